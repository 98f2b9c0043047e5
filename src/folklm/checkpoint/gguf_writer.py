"""Write a Hugging Face-style checkpoint as a llama.cpp GGUF file (the inverse of gguf.py).

The file is written with ``gguf.GGUFWriter`` (llama.cpp's gguf-py), following what
``convert_hf_to_gguf.py`` writes for the ``llama`` and ``qwen2`` architectures, so that
llama.cpp, Ollama and :func:`folklm.checkpoint.gguf.read_gguf` read it:

* hyper-parameters as ``<arch>.*`` keys (``block_count``, ``embedding_length``,
  ``attention.head_count_kv``, ``rope.freq_base``, ...); Mixtral is ``llama`` with
  ``expert_count`` and stacked ``ffn_*_exps`` expert tensors; Llama 3.1 RoPE scaling is a
  ``rope_freqs.weight`` tensor of per-frequency factors;
* HF tensor names to GGUF names (``model.layers.N.self_attn.q_proj.weight`` ->
  ``blk.N.attn_q.weight``), shapes as GGML ``ne`` (innermost first; the writer reverses);
* for ``llama`` the rows of q/k (weights and biases) are permuted from HF's "rotate half"
  order to GGML's interleaved pairs (``LlamaModel.permute``);
* the tokenizer as ``tokenizer.ggml.*``: ``gpt2`` (byte-level BPE: tokens, token types,
  merges, the pre-tokenizer name) or ``llama`` (SentencePiece BPE: pieces, scores, byte
  tokens), special token ids, ``add_bos_token``, and the chat template. The written
  metadata is rebuilt into a tokenizer and compared with the source on probe texts, so a
  tokenizer GGUF cannot express is refused rather than silently changed.

Tensors are stored as F32, F16 or BF16 (1-D tensors always F32, as llama.cpp requires).
:func:`rewrite_gguf` copies an existing GGUF's tensors byte for byte (quantized blocks
included) and replaces metadata -- how the hub exports a GGUF entry with its licence and
lineage without re-quantizing.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFValueType, LlamaFileType

from folklm.checkpoint.gguf import _EXPERT_NAMES, _GLOBAL_NAMES, _LAYER_NAMES
from folklm.checkpoint.gguf_config import _llama3_rope_factors
from folklm.checkpoint.gguf_encode import Encoded, quantize_q4_0, quantize_q4_1, quantize_q8_0
from folklm.checkpoint.gguf_reader import GGUFFileError, open_gguf, read_metadata
from folklm.checkpoint.gguf_tokenizer import (
    BYTE,
    CONTROL,
    LLAMA3_SPLIT,
    NORMAL,
    QWEN2_SPLIT,
    TEKKEN_SPLIT,
    UNKNOWN,
    USER_DEFINED,
    build_tokenizer,
)
from folklm.errors import CheckpointError

__all__ = ["permute_rope", "rewrite_gguf", "tokenizer_metadata", "write_gguf"]

_HF_LAYER = {hf: g for g, hf in _LAYER_NAMES.items()}
_HF_GLOBAL = {hf: g for g, hf in _GLOBAL_NAMES.items()}
_HF_EXPERT = {hf: g for g, hf in _EXPERT_NAMES.items()}  # w1 -> ffn_gate, ...
_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")
_EXPERT = re.compile(r"model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.(w[123])\.weight")
_DTYPES = {
    "f32": (GGMLQuantizationType.F32, LlamaFileType.ALL_F32),
    "f16": (GGMLQuantizationType.F16, LlamaFileType.MOSTLY_F16),
    "bf16": (GGMLQuantizationType.BF16, LlamaFileType.MOSTLY_BF16),
}
_QUANT = {
    "q8_0": (GGMLQuantizationType.Q8_0, LlamaFileType.MOSTLY_Q8_0, quantize_q8_0),
    "q4_0": (GGMLQuantizationType.Q4_0, LlamaFileType.MOSTLY_Q4_0, quantize_q4_0),
    "q4_1": (GGMLQuantizationType.Q4_1, LlamaFileType.MOSTLY_Q4_1, quantize_q4_1),
}
_FILE_TYPES = {q: ft for q, ft in _DTYPES.values()} | {q: ft for q, ft, _ in _QUANT.values()}
# Embeddings and the output matrix stay at 8 bits in a Q4_0/Q4_1 file (llama.cpp keeps them at
# Q6_K, which folklm does not encode).
_HIGH_PRECISION = {"token_embd.weight", "output.weight"}
_FROM_TORCH = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}
# Texts that exercise pre-tokenization, digits, whitespace runs, bytes and non-Latin scripts.
PROBES = (
    "Hello world! Hello, World.  How's it going?\n\nNew paragraph\ttab",
    "1234567890 3.14159 1,000,000 x=42; y = x**2 // 7",
    "   leading spaces, trailing   \n\n\n",
    "Äpfel, naïve café — 日本語のテキスト, русский текст, العربية 🦙🚀",
    "def f(x):\n    return x  # comment\n",
    "I'm, you're, they've, he'd, we'll: DON'T SHOUT",
)


def permute_rope(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's q/k row permutation (``LlamaModel.permute``): HF halves -> GGML pairs.

    Each head's rows ``[x_0..x_{d/2-1}, y_0..y_{d/2-1}]`` become ``[x_0, y_0, x_1, y_1, ...]``;
    :func:`folklm.checkpoint.gguf.unpermute_rope` is its inverse.
    """
    rows = w.shape[0]
    # (n_head, 2, d/2, ...) -> (n_head, d/2, 2, ...)
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _gguf_arch(config: Mapping[str, Any]) -> str:
    model_type = config.get("model_type")
    if model_type in ("llama", "mistral", "mixtral"):
        return "llama"
    if model_type == "qwen2":
        return "qwen2"
    raise CheckpointError(
        f"cannot write model_type {model_type!r} as GGUF (folklm writes llama, mistral, "
        "mixtral and qwen2)"
    )


