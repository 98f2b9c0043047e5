"""``folk pull ollama:`` against a local registry (``registries.FakeOllama``), ``folk
import ollama:NAME`` from an Ollama store, and ``folk export --format ollama`` read back by
that import and checked with the official ``ollama`` client's request models."""

from __future__ import annotations

import hashlib
import json
import os
import re

import pytest
from hubtest import assert_one_line_error, folk
from ollama._types import CreateRequest, Options
from registries import FakeOllama, pull_json, tiny_gguf

from folklm.hub import api

APACHE = "Apache License\nVersion 2.0, January 2004\nhttp://www.apache.org/licenses/\n"
TEMPLATE = "{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}<|im_start|>"
PARAMS = '{"stop":["<|im_start|>","<|im_end|>"],"temperature":0.2}'


@pytest.fixture
def registry(home, tmp_path, monkeypatch):
    """A registry with ``tiny:1b`` (GGUF without a licence of its own + template, params,
    an Apache-2.0 licence layer) and a private ``team/secret``; blobs come from its CDN."""
    server = FakeOllama(cdn=True)
    gguf = tiny_gguf(tmp_path / "t.gguf", license=None).read_bytes()
    server.add("tiny:1b", gguf, {"template": TEMPLATE, "params": PARAMS, "license": APACHE})
    server.add("team/secret", gguf, {"license": "mit"})
    server.private.add("team/secret")
    monkeypatch.setenv("FOLK_OLLAMA_REGISTRY", server.url)
    monkeypatch.delenv("FOLK_OLLAMA_TOKEN", raising=False)
    yield server
    server.close()


def gguf_digest(registry: FakeOllama, name: str = "library/tiny:1b") -> str:
    manifest = json.loads(registry.manifests[name])
    (layer,) = [x for x in manifest["layers"] if x["mediaType"].endswith(".model")]
    return layer["digest"]


def test_pull_ollama_imports_gguf_template_params_and_licence(registry, home):
    out = pull_json("ollama:tiny:1b")
    entry = out["entry"]
    assert entry["name"] == "tiny:1b" and entry["format"] == "gguf"
    assert entry["files"][0]["sha256"] == gguf_digest(registry).removeprefix("sha256:")
    assert entry["license"]["expression"] == "apache-2.0"
    assert "Ollama licence layer" in entry["license"]["source"]
    src = entry["source"]
    raw = registry.manifests["library/tiny:1b"]
    assert src["manifest_digest"] == "sha256:" + hashlib.sha256(raw).hexdigest()
    assert src["url"] == f"{registry.url}/v2/library/tiny/manifests/1b"
    texts = {x["mediaType"].rsplit(".", 1)[-1]: x.get("text") for x in src["layers"]}
    assert texts == {"model": None, "template": TEMPLATE, "params": PARAMS, "license": APACHE}
    accepts = [a for m, p, a in registry.log if "/manifests/" in p]
    assert accepts == ["application/vnd.docker.distribution.manifest.v2+json"]
    assert not list((home / "downloads").glob("*.partial"))  # the download moved into the hub


def test_pull_ollama_resumes_and_refuses_a_corrupted_blob(registry, home, tmp_path):
    digest = gguf_digest(registry)
    size = len(registry.blobs[digest])
    registry.faults.corrupt.add(digest)
    proc = folk("pull", "ollama:tiny:1b")
    assert_one_line_error(proc, "ollama:tiny:1b", digest[:19], "refused")
    assert api.list_models() == [] and not list((home / "hub/blobs").glob("*"))
    assert not list((home / "downloads").glob("*.partial"))  # the bad bytes are not resumed from
    registry.faults.corrupt.clear()
    registry.faults.drop.add(digest)  # half, then the connection closes: resumed in-process
    out = pull_json("ollama:tiny:1b")
    ranges = [r for m, p, r in registry.log if p.endswith(digest) and r]
    assert ranges == [f"bytes={size // 2}-"]
    (t,) = [t for t in out["transfers"] if t["file"] == digest]
    assert t["size"] == size


