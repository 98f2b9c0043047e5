"""The streaming merge: one tensor at a time from every input to the output file.

For each tensor name the executor reads that tensor from every memory-mapped input,
resolves the recipe's parameters for it (by name and depth), applies the method
(:mod:`folklm.merge.methods`), appends the result to the output shard
(:mod:`folklm.merge.writer`) and drops the inputs' file pages. Memory is therefore one
tensor per input plus the method's scratch, not one model per input.
"""

from __future__ import annotations

import json
import resource
import shutil
import sys
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from folklm.checkpoint.safetensors_io import release_pages
from folklm.errors import FolkError
from folklm.merge import methods
from folklm.merge.config import GLOBAL_DEFAULTS, MergeConfig, Param
from folklm.merge.inputs import (
    OpenModel,
    check_compatible,
    check_vocabularies,
    depth,
    open_model,
)
from folklm.merge.writer import StreamingWriter, TensorSpec

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Files of an input folder that are not carried into the merged folder.
_SKIP = {"config.json", "model.safetensors.index.json", "README.md", ".gitattributes"}


@dataclass
class MergeStats:
    tensors: int
    bytes_written: int
    seconds: float
    peak_rss_bytes: int
    input_weight_bytes: list[int] = field(default_factory=list)


def peak_rss_bytes() -> int:
    """This process's peak resident set size so far.

    Linux: ``VmHWM`` from ``/proc/self/status``, the high-water mark of the current
    address space (``ru_maxrss`` would also count the parent's peak, which Linux carries
    across ``fork`` + ``exec``). Elsewhere: ``getrusage`` ``ru_maxrss``.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def open_inputs(cfg: MergeConfig) -> tuple[OpenModel | None, list[OpenModel]]:
    """Open and cross-check every input; returns (base, others)."""
    base = open_model(cfg.base, "base_model") if cfg.base is not None else None
    others = [open_model(m, f"models[{i}]") for i, m in enumerate(cfg.models)]
    everyone = ([base] if base else []) + others
    for other in everyone[1:]:
        check_compatible(everyone[0], other)
    check_vocabularies(everyone)
    return base, others


def _value(p: Param | None, name: str, t: float, key: str, default=None):
    if p is None:
        if default is None:
            raise FolkError(f"parameter {key!r} is not set for tensor '{name}'")
        return default
    v = p.at(name, t)
    if v is None:
        raise FolkError(f"{p.where}: no filter matches tensor '{name}'")
    return v


def _generator(seed: int, name: str, index: int) -> torch.Generator:
    """Per (tensor, model) stream: DARE's masks do not depend on the order of work."""
    g = torch.Generator()
    g.manual_seed((seed * 1_000_003 + zlib.crc32(name.encode()) * 131 + index) % (2**63))
    return g


def merge_tensor(
    cfg: MergeConfig,
    name: str,
    t: float,
    base: torch.Tensor | None,
    others: list[torch.Tensor],
) -> torch.Tensor:
    """Apply the recipe's method to one tensor (inputs already in the compute dtype)."""
    m = cfg.method
    if m == "lora_fuse":
        return others[0]
    glob = cfg.parameters
    if m == "slerp":
        assert base is not None  # config.NEEDS_BASE: the recipe was refused without one
        return methods.slerp(float(_value(glob.get("t"), name, t, "t")), base, others[0])
    weights = [float(_value(cfg.param(x, "weight"), name, t, "weight")) for x in cfg.models]
    normalize = bool(_value(glob.get("normalize"), name, t, "normalize", _default(m, "normalize")))
    if m == "linear":
        return methods.linear(others, weights, normalize)
    assert base is not None  # every method below is in config.NEEDS_BASE
    lam = float(_value(glob.get("lambda"), name, t, "lambda", 1.0))
    if m == "task_arithmetic":
        return methods.task_arithmetic(base, others, weights, lam=lam, normalize=normalize)
    dens = [float(_value(cfg.param(x, "density"), name, t, "density")) for x in cfg.models]
    for i, d in enumerate(dens):
        if not 0 < d <= 1:
            raise FolkError(f"models[{i}].parameters.density: {d} at tensor '{name}' not in (0, 1]")
    gens = [_generator(cfg.seed, name, i) for i in range(len(others))] if "dare" in m else None
    if m == "dare_linear":
        return methods.task_arithmetic(
            base, others, weights, lam=lam, normalize=normalize, densities=dens, generators=gens
        )

    return methods.ties(
        base,
        others,
        weights,
        dens,
        lam=lam,
        normalize=normalize,
        generators=gens,
        release=release_pages,
    )  # ties, dare_ties


