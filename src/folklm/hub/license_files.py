"""Finding the licence of a model or a data set in its files.

A model: the GGUF ``general.license`` field, else the ``license:`` of the README's YAML
front matter (Hugging Face model cards), else a ``LICENSE`` file identified by its text.
A data file: the ``SOURCE.md`` / ``README.md`` beside it (or in a parent folder of the data
set): front matter ``license:``, else every licence named on its lines that mention a
licence -- a data set copied from a repository under one licence whose upstream data is
under another carries both.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from folklm.hub.licenses import identify_text, lookup, mentioned, split_expression

LICENSE_FILES = ("LICENSE", "LICENSE.txt", "LICENSE.md", "LICENCE", "LICENCE.txt", "COPYING")
DATA_DOCS = ("SOURCE.md", "README.md", "README", "DATA_LICENSE", "LICENSE", "LICENSE.txt")
_FRONT = re.compile(r"\A---[ \t]*\r?\n(.*?)\r?\n---[ \t]*(?:\r?\n|\Z)", re.DOTALL)


@dataclass
class Found:
    """Licence ids found, and where (for the record and the transparency report)."""

    ids: list[str] = field(default_factory=list)
    source: str = "not found"
    description: str | None = None


def _scalar(text: str) -> str:
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        return text[1:-1]
    return text.split(" #", 1)[0].strip()


def front_matter(text: str) -> dict[str, Any]:
    """Top-level scalars and lists of a Markdown file's YAML front matter.

    Model cards only need ``key: value`` and ``key:`` followed by ``- item`` lines here;
    nested mappings (``model-index``) are skipped rather than mis-read.
    """
    m = _FRONT.match(text)
    if not m:
        return {}
    out: dict[str, Any] = {}
    key = None
    for line in m.group(1).splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if not line[0].isspace() and ":" in line:
            key, _, value = line.partition(":")
            key = key.strip()
            out[key] = _scalar(value) if value.strip() else []
        elif key is not None and line.strip().startswith("- ") and isinstance(out[key], list):
            out[key].append(_scalar(line.strip()[2:]))
        else:
            key = None if not line[0].isspace() else key
    return out


def _read(path: Path, limit: int = 1 << 20) -> str:
    with open(path, "rb") as f:
        return f.read(limit).decode("utf-8", "replace")


def _declared(value: str, name: str | None, where: str) -> Found | None:
    if value.lower() == "other":
        lic = lookup(name) if name else None
        if lic:
            return Found([lic.id], f"{where} (license: other, license_name: {name})")
        if name:
            return Found([name.lower()], f"{where} (license: other, license_name: {name})")
        return None
    ids = split_expression(value)
    return Found(ids, f"{where} (license: {value})") if ids else None


def model_license(files: dict[str, Path], gguf_metadata: dict[str, Any]) -> Found:
    """The licence of a model from its GGUF metadata, README front matter or LICENSE text."""
    value = gguf_metadata.get("general.license")
    if isinstance(value, str) and value.strip():
        found = _declared(value, gguf_metadata.get("general.license.name"), "GGUF general.license")
        if found:
            return found
    if "README.md" in files:
        meta = front_matter(_read(files["README.md"]))
        value = meta.get("license")
        if isinstance(value, str) and value:
            name = meta.get("license_name")
            found = _declared(value, name if isinstance(name, str) else None, "README.md")
            if found:
                return found
    for name in LICENSE_FILES:
        if name in files and (lic := identify_text(_read(files[name]))):
            return Found([lic.id], f"{name} (text identified as the {lic.name})")
    return Found()


def data_license(path: Path, root_limit: int = 3) -> Found:
    """The licence ids of the data set ``path`` belongs to, from the documents beside it.

    Looks in the file's folder and up to ``root_limit`` - 1 parents for ``SOURCE.md``,
    ``README.md``, ``DATA_LICENSE`` or ``LICENSE``.
    """
    folder = path.parent
    for _ in range(root_limit):
        for doc_name in DATA_DOCS:
            doc = folder / doc_name
            if not doc.is_file():
                continue
            text = _read(doc)
            found = _data_doc(text, doc)
            if found.ids:
                return found
        if folder.parent == folder:
            break
        folder = folder.parent
    return Found()


def _data_doc(text: str, doc: Path) -> Found:
    description = _describe(text)
    meta = front_matter(text)
    value = meta.get("license")
    if isinstance(value, str) and value:
        ids = split_expression(value)
        return Found(ids, f"{doc} (front matter license: {value})", description)
    if isinstance(value, list) and value:
        ids = [i for v in value for i in split_expression(v)]
        return Found(ids, f"{doc} (front matter license: {', '.join(value)})", description)
    lines = [line.strip() for line in text.splitlines() if re.search(r"licen[cs]", line, re.I)]
    lics = mentioned(" ".join(lines))
    if lics:
        quoted = lines[0][:160]
        return Found([lic.id for lic in lics], f"{doc}: {quoted}", description)
    if lic := identify_text(text):
        return Found([lic.id], f"{doc} (text identified as the {lic.name})", description)
    return Found(description=description)


def _describe(text: str) -> str | None:
    """The data set's title and origin: its first heading and a repository/URL line."""
    title = next((ln.lstrip("# ").strip() for ln in text.splitlines() if ln.startswith("#")), None)
    origin = re.search(r"(?im)^\W*(?:repository|source|url|homepage)\W*:?\s*(\S+)", text)
    parts = [p for p in (title, origin.group(1) if origin else None) if p]
    return " -- ".join(parts) or None
