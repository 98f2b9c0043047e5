"""Model references: ``name[:tag]``, as in Ollama (the tag defaults to ``latest``).

Names become folder and file names on export and appear in shell commands, so they are
checked before anything touches the file system: lower-case letters, digits, ``.``, ``_``
and ``-``, starting with a letter or digit, no ``..``. Upper case is accepted and folded
to lower case (names are case-insensitive, as in Ollama).
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

from folklm.errors import FolkError

DEFAULT_TAG = "latest"
MAX_NAME = 80
MAX_TAG = 64
_PART = re.compile(r"[a-z0-9][a-z0-9._-]*")
# Quantization suffixes of GGUF file names ("model.Q4_K_M.gguf", "model-f16.gguf"): they
# become the tag when a file is imported without --name.
_QUANT_SUFFIX = re.compile(r"[.-]((?:i?q\d(?:_[a-z0-9]+)*)|f16|f32|bf16|fp16|fp32)$", re.IGNORECASE)


@dataclass(frozen=True, order=True)
class ModelRef:
    """A validated ``name:tag``."""

    name: str
    tag: str = DEFAULT_TAG

    def __str__(self) -> str:
        return f"{self.name}:{self.tag}"


def _describe(text: str) -> str:
    """The reference as the user typed it, with control characters made visible."""
    return repr(text) if any(unicodedata.category(c).startswith("C") for c in text) else text


def _check_part(kind: str, part: str, limit: int, whole: str) -> str:
    bad = (
        f"invalid model name '{_describe(whole)}'"
        if part == whole
        else f"invalid model {kind} in '{_describe(whole)}'"
    )
    if not part:
        raise FolkError(f"{bad}: the {kind} is empty")
    if len(part) > limit:
        raise FolkError(f"{bad}: longer than {limit} characters")
    for c in part:
        if unicodedata.category(c).startswith("C"):
            raise FolkError(f"{bad}: contains the control character {c!r}")
        if c.isspace():
            raise FolkError(f"{bad}: contains a space")
        if c in "/\\":
            raise FolkError(f"{bad}: contains {c!r} (names are not paths)")
    if ".." in part:
        raise FolkError(f"{bad}: contains '..'")
    lowered = part.lower()
    if not _PART.fullmatch(lowered):
        raise FolkError(
            f"{bad}: use letters, digits, '.', '_' and '-', starting with a letter or digit"
        )
    return lowered


def parse_ref(text: str) -> ModelRef:
    """Parse and validate ``name`` or ``name:tag``.

    Raises:
        FolkError: the reference has a path separator, ``..``, a space, a control
            character or another character outside ``[a-z0-9._-]``.
    """
    if not isinstance(text, str):
        raise FolkError(f"invalid model name {text!r}: expected a string")
    name, sep, tag = text.partition(":")
    if sep and ":" in tag:
        raise FolkError(f"invalid model name '{_describe(text)}': more than one ':'")
    return ModelRef(
        _check_part("name", name, MAX_NAME, text),
        _check_part("tag", tag, MAX_TAG, text) if sep else DEFAULT_TAG,
    )


def suggest_ref(stem: str) -> ModelRef:
    """A valid reference derived from a folder or file name (``Foo-7B.Q4_K_M`` ->
    ``foo-7b:q4_k_m``)."""
    stem = unicodedata.normalize("NFKD", stem).encode("ascii", "ignore").decode()
    tag = DEFAULT_TAG
    if m := _QUANT_SUFFIX.search(stem):
        tag, stem = m.group(1).lower(), stem[: m.start()]
    name = re.sub(r"[^a-z0-9._-]+", "-", stem.lower())
    name = re.sub(r"\.{2,}", ".", name).strip("._-")[:MAX_NAME] or "model"
    return ModelRef(name, tag)