def test_pull_ollama_resumes_what_an_earlier_process_left(registry, home):
    digest = gguf_digest(registry)
    data = registry.blobs[digest]
    partial = home / "downloads" / f"{digest.replace(':', '-')}.partial"
    partial.parent.mkdir(parents=True)
    partial.write_bytes(data[:100])
    out = pull_json("ollama:tiny:1b")
    assert [r for m, p, r in registry.log if p.endswith(digest)] == ["bytes=100-"]
    (t,) = [t for t in out["transfers"] if t["file"] == digest]
    assert t["resumed_from"] == 100 and t["fetched"] == len(data) - 100


def test_private_registry_needs_its_token(registry, home):
    proc = folk("pull", "ollama:team/secret")
    assert_one_line_error(proc, "ollama:team/secret", "401", "FOLK_OLLAMA_TOKEN")
    out = pull_json("ollama:team/secret", env={"FOLK_OLLAMA_TOKEN": registry.token})
    assert out["entry"]["name"] == "team-secret:latest"
    # the blobs came through the CDN redirect, and the token stayed with the registry
    assert registry.cdn_log and not any("Authorization" in h for h in registry.cdn_log)
    assert out["entry"]["license"]["expression"] == "mit"
    proc = folk("pull", "ollama:nope", "--registry", registry.url)
    assert_one_line_error(proc, "ollama:nope:latest", "404")


def test_export_to_an_ollama_store_reads_back_byte_identical(registry, home, tmp_path):
    pulled = pull_json("ollama:tiny:1b")["entry"]
    store = tmp_path / "ollama-models"
    proc = folk("export", "tiny:1b", "--format", "ollama", "--store", str(store), "--json")
    assert proc.returncode == 0, proc.stderr
    manifest_path = store / "manifests/registry.ollama.ai/library/tiny/1b"
    assert json.loads(proc.stdout)["manifest"] == str(manifest_path)
    ours = json.loads(manifest_path.read_text())
    theirs = json.loads(registry.manifests["library/tiny:1b"])
    # every layer the registry served is written back with the same bytes
    assert {x["digest"] for x in ours["layers"]} == {x["digest"] for x in theirs["layers"]}
    for layer in ours["layers"] + [ours["config"]]:
        blob = store / "blobs" / layer["digest"].replace(":", "-")
        assert "sha256:" + hashlib.sha256(blob.read_bytes()).hexdigest() == layer["digest"]
        assert blob.stat().st_size == layer["size"]
    proc = folk("import", "ollama:tiny:1b", "--ollama-models", str(store), "-n", "back", "--json")
    assert proc.returncode == 0, proc.stderr
    back = json.loads(proc.stdout)
    assert back["digest"] == pulled["digest"]  # identical bytes
    assert back["license"]["expression"] == "apache-2.0"
    assert set(back["placed"].values()) <= {"reflink", "hardlink"}
    assert back["source"]["origin"] == "ollama-store"


def test_import_from_an_ollama_store_refuses_a_tampered_blob(registry, home, tmp_path):
    pull_json("ollama:tiny:1b")
    store = tmp_path / "store"
    assert folk("export", "tiny:1b", "--format", "ollama", "--store", str(store)).returncode == 0
    blob = store / "blobs" / gguf_digest(registry).replace(":", "-")
    data = bytearray(blob.read_bytes())
    blob.unlink()  # may be a hard link to the hub's own blob: replace, never edit in place
    data[-1] ^= 0xFF
    blob.write_bytes(bytes(data))
    proc = folk("import", "ollama:tiny:1b", "--ollama-models", str(store), "-n", "bad")
    assert_one_line_error(proc, "ollama:tiny:1b", "sha256", "refused")
    assert "bad:latest" not in {r["name"] for r in api.list_models()}
    proc = folk("import", "ollama:absent", "--ollama-models", str(store))
    assert_one_line_error(proc, "ollama:absent:latest", "not in the Ollama store")


