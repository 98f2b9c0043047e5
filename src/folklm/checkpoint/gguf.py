"""Load a llama.cpp GGUF file as a Hugging Face-style checkpoint.

GGUF (spec: ``docs/gguf.md`` in github.com/ggml-org/ggml) is one little-endian file: a header,
typed key/value metadata (``general.*``, ``<arch>.*`` hyper-parameters, ``tokenizer.*``),
tensor infos (name, GGML dims ``ne`` innermost first, encoding, offset) and the aligned tensor
data. :func:`read_gguf` turns one into what the rest of folklm reads from a Hugging Face
folder: a ``config.json`` dict, tensors under HF parameter names, a ``tokenizers.Tokenizer``,
a ``tokenizer_config`` and a ``generation_config``.

What the conversion undoes (see llama.cpp ``convert_hf_to_gguf.py``):

* names: ``blk.N.attn_q.weight`` -> ``model.layers.N.self_attn.q_proj.weight`` and so on;
  Mixtral's stacked ``ffn_*_exps`` tensors are split per expert (``w1`` gate, ``w2`` down,
  ``w3`` up);
* shapes: GGML lists dims innermost first, so the row-major shape is ``reversed(ne)``;
* RoPE layout: for arch ``llama`` the converter permutes the rows of q/k from HF's "rotate
  half" order to GGML's interleaved pairs (``LlamaModel.permute``); :func:`unpermute_rope`
  inverts it. Qwen2 is stored unpermuted;
* Llama 3.1 RoPE scaling, stored as a ``rope_freqs.weight`` tensor of per-frequency factors,
  is turned back into the ``rope_scaling`` dict of ``config.json``.

The file is read with ``gguf.GGUFReader`` (memory-mapped); tensors are dequantized by
:mod:`folklm.checkpoint.gguf_quants`, or, with ``keep_quantized=True``, quantized 2-D weights
stay as their memory-mapped blocks (:class:`folklm.kernels.gguf_linear.GGUFTensor`) for the
native kernels; the q/k row permutation is then recorded as a row order, not applied.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from math import prod
from pathlib import Path
from typing import Any

import gguf
import torch
from tokenizers import Tokenizer

from folklm.checkpoint.gguf_config import config_from_metadata, generation_config
from folklm.checkpoint.gguf_quants import BLOCK_SIZES, dequantize
from folklm.checkpoint.gguf_reader import GGUFFileError, open_gguf, read_metadata
from folklm.checkpoint.gguf_tokenizer import TokenizerMetadataError, build_tokenizer
from folklm.errors import CheckpointError
from folklm.kernels.gguf_linear import BLOCKS as QUANTIZED_BLOCKS
from folklm.kernels.gguf_linear import GGUFTensor

__all__ = ["GGUFCheckpoint", "dequantize", "read_gguf", "read_gguf_tokenizer", "unpermute_rope"]

# GGUF name inside ``blk.N.`` -> HF name inside ``model.layers.N.``
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.bias": "self_attn.o_proj.bias",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "ffn_gate_inp.weight": "block_sparse_moe.gate.weight",
}
# Gemma 2/3 (and OLMo 2) keep a norm after attention and around the feed-forward; llama.cpp
# calls the one before the feed-forward ``ffn_norm`` in every family.
_SANDWICH_NAMES = {
    **{g: hf for g, hf in _LAYER_NAMES.items() if g != "ffn_norm.weight"},
    "ffn_norm.weight": "pre_feedforward_layernorm.weight",
    "post_attention_norm.weight": "post_attention_layernorm.weight",
    "post_ffw_norm.weight": "post_feedforward_layernorm.weight",
}
_QK_NORM_NAMES = {
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
}
# model_type -> GGUF name inside ``blk.N.`` -> HF name inside ``model.layers.N.``
FAMILY_LAYER_NAMES: dict[str, dict[str, str]] = {
    "gemma2": _SANDWICH_NAMES,
    "gemma3_text": {**_SANDWICH_NAMES, **_QK_NORM_NAMES},
    "qwen3": {**_LAYER_NAMES, **_QK_NORM_NAMES},
    "qwen3_moe": {**_LAYER_NAMES, **_QK_NORM_NAMES, "ffn_gate_inp.weight": "mlp.gate.weight"},
    # Phi-3 keeps q/k/v and gate/up fused; llama.cpp calls the fused gate/up ``ffn_up``
    "phi3": {
        **{g: hf for g, hf in _LAYER_NAMES.items() if "attn_" not in g and "ffn_" not in g},
        "attn_norm.weight": "input_layernorm.weight",
        "ffn_norm.weight": "post_attention_layernorm.weight",
        "attn_qkv.weight": "self_attn.qkv_proj.weight",
        "attn_output.weight": "self_attn.o_proj.weight",
        "ffn_up.weight": "mlp.gate_up_proj.weight",
        "ffn_down.weight": "mlp.down_proj.weight",
    },
    # OLMo 2: norms after attention and feed-forward only; q/k norms across all heads
    "olmo2": {
        **{
            g: hf
            for g, hf in _SANDWICH_NAMES.items()
            if g not in ("attn_norm.weight", "ffn_norm.weight")
        },
        **_QK_NORM_NAMES,
    },
}
# Families whose q/k norms span all heads (sized heads * head_dim, not head_dim).
_QK_NORM_ACROSS_HEADS = {"olmo2"}
# Gemma's converter stores its norm weights as ``1 + w`` (the scale they apply).
_NORM_SHIFTED = {"gemma2", "gemma3_text"}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_EXPERT_NAMES = {"ffn_gate": "w1", "ffn_down": "w2", "ffn_up": "w3"}  # Mixtral's names
# Qwen3-MoE's experts are SwiGLU MLPs under ``mlp.experts.E``
_MLP_EXPERT_NAMES = {"ffn_gate": "gate_proj", "ffn_down": "down_proj", "ffn_up": "up_proj"}


def _expert_name(model_type: str, layer: str, expert: int | str, kind: str) -> str:
    """HF name of expert ``expert``'s ``kind`` (ffn_gate/up/down) weight in ``layer``."""
    if model_type == "qwen3_moe":
        return f"model.layers.{layer}.mlp.experts.{expert}.{_MLP_EXPERT_NAMES[kind]}.weight"
    return f"model.layers.{layer}.block_sparse_moe.experts.{expert}.{_EXPERT_NAMES[kind]}.weight"


