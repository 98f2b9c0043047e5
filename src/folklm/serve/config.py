"""``ServeConfig``: every setting of ``folk serve``, validated in one place.

The dataclass is the single description of the server's settings: ``folk serve`` builds
its command-line options from these fields (each field's ``metadata`` holds its flag and
help text), Python users and tests construct it directly, and :func:`build_app` calls
:meth:`ServeConfig.validate` once, so a bad value is refused with the same message
whichever door it came through.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from folklm.errors import FolkError

DTYPES = ("float32", "bfloat16")
GIB = 1 << 30


def _flag(help: str, lo: float | None = None, hi: float | None = None, **extra: Any) -> dict:
    return {"help": help, "range": (lo, hi), **extra}


@dataclass
class ServeConfig:
    """What ``folk serve`` starts.

    Attributes:
        models: registry names, paths, loaded ``LLM`` objects, or None for the default.
        names: the name each model is served under (default: derived from the source).
        adapters: served adapter name -> (base, PEFT folder).
        api_keys: bearer keys; empty: no authentication.
        allowed_hosts: ``Host`` names served besides localhost/127.0.0.1/[::1] when bound
            to loopback (the DNS-rebinding guard).
    """

    models: list[Any] = field(default_factory=lambda: [None])
    names: list[str | None] | None = None
    adapters: dict[str, tuple[str, str]] = field(default_factory=dict)
    api_keys: list[str] = field(default_factory=list)
    allowed_hosts: list[str] = field(default_factory=list)
    host: str = field(default="127.0.0.1", metadata=_flag("Address to bind."))
    port: int = field(default=8000, metadata=_flag("Port to bind.", 0, 65535))
    max_batch: int = field(default=16, metadata=_flag("Most sequences decoding together.", 1, 1024))
    max_queue: int = field(default=256, metadata=_flag("Most requests waiting; beyond it: 429.", 0))
    max_len: int | None = field(
        default=None, metadata=_flag("Most tokens per sequence (default: the model's context).", 1)
    )
    kv_cache_bytes: int = 4 * GIB
    max_adapters: int = field(default=8, metadata=_flag("Adapters resident at once (LRU).", 1, 256))
    max_body_bytes: int = 4 << 20
    max_choices: int = field(
        default=64,
        metadata=_flag("Most choices (prompts x n) in one completions request.", 1, 1024),
    )
    dtype: str = field(
        default="float32", metadata=_flag("Compute dtype: float32 or bfloat16.", choices=DTYPES)
    )

    def validate(self) -> ServeConfig:
        """Check every field; returns ``self``.

        Raises:
            FolkError: the first bad value, naming the field and its ``folk serve`` flag.
        """
        for f in fields(self):
            lo, hi = f.metadata.get("range", (None, None))
            value = getattr(self, f.name)
            flag = "--" + f.name.replace("_", "-")
            if value is None or not f.metadata:
                continue
            if (lo is not None and value < lo) or (hi is not None and value > hi):
                span = f">= {lo}" if hi is None else f"in {lo}..{hi}"
                raise FolkError(f"{flag} {value!r}: must be {span}")
            choices = f.metadata.get("choices")
            if choices and value not in choices:
                raise FolkError(f"{flag} {value!r}: expected one of: {', '.join(choices)}")
        if self.kv_cache_bytes < GIB // 100:
            raise FolkError(f"--kv-cache-gb {self.kv_cache_bytes / GIB:g}: must be >= 0.01")
        if self.max_body_bytes < 1:
            raise FolkError(f"max_body_bytes {self.max_body_bytes}: must be >= 1")
        if not self.models:
            raise FolkError("no model to serve")
        if self.names is not None and len(self.names) != len(self.models):
            raise FolkError(f"{len(self.names)} names for {len(self.models)} models")
        for name, pair in self.adapters.items():
            if not (name and isinstance(pair, tuple | list) and len(pair) == 2 and all(pair)):
                raise FolkError(f"--adapter {name!r}: expected NAME=BASE:FOLDER")
        return self


def parse_adapter(spec: str) -> tuple[str, tuple[str, str]]:
    """``NAME=BASE:FOLDER`` -> ``(NAME, (BASE, FOLDER))`` (``folk serve --adapter``)."""
    name, sep, rest = spec.partition("=")
    base, sep2, folder = rest.partition(":")
    if not (sep and sep2 and name and base and folder):
        raise FolkError(f"--adapter {spec!r}: expected NAME=BASE:FOLDER")
    return name, (base, folder)


def flag_fields() -> list:
    """The fields ``folk serve`` turns into ``--flag`` options, in order."""
    return [f for f in fields(ServeConfig) if f.metadata]
