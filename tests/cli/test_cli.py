"""The ``folk`` command as a user runs it: a real subprocess, real files, exit codes."""

from __future__ import annotations

import json
import struct

import pytest
from clitest import assert_one_line_error, folk


def test_run_streams_text_and_json(tiny_models):
    _, folder = tiny_models("llama")
    proc = folk("run", str(folder), "t5 t6 t7", "-n", "6", "--no-chat")
    assert proc.returncode == 0, proc.stderr
    words = proc.stdout.split()
    assert len(words) == 6 and all(w.startswith("t") for w in words)
    proc = folk("run", str(folder), "t5 t6 t7", "-n", "6", "--no-chat", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["text"].split() == words  # greedy: the same text both times
    assert out["prompt_tokens"] == 3 and out["completion_tokens"] == 6
    for key in ("prefill_tokens_per_s", "decode_tokens_per_s", "load_seconds"):
        assert out[key] > 0


@pytest.mark.slow  # several folk run subprocesses
def test_run_stop_string_and_seed(tiny_models):
    _, folder = tiny_models("qwen2")
    base = folk("run", str(folder), "t9 t3", "-n", "8", "--no-chat", "--json")
    text = json.loads(base.stdout)["text"]
    stop_word = text.split()[3]
    cut = json.loads(
        folk(
            "run", str(folder), "t9 t3", "-n", "8", "--no-chat", "--json", "--stop", stop_word
        ).stdout
    )["text"]
    assert cut == text[: text.index(stop_word)]
    seeded = [
        json.loads(
            folk(
                "run",
                str(folder),
                "t9 t3",
                "-n",
                "8",
                "--no-chat",
                "--json",
                "-t",
                "1.5",
                "--seed",
                str(s),
            ).stdout
        )["text"]
        for s in (7, 7, 8)
    ]
    assert seeded[0] == seeded[1]


@pytest.mark.parametrize(
    "args, words",
    [
        (["run", "/no/such/folder", "hi"], ["/no/such/folder"]),
        (["run", "--max-tokens", "-1", "hi"], ["--max-tokens", "-1"]),
        (["run", "   "], ["empty prompt"]),
        (["run", "--top-p", "0", "hi"], ["--top-p"]),
        (["run", "--presence-penalty", "5", "hi"], ["--presence-penalty", "5"]),
        (["run", "--temperature", "-1", "hi"], ["--temperature", "-1"]),
        (["run", "--dtype", "int3", "hi"], ["--dtype"]),
        (["chat", "/no/such/model.gguf"], ["/no/such/model.gguf"]),
    ],
)
def test_bad_input_gives_one_line_error(args, words):
    assert_one_line_error(folk(*args), *words)


def test_bad_model_files(tiny_models, tmp_path):
    _, folder = tiny_models("llama")
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in folder.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 3])
    assert_one_line_error(folk("run", str(bad), "t1"), "truncated", "model.safetensors")

    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "falcon"
    (bad / "model.safetensors").write_bytes(data)
    (bad / "config.json").write_text(json.dumps(config))
    assert_one_line_error(folk("run", str(bad), "t1"), "falcon", "llama, mistral, mixtral, qwen2")

    gguf = tmp_path / "fake.gguf"
    gguf.write_bytes(b"GGML" + struct.pack("<I", 3) + b"\0" * 64)
    assert_one_line_error(folk("run", str(gguf), "hi"), "fake.gguf")


def test_chat_refuses_a_model_without_chat_template(tiny_models):
    # (history and /reset through the real `folk chat`: tests/engine/test_repl.py)
    _, folder = tiny_models("llama")
    # The tiny tokenizer has no chat template: chat refuses with a clear error.
    assert_one_line_error(folk("chat", str(folder)), "no chat template")


def test_help_explains_commands():
    proc = folk("--help")
    assert proc.returncode == 0
    assert "run" in proc.stdout and "chat" in proc.stdout
    proc = folk("run", "--help")
    for flag in ("--temperature", "--top-p", "--min-p", "--stop", "--json", "--chat"):
        assert flag in proc.stdout
