"""Streaming safetensors writer: the header first, then each tensor's bytes as it comes.

The output of a merge has the names, shapes and dtypes of its inputs, so every shard's
header (https://huggingface.co/docs/safetensors: 8-byte little-endian length, JSON, then
the raw bytes at the listed ``data_offsets``) can be written before any tensor is merged.
Each merged tensor is then appended and dropped: the writer holds one tensor at a time,
however large the model. Shards follow the Hugging Face layout
(``model-00001-of-00002.safetensors`` + ``model.safetensors.index.json``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

_CODES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * torch.empty((), dtype=self.dtype).element_size()


def plan_shards(specs: list[TensorSpec], max_shard_bytes: int) -> list[list[TensorSpec]]:
    """Split ``specs`` (in order) into shards of at most ``max_shard_bytes`` each (a tensor
    larger than that gets a shard of its own)."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards


class StreamingWriter:
    """Write tensors in the planned order; :meth:`write` checks each against the plan."""

    def __init__(self, folder: Path, specs: list[TensorSpec], max_shard_bytes: int) -> None:
        self.folder = folder
        self.shards = plan_shards(specs, max_shard_bytes)
        n = len(self.shards)
        self.names = (
            ["model.safetensors"]
            if n == 1
            else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        )
        self._order = [(i, s) for i, shard in enumerate(self.shards) for s in shard]
        self._next = 0
        self._shard = -1
        self._file: BinaryIO | None = None
        self.bytes_written = 0

    def _finish_file(self) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None

    def _open(self, index: int) -> None:
        self._finish_file()
        header: dict = {"__metadata__": {"format": "pt"}}
        offset = 0
        for spec in self.shards[index]:
            header[spec.name] = {
                "dtype": _CODES[spec.dtype],
                "shape": list(spec.shape),
                "data_offsets": [offset, offset + spec.nbytes],
            }
            offset += spec.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned
        self._file = open(self.folder / self.names[index], "wb")  # noqa: SIM115
        self._file.write(len(raw).to_bytes(8, "little") + raw)
        self._shard = index

    def write(self, name: str, tensor: torch.Tensor) -> None:
        index, spec = self._order[self._next]
        if name != spec.name or tensor.dtype != spec.dtype or tuple(tensor.shape) != spec.shape:
            raise RuntimeError(
                f"writer expected {spec.name} {spec.dtype} {spec.shape}, got "
                f"{name} {tensor.dtype} {tuple(tensor.shape)}"
            )
        if index != self._shard:
            self._open(index)
        data = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
        if data.numel():
            assert self._file is not None  # the shard of `index` is open (just above)
            self._file.write(data.numpy().data)  # the array's buffer, as a memoryview
        self.bytes_written += data.numel()
        self._next += 1

    def close(self) -> None:
        """Finish the last shard (fsync) and write the index of a sharded model."""
        if self._next != len(self._order):
            missing = self._order[self._next][1].name
            raise RuntimeError(f"writer closed before tensor {missing!r} was written")
        self._finish_file()
        if len(self.shards) > 1:
            index = {
                "metadata": {"total_size": sum(s.nbytes for _, s in self._order)},
                "weight_map": {
                    s.name: self.names[i] for i, shard in enumerate(self.shards) for s in shard
                },
            }
            text = json.dumps(index, indent=2) + "\n"
            (self.folder / "model.safetensors.index.json").write_text(text)

    def abort(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