_IGNORED = re.compile(
    r"rope_freqs\.weight|rope_factors_(long|short)\.weight|blk\.\d+\.attn_rot_embd\.weight"
)
_STACKED = re.compile(r"blk\.(\d+)\.(ffn_gate|ffn_up|ffn_down)_exps\.weight")
_PER_EXPERT = re.compile(r"blk\.(\d+)\.(ffn_gate|ffn_up|ffn_down)\.(\d+)\.weight")
_LAYER = re.compile(r"blk\.(\d+)\.(.+)")


@dataclass
class GGUFCheckpoint:
    """A GGUF file in Hugging Face terms.

    Attributes:
        config: ``config.json``-style dict (a ``model_type`` of ``models.registry``).
        tensors: HF parameter name -> tensor in the requested dtype (no ``lm_head.weight``
            when the embeddings are tied).
        tokenizer: the tokenizer rebuilt from the file's metadata.
        tokenizer_config: ``tokenizer_config.json``-style dict (special token strings,
            ``add_bos_token``/``add_eos_token``, ``chat_template``).
        generation_config: ``bos_token_id``, ``eos_token_id`` (a list when the file names
            several stop tokens), ``pad_token_id``.
        metadata: the ``general.*`` fields, plus ``file_type`` (e.g. ``"Q4_1"``).
        quantized: with ``keep_quantized``, HF name -> :class:`GGUFTensor` for each weight
            kept as blocks; ``tensors`` then holds a ``meta`` placeholder under that name.
    """

    config: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    tokenizer: Tokenizer
    tokenizer_config: dict[str, Any]
    generation_config: dict[str, Any]
    metadata: dict[str, Any]
    quantized: dict[str, Any] = field(default_factory=dict)


