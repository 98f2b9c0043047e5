"""``load(path)`` -> ``LLM`` with ``generate``, ``stream`` and ``chat``.

``load`` takes a path: a Hugging Face folder, a PEFT adapter folder or a ``.gguf`` file.
It knows no hub: ``folklm.load(name_or_path)`` resolves a hub name or the bundled default
through :func:`folklm.hub.resolve.resolve` first, then calls this function.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeGuard, cast, overload

import torch

from folklm.checkpoint.gguf import read_gguf
from folklm.checkpoint.hf import (
    materialize,
    read_config,
    read_generation_config,
    read_weights,
)
from folklm.checkpoint.peft import fused_weight, is_adapter_dir, load_adapter
from folklm.config import ModelConfig
from folklm.engine import native_step
from folklm.engine.device import default_dtype
from folklm.engine.fast import nf4_to_int8, pack_linears
from folklm.engine.generate import Completion, Timings, generate, generate_stream
from folklm.errors import CheckpointError, FolkError
from folklm.kernels.gguf_linear import install_gguf_modules
from folklm.kernels.schemes import cast_float_parts, materialize_quantized
from folklm.models.llama import CausalLM
from folklm.ops.sampling import SamplingParams
from folklm.tokenizer import Tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    aliases = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "f32": "float32"}
    key = aliases.get(name, name)
    if key not in DTYPES:
        raise FolkError(f"unknown dtype {name!r}; expected one of: {', '.join(DTYPES)}")
    return DTYPES[key]


@dataclass
class GenerationOutput:
    """What ``LLM.generate`` returns for one prompt."""

    text: str
    token_ids: list[int]
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str | None
    timings: Timings = field(repr=False, default_factory=Timings)
    logprobs: list[dict] | None = None  # with ``logprobs=k``: per token, logprob and top k


class LLM:
    """A loaded model with its tokenizer and generation defaults."""

    def __init__(
        self,
        model: CausalLM,
        tokenizer: Tokenizer,
        generation_config: dict | None = None,
        source: str = "",
        load_seconds: float = 0.0,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.config: ModelConfig = model.config
        self.generation_config = dict(generation_config or {})
        self.source = source
        self.load_seconds = load_seconds

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def eos_token_ids(self) -> list[int]:
        """Every id that ends a turn: generation_config's list, config's and tokenizer's EOS."""
        ids: list[int] = []
        for value in (self.generation_config.get("eos_token_id"), self.config.eos_token_id):
            if isinstance(value, int):
                ids.append(value)
            elif isinstance(value, list):
                ids.extend(int(v) for v in value)
        if self.tokenizer.eos_token_id is not None:
            ids.append(self.tokenizer.eos_token_id)
        return sorted(set(ids))

    # -- prompts --------------------------------------------------------------------------
    def encode_prompt(
        self, prompt: str | list[dict[str, Any]], chat: bool | None = None
    ) -> list[int]:
        """Token ids for a plain prompt, or for a conversation through the chat template.

        ``chat=None`` uses the chat template when the model has one.
        """
        if isinstance(prompt, list):
            return self.tokenizer.encode_chat(prompt)
        if not isinstance(prompt, str) or not prompt.strip():
            raise FolkError("empty prompt: give some text to continue or answer")
        if chat is None:
            chat = self.tokenizer.chat_template is not None
        if chat:
            return self.tokenizer.encode_chat([{"role": "user", "content": prompt}])
        return self.tokenizer.encode(prompt)

    # -- generation -----------------------------------------------------------------------
    @overload
    def generate(
        self,
        prompts: str | list[dict[str, Any]],
        params: SamplingParams | None = None,
        chat: bool | None = None,
        **kwargs: Any,
    ) -> GenerationOutput: ...

    @overload
    def generate(
        self,
        prompts: list[str],
        params: SamplingParams | None = None,
        chat: bool | None = None,
        **kwargs: Any,
    ) -> list[GenerationOutput]: ...

    def generate(
        self,
        prompts: str | list[str] | list[dict[str, Any]],
        params: SamplingParams | None = None,
        chat: bool | None = None,
        **kwargs: Any,
    ) -> GenerationOutput | list[GenerationOutput]:
        """Generate for one prompt (returns one output) or a list of prompts (a batch).

        Keyword arguments are ``SamplingParams`` fields (``max_new_tokens``,
        ``temperature``, ``top_p``, ``min_p``, ``repetition_penalty``, ``presence_penalty``,
        ``frequency_penalty``, ``stop``, ``seed``, ``logprobs``, ...).
        """
        params = params or SamplingParams(**kwargs)
        batch: list[str | list[dict[str, Any]]]
        if isinstance(prompts, str) or _is_conversation(prompts):
            single, batch = True, [prompts]
        else:
            # not a conversation (caught above): a list of prompts
            single, batch = False, list(cast(list[str], prompts))
        ids = [self.encode_prompt(p, chat) for p in batch]
        timings = Timings()
        results = generate(self.model, self.tokenizer, ids, params, self.eos_token_ids, timings)
        outs = [self._output(r, timings) for r in results]
        return outs[0] if single else outs

    def stream(
        self,
        prompt: str | list[dict[str, Any]],
        params: SamplingParams | None = None,
        chat: bool | None = None,
        timings: Timings | None = None,
        **kwargs: Any,
    ) -> Iterator[str]:
        """Yield the answer's text piece by piece as it is decoded."""
        params = params or SamplingParams(**kwargs)
        ids = [self.encode_prompt(prompt, chat)]
        for events in generate_stream(
            self.model, self.tokenizer, ids, params, self.eos_token_ids, timings
        ):
            for _, text, _ in events:
                if text:
                    yield text

    def chat(
        self, messages: list[dict[str, Any]], params: SamplingParams | None = None, **kwargs: Any
    ) -> GenerationOutput:
        """Answer a conversation (list of ``{"role", "content"}``) with the chat template."""
        return self.generate(messages, params, **kwargs)

    def _output(self, r: Completion, timings: Timings) -> GenerationOutput:
        return GenerationOutput(
            text=r.text,
            token_ids=r.token_ids,
            prompt_tokens=r.prompt_tokens,
            completion_tokens=len(r.token_ids),
            finish_reason=r.finish_reason,
            timings=timings,
            logprobs=r.logprobs,
        )


