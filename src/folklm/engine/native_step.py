"""The whole decode step of a Llama-family model in one native call.

On a CPU, a PyTorch decode step of a small model is dominated by dispatch: each of a few
hundred operations per token costs microseconds before any arithmetic. ``NativeStep`` hands
the step -- embedding, every layer, final norm, LM head -- to ``folk_decode_step`` in
``kernels/csrc/decode_step.c``, compiled for this CPU at first use and cached like the
other kernels (:mod:`folklm.kernels.native`): the persisted artefact is keyed by the C
sources, the compiler, its flags and the CPU, so later runs load it in milliseconds.

The step reads the model's own weights in place (GGML blocks of a GGUF file through the
integer kernels, dense float32/bfloat16/float16 rows through float dot products) and the
caller's KV cache (``cache.KVCache`` or the server's ``engine.slots.SlotDecode``), so
prefill stays with PyTorch's GEMMs and decode continues in the same buffers.

It applies only where it computes exactly what the PyTorch model would:

- the model is built from the plain Llama blocks (``models.llama``: ``Attention``, ``MLP``,
  ``RMSNorm``, ``RotaryEmbedding``); Llama, Mistral and Qwen2 are, other families are not;
- every projection is an ``nn.Linear`` with contiguous float weights, a ``GGUFLinear`` or
  an ``Int8Linear`` (``folk quantize --scheme int8``: int8 rows times a scale per row) or
  an ``Int4Linear`` (int4 groups of 32 or more, re-laid once as Q4_1-like blocks with
  float32 scale and offset: exact, 0.75 bytes per weight, kept beside PyTorch's own copy,
  which the prefill uses);
- no forward hook or pre-hook is set on any of its modules (interpretability tools, GPTQ);
- one token per row, no per-row LoRA adapters, a float32 or bfloat16 cache.

Anything else takes the PyTorch path. ``FOLK_NATIVE_STEP=0`` turns the native step off.
"""

from __future__ import annotations

import ctypes
import os
import weakref
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from folklm.cache import Cache, KVCache
from folklm.engine.slots import SlotDecode
from folklm.errors import FolkError
from folklm.kernels import native
from folklm.kernels.gguf_linear import ACTIVATION_LEVELS, GGUFEmbedding, GGUFLinear
from folklm.kernels.int4 import Int4Linear
from folklm.kernels.int8 import Int8Linear
from folklm.models.llama import MLP, Attention, CausalLM, DecoderLayer, RMSNorm
from folklm.ops.rope import RotaryEmbedding

_PTR, _I64, _I32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32
_DENSE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 30}
_FAMILIES = ("llama", "mistral", "qwen2")


class _Lin(ctypes.Structure):
    _fields_ = [
        ("type", _I32),
        ("unused", _I32),
        ("w", _PTR),
        ("row_bytes", _I64),
        ("n", _I64),
        ("k", _I64),
        ("out_index", _PTR),
        ("bias", _PTR),
        ("scale", _PTR),
    ]


_I8_ROWS = 256  # gguf_kernels.c's type of folklm's int8 rows (kernels.int8)
_I4_GROUPS = 257  # gguf_kernels.c's Q4_1-like blocks with float32 d and m (kernels.int4)


