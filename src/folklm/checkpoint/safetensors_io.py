"""Zero-copy safetensors reading and atomic writing.

The safetensors format (https://huggingface.co/docs/safetensors) is an 8-byte little-endian
header length, a JSON header mapping tensor names to ``dtype``, ``shape`` and
``data_offsets``, then the raw bytes. Reading maps the file copy-on-write and views each
tensor in place, so a model's weights are paged in lazily by the OS and never copied in
RAM; a header that points past the end of the file is reported as a truncated file.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
import weakref
from pathlib import Path

import torch
from safetensors.torch import save_file

from folklm.errors import CheckpointError

_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def read_header(path: Path) -> tuple[dict, int]:
    """Return (header dict without ``__metadata__`` removed, data start offset)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header)")
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8 or n > 100_000_000:
            raise CheckpointError(
                f"{path}: truncated or not a safetensors file (header of {n} bytes, file {size})"
            )
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CheckpointError(f"{path}: corrupt safetensors header (not JSON)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    return header, 8 + n


def load_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Map ``path`` and return its tensors as views into the mapping (no copy)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    header, start = read_header(path)
    size = path.stat().st_size
    header.pop("__metadata__", None)
    end_of_data = max((int(v["data_offsets"][1]) for v in header.values()), default=0)
    if start + end_of_data > size:
        missing = start + end_of_data - size
        raise CheckpointError(
            f"{path}: truncated safetensors file ({missing} bytes missing of {start + end_of_data})"
        )
    if size == 0 or not header:
        return {}
    with open(path, "rb") as f:
        # ACCESS_COPY: private copy-on-write mapping, so tensors are writable views and
        # nothing is written back to the file.
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    buf = torch.frombuffer(mm, dtype=torch.uint8)
    _MAPPINGS[buf.data_ptr()] = (weakref.ref(mm), len(mm))
    tensors = {}
    for name, info in header.items():
        try:
            dtype = _DTYPES[info["dtype"]]
            shape = [int(s) for s in info["shape"]]
            lo, hi = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(
                f"{path}: tensor {name!r} has an unsupported entry {info}"
            ) from None
        numel = 1
        for s in shape:
            numel *= s
        if hi - lo != numel * torch.empty((), dtype=dtype).element_size():
            raise CheckpointError(
                f"{path}: tensor {name!r} has {hi - lo} bytes, shape {shape} needs "
                f"{numel * torch.empty((), dtype=dtype).element_size()}"
            )
        tensors[name] = buf[start + lo : start + hi].view(dtype).view(shape)
    return tensors


# Base address -> (weak reference to the mapping, its length). Weak: the mapping lives as
# long as some tensor views it, and not a moment longer because of this table.
_MAPPINGS: dict[int, tuple[weakref.ref, int]] = {}


def release_pages(tensor: torch.Tensor) -> bool:
    """Drop the resident pages of a tensor that is a view into a mapped checkpoint.

    After a weight has been copied elsewhere (re-packed, converted), its file pages still
    count in the process's RSS while the mapping lives. The mapping is private and never
    written, so ``MADV_DONTNEED`` simply forgets the pages; touching them again re-reads
    the file. Returns False (and does nothing) for tensors not in a mapping.
    """
    start = tensor.data_ptr()
    end = start + tensor.numel() * tensor.element_size()
    for base, (ref, length) in list(_MAPPINGS.items()):
        mm = ref()
        if mm is None:
            del _MAPPINGS[base]
            continue
        if base <= start and end <= base + length:
            page = mmap.PAGESIZE
            lo = -(-(start - base) // page) * page  # whole pages inside the tensor only
            hi = (end - base) // page * page
            if hi > lo and hasattr(mm, "madvise"):
                mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)
            return True
    return False


def save_safetensors(
    tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict | None = None
) -> None:
    """Write atomically: a temporary file in the same folder, fsync, then rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
