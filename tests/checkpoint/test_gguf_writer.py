"""The GGUF writer (folklm.checkpoint.gguf_writer) against the reader and llama.cpp's own
conventions: tiny random models of every family round-trip through a GGUF file with
identical tensors, tokenizer ids and logits; real llama.cpp vocabularies round-trip with
their reference tokenizations."""

from __future__ import annotations

import os
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

import folklm
from folklm.checkpoint.gguf import read_gguf, read_gguf_tokenizer, unpermute_rope
from folklm.checkpoint.gguf_writer import PROBES, permute_rope, tokenizer_metadata, write_gguf
from folklm.checkpoint.hf import read_config, read_generation_config, read_weights
from folklm.errors import CheckpointError
from folklm.tokenizer import Tokenizer

SEPARATOR = "\n__ggml_vocab_test__\n"


def llama_cpp_permute(weights: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """``LlamaModel.permute`` from llama.cpp's convert_hf_to_gguf.py, verbatim in numpy."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


@pytest.mark.parametrize(("rows", "cols", "heads"), [(64, 32, 4), (48, 16, 3), (32, 1, 2)])
def test_permutation_is_llama_cpps_and_the_reader_undoes_it(rows, cols, heads):
    w = torch.randn(rows, cols).squeeze(-1) if cols == 1 else torch.randn(rows, cols)
    ours = permute_rope(w, heads)
    ref = llama_cpp_permute(w.numpy(), heads, None)
    np.testing.assert_array_equal(ours.numpy(), ref)
    assert torch.equal(unpermute_rope(ours, heads), w)


def write(folder: Path, out: Path, **kwargs) -> Path:
    config = read_config(folder)
    return write_gguf(
        out,
        config.to_dict(),
        read_weights(folder),
        Tokenizer.from_folder(folder),
        read_generation_config(folder),
        **kwargs,
    )


@pytest.mark.parametrize("family", ["llama", "llama_tied", "qwen2", "mixtral"])
def test_round_trip_is_exact(bpe_models, tmp_path, family):
    folder = bpe_models(family)
    path = write(folder, tmp_path / "m.gguf", metadata={"general.license": "mit"})
    ckpt = read_gguf(path)
    tensors = read_weights(folder)
    assert set(ckpt.tensors) == set(tensors)
    for name, t in tensors.items():
        assert torch.equal(ckpt.tensors[name], t), name
    config = read_config(folder).to_dict()
    for key in ("num_hidden_layers", "num_key_value_heads", "rope_theta", "tie_word_embeddings",
                "num_local_experts", "rope_scaling", "vocab_size"):  # fmt: skip
        assert ckpt.config.get(key) == config.get(key), key
    ours, theirs = Tokenizer.from_folder(folder), Tokenizer(ckpt.tokenizer, ckpt.tokenizer_config)
    for text in PROBES:
        assert theirs.encode(text) == ours.encode(text)
    chat = [{"role": "user", "content": "Who art thou? 42"}]
    assert theirs.encode_chat(chat) == ours.encode_chat(chat)
    # llama.cpp's own reader sees the architecture, the tensors and the metadata.
    reader = gguf.GGUFReader(path)
    arch = bytes(reader.fields["general.architecture"].parts[-1]).decode()
    assert arch == ("qwen2" if family == "qwen2" else "llama")
    assert bytes(reader.fields["general.license"].parts[-1]).decode() == "mit"
    assert int(reader.fields["general.file_type"].parts[-1][0]) == gguf.LlamaFileType.ALL_F32
    a, b = folklm.load(str(folder)), folklm.load(str(path))
    ids = torch.tensor([ours.encode("To be, or not to be: that is the question.")])
    with torch.inference_mode():
        assert torch.equal(a.model(ids), b.model(ids))


def test_half_precision_rounds_like_torch(bpe_models, tmp_path):
    folder = bpe_models("llama")
    tensors = read_weights(folder)
    for dtype, torch_dtype, ftype in (
        ("f16", torch.float16, gguf.LlamaFileType.MOSTLY_F16),
        ("bf16", torch.bfloat16, gguf.LlamaFileType.MOSTLY_BF16),
    ):
        path = write(folder, tmp_path / f"{dtype}.gguf", dtype=dtype)
        ckpt = read_gguf(path)
        for name, t in tensors.items():
            want = t if t.dim() == 1 else t.to(torch_dtype).float()  # norms stay F32
            assert torch.equal(ckpt.tensors[name], want), (dtype, name)
        reader = gguf.GGUFReader(path)
        assert int(reader.fields["general.file_type"].parts[-1][0]) == ftype
        assert reader.tensors[0].tensor_type.name in ("F16", "BF16", "F32")


def test_atomic_write_leaves_no_partial_file(bpe_models, tmp_path):
    folder = bpe_models("llama")
    with pytest.raises(CheckpointError, match="unknown GGUF dtype"):
        write(folder, tmp_path / "bad.gguf", dtype="q3_k")
    assert list(tmp_path.iterdir()) == []


def test_word_level_tokenizer_is_refused(tiny_models, tmp_path):
    _, folder = tiny_models("llama")
    with pytest.raises(CheckpointError, match="cannot store a WordLevel tokenizer in GGUF"):
        write(folder, tmp_path / "x.gguf")
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def vocab_dir() -> Path:
    path = Path(os.environ.get("FOLK_TEST_VOCAB_DIR", ""))
    if not (path / "ggml-vocab-llama-spm.gguf").is_file():
        pytest.skip("no llama.cpp vocab files (run tests/data/fetch_vocab.sh DIR)")
    return path


@pytest.mark.parametrize("name", ["llama-spm", "gpt-2", "starcoder"])
def test_real_vocabularies_round_trip_with_reference_tokenizations(vocab_dir, tmp_path, name):
    src = vocab_dir / f"ggml-vocab-{name}.gguf"
    hf, config = read_gguf_tokenizer(src)
    meta = tokenizer_metadata(Tokenizer(hf, config), {})
    out = tmp_path / "vocab.gguf"
    writer = gguf.GGUFWriter(out, "llama")
    from folklm.checkpoint.gguf_writer import _add_metadata

    _add_metadata(writer, meta)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    rebuilt, rebuilt_config = read_gguf_tokenizer(out)
    assert rebuilt_config == config
    texts = src.with_name(src.name + ".inp").read_text("utf-8").split(SEPARATOR)[:-1]
    lines = src.with_name(src.name + ".out").read_text("utf-8").split("\n")[:-1]
    for text, line in zip(texts, lines, strict=True):
        assert rebuilt.encode(text, add_special_tokens=False).ids == [int(i) for i in line.split()]
