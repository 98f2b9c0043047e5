"""Reading task data: JSONL, llama.cpp's HellaSwag text, MMLU CSV, raw text documents.

Every reader returns a list of records (dicts) for :class:`folklm.eval.tasks.TaskSpec`
templates. The named ``preprocess`` steps reproduce lm-evaluation-harness's
``process_docs`` for the built-in data, whose files come in other layouts (llm-foundry's
re-formatted JSONL, llama.cpp's HellaSwag text): ``hellaswag`` (lm_eval/tasks/hellaswag/
utils.py: ``activity_label: ctx_a + " " + ctx_b.capitalize()``, bracket artefacts removed),
``wikitext`` (lm_eval/tasks/wikitext/preprocess_wikitext.py's detokenizer; words and bytes
are counted on the original page, as there) and ``boolq`` (``passage\\nQuestion: ...?``).
"""

from __future__ import annotations

import bz2
import csv
import json
import re
from pathlib import Path
from typing import Any

from folklm import datasets
from folklm.errors import FolkError

FORMATS = ("jsonl", "hellaswag_txt", "mmlu_csv", "wikitext_raw", "text_blocks")


def read_records(path: str | Path, fmt: str) -> list[dict[str, Any]]:
    """The records of a data file in format ``fmt`` (one of ``FORMATS``).

    ``builtin:<set>/<file>`` names a shipped data file (see :mod:`folklm.datasets`).
    """
    if str(path).startswith(datasets.SCHEME):
        path = datasets.path(str(path))
    p = Path(path).expanduser()
    if fmt not in FORMATS:
        raise FolkError(f"{p}: unknown data format {fmt!r} (known: {', '.join(FORMATS)})")
    if not p.is_file():
        raise FolkError(f"{p}: no such data file")
    if fmt == "jsonl":
        return _jsonl(p)
    if fmt == "hellaswag_txt":
        return _hellaswag(p)
    if fmt == "mmlu_csv":
        return _mmlu(p)
    text = p.read_text(encoding="utf-8")
    if fmt == "wikitext_raw":
        return _wikitext_pages(text)
    return _blocks(text)