def parse_modelfile(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, argument) pairs, by the grammar of Ollama's docs/modelfile.md:
    an argument is \"\"\"...\"\"\" (may span lines), "..." (JSON escapes) or bare."""
    out = []
    pattern = re.compile(r'(\w+)[ \t]+(?:"""(.*?)"""|("(?:[^"\\]|\\.)*")|([^\n]*))', re.S)
    pos = 0
    while pos < len(text):
        if text[pos] in "\n \t":
            pos += 1
            continue
        if text[pos] == "#":
            pos = text.find("\n", pos) + 1 or len(text)
            continue
        m = pattern.match(text, pos)
        assert m, text[pos : pos + 40]
        triple, quoted, bare = m.group(2), m.group(3), m.group(4)
        arg = triple if triple is not None else json.loads(quoted) if quoted else bare.strip()
        out.append((m.group(1).upper(), arg))
        pos = m.end()
    return out


def test_modelfile_export_is_a_valid_create_request(home, tmp_path):
    gguf = tiny_gguf(tmp_path / "tiny.gguf")  # ChatML chat template, EOS <|im_end|>
    api.import_path(gguf, "chatml")
    out = tmp_path / "modelfile"
    proc = folk("export", "chatml", str(out), "--format", "ollama", "--json")
    assert proc.returncode == 0, proc.stderr
    pairs = parse_modelfile((out / "Modelfile").read_text())
    kinds = [k for k, _ in pairs]
    assert kinds[0] == "FROM" and set(kinds) <= {"FROM", "TEMPLATE", "PARAMETER", "LICENSE"}
    weights = out / pairs[0][1]
    assert weights.read_bytes() == gguf.read_bytes()
    params: dict = {}
    for k, v in pairs:
        if k == "PARAMETER":
            key, _, value = v.partition(" ")
            value = json.loads(value)
            if key == "stop":
                params.setdefault("stop", []).append(value)
            else:
                params[key] = value
    assert set(params) <= set(Options.model_fields)  # only options Ollama knows
    sha = "sha256:" + hashlib.sha256(weights.read_bytes()).hexdigest()
    request = CreateRequest(
        model="chatml",
        files={weights.name: sha},
        template=dict(pairs)["TEMPLATE"],
        license=[v for k, v in pairs if k == "LICENSE"],
        parameters=Options(**params),
    )
    body = request.model_dump(exclude_none=True)  # what `ollama create` would POST
    assert body["parameters"]["stop"] == ["<|im_start|>", "<|im_end|>"]
    assert body["license"] == ["apache-2.0"]
    assert "{{ range .Messages }}" in body["template"].replace("{{- range", "{{ range")
    assert body["files"] == {"chatml.gguf": sha}
    # the same model into a store: its params blob is the JSON of the same options
    store = tmp_path / "store"
    assert folk("export", "chatml", "--format", "ollama", "--store", str(store)).returncode == 0
    manifest = json.loads(
        (store / "manifests/registry.ollama.ai/library/chatml/latest").read_text()
    )
    blobs = {x["mediaType"].rsplit(".", 1)[-1]: x["digest"] for x in manifest["layers"]}
    stored = json.loads((store / "blobs" / blobs["params"].replace(":", "-")).read_text())
    assert Options(**stored).model_dump(exclude_none=True) == body["parameters"]
    template = (store / "blobs" / blobs["template"].replace(":", "-")).read_text()
    assert template == body["template"]
    assert os.path.exists(store / "blobs" / sha.replace(":", "-"))


def test_export_ollama_errors_are_one_line(home, tmp_path):
    api.import_path(tiny_gguf(tmp_path / "t.gguf"), "t")
    proc = folk("export", "t", "--format", "ollama")
    assert_one_line_error(proc, "--format ollama", "--store")
    proc = folk("export", "t", str(tmp_path / "x"), "--format", "gguf", "--store", str(tmp_path))
    assert_one_line_error(proc, "--store is for --format ollama")


def test_go_template_families():
    from folklm.export.gotemplate import go_template

    template, stops, family = go_template("<|im_start|>x<|im_end|>")
    assert family == "chatml" and stops == ["<|im_start|>", "<|im_end|>"]
    assert template is not None and template.endswith("<|im_start|>assistant\n")
    assert go_template("{{ bos_token }}<|start_header_id|>x<|eot_id|>")[2] == "llama3"
    assert go_template("{% for m in messages %}{{ m.content }}{% endfor %}") == (None, [], None)


