"""Hugging Face folder loading: formats, memory mapping, and one-line errors for bad input."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

import folklm
from folklm.checkpoint.safetensors_io import load_safetensors
from folklm.errors import CheckpointError, ConfigError


def copy_model(folder, tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(folder, dst)
    return dst


def test_weights_are_memory_mapped_not_copied(tiny_models):
    _, folder = tiny_models("llama")
    llm = folklm.load(folder, dtype="float32")
    file_size = (folder / "model.safetensors").stat().st_size
    storages = {p.untyped_storage().data_ptr() for p in llm.model.parameters()}
    # every parameter is a view into the one mapping of the file
    assert len(storages) == 1
    assert next(llm.model.parameters()).untyped_storage().nbytes() == file_size


def test_sharded_checkpoint(tiny_models, tmp_path):
    hf, folder = tiny_models("qwen2")
    dst = copy_model(folder, tmp_path)
    (dst / "model.safetensors").unlink()
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    names = sorted(state)
    shards = {
        "model-00001-of-00002.safetensors": names[::2],
        "model-00002-of-00002.safetensors": names[1::2],
    }
    weight_map = {}
    for shard, keys in shards.items():
        save_file({k: state[k] for k in keys}, str(dst / shard))
        weight_map.update(dict.fromkeys(keys, shard))
    (dst / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    ids = torch.randint(3, 128, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(
            folklm.load(dst, dtype="float32").model(ids), hf(ids).logits, atol=1e-4, rtol=1e-4
        )


def test_pickled_weights_refused_unless_allowed(tiny_models, tmp_path):
    hf, folder = tiny_models("llama")
    dst = copy_model(folder, tmp_path)
    (dst / "model.safetensors").unlink()
    torch.save(hf.state_dict(), dst / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pickle") as err:
        folklm.load(dst)
    assert "\n" not in str(err.value)
    llm = folklm.load(dst, dtype="float32", allow_pickle=True)
    ids = torch.randint(3, 128, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(llm.model(ids), hf(ids).logits, atol=1e-4, rtol=1e-4)


def test_pickle_with_code_is_not_executed(tmp_path, tiny_models):
    _, folder = tiny_models("llama")
    dst = copy_model(folder, tmp_path)
    (dst / "model.safetensors").unlink()
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    import pickle

    with open(dst / "pytorch_model.bin", "wb") as f:
        pickle.dump({"x": Evil()}, f)
    with pytest.raises(CheckpointError):
        folklm.load(dst, allow_pickle=True)
    assert not marker.exists()


def test_truncated_safetensors(tiny_models, tmp_path):
    _, folder = tiny_models("llama")
    dst = copy_model(folder, tmp_path)
    path = dst / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated") as err:
        folklm.load(dst)
    assert str(path) in str(err.value)
    path.write_bytes(data[:5])
    with pytest.raises(CheckpointError, match="truncated"):
        load_safetensors(path)


def test_missing_tensor_and_shape_mismatch(tiny_models, tmp_path):
    hf, folder = tiny_models("llama")
    dst = copy_model(folder, tmp_path)
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    name = "model.layers.1.mlp.down_proj.weight"
    save_file({k: v for k, v in state.items() if k != name}, str(dst / "model.safetensors"))
    with pytest.raises(CheckpointError, match=name):
        folklm.load(dst)
    state[name] = torch.zeros(3, 3)
    save_file(state, str(dst / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"shape \(3, 3\)"):
        folklm.load(dst)


def test_unsupported_architecture_lists_supported(tiny_models, tmp_path):
    _, folder = tiny_models("llama")
    dst = copy_model(folder, tmp_path)
    config = json.loads((dst / "config.json").read_text())
    config["model_type"] = "gpt_neox"
    (dst / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="gpt_neox.*llama, mistral, mixtral, qwen2"):
        folklm.load(dst)


def test_missing_folder_and_non_model_file(tmp_path):
    with pytest.raises(CheckpointError, match="no such file or folder"):
        folklm.load(tmp_path / "nope")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(CheckpointError, match="not a model"):
        folklm.load(tmp_path / "notes.txt")
    with pytest.raises(CheckpointError, match="no config.json"):
        folklm.load(tmp_path)


def test_save_folder_round_trip(tiny_models, tmp_path):
    from folklm.checkpoint.hf import save_folder

    _, folder = tiny_models("mixtral")
    llm = folklm.load(folder, dtype="float32")
    out = save_folder(
        tmp_path / "copy",
        llm.config,
        llm.model.state_dict(),
        llm.tokenizer.files(),
        llm.generation_config,
    )
    again = folklm.load(out, dtype="float32")
    ids = torch.randint(3, 128, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(again.model(ids), llm.model(ids))
    assert again.tokenizer.encode("t5 t7") == [5, 7]