def unpermute_rope(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation (inverse of ``LlamaModel.permute``).

    The converter regroups each head's rows from HF's halves ``[x_0..x_{d/2-1}, y_0..]`` to
    interleaved pairs ``[x_0, y_0, x_1, y_1, ...]``; this puts them back.
    """
    rows = w.shape[0]
    # (n_head, 2, d/2, ...) was swapped to (n_head, d/2, 2, ...); swap back.
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def read_gguf(
    path: str | os.PathLike, *, dtype: torch.dtype = torch.float32, keep_quantized: bool = False
) -> GGUFCheckpoint:
    """Read a GGUF model file into Hugging Face names, shapes and config.

    Args:
        path: the ``.gguf`` file.
        dtype: dtype of the returned tensors (quantized weights are dequantized).
        keep_quantized: keep 2-D weights in the encodings the native kernels compute on
            (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K) as memory-mapped blocks in
            ``quantized`` instead of dequantizing them.

    Raises:
        CheckpointError: the file is missing, not GGUF, truncated, of an unsupported
            architecture or tensor encoding, or its tensors do not match its metadata.
    """
    path = Path(path)
    reader = _open(path)
    meta = read_metadata(reader)
    infos = {t.name: t for t in reader.tensors}
    config = config_from_metadata(path, meta, infos)
    plan = _plan(path, config, infos)
    tokenizer, tokenizer_config = _tokenizer(path, meta)

    permute = meta["general.architecture"] == "llama"
    n_heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}
    model_type = config["model_type"]
    shifted = model_type in _NORM_SHIFTED

    def decode(name: str, info: Any, shape: tuple[int, ...]) -> torch.Tensor:
        w = dequantize(info.data, info.tensor_type, shape)
        if permute and (proj := name.rsplit(".", 2)[-2]) in n_heads:
            w = unpermute_rope(w, n_heads[proj])
        if shifted and name.endswith("norm.weight"):
            w = w - 1
        return w.to(dtype)

    tensors: dict[str, torch.Tensor] = {}
    quantized: dict[str, Any] = {}
    if keep_quantized:
        for name, (info, shape) in list(plan.items()):
            if len(shape) < 2 or info.tensor_type not in QUANTIZED_BLOCKS:
                continue
            del plan[name]
            for hf, t in _kept(name, info, shape, permute, n_heads, model_type):
                quantized[hf] = t
                tensors[hf] = torch.empty(t.shape, dtype=dtype, device="meta")
    for name, w in _in_parallel(decode, plan):
        if m := _STACKED.fullmatch(name):
            for e in range(w.shape[0]):
                tensors[_expert_name(model_type, m.group(1), e, m.group(2))] = w[e]
        else:
            tensors[_hf_name(name, model_type)] = w
    config["torch_dtype"] = str(dtype).removeprefix("torch.")
    return GGUFCheckpoint(
        config=config,
        tensors=tensors,
        tokenizer=tokenizer,
        tokenizer_config=tokenizer_config,
        generation_config=generation_config(meta),
        metadata=_general_metadata(meta, infos),
        quantized=quantized,
    )


def _kept(
    name: str,
    info: Any,
    shape: tuple[int, ...],
    permute: bool,
    n_heads: dict[str, int],
    model_type: str,
) -> Iterator[tuple[str, GGUFTensor]]:
    """(HF name, blocks) of one quantized GGUF tensor, split per expert when stacked."""
    t = GGUFTensor.from_bytes(info.data, info.tensor_type, (prod(shape[:-1]), shape[-1]))
    if m := _STACKED.fullmatch(name):
        rows = shape[1]
        for e in range(shape[0]):
            hf = _expert_name(model_type, m.group(1), e, m.group(2))
            yield hf, t.rows(e * rows, (e + 1) * rows)
        return
    if permute and (proj := name.rsplit(".", 2)[-2]) in n_heads:
        # Blocks lie within rows, so undoing the RoPE permutation is a row order (exact).
        t.order = unpermute_rope(torch.arange(shape[0]), n_heads[proj]).contiguous()
    yield _hf_name(name, model_type), t


def _in_parallel(
    decode: Callable[[str, Any, tuple[int, ...]], torch.Tensor], plan: dict[str, tuple]
) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, decode(name, info, shape))`` for every planned tensor, one tensor per core.

    Each tensor is decoded by one Python thread with torch's intra-op threads set to 1 for the
    duration: element-wise decoding is memory-bound, and intra-op (OpenMP) parallelism over
    hundreds of small tensors stalls at a barrier whenever another process holds a core --
    on a busy 2-core machine that made loading several times slower, not faster.
    """
    workers = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            jobs = [(name, pool.submit(decode, name, *item)) for name, item in plan.items()]
            for name, job in jobs:
                yield name, job.result()
    finally:
        torch.set_num_threads(workers)


def read_gguf_tokenizer(path: str | os.PathLike) -> tuple[Tokenizer, dict[str, Any]]:
    """Only the tokenizer and ``tokenizer_config`` of a GGUF file (works on vocab-only files)."""
    path = Path(path)
    return _tokenizer(path, read_metadata(_open(path)))


def _open(path: Path) -> gguf.GGUFReader:
    try:
        return open_gguf(path)
    except GGUFFileError as e:
        raise CheckpointError(f"{path}: {e}") from None


def _tokenizer(path: Path, meta: dict[str, Any]) -> tuple[Tokenizer, dict[str, Any]]:
    try:
        return build_tokenizer(meta)
    except TokenizerMetadataError as e:
        raise CheckpointError(f"{path}: {e}") from None


def _hf_name(gguf_name: str, model_type: str = "llama") -> str:
    """The HF name of a non-stacked GGUF tensor (one of ``_expected_tensors``)."""
    names = FAMILY_LAYER_NAMES.get(model_type, _LAYER_NAMES)
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    if m := _PER_EXPERT.fullmatch(gguf_name):
        layer, kind, e = m.groups()
        return _expert_name(model_type, layer, e, kind)
    if (m := _LAYER.fullmatch(gguf_name)) and m.group(2) in names:
        return f"model.layers.{m.group(1)}.{names[m.group(2)]}"
    raise CheckpointError(f"GGUF tensor {gguf_name!r} has no Hugging Face name")


def _expected_tensors(config: dict[str, Any], biases: bool) -> dict[str, tuple[int, ...]]:
    """GGUF name -> row-major shape for every tensor the config implies."""
    hidden, vocab = config["hidden_size"], config["vocab_size"]
    head_dim = config.get("head_dim") or hidden // config["num_attention_heads"]
    q_rows = config["num_attention_heads"] * head_dim
    kv_rows = config["num_key_value_heads"] * head_dim
    ff = config["intermediate_size"]
    experts = config.get("num_local_experts") or 0
    if experts and config.get("moe_intermediate_size"):  # Qwen3-MoE: experts narrower
        ff = config["moe_intermediate_size"]
    names = FAMILY_LAYER_NAMES.get(config["model_type"], _LAYER_NAMES)
    out: dict[str, tuple[int, ...]] = {
        "token_embd.weight": (vocab, hidden),
        "output_norm.weight": (hidden,),
    }
    if not config["tie_word_embeddings"]:
        out["output.weight"] = (vocab, hidden)
    for i in range(config["num_hidden_layers"]):
        b = f"blk.{i}."
        for norm in ("attn_norm", "ffn_norm", "post_attention_norm", "post_ffw_norm"):
            if f"{norm}.weight" in names:
                out[f"{b}{norm}.weight"] = (hidden,)
        if "attn_q_norm.weight" in names:
            across = config["model_type"] in _QK_NORM_ACROSS_HEADS
            out[b + "attn_q_norm.weight"] = (q_rows if across else head_dim,)
            out[b + "attn_k_norm.weight"] = (kv_rows if across else head_dim,)
        if "attn_qkv.weight" in names:
            out[b + "attn_qkv.weight"] = (q_rows + 2 * kv_rows, hidden)
        else:
            out[b + "attn_q.weight"] = (q_rows, hidden)
            out[b + "attn_k.weight"] = (kv_rows, hidden)
            out[b + "attn_v.weight"] = (kv_rows, hidden)
        out[b + "attn_output.weight"] = (hidden, q_rows)
        if biases:
            out[b + "attn_q.bias"] = (q_rows,)
            out[b + "attn_k.bias"] = (kv_rows,)
            out[b + "attn_v.bias"] = (kv_rows,)
            if config["model_type"] != "qwen2":  # HF Llama's attention_bias covers o_proj too
                out[b + "attn_output.bias"] = (hidden,)
        if experts:
            out[b + "ffn_gate_inp.weight"] = (experts, hidden)
            out[b + "ffn_gate_exps.weight"] = (experts, ff, hidden)
            out[b + "ffn_up_exps.weight"] = (experts, ff, hidden)
            out[b + "ffn_down_exps.weight"] = (experts, hidden, ff)
        elif "ffn_gate.weight" not in names:  # fused gate/up (Phi-3)
            out[b + "ffn_up.weight"] = (2 * ff, hidden)
            out[b + "ffn_down.weight"] = (hidden, ff)
        else:
            out[b + "ffn_gate.weight"] = (ff, hidden)
            out[b + "ffn_up.weight"] = (ff, hidden)
            out[b + "ffn_down.weight"] = (hidden, ff)
    return out


def _plan(path: Path, config: dict[str, Any], infos: dict[str, Any]) -> dict[str, tuple]:
    """Check every tensor before decoding any: GGUF name -> (tensor info, row-major shape)."""
    expected = _expected_tensors(config, config.get("attention_bias", False))
    # Old Mixtral files store one tensor per expert (blk.N.ffn_gate.E.weight) instead of stacks.
    for name in list(expected):
        m = _STACKED.fullmatch(name)
        if m and name not in infos and f"blk.{m.group(1)}.{m.group(2)}.0.weight" in infos:
            stacked = expected.pop(name)
            for e in range(stacked[0]):
                expected[f"blk.{m.group(1)}.{m.group(2)}.{e}.weight"] = stacked[1:]
    plan = {}
    for name, shape in expected.items():
        info = infos.get(name)
        if info is None:
            raise CheckpointError(f"{path}: missing tensor {name!r} (needed by the metadata)")
        actual = tuple(int(d) for d in reversed(info.shape.tolist()))
        if actual != shape:
            raise CheckpointError(
                f"{path}: tensor {name!r} has shape {actual}, expected {shape} from the metadata"
            )
        if info.tensor_type not in BLOCK_SIZES:
            raise CheckpointError(
                f"{path}: tensor {name!r} uses GGML type {info.tensor_type.name}, which folklm "
                f"cannot decode (supported: {', '.join(t.name for t in BLOCK_SIZES)})"
            )
        plan[name] = (info, shape)
    for name in infos:
        if name not in expected and not _IGNORED.fullmatch(name):
            raise CheckpointError(
                f"{path}: unexpected tensor {name!r} for a {config['model_type']} model "
                "(folklm does not implement the architecture variant that uses it)"
            )
    return plan


def _general_metadata(meta: dict[str, Any], infos: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in meta.items() if k.startswith("general.")}
    file_type = meta.get("general.file_type", -1)  # -1: no type (a ValueError below)
    try:
        out["file_type"] = gguf.LlamaFileType(file_type).name.removeprefix("MOSTLY_")
    except ValueError:
        # No (or an unknown) declared type: name the encoding of most of the 2-D weights.
        counts = Counter(t.tensor_type.name for t in infos.values() if len(t.shape) > 1)
        out["file_type"] = counts.most_common(1)[0][0] if counts else "unknown"
    return out
