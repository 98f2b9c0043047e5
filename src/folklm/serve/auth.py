"""API keys: with keys configured, every ``/v1`` route needs ``Authorization: Bearer KEY``.

Keys are compared in constant time (``hmac.compare_digest``) so response timing does not
leak a key prefix. A keys file holds one key per line; blank lines and ``#`` comments are
skipped.
"""

from __future__ import annotations

import hmac
from pathlib import Path

from folklm.errors import FolkError


class AuthError(FolkError):
    """Missing or wrong API key (401)."""


def read_keys_file(path: str | Path) -> list[str]:
    p = Path(path)
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise FolkError(f"{p}: cannot read API keys file ({exc})") from None
    keys = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    if not keys:
        raise FolkError(f"{p}: no API keys in the file")
    return keys


def check(keys: list[str], header: str | None) -> None:
    """Raise ``AuthError`` unless ``header`` is ``Bearer <one of keys>``."""
    if not keys:
        return
    if not header or not header.startswith("Bearer "):
        raise AuthError("missing API key: send 'Authorization: Bearer YOUR_KEY'")
    given = header[len("Bearer ") :].strip().encode("utf-8", "replace")
    if not any(hmac.compare_digest(given, k.encode()) for k in keys):
        raise AuthError("incorrect API key provided")