def test_hf_entry_exports_to_ollama_with_the_gguf_export(home, bpe_models, tmp_path):
    from folklm.export import export, export_report

    api.import_path(bpe_models("qwen2"), "q", license="apache-2.0")
    report = export_report("q", tmp_path / "m", "ollama")
    gguf = export("q", tmp_path / "g", "gguf")
    assert (tmp_path / "m" / "q.gguf").read_bytes() == gguf.read_bytes()
    pairs = parse_modelfile((tmp_path / "m" / "Modelfile").read_text())
    assert pairs[0] == ("FROM", "./q.gguf") and ("LICENSE", "apache-2.0") in pairs
    assert report["modelfile"] == str(tmp_path / "m" / "Modelfile")


# The chat templates these families publish in tokenizer_config.json (Llama 3 Instruct,
# Gemma 2 it, Phi-3 mini instruct, Mistral 7B Instruct v0.1); SmolLM2's is read from the
# bundled model itself.
JINJA = {
    "llama3": "{% set loop_messages = messages %}{% for message in loop_messages %}{% set "
    "content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ "
    "message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = "
    "bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}",
    "gemma": "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception("
    "'System role not supported') }}{% endif %}{% for message in messages %}{% if "
    "(message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation"
    " roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if "
    "(message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = "
    "message['role'] %}{% endif %}{{ '<start_of_turn>' + role + '\\n' + message['content'] | "
    "trim + '<end_of_turn>\\n' }}{% endfor %}{% if add_generation_prompt %}"
    "{{'<start_of_turn>model\\n'}}{% endif %}",
    "phi3": "{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\\n'"
    " + message['content'] + '<|end|>\\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\\n'"
    " + message['content'] + '<|end|>\\n'}}{% elif message['role'] == 'assistant' %}"
    "{{'<|assistant|>\\n' + message['content'] + '<|end|>\\n'}}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% else %}{{ eos_token }}{% endif %}",
    "mistral": "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') "
    "!= (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate "
    "user/assistant/user/assistant/...') }}{% endif %}{% if message['role'] == 'user' %}"
    "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ message['content'] + eos_token}}{% else %}{{ raise_exception('Only user and assistant "
    "roles are supported!') }}{% endif %}{% endfor %}",
}


def test_go_templates_render_as_the_jinja_templates_they_replace(default_gguf):
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    from folklm.checkpoint.gguf_reader import open_gguf, read_metadata
    from folklm.export.gotemplate import default_system, go_template, render

    def raise_exception(message: str) -> None:
        raise ValueError(message)

    templates = dict(JINJA)
    smollm2 = read_metadata(open_gguf(default_gguf))["tokenizer.chat_template"]
    templates["chatml"] = smollm2
    chat = [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4."},
        {"role": "user", "content": "And 3+3?"},
    ]
    with_system = [{"role": "system", "content": "Be terse."}, *chat]
    for family, jinja in templates.items():
        template, stops, found = go_template(jinja)
        assert found == family and template is not None and stops
        env = ImmutableSandboxedEnvironment()
        env.globals["raise_exception"] = raise_exception
        # Gemma and Mistral have no system role; SmolLM2 without one: checked below
        conversations = {"gemma": [chat], "mistral": [chat], "chatml": [with_system]}
        for messages in conversations.get(family, [chat, with_system]):
            # BOS is added by llama.cpp as a token, not by Ollama's template
            want = env.from_string(jinja).render(
                messages=messages, add_generation_prompt=True, bos_token="", eos_token="</s>"
            )
            assert render(template, messages) == want, family
    # SmolLM2 adds a system message to a conversation without one: it becomes SYSTEM, which
    # Ollama puts first in .Messages when a request has no system message of its own
    system = default_system(smollm2, go_template(smollm2)[0])
    assert system == "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    want = (
        ImmutableSandboxedEnvironment()
        .from_string(smollm2)
        .render(messages=chat, add_generation_prompt=True)
    )
    assert render(go_template(smollm2)[0], [{"role": "system", "content": system}, *chat]) == want
    assert default_system(JINJA["llama3"], go_template(JINJA["llama3"])[0]) is None