def _default(method: str, key: str):
    return GLOBAL_DEFAULTS[method][key]


def run_merge(
    cfg: MergeConfig,
    out: str | Path,
    *,
    max_shard_bytes: int = 2 * 1024**3,
    progress: Callable[[int, int, str], None] | None = None,
    opened: tuple[OpenModel | None, list[OpenModel]] | None = None,
) -> MergeStats:
    """Merge into the folder ``out`` (created; must not exist or be empty).

    ``opened`` is the result of :func:`open_inputs` when the caller already has it.

    Raises:
        FolkError: an input cannot be read or does not match the others, or a parameter
            cannot be resolved for a tensor. Nothing is left in ``out`` then.
    """
    t0 = time.perf_counter()
    folder = Path(out)
    if folder.exists() and any(folder.iterdir()):
        raise FolkError(f"{folder}: output folder exists and is not empty")
    base, others = opened if opened is not None else open_inputs(cfg)
    ref = base or others[0]
    compute = DTYPES[cfg.dtype]
    out_dtype = DTYPES[cfg.out_dtype or cfg.dtype]
    num_layers = int(ref.config.get("num_hidden_layers") or 1)
    names = list(ref.tensors)
    specs = [
        TensorSpec(
            n,
            out_dtype if ref.tensors[n].is_floating_point() else ref.tensors[n].dtype,
            tuple(ref.tensors[n].shape),
        )
        for n in names
    ]
    folder.mkdir(parents=True, exist_ok=True)
    writer = StreamingWriter(folder, specs, max_shard_bytes)
    try:
        for i, name in enumerate(names):
            if not ref.tensors[name].is_floating_point():
                result = ref.tensors[name]
            else:
                t = depth(name, num_layers)
                b = base.get(name).to(compute) if base is not None else None
                xs = [o.get(name).to(compute) for o in others]
                result = merge_tensor(cfg, name, t, b, xs)
                del b, xs
            writer.write(name, result.to(specs[i].dtype))
            del result
            for m in ([base] if base else []) + others:
                m.release(name)
            if progress is not None:
                progress(i + 1, len(names), name)
        writer.close()
        _copy_side_files(ref, folder, out_dtype)
    except BaseException:
        writer.abort()
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return MergeStats(
        tensors=len(names),
        bytes_written=writer.bytes_written,
        seconds=time.perf_counter() - t0,
        peak_rss_bytes=peak_rss_bytes(),
        input_weight_bytes=[_weight_bytes(m) for m in ([base] if base else []) + others],
    )


def _weight_bytes(m: OpenModel) -> int:
    return sum(t.numel() * t.element_size() for t in m.tensors.values())


def _copy_side_files(ref: OpenModel, folder: Path, out_dtype: torch.dtype) -> None:
    """config.json (with the new dtype) and the tokenizer/generation files of ``ref``."""
    config = dict(ref.config)
    config["dtype" if "dtype" in config else "torch_dtype"] = str(out_dtype).removeprefix("torch.")
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for p in sorted(ref.folder.iterdir()):
        if p.name in _SKIP or p.name.startswith(".") or not p.is_file():
            continue
        if p.suffix in (".safetensors", ".bin", ".pt", ".pth", ".gguf"):
            continue
        shutil.copyfile(p, folder / p.name)