def _is_conversation(prompts: object) -> TypeGuard[list[dict[str, Any]]]:
    """A list of ``{"role", "content"}`` messages: one prompt, not a batch."""
    return isinstance(prompts, list) and bool(prompts) and isinstance(prompts[0], dict)


def load(
    source: str | Path,
    dtype: str | torch.dtype | None = None,
    allow_pickle: bool = False,
    fast: bool = True,
    resolve_base: Callable[[str], Path] | None = None,
) -> LLM:
    """Load a model from a path: a Hugging Face folder, an adapter folder or a ``.gguf`` file.

    A folder whose ``config.json`` records a ``quantization_config`` (``folk quantize``) is
    loaded as saved: integer weights stay integer, nothing is re-quantized.

    Args:
        source: path to a model folder, an adapter folder or a GGUF file.
        dtype: compute dtype, ``float32`` or ``bfloat16`` (``float16`` is slow on CPUs);
            None: ``engine.device.default_dtype`` (bfloat16 where the CPU has native bf16,
            else float32; a quantized model's saved dtype where the CPU runs it natively).
        allow_pickle: accept pickled ``*.bin`` weights (loaded with ``weights_only=True``).
        fast: re-pack linear weights for fast CPU inference (``engine.fast``) and keep a GGUF
            file's quantized weights quantized (``kernels.gguf_linear``); turn off to get
            plain ``nn.Linear`` modules (e.g. to train or wrap them).
        resolve_base: turns the base model an adapter names (a path or, for
            ``folklm.load``, a hub name) into a path; None takes it as a path.
    """
    t0 = time.perf_counter()
    path = Path(source).expanduser()
    if path.is_dir() and not (path / "config.json").exists() and is_adapter_dir(path):
        return _load_with_adapter(path, dtype, allow_pickle, fast, t0, resolve_base)
    if path.is_dir():
        config = read_config(path)
        tensors = read_weights(path, allow_pickle=allow_pickle)
        quantized = config.extra.get("quantization_config")
        if quantized is not None:
            saved = quantized.get("dtype", "float32") if isinstance(quantized, dict) else None
            torch_dtype = parse_dtype(dtype or default_dtype(saved))
            model = materialize_quantized(config, tensors, str(path))
            cast_float_parts(model, torch_dtype)
        else:
            torch_dtype = parse_dtype(dtype or default_dtype())
            model = materialize(config, tensors, torch_dtype, str(path))
        tokenizer = Tokenizer.from_folder(path)
        gen_config = read_generation_config(path)
    elif path.is_file() and path.suffix.lower() == ".gguf":
        torch_dtype = parse_dtype(dtype or default_dtype())
        # fast: quantized weights stay as their file's blocks (native kernels); otherwise
        # every tensor is dequantized to plain modules, as training and merging need.
        ckpt = read_gguf(path, keep_quantized=fast)
        config = ModelConfig.from_dict(ckpt.config)
        model = materialize(config, ckpt.tensors, torch_dtype, str(path))
        if ckpt.quantized:
            install_gguf_modules(model, ckpt.quantized, torch_dtype)
        tokenizer = Tokenizer(ckpt.tokenizer, ckpt.tokenizer_config, source=str(path))
        gen_config = ckpt.generation_config
    elif path.is_file():
        raise CheckpointError(
            f"{path}: not a model (expected a Hugging Face folder or a .gguf file)"
        )
    else:
        raise CheckpointError(f"{path}: no such file or folder")
    if fast:
        speed_up(model)
    return LLM(model, tokenizer, gen_config, str(path), time.perf_counter() - t0)


def speed_up(model: CausalLM) -> None:
    """The native decode step where the model can take it (its linears stay plain, so the
    step reads them in place), else oneDNN-packed linears (``engine.fast``)."""
    nf4_to_int8(model)
    if native_step.enable(model) is None:
        pack_linears(model)


def _load_with_adapter(
    path: Path,
    dtype: str | torch.dtype | None,
    allow_pickle: bool,
    fast: bool,
    t0: float,
    resolve_base: Callable[[str], Path] | None,
) -> LLM:
    """A PEFT adapter folder: load the base it names and fuse the adapter into it."""
    adapter = load_adapter(path, allow_pickle=allow_pickle)
    base = adapter.config.base_model_name_or_path
    if not base:
        raise CheckpointError(f"{path}: the adapter does not name its base model")
    base_path = resolve_base(base) if resolve_base is not None else Path(base)
    llm = load(base_path, dtype, allow_pickle, fast=False, resolve_base=resolve_base)
    for name, w in adapter.layers.items():
        try:
            lin = llm.model.get_submodule(name)
        except AttributeError:
            raise CheckpointError(f"{path}: adapter layer {name!r} is not in {base}") from None
        weight = lin.weight  # an nn.Linear's (fast=False above)
        if not isinstance(weight, torch.Tensor):
            raise CheckpointError(f"{path}: adapter layer {name!r} has no dense weight")
        with torch.no_grad():
            weight.copy_(fused_weight(weight, w, adapter.config.scaling))
    if fast:
        speed_up(llm.model)
    llm.source, llm.load_seconds = str(path), time.perf_counter() - t0
    return llm