def _gguf_name(hf_name: str) -> str:
    if hf_name in _HF_GLOBAL:
        return _HF_GLOBAL[hf_name]
    if (m := _LAYER.fullmatch(hf_name)) and m.group(2) in _HF_LAYER:
        return f"blk.{m.group(1)}.{_HF_LAYER[m.group(2)]}"
    raise CheckpointError(f"tensor {hf_name!r} has no GGUF name (unsupported architecture part)")


def _hparams(writer: gguf.GGUFWriter, arch: str, config: Mapping[str, Any]) -> int:
    """Write the ``<arch>.*`` keys; return the head dimension."""
    hidden, n_head = int(config["hidden_size"]), int(config["num_attention_heads"])
    head_dim = int(config.get("head_dim") or hidden // n_head)
    writer.add_context_length(int(config.get("max_position_embeddings", 2048)))
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(int(config["intermediate_size"]))
    writer.add_block_count(int(config["num_hidden_layers"]))
    writer.add_head_count(n_head)
    writer.add_head_count_kv(int(config.get("num_key_value_heads") or n_head))
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
    rope = config.get("rope_parameters") or {}
    writer.add_rope_freq_base(float(config.get("rope_theta") or rope.get("rope_theta", 10000.0)))
    writer.add_rope_dimension_count(head_dim)
    if head_dim != hidden // n_head:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_vocab_size(int(config["vocab_size"]))
    window = config.get("sliding_window")
    if window and (arch == "llama" or config.get("use_sliding_window")):
        writer.add_sliding_window(int(window))
    if config.get("num_local_experts"):
        writer.add_expert_count(int(config["num_local_experts"]))
        writer.add_expert_used_count(int(config["num_experts_per_tok"]))
    scaling = config.get("rope_scaling") or (rope if rope.get("rope_type") else {})
    kind = scaling.get("rope_type") or scaling.get("type")
    if kind in ("linear", "yarn"):
        writer.add_rope_scaling_type(gguf.RopeScalingType(kind))
        writer.add_rope_scaling_factor(float(scaling["factor"]))
    if kind in ("yarn", "llama3") and scaling.get("original_max_position_embeddings"):
        writer.add_rope_scaling_orig_ctx_len(int(scaling["original_max_position_embeddings"]))
    elif kind not in (None, "default", "linear", "yarn", "llama3"):
        raise CheckpointError(f"cannot write rope scaling {kind!r} as GGUF")
    return head_dim


def _rope_freqs(config: Mapping[str, Any], head_dim: int) -> np.ndarray | None:
    """Llama 3.1 scaling as llama.cpp stores it: one factor per rotary frequency."""
    scaling = config.get("rope_scaling") or config.get("rope_parameters") or {}
    if (scaling.get("rope_type") or scaling.get("type")) != "llama3":
        return None
    theta = float(config.get("rope_theta") or scaling.get("rope_theta", 10000.0))
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    factors = _llama3_rope_factors(
        inv_freq,
        float(scaling["factor"]),
        float(scaling.get("low_freq_factor", 1.0)),
        float(scaling.get("high_freq_factor", 4.0)),
        int(scaling.get("original_max_position_embeddings", 8192)),
    )
    return factors.astype(np.float32)


def _add(
    writer: gguf.GGUFWriter, name: str, t: torch.Tensor | Encoded, dtype: str
) -> GGMLQuantizationType:
    """Add one tensor; 1-D tensors stay F32 (llama.cpp computes norms and biases in F32)."""
    if isinstance(t, Encoded):  # blocks encoded by the caller (e.g. int8 codes as Q8_0)
        writer.add_tensor(name, t.data, raw_shape=t.data.shape, raw_dtype=t.qtype)
        return t.qtype
    kind = _FROM_TORCH.get(t.dtype, "f32") if dtype in ("auto", *_QUANT) else dtype
    if dtype in _QUANT and t.dim() >= 2:
        if t.shape[-1] % 32:
            kind = "f16"  # rows that are not whole blocks (llama.cpp also falls back)
        else:
            kind = "q8_0" if name in _HIGH_PRECISION else dtype
            qtype, _, encode = _QUANT[kind]
            data = encode(t)
            writer.add_tensor(name, data, raw_shape=data.shape, raw_dtype=qtype)
            return qtype
    if t.dim() == 1:
        kind = "f32"
    qtype = _DTYPES[kind][0]
    t = t.detach().contiguous()
    if kind == "bf16":  # numpy has no bfloat16: hand the raw 16-bit words over
        arr = t.to(torch.bfloat16).view(torch.int16).numpy()
        writer.add_tensor(name, arr, raw_shape=arr.shape, raw_dtype=qtype)
    else:
        writer.add_tensor(name, t.to(torch.float32 if kind == "f32" else torch.float16).numpy())
    return qtype


def write_gguf(
    path: str | os.PathLike,
    config: Mapping[str, Any],
    tensors: Mapping[str, torch.Tensor],
    tokenizer: Any,
    generation_config: Mapping[str, Any] | None = None,
    *,
    dtype: str = "auto",
    metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Write a model as one GGUF file, atomically (temp file, fsync, rename).

    Args:
        config: ``config.json`` dict (model_type llama, mistral, mixtral or qwen2).
        tensors: HF parameter name -> tensor (un-permuted, as ``read_gguf`` returns them).
        tokenizer: a :class:`folklm.tokenizer.Tokenizer`.
        generation_config: ``bos_token_id``/``eos_token_id`` (a list: eos, eot, eom).
        dtype: ``auto`` (each tensor's own float type), ``f32``, ``f16``, ``bf16``, or the
            block types ``q8_0`` / ``q4_0`` / ``q4_1`` (llama.cpp's reference encoders;
            embeddings and output at Q8_0). A tensor may also be given already encoded
            (``Encoded``).
        metadata: extra keys, e.g. ``{"general.license": "apache-2.0"}``; str, int, float,
            bool, or lists of one of them.

    Raises:
        CheckpointError: an architecture, tensor, RoPE variant or tokenizer GGUF cannot
            express.
    """
    if dtype != "auto" and dtype not in _DTYPES and dtype not in _QUANT:
        raise CheckpointError(
            f"unknown GGUF dtype {dtype!r}; expected auto, f32, f16, bf16, q8_0, q4_0 or q4_1"
        )
    arch = _gguf_arch(config)
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    writer = gguf.GGUFWriter(tmp, arch)
    try:
        writer.add_type("model")
        head_dim = _hparams(writer, arch, config)
        _add_metadata(writer, tokenizer_metadata(tokenizer, generation_config or {}))
        types = _add_tensors(writer, arch, config, tensors, dtype, head_dim)
        big = [t for t in types if t != GGMLQuantizationType.F32]
        file_type = LlamaFileType.ALL_F32
        if big:
            file_type = _FILE_TYPES[max(set(big), key=big.count)]
        writer.add_file_type(int(file_type))
        _add_metadata(writer, metadata or {})
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        _commit(tmp, path)
    finally:
        writer.close()
        tmp.unlink(missing_ok=True)
    return path


def _add_tensors(writer, arch, config, tensors, dtype, head_dim) -> list[GGMLQuantizationType]:
    n_heads = {
        "attn_q": int(config["num_attention_heads"]),
        "attn_k": int(config.get("num_key_value_heads") or config["num_attention_heads"]),
    }
    types = []
    experts: dict[tuple[str, str], dict[int, torch.Tensor]] = {}
    for name, t in tensors.items():
        if name.endswith(".rotary_emb.inv_freq"):
            continue
        if name == "lm_head.weight" and config.get("tie_word_embeddings"):
            continue
        if m := _EXPERT.fullmatch(name):
            experts.setdefault((m.group(1), m.group(3)), {})[int(m.group(2))] = t
            continue
        g = _gguf_name(name)
        if arch == "llama" and (proj := g.rsplit(".", 2)[-2]) in n_heads:
            if isinstance(t, Encoded):  # rows of bytes permute like rows of weights
                rows = permute_rope(torch.from_numpy(t.data), n_heads[proj]).numpy()
                t = Encoded(rows, t.qtype)
            else:
                t = permute_rope(t, n_heads[proj])
        types.append(_add(writer, g, t, dtype))
    for (layer, kind), per_expert in sorted(experts.items(), key=lambda x: (int(x[0][0]), x[0][1])):
        stacked = torch.stack([per_expert[e] for e in sorted(per_expert)])  # (E, rows, cols)
        types.append(_add(writer, f"blk.{layer}.{_HF_EXPERT[kind]}_exps.weight", stacked, dtype))
    if (freqs := _rope_freqs(config, head_dim)) is not None:
        writer.add_tensor("rope_freqs.weight", freqs)
    return types


def _commit(tmp: Path, path: Path) -> None:
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _add_metadata(writer: gguf.GGUFWriter, metadata: Mapping[str, Any]) -> None:
    for key, value in metadata.items():
        if value is None:
            continue
        if isinstance(value, tuple) and len(value) == 2 and isinstance(value[1], GGUFValueType):
            value, vtype = value
            if isinstance(value, list):
                writer.add_key_value(key, value, GGUFValueType.ARRAY, sub_type=vtype)
            else:
                writer.add_key_value(key, value, vtype)
        elif isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value) if 0 <= value < 2**32 else writer.add_int64(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        elif isinstance(value, str):
            writer.add_string(key, value)
        elif isinstance(value, list) and value:
            writer.add_array(key, value)


# -- tokenizer --------------------------------------------------------------------------
def tokenizer_metadata(tokenizer: Any, generation_config: Mapping[str, Any]) -> dict[str, Any]:
    """The ``tokenizer.*`` keys that rebuild ``tokenizer`` (a folklm ``Tokenizer``).

    Values are ``(value, GGUFValueType)`` where the type matters (arrays, token ids).

    Raises:
        CheckpointError: not a BPE tokenizer, a pre-tokenizer llama.cpp has no name for, or
            the rebuilt tokenizer tokenizes the probe texts differently.
    """
    j = json.loads(tokenizer.hf.to_str())
    model = j.get("model") or {}
    if model.get("type") != "BPE":
        raise CheckpointError(
            f"cannot store a {model.get('type')} tokenizer in GGUF (GGUF holds BPE: byte-level "
            "'gpt2' or SentencePiece 'llama')"
        )
    vocab: dict[str, int] = dict(model["vocab"])
    added = {int(t["id"]): t for t in j.get("added_tokens") or ()}
    for i, t in added.items():
        vocab.setdefault(t["content"], i)
    n = max(vocab.values()) + 1
    tokens = [f"[PAD{i}]" for i in range(n)]
    for tok, i in vocab.items():
        tokens[i] = tok
    types = [NORMAL] * n
    present = set(vocab.values())
    for i in range(n):
        if i not in present:
            types[i] = USER_DEFINED  # a hole in the id range: llama.cpp's [PAD<id>] filler
    for i, t in added.items():
        types[i] = CONTROL if t.get("special") else USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or ()]
    spm = bool(model.get("byte_fallback")) or "▁" in json.dumps(
        [j.get("normalizer"), j.get("pre_tokenizer")], ensure_ascii=False
    )
    meta: dict[str, Any] = {}
    if spm:
        meta["tokenizer.ggml.model"] = "llama"
        meta["tokenizer.ggml.pre"] = "default"
        meta["tokenizer.ggml.scores"] = (_scores(tokens, merges), GGUFValueType.FLOAT32)
        meta["tokenizer.ggml.add_space_prefix"] = _space_prefix(j)
        unk = model.get("unk_token")
        for i, tok in enumerate(tokens):
            if re.fullmatch(r"<0x[0-9A-F]{2}>", tok) and types[i] == NORMAL:
                types[i] = BYTE
            elif tok == unk:
                types[i] = UNKNOWN
    else:
        meta["tokenizer.ggml.model"] = "gpt2"
        meta["tokenizer.ggml.pre"] = _pre_name(j)
        meta["tokenizer.ggml.merges"] = (merges, GGUFValueType.STRING)
    meta["tokenizer.ggml.tokens"] = (tokens, GGUFValueType.STRING)
    meta["tokenizer.ggml.token_type"] = (types, GGUFValueType.INT32)
    meta.update(_special_ids(tokenizer, generation_config))
    if tokenizer.chat_template:
        meta["tokenizer.chat_template"] = tokenizer.chat_template
    _check_roundtrip(tokenizer, meta)
    return meta


def _scores(tokens: list[str], merges: list[str]) -> list[float]:
    """SentencePiece scores that reproduce the merge order: a piece first formed by merge
    ``k`` scores ``-k``; pieces no merge forms score below all of them."""
    first: dict[str, int] = {}
    for k, merge in enumerate(merges):
        first.setdefault(merge.replace(" ", "", 1), k)
    low = -float(len(merges))
    return [-float(first[t]) if t in first else low - i for i, t in enumerate(tokens)]


def _space_prefix(j: dict[str, Any]) -> bool:
    """Whether a SentencePiece tokenizer prepends "▁": a ``Prepend`` normalizer (older
    tokenizer.json files) or a ``Metaspace`` pre-tokenizer that prepends (newer ones)."""
    if "Prepend" in json.dumps(j.get("normalizer")):
        return True
    pre = j.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    return any(
        s.get("type") == "Metaspace" and s.get("prepend_scheme", "always") != "never" for s in steps
    )


def _pre_name(j: dict[str, Any]) -> str:
    """The ``tokenizer.ggml.pre`` name llama.cpp uses for this pre-tokenizer."""
    pre = j.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    regex = next((s["pattern"].get("Regex") for s in steps if s.get("type") == "Split"), None)
    digits = any(s.get("type") == "Digits" and s.get("individual_digits") for s in steps)
    known = {LLAMA3_SPLIT: "llama-bpe", QWEN2_SPLIT: "qwen2", TEKKEN_SPLIT: "tekken"}
    if regex is not None:
        if regex not in known:
            raise CheckpointError(f"no GGUF pre-tokenizer name for the split regex {regex!r}")
        return known[regex]
    return "smollm" if digits else "gpt-2"


def _special_ids(tokenizer: Any, generation_config: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    u32 = GGUFValueType.UINT32
    eos = generation_config.get("eos_token_id")
    eos_ids = eos if isinstance(eos, list) else [eos] if eos is not None else []
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos_ids:
        eos_ids = [tokenizer.eos_token_id, *eos_ids]
    for key, value in zip(("eos", "eot", "eom"), eos_ids, strict=False):
        out[f"tokenizer.ggml.{key}_token_id"] = (int(value), u32)
    for key, value in (
        ("bos", tokenizer.bos_token_id),
        ("unknown", tokenizer.token_id(tokenizer.unk_token)),
        ("padding", tokenizer.pad_token_id),
    ):
        if value is not None:
            out[f"tokenizer.ggml.{key}_token_id"] = (int(value), u32)
    # Whether BOS/EOS are added is what the tokenizer does, whatever its config claims.
    with_special = tokenizer.hf.encode("a", add_special_tokens=True).ids
    bos, eos_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    out["tokenizer.ggml.add_bos_token"] = bos is not None and with_special[:1] == [bos]
    out["tokenizer.ggml.add_eos_token"] = eos_id is not None and with_special[-1:] == [eos_id]
    return out


def _check_roundtrip(tokenizer: Any, meta: dict[str, Any]) -> None:
    plain = {k: v[0] if isinstance(v, tuple) else v for k, v in meta.items()}
    rebuilt, _ = build_tokenizer(plain)
    for text in PROBES:
        for special in (False, True):
            want = tokenizer.hf.encode(text, add_special_tokens=special).ids
            got = rebuilt.encode(text, add_special_tokens=special).ids
            if got != want:
                raise CheckpointError(
                    f"GGUF cannot express this tokenizer exactly: {text[:30]!r} tokenizes to "
                    f"{got[:8]}... instead of {want[:8]}..."
                )


# -- re-writing an existing GGUF ----------------------------------------------------------
def rewrite_gguf(
    src: str | os.PathLike, dst: str | os.PathLike, metadata: Mapping[str, Any]
) -> Path:
    """Copy ``src`` to ``dst`` with ``metadata`` keys added or replaced (``None`` removes a
    key); every tensor is copied byte for byte, quantized blocks included."""
    src, dst = Path(src), Path(dst)
    try:
        reader = open_gguf(src)
    except GGUFFileError as e:
        raise CheckpointError(f"{src}: {e}") from None
    values = read_metadata(reader)
    arch = values.get("general.architecture") or ""  # "": the writer adds no such key
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    writer = gguf.GGUFWriter(tmp, arch)
    try:
        for key, field in reader.fields.items():
            if key.startswith("GGUF.") or key == "general.architecture" or key in metadata:
                continue
            vtype = field.types[0]
            if vtype == GGUFValueType.ARRAY:
                writer.add_key_value(key, list(values[key]), vtype, sub_type=field.types[-1])
            else:
                writer.add_key_value(key, values[key], vtype)
        _add_metadata(writer, {k: v for k, v in metadata.items() if v is not None})
        for t in reader.tensors:
            writer.add_tensor(t.name, t.data, raw_dtype=t.tensor_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        _commit(tmp, dst)
    finally:
        writer.close()
        tmp.unlink(missing_ok=True)
    return dst
