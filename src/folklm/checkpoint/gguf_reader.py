"""Open a GGUF file with ``gguf.GGUFReader``, fast and with bounds checks.

``GGUFReader`` (llama.cpp's ``gguf-py``) parses the header of the GGUF spec (``docs/gguf.md`` in
github.com/ggml-org/ggml): ``magic "GGUF" | version u32 | n_tensors u64 | n_kv u64``, then the
key/values (``key: string, type: u32, value``; strings are ``u64 length + UTF-8 bytes``;
arrays are ``item type u32, count u64, items``), then the tensor infos, then aligned data.

Two things are changed in a subclass, without changing what it returns for tensors:

* every read is bounds-checked, so a truncated file fails with how many bytes it lacks rather
  than with a short array or a reshape error further on;
* arrays are parsed in one go. The stock reader makes a memmap view per array element, which
  takes about two seconds for the 49k-token vocabulary and 49k merges of a small model.
  Here a numeric array is one view and a string array a numpy object array of ``str``
  (so ``ReaderField.contents()`` is not meaningful for array fields; use
  :func:`read_metadata`).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGUFReader, GGUFValueType

GGUF_MAGIC = b"GGUF"


class GGUFFileError(Exception):
    """The file is not a GGUF file folklm can read; the message is the reason, one line."""


class _Truncated(Exception):
    def __init__(self, needed: int, size: int) -> None:
        super().__init__(f"truncated GGUF file (needs at least {needed} bytes, has {size})")


class _Reader(GGUFReader):
    def _get(self, offset: int, dtype: Any, count: int = 1, override_order: Any = None) -> Any:
        plain = self.__dict__.get("_plain")
        if plain is None:
            # A plain ndarray view of the same mapping: slicing a np.memmap runs Python code.
            plain = self.__dict__["_plain"] = self.data.view(np.ndarray)
        dtype = np.dtype(dtype)
        count = int(count)
        end = int(offset) + dtype.itemsize * count
        if end > plain.size:
            raise _Truncated(end, plain.size)
        arr = plain[offset:end].view(dtype)
        order = self.byte_order if override_order is None else override_order
        return arr.view(arr.dtype.newbyteorder(order))

    def _get_field_parts(self, orig_offs: int, raw_type: int) -> tuple[int, list, list, list]:
        if (
            GGUFValueType(raw_type) != GGUFValueType.ARRAY
            or self.byte_order != "I"
            or sys.byteorder != "little"
        ):
            return super()._get_field_parts(orig_offs, raw_type)
        raw_itype = self._get(orig_offs, np.uint32)
        count = self._get(orig_offs + 4, np.uint64)
        itype = GGUFValueType(raw_itype[0])
        n, offs = int(count[0]), orig_offs + 12
        if itype == GGUFValueType.STRING:
            strings, offs = self._strings(offs, n)
            items = np.empty(n, dtype=object)
            items[:] = strings
        elif itype in self.gguf_scalar_to_np:
            items = self._get(offs, self.gguf_scalar_to_np[itype], n)
            offs += items.nbytes
        else:  # arrays of arrays: rare, leave them to the stock parser
            return super()._get_field_parts(orig_offs, raw_type)
        return offs - orig_offs, [raw_itype, count, items], [2], [GGUFValueType.ARRAY, itype]

    def _strings(self, offs: int, n: int) -> tuple[list[str], int]:
        self._get(offs, np.uint8, 0)  # make sure _plain exists
        buf = memoryview(self.__dict__["_plain"])
        size = len(buf)
        out = []
        for _ in range(n):
            if offs + 8 > size:
                raise _Truncated(offs + 8, size)
            length = int.from_bytes(buf[offs : offs + 8], "little")
            offs += 8
            if offs + length > size:
                raise _Truncated(offs + length, size)
            out.append(str(buf[offs : offs + length], "utf-8", "replace"))
            offs += length
        return out, offs


def open_gguf(path: Path) -> GGUFReader:
    """Parse the header, metadata and tensor infos of ``path`` (tensor data stays mapped).

    Raises:
        GGUFFileError: missing file, bad magic, truncated or otherwise unreadable.
    """
    if not path.exists():
        raise GGUFFileError("file not found")
    if path.is_dir():
        raise GGUFFileError("is a directory, expected a .gguf file")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise GGUFFileError(f"not a GGUF file (bad magic {magic!r}, expected {GGUF_MAGIC!r})")
    try:
        reader = _Reader(path)
    except _Truncated as e:
        raise GGUFFileError(str(e)) from None
    except (ValueError, KeyError, IndexError, OverflowError, UnicodeDecodeError) as e:
        raise GGUFFileError(f"corrupt or unsupported GGUF file ({_one_line(e)})") from None
    if reader.byte_order != "I":
        raise GGUFFileError("GGUF file of the other byte order (big-endian) is not supported")
    size = reader.data.size
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size:
            raise GGUFFileError(
                f"truncated GGUF file (tensor {t.name!r} ends at byte "
                f"{t.data_offset + t.n_bytes}, file has {size})"
            )
    return reader


def read_metadata(reader: GGUFReader) -> dict[str, Any]:
    """All key/value metadata as Python values (str, int, float, bool, or lists of them)."""
    out: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        kind = field.types[0] if field.types else None
        if kind == GGUFValueType.ARRAY:
            if len(field.parts) == 6 and len(field.data) == 1:  # parsed by _Reader in one go
                out[key] = field.parts[field.data[0]].tolist()
            else:
                out[key] = field.contents()
        elif kind == GGUFValueType.STRING:
            out[key] = str(bytes(field.parts[-1]), "utf-8", "replace")
        elif kind == GGUFValueType.FLOAT32:
            # The shortest decimal that round-trips the float32 (1e-05, not 9.99999974738e-06).
            out[key] = float(str(field.parts[-1][0]))
        else:
            out[key] = field.parts[-1][0].item()
    return out


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__