def _jsonl(p: Path) -> list[dict[str, Any]]:
    out = []
    with open(p, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise FolkError(f"{p} line {n}: not valid JSON ({e.msg})") from None
            if not isinstance(rec, dict):
                raise FolkError(f"{p} line {n}: expected a JSON object")
            out.append(rec)
    if not out:
        raise FolkError(f"{p}: no records")
    return out


def _hellaswag(p: Path) -> list[dict[str, Any]]:
    opener = bz2.open if p.suffix == ".bz2" else open
    with opener(p, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if len(lines) % 6:
        raise FolkError(f"{p}: expected 6 lines per HellaSwag item, got {len(lines)} lines")
    out = []
    for i in range(0, len(lines), 6):
        label = lines[i + 1].strip()
        if not label.isdigit():
            raise FolkError(f"{p} line {i + 2}: label must be 0-3, got {label!r}")
        out.append({"ctx": lines[i], "label": int(label), "endings": lines[i + 2 : i + 6]})
    return out


def _mmlu(p: Path) -> list[dict[str, Any]]:
    out = []
    subject = re.sub(r"_(test|dev|val)$", "", p.stem)
    with open(p, encoding="utf-8", newline="") as f:
        for n, row in enumerate(csv.reader(f), 1):
            if len(row) != 6 or row[5] not in ("A", "B", "C", "D"):
                raise FolkError(f"{p} row {n}: expected question, 4 options, answer A-D")
            out.append(
                {
                    "question": row[0],
                    "choices": row[1:5],
                    "answer": "ABCD".index(row[5]),
                    "subject": subject,
                }
            )
    return out


_HEADING = re.compile(r"^ = [^=].* = $")


def _wikitext_pages(text: str) -> list[dict[str, Any]]:
    """Split the raw file into articles at level-1 headings (`` = Title = ``)."""
    pages: list[list[str]] = []
    for line in text.replace("\r\n", "\n").split("\n"):
        if _HEADING.match(line) or not pages:
            pages.append([])
        pages[-1].append(line)
    return [{"page": "\n".join(lines).strip("\n") + "\n"} for lines in pages if "".join(lines)]


def _blocks(text: str, min_chars: int = 4000) -> list[dict[str, Any]]:
    """Consecutive blank-line-separated paragraphs grouped into documents of >= min_chars."""
    out, current = [], ""
    for para in re.split(r"\n\s*\n", text.strip()):
        current = f"{current}\n\n{para}" if current else para
        if len(current) >= min_chars:
            out.append({"text": current})
            current = ""
    if current:
        out.append({"text": current})
    return out


# -- lm-eval's process_docs for the built-in files -------------------------------------------
def _hellaswag_clean(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _capitalize_ctx_b(ctx: str) -> str:
    """llama.cpp's file holds ``ctx = ctx_a + " " + ctx_b``; the harness capitalises ctx_b.

    ctx_a ends a sentence, ctx_b is the fragment after it: capitalise that fragment when
    it starts in lower case (``str.capitalize``, as the harness does).
    """
    cut = max(ctx.rfind(". "), ctx.rfind("? "), ctx.rfind("! "))
    head, tail = (ctx[: cut + 2], ctx[cut + 2 :]) if cut >= 0 else ("", ctx)
    if tail[:1].islower():
        tail = tail.capitalize()
    return head + tail


def _preprocess_hellaswag(rec: dict[str, Any]) -> dict[str, Any]:
    label, _, ctx = rec["ctx"].partition(": ")
    query = f"{label}: {_capitalize_ctx_b(ctx)}" if ctx else _capitalize_ctx_b(label)
    return {
        **rec,
        "query": _hellaswag_clean(query),
        "choices": [_hellaswag_clean(e) for e in rec["endings"]],
    }


def wikitext_detokenize(string: str) -> str:
    """WikiText's tokenised spacing undone, rule for rule as the harness does it."""
    string = string.replace("s '", "s'")
    string = re.sub(r"/' [0-9]/", r"/'[0-9]/", string)
    for a, b in ((" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", ".")):
        string = string.replace(a, b)
    for p in ":;.!?,":
        string = string.replace(f" {p} ", f"{p} ")
    string = re.sub(r"\(\s*([^\)]*?)\s*\)", r"(\1)", string)
    string = re.sub(r"\[\s*([^\]]*?)\s*\]", r"[\1]", string)
    string = re.sub(r"{\s*([^}]*?)\s*}", r"{\1}", string)
    string = re.sub(r"\"\s*([^\"]*?)\s*\"", r'"\1"', string)
    string = re.sub(r"'\s*([^']*?)\s*'", r"'\1'", string)
    string = string.replace("= = = =", "====").replace("= = =", "===").replace("= =", "==")
    string = string.replace(" " + chr(176) + " ", chr(176))
    string = string.replace(" \n", "\n").replace("\n ", "\n")
    return string.replace(" N ", " 1 ").replace(" 's", "'s")


def _preprocess_wikitext(rec: dict[str, Any]) -> dict[str, Any]:
    return {**rec, "text": wikitext_detokenize(rec["page"]), "count_text": rec["page"]}


def _preprocess_boolq(rec: dict[str, Any]) -> dict[str, Any]:
    query = rec.get("query", "")
    return {**rec, "query": query.removeprefix("Passage: ")}


PREPROCESS = {
    "hellaswag": _preprocess_hellaswag,
    "wikitext": _preprocess_wikitext,
    "boolq": _preprocess_boolq,
}


def load_records(path: str | Path, fmt: str, preprocess: str | None) -> list[dict[str, Any]]:
    records = read_records(path, fmt)
    if preprocess is None:
        return records
    if preprocess not in PREPROCESS:
        raise FolkError(f"unknown preprocess step {preprocess!r} (known: {', '.join(PREPROCESS)})")
    step = PREPROCESS[preprocess]
    out = []
    for i, rec in enumerate(records):
        try:
            out.append(step(rec))
        except (KeyError, TypeError, AttributeError) as e:
            raise FolkError(f"{path} record {i}: missing field {e} for {preprocess}") from None
    return out