def int4_blocks(module: Int4Linear) -> torch.Tensor:
    """An ``Int4Linear``'s weight as (N, K/32 * 24) bytes of blocks ``[d, m, nibbles]``.

    ``w = s * (q - 8) + z`` (kernels.int4) is ``d * q + m`` with ``d = s`` and ``m = z - 8 s``
    in float32 for each run of 32 inputs (a group of 64 or more repeats its d and m); the 32
    codes are packed as Q4_1 packs them: byte j holds code j (low nibble) and j + 16.
    """
    N, K, G = module.out_features, module.in_features, module.group_size
    codes = module.codes().reshape(N, K // 32, 32)
    nibbles = (codes[..., :16] | (codes[..., 16:] << 4)).to(torch.uint8)  # (N, K/32, 16)
    s = module.scales.float().repeat_interleave(G // 32, dim=1)  # (N, K/32)
    m = module.zeros.float().repeat_interleave(G // 32, dim=1) - 8 * s
    dm = torch.stack([s, m], dim=-1).contiguous().view(torch.uint8)  # (N, K/32, 8)
    return torch.cat([dm, nibbles], dim=-1).reshape(N, K // 32 * 24).contiguous()


class _Layer(ctypes.Structure):
    _fields_ = [
        *((name, _Lin) for name in ("q", "k", "v", "o", "gate", "up", "down")),
        ("attn_norm", _PTR),
        ("ffn_norm", _PTR),
        ("window", _I64),
    ]


class _Model(ctypes.Structure):
    _fields_ = [
        *((name, _I64) for name in ("n_layers", "hidden", "n_heads", "n_kv", "head_dim", "ffn")),
        ("vocab", _I64),
        ("eps", ctypes.c_float),
        ("rope_mult", ctypes.c_float),
        ("inv_freq", _PTR),
        ("embed", _Lin),
        ("head", _Lin),
        ("final_norm", _PTR),
        ("layers", _PTR),
    ]


class _KV(ctypes.Structure):
    _fields_ = [
        ("rows", _I64),
        ("cap", _I64),
        ("bf16", _I32),
        ("unused", _I32),
        ("k", _PTR),
        ("v", _PTR),
    ]


class Unsupported(Exception):
    """The model cannot take the native step (the message says why)."""


def _bind(lib: ctypes.CDLL) -> None:
    fn = lib.folk_decode_step
    if fn.argtypes is None:
        fn.argtypes = [_PTR, _PTR, _I64, _PTR, _PTR, _PTR, _PTR, _PTR, ctypes.c_int, ctypes.c_int]
        fn.restype = ctypes.c_int


class NativeStep:
    """The native decode step of one model (build it with :func:`native_step`)."""

    def __init__(self, model: CausalLM, lib: native.NativeKernels):
        self.lib = lib.lib
        _bind(self.lib)
        self._keep: list[object] = []  # every tensor and struct the C side points into
        c = model.config
        layers = list(model.model.layers)
        self.config = c
        self.dtypes: set[torch.dtype] = set()
        structs = (_Layer * len(layers))()
        for i, layer in enumerate(layers):
            if type(layer) is not DecoderLayer:
                raise Unsupported(f"layer {i} is a {type(layer).__name__}")
            attn, mlp = layer.self_attn, getattr(layer, layer.mlp_name)
            if type(attn) is not Attention or attn.qkv_proj is not None:
                raise Unsupported(f"layer {i}'s attention is not the plain Llama attention")
            # a scale or logit cap of its own (Gemma) is not what the C step computes
            if attn.scale is not None or attn.softcap is not None:
                raise Unsupported(f"layer {i}'s attention scale or soft-cap")
            if type(mlp) is not MLP or mlp.gate_up_proj is not None:
                raise Unsupported(f"layer {i}'s MLP is not a plain SwiGLU MLP")
            if mlp.act is not F.silu:
                raise Unsupported(f"layer {i}'s MLP activation is not SiLU")
            s = structs[i]
            for slot, module in (
                ("q", attn.q_proj),
                ("k", attn.k_proj),
                ("v", attn.v_proj),
                ("o", attn.o_proj),
                ("gate", mlp.gate_proj),
                ("up", mlp.up_proj),
                ("down", mlp.down_proj),
            ):
                setattr(s, slot, self._linear(module, f"layer {i} {slot}"))
            s.attn_norm = self._norm(layer.input_layernorm)
            s.ffn_norm = self._norm(layer.post_attention_layernorm)
            s.window = layer.sliding_window or 0
        self._keep.append(structs)
        rotary = model.model.rotary_emb
        if type(rotary) is not RotaryEmbedding:
            raise Unsupported(f"rotary embedding {type(rotary).__name__}")
        if rotary.by_length:  # longrope / dynamic: per-call frequencies
            raise Unsupported("RoPE frequencies that depend on the sequence length")
        if c.final_logit_softcapping is not None:
            raise Unsupported("final logit soft-capping")
        inv_freq = self._floats(rotary.inv_freq)
        m = _Model(
            n_layers=len(layers),
            hidden=c.hidden_size,
            n_heads=c.num_attention_heads,
            n_kv=c.kv_heads,
            head_dim=c.head_size,
            ffn=c.intermediate_size,
            vocab=c.vocab_size,
            eps=c.rms_norm_eps,
            rope_mult=float(rotary.scaling),  # yarn's cos/sin factor
            inv_freq=inv_freq,
            embed=self._embedding(model.model.embed_tokens),
            head=self._linear(model.lm_head, "lm_head"),
            final_norm=self._norm(model.model.norm),
            layers=ctypes.addressof(structs),
        )
        if rotary.inv_freq.numel() * 2 != c.head_size:
            raise Unsupported("partial rotary embeddings")
        self._model = m
        # what the step read, to notice a module swapped afterwards (quantize, merge, adapters)
        self._parts = [(parent, name, child) for parent in model.modules()
                       for name, child in parent._modules.items()]  # fmt: skip
        self._params = [(m, name, p) for m in model.modules() for name, p in m._parameters.items()]
        # the hook tables of every module the step bypasses (dicts, checked for emptiness)
        mods = list(model.modules())
        self._hook_tables = [m._forward_hooks for m in mods] + [m._forward_pre_hooks for m in mods]
        self.levels = ACTIVATION_LEVELS
        lins = [getattr(s, f) for s in structs for f in ("q", "k", "v", "o", "gate", "up", "down")]
        # bytes of weights one decode step reads (every linear, the head; one embedding row)
        self.weight_bytes = sum(x.row_bytes * x.n for x in [*lins, m.head])
        self.calls = 0  # decode steps run (tests and benchmarks read it)

    # -- building ----------------------------------------------------------------------------
    def _floats(self, t: torch.Tensor) -> int:
        t = t.detach().to(torch.float32).contiguous()
        self._keep.append(t)
        return t.data_ptr()

    def _norm(self, norm: nn.Module) -> int:
        if type(norm) is not RMSNorm:
            raise Unsupported(f"norm {type(norm).__name__}")
        return self._floats(norm.weight)

    def _rows(
        self,
        code: int,
        data: torch.Tensor,
        k: int,
        bias: torch.Tensor | None = None,
        scale: torch.Tensor | None = None,
        out_index: torch.Tensor | None = None,
    ) -> _Lin:
        """A weight whose row r starts at ``data[r]`` (blocks, codes or floats), kept alive
        as long as the step: a replaced parameter must not leave a dangling pointer."""
        self._keep.append(data)
        if out_index is not None:
            out_index = out_index.contiguous()
            self._keep.append(out_index)
        return _Lin(
            type=code,
            w=data.data_ptr(),
            row_bytes=data.stride(0) * data.element_size(),
            n=data.shape[0],
            k=k,
            out_index=None if out_index is None else out_index.data_ptr(),
            bias=None if bias is None else self._floats(bias),
            scale=None if scale is None else self._floats(scale),
        )

    def _dense(self, w: torch.Tensor, where: str, bias: torch.Tensor | None = None) -> _Lin:
        if w.dtype not in _DENSE or not w.is_contiguous() or w.device.type != "cpu":
            raise Unsupported(f"{where}: {w.dtype} weight on {w.device}")
        self.dtypes.add(w.dtype)
        return self._rows(_DENSE[w.dtype], w, w.shape[1], bias)

    def _linear(self, module: nn.Module, where: str) -> _Lin:
        if isinstance(module, GGUFLinear):
            t = module.qweight
            return self._rows(int(t.qtype), t.blocks, t.shape[1], module.bias, None, t.out_index)
        if isinstance(module, Int8Linear):
            q = module.qweight
            if q.shape[1] % 32 or not q.is_contiguous():
                raise Unsupported(f"{where}: int8 rows of {q.shape[1]} weights")
            return self._rows(_I8_ROWS, q, q.shape[1], module.bias, module.scales)
        if isinstance(module, Int4Linear):
            if module.group_size % 32:
                raise Unsupported(f"{where}: int4 groups of {module.group_size}")
            return self._rows(_I4_GROUPS, int4_blocks(module), module.in_features, module.bias)
        if type(module) is not nn.Linear:
            raise Unsupported(f"{where} is a {type(module).__name__}")
        return self._dense(module.weight, where, module.bias)

    def _embedding(self, module: nn.Module) -> _Lin:
        if isinstance(module, GGUFEmbedding):
            t = module.qweight
            if t.order is not None:
                raise Unsupported("row-permuted embedding")
            return self._rows(int(t.qtype), t.blocks, t.shape[1])
        if type(module) is not nn.Embedding:
            raise Unsupported(f"embedding {type(module).__name__}")
        return self._dense(module.weight, "embedding")

    # -- running -----------------------------------------------------------------------------
    def hooked(self) -> bool:
        """Whether a forward hook is set anywhere the native step would skip."""
        if nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks:
            return True
        return any(self._hook_tables)

    def current(self) -> bool:
        """Whether every module and parameter the step read is still in place (a model that
        was quantized, merged into or re-assigned since needs a new step)."""
        return all(p._modules.get(n) is c for p, n, c in self._parts) and all(
            m._parameters.get(n) is t for m, n, t in self._params
        )

    def accepts(self, cache: Cache) -> bool:
        return isinstance(cache, KVCache | SlotDecode) and cache.k[0].dtype in (
            torch.float32,
            torch.bfloat16,
        )

    def decode(self, tokens: torch.Tensor, cache: KVCache | SlotDecode) -> torch.Tensor:
        """Logits (B, vocab) float32 for one token per row (``tokens`` (B,)); the cache
        holds their keys/values and has advanced by one afterwards."""
        B = tokens.shape[0]
        if isinstance(cache, KVCache):
            slot = torch.full((B,), cache.length, dtype=torch.int64)
            if cache.pad is None:
                first = torch.zeros(B, dtype=torch.int64)
            else:
                first = cache.pad.to(torch.int64).contiguous()
            pos = (slot - first).clamp(min=0)
            ks, vs = cache.k, cache.v
            if cache.length >= cache.max_len:
                raise FolkError(
                    f"KV cache full: {cache.length + 1} tokens > capacity {cache.max_len}"
                )
        else:
            slot = cache.positions.to(torch.int64).contiguous()
            pos = slot
            first = torch.zeros(B, dtype=torch.int64)
            ks, vs = cache.k, cache.v
        kv = _KV(
            rows=ks[0].shape[0],
            cap=ks[0].shape[2],
            bf16=int(ks[0].dtype == torch.bfloat16),
            k=ctypes.cast((_PTR * len(ks))(*[_ptr(t) for t in ks]), _PTR),
            v=ctypes.cast((_PTR * len(vs))(*[_ptr(t) for t in vs]), _PTR),
        )
        ids = tokens.to(torch.int64).contiguous()
        logits = torch.empty(B, self.config.vocab_size, dtype=torch.float32)
        rc = self.lib.folk_decode_step(
            ctypes.addressof(self._model),
            ctypes.addressof(kv),
            B,
            ids.data_ptr(),
            pos.data_ptr(),
            slot.data_ptr(),
            first.data_ptr(),
            logits.data_ptr(),
            self.levels,
            torch.get_num_threads(),
        )
        if rc:
            raise RuntimeError(f"folk_decode_step failed ({rc})")
        cache.advance(1)
        self.calls += 1
        return logits


def _ptr(t: torch.Tensor) -> int:
    if not t.is_contiguous():
        raise Unsupported("a non-contiguous cache buffer")
    return t.data_ptr()


_STEPS: weakref.WeakKeyDictionary[nn.Module, NativeStep | None] = weakref.WeakKeyDictionary()


def enable(model: nn.Module) -> NativeStep | None:
    """Build the native step of ``model`` (once) and remember it; None when it cannot take
    one (not a plain Llama-family model, no C compiler, ``FOLK_NATIVE_STEP=0``)."""
    if os.environ.get("FOLK_NATIVE_STEP", "1") == "0":
        return None
    step = None
    if type(model) is CausalLM and model.config.model_type in _FAMILIES:
        lib = native.kernels()
        if lib is not None:
            try:
                step = NativeStep(model, lib)
            except Unsupported:
                step = None
    _STEPS[model] = step
    return step


def for_model(model: nn.Module) -> NativeStep | None:
    """The step :func:`enable` built for ``model`` (None if it was never enabled), rebuilt
    when a module or parameter it read has been replaced since (None if it no longer fits)."""
    step = _STEPS.get(model)
    if step is not None and not step.current():
        step = enable(model)
    return step


def supported_families() -> Sequence[str]:
    return _FAMILIES
