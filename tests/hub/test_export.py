"""Round trips out of the hub: Hugging Face folders that ``transformers`` loads with the
same logits, GGUF files that the ``gguf`` package reads and folklm re-imports unchanged."""

from __future__ import annotations

import json
import os

import gguf
import pytest
import torch
from hubtest import SESSION_HOME

import folklm
from folklm.checkpoint.gguf import read_gguf
from folklm.checkpoint.gguf_writer import PROBES
from folklm.checkpoint.hf import read_weights
from folklm.export import export
from folklm.hub import api
from folklm.hub.defaults import DEFAULT_NAME, default_model_folder
from folklm.tokenizer import Tokenizer

CHAT = [{"role": "user", "content": "What is the capital of France?"}]


def hf_logits(folder, ids):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.inference_mode():
        return model(torch.tensor([ids])).logits


def gguf_string(reader: gguf.GGUFReader, key: str) -> str:
    return bytes(reader.fields[key].parts[-1]).decode()


@pytest.mark.filterwarnings("ignore:no licence found")
def test_hf_folder_import_export_loads_in_transformers_with_equal_logits(
    home, tiny_models, tmp_path
):
    from transformers import AutoTokenizer

    model, folder = tiny_models("llama")
    api.import_path(folder, "tiny")
    out = export("tiny", tmp_path / "out", "hf")
    assert {p.name for p in folder.iterdir()} | {"README.md"} == {p.name for p in out.iterdir()}
    assert not any(p.is_symlink() for p in out.iterdir())  # real files, not links to blobs
    text = "t5 t9 t17 t3 t64"
    ids = AutoTokenizer.from_pretrained(out)(text)["input_ids"]
    assert ids == AutoTokenizer.from_pretrained(folder)(text)["input_ids"]
    with torch.inference_mode():
        want = model(torch.tensor([ids])).logits
    torch.testing.assert_close(hf_logits(out, ids), want, atol=0, rtol=0)
    assert (out / "README.md").read_text().startswith("---\nlicense: ")


def test_gguf_entry_exports_a_folder_transformers_loads(home, bpe_models, tmp_path):
    """HF -> GGUF (writer) -> hub -> HF (dequantized folder): transformers agrees."""
    from transformers import AutoTokenizer

    folder = bpe_models("qwen2")
    api.import_path(folder, "q", license="apache-2.0")
    gguf_file = export("q", tmp_path / "g", "gguf")
    api.import_path(gguf_file, "q-gguf")
    assert api.show("q-gguf").license["expression"] == "apache-2.0"  # from general.license
    out = export("q-gguf", tmp_path / "hf", "hf")
    text = "Now is the winter of our discontent 1234"
    ids = AutoTokenizer.from_pretrained(out)(text)["input_ids"]
    assert ids == AutoTokenizer.from_pretrained(folder)(text)["input_ids"]
    torch.testing.assert_close(hf_logits(out, ids), hf_logits(folder, ids), atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def session_home():
    """The session's FOLK_HOME, where the bundled model is converted and registered once."""
    saved = os.environ["FOLK_HOME"]
    os.environ["FOLK_HOME"] = SESSION_HOME
    try:
        default_model_folder()
        yield SESSION_HOME
    finally:
        os.environ["FOLK_HOME"] = saved


@pytest.mark.slow
def test_default_model_exports_to_gguf_with_identical_tensors_and_tokenizer(session_home, tmp_path):
    folder = api.resolve_model(DEFAULT_NAME)
    path = export(DEFAULT_NAME, tmp_path / "smollm2.gguf", "gguf", dtype="f32")
    ckpt = read_gguf(path)
    tensors = read_weights(folder)
    assert set(ckpt.tensors) == set(tensors)
    for name, t in tensors.items():
        assert torch.equal(ckpt.tensors[name], t), name
    ours, back = Tokenizer.from_folder(folder), Tokenizer(ckpt.tokenizer, ckpt.tokenizer_config)
    for text in PROBES:
        assert back.encode(text) == ours.encode(text)
    assert back.encode_chat(CHAT) == ours.encode_chat(CHAT)
    reader = gguf.GGUFReader(path)
    assert gguf_string(reader, "general.license") == "apache-2.0"
    lineage = json.loads(gguf_string(reader, "folklm.lineage"))
    assert lineage["name"] == f"{DEFAULT_NAME}:latest" and lineage["operation"] == "import"


@pytest.mark.slow
def test_default_gguf_import_export_reimport_keeps_logits(session_home, default_gguf, tmp_path):
    api.import_path(default_gguf, "smollm2-test:q4_1")
    entry = api.show("smollm2-test:q4_1")
    assert entry.quantization == "Q4_1" and entry.license["expression"] == "apache-2.0"
    out = export("smollm2-test:q4_1", tmp_path, "gguf")
    assert out.name == "smollm2-test-q4_1.gguf"
    original, exported = gguf.GGUFReader(default_gguf), gguf.GGUFReader(out)
    for a, b in zip(original.tensors, exported.tensors, strict=True):  # quantized blocks as-is
        assert a.name == b.name and a.tensor_type == b.tensor_type
        assert a.data.tobytes() == b.data.tobytes()
    assert gguf_string(exported, "general.license") == "apache-2.0"
    assert gguf_string(exported, "folklm.content_hash") == f"sha256:{entry.digest}"
    again = api.import_path(out, "smollm2-test:reimported")
    assert again.source["embedded_content_hash"] == f"sha256:{entry.digest}"
    assert again.license["expression"] == "apache-2.0"
    a = folklm.load("smollm2-test:q4_1", fast=False, dtype="float32")
    b = folklm.load("smollm2-test:reimported", fast=False, dtype="float32")
    ids = torch.tensor([a.tokenizer.encode_chat(CHAT)])
    assert b.tokenizer.encode_chat(CHAT) == ids[0].tolist()
    with torch.inference_mode():
        assert torch.equal(a.model(ids), b.model(ids))
    api.remove_many(["smollm2-test:q4_1", "smollm2-test:reimported"])
