"""Training data: format detection, chat-template rendering, assistant-only masks, packing.

Formats, detected from the records of a JSON array or JSON Lines file (``.gz`` allowed):

* Alpaca (Taori et al., 2023): ``instruction`` / ``input`` / ``output``;
* ShareGPT / Vicuna (Chiang et al., 2023): ``conversations`` of ``from`` / ``value``;
* OpenAI chat: ``messages`` of ``role`` / ``content``;
* plain text (``text`` field, or a ``.txt`` file): continued pre-training, packed into
  fixed-length blocks, every token a target;
* preference pairs: ``prompt`` / ``chosen`` / ``rejected``, or the HH-RLHF layout
  (Bai et al., 2022, arXiv:2204.05862) of two whole dialogues ``\\n\\nHuman: ...
  \\n\\nAssistant: ...`` that differ in the last answer.

Conversations are rendered with the model's own chat template. The loss covers assistant
tokens only: the characters a template adds for assistant turn ``i`` are those between
``render(turns[:i], add_generation_prompt=True)`` and ``render(turns[:i+1])`` (the answer
and its end-of-turn marker), and a token is a target when its character offset falls in
such a span. This is the span transformers marks with ``{% generation %}`` tags.
"""

from __future__ import annotations

import gzip
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from folklm.errors import FolkError
from folklm.tokenizer import Tokenizer

IGNORE = -100
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
SHAREGPT_ROLES |= {"chatgpt": "assistant", "bard": "assistant", "bing": "assistant"}
SHAREGPT_ROLES |= {"system": "system"}
CHAT_ROLES = ("system", "user", "assistant")
FORMATS = ("alpaca", "sharegpt", "openai", "text", "preference", "hh-rlhf")
_HH_TURN = re.compile(r"\n\n(Human|Assistant): ")


@dataclass
class Record:
    line: int  # 1-based line where the record starts
    index: int  # 0-based record number
    data: Any


@dataclass
class SFTExample:
    input_ids: list[int]
    labels: list[int]  # IGNORE where no loss


@dataclass
class PreferenceExample:
    prompt_ids: list[int]
    chosen_ids: list[int]  # response tokens only (each ends with the end-of-turn marker)
    rejected_ids: list[int]


@dataclass
class Dataset:
    path: Path
    format: str
    examples: list[Any]
    records: int
    truncated: int = 0
    dropped: int = 0
    stats: dict[str, int] = field(default_factory=dict)

    @property
    def is_preference(self) -> bool:
        return self.format in ("preference", "hh-rlhf")


# -- reading ----------------------------------------------------------------------------
def read_records(path: str | Path) -> list[Record]:
    """Records of a JSON array, a JSON Lines file, or a ``.txt`` file (one record)."""
    p = Path(path)
    if not p.is_file():
        raise FolkError(f"{p}: data file not found")
    try:
        raw = gzip.open(p).read() if p.suffix == ".gz" else p.read_bytes()
        text = raw.decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise FolkError(f"{p}: cannot read as UTF-8 text ({exc})") from None
    if p.name.removesuffix(".gz").endswith(".txt"):
        return [Record(1, 0, {"text": text})] if text.strip() else []
    stripped = text.lstrip()
    if stripped.startswith("["):
        return _json_array(p, text)
    records: list[Record] = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(Record(n, len(records), json.loads(line)))
        except json.JSONDecodeError as exc:
            raise FolkError(f"{p}:{n}: not valid JSON ({exc.msg})") from None
    return records


def _json_array(p: Path, text: str) -> list[Record]:
    dec = json.JSONDecoder()
    i = text.index("[") + 1
    out: list[Record] = []
    while True:
        while i < len(text) and text[i] in " \t\r\n,":
            i += 1
        if i >= len(text):
            raise FolkError(f"{p}: JSON array is not closed")
        if text[i] == "]":
            return out
        try:
            obj, end = dec.raw_decode(text, i)
        except json.JSONDecodeError as exc:
            raise FolkError(f"{p}:{exc.lineno}: not valid JSON ({exc.msg})") from None
        out.append(Record(text.count("\n", 0, i) + 1, len(out), obj))
        i = end


def detect(data: Any) -> str | None:
    """The format one record is in, or None."""
    if not isinstance(data, dict):
        return None
    if isinstance(data.get("conversations"), list):
        return "sharegpt"
    if isinstance(data.get("messages"), list):
        return "openai"
    if {"prompt", "chosen", "rejected"} <= data.keys():
        return "preference"
    if {"chosen", "rejected"} <= data.keys() and "Assistant:" in str(data["chosen"]):
        return "hh-rlhf"
    if "instruction" in data and "output" in data:
        return "alpaca"
    if isinstance(data.get("text"), str):
        return "text"
    return None


def _describe(data: Any) -> str:
    if isinstance(data, dict):
        return "keys: " + ", ".join(sorted(map(str, data))[:8])
    return f"a JSON {type(data).__name__}"


def detect_format(path: Path, records: list[Record]) -> str:
    """The file's format: that of its first record, which every record must share."""
    if not records:
        raise FolkError(f"{path}: the data set is empty (no records)")
    fmt = detect(records[0].data)
    for r in records:
        got = detect(r.data)
        if got is None or (fmt is not None and got != fmt):
            if fmt is None:
                expected = (
                    "Alpaca instruction/input/output, ShareGPT conversations, OpenAI "
                    "messages, text, or prompt/chosen/rejected"
                )
            else:
                expected = f"the {fmt} format of record 1"
            raise FolkError(
                f"{path}:{r.line}: record {r.index + 1} fits no known format "
                f"({_describe(r.data)}); expected {expected}"
            )
    assert fmt is not None
    return fmt


# -- records -> chat turns ----------------------------------------------------------------
def _where(path: Path, r: Record) -> str:
    return f"{path}:{r.line}: record {r.index + 1}"


def _text(value: Any, where: str, name: str) -> str:
    if not isinstance(value, str):
        raise FolkError(f"{where}: field '{name}' must be a string, got {type(value).__name__}")
    return value


def to_messages(path: Path, r: Record, fmt: str) -> list[dict[str, str]]:
    """A chat (list of role/content) for an Alpaca, ShareGPT or OpenAI record."""
    where, d = _where(path, r), r.data
    if fmt == "alpaca":
        prompt = _text(d["instruction"], where, "instruction")
        extra = d.get("input") or ""
        if _text(extra, where, "input").strip():
            prompt = f"{prompt}\n\n{extra}"
        return [
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": _text(d["output"], where, "output")},
        ]
    turns, key_role, key_text = (
        (d["conversations"], "from", "value")
        if fmt == "sharegpt"
        else (d["messages"], "role", "content")
    )
    messages = []
    for t, turn in enumerate(turns):
        if not isinstance(turn, dict) or key_role not in turn or key_text not in turn:
            raise FolkError(f"{where}: turn {t + 1} needs '{key_role}' and '{key_text}'")
        role = turn[key_role]
        mapped = SHAREGPT_ROLES.get(role) if fmt == "sharegpt" else role
        if mapped not in CHAT_ROLES:
            known = sorted(SHAREGPT_ROLES) if fmt == "sharegpt" else list(CHAT_ROLES)
            raise FolkError(
                f"{where}: turn {t + 1} has unknown role {role!r} (expected one of: "
                f"{', '.join(known)})"
            )
        messages.append({"role": mapped, "content": _text(turn[key_text], where, key_text)})
    if not any(m["role"] == "assistant" for m in messages):
        raise FolkError(f"{where}: the conversation has no assistant turn to learn from")
    return messages


def split_hh(text: str, where: str) -> list[dict[str, str]]:
    """``\\n\\nHuman: a\\n\\nAssistant: b ...`` -> chat turns."""
    parts = _HH_TURN.split(text)
    if len(parts) < 3 or parts[0].strip():
        raise FolkError(
            f"{where}: not an HH-RLHF dialogue ('\\n\\nHuman: ... \\n\\nAssistant: ...')"
        )
    roles = {"Human": "user", "Assistant": "assistant"}
    return [{"role": roles[parts[i]], "content": parts[i + 1]} for i in range(1, len(parts), 2)]


def to_preference(path: Path, r: Record, fmt: str) -> tuple[list, str, str]:
    """(prompt turns, chosen answer, rejected answer)."""
    where, d = _where(path, r), r.data
    if fmt == "preference":
        prompt = d["prompt"]
        turns = (
            [{"role": "user", "content": _text(prompt, where, "prompt")}]
            if not isinstance(prompt, list)
            else prompt
        )
        return turns, _text(d["chosen"], where, "chosen"), _text(d["rejected"], where, "rejected")
    chosen = split_hh(_text(d["chosen"], where, "chosen"), where)
    rejected = split_hh(_text(d["rejected"], where, "rejected"), where)
    if chosen[-1]["role"] != "assistant" or rejected[-1]["role"] != "assistant":
        raise FolkError(f"{where}: a dialogue does not end with an Assistant turn")
    return chosen[:-1], chosen[-1]["content"], rejected[-1]["content"]


# -- tokenization -------------------------------------------------------------------------
def encode_chat(tok: Tokenizer, messages: list[dict[str, str]], last_only: bool = False):
    """(input_ids, labels) of a rendered conversation; labels cover assistant turns only
    (only the last one when ``last_only``)."""
    full = tok.apply_chat_template(messages, add_generation_prompt=False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant" or (last_only and i != len(messages) - 1):
            continue
        start = tok.apply_chat_template(messages[:i], add_generation_prompt=True) if i else ""
        end = tok.apply_chat_template(messages[: i + 1], add_generation_prompt=False)
        if not (full.startswith(start) and full.startswith(end)):
            raise FolkError(
                f"chat template of {tok.source or 'this model'} does not render conversations "
                "incrementally; cannot find the assistant tokens"
            )
        spans.append((len(start), len(end)))
    enc = tok.hf.encode(full, add_special_tokens=False)
    labels = []
    for tid, (a, _) in zip(enc.ids, enc.offsets, strict=True):
        inside = any(s <= a < e for s, e in spans)
        labels.append(tid if inside else IGNORE)
    return list(enc.ids), labels


def _fit(ids: list[int], labels: list[int], max_len: int, truncate: bool):
    """(ids, labels, truncated?) or None when the example must be dropped."""
    if len(ids) <= max_len:
        return ids, labels, False
    if not truncate:
        return None
    ids, labels = ids[:max_len], labels[:max_len]
    return ids, labels, True


def build_dataset(
    path: str | Path,
    tok: Tokenizer,
    max_seq_len: int,
    truncate: bool = True,
    pack: bool = False,
    preference: bool | None = None,
) -> Dataset:
    """Read, detect, render and tokenize a data file.

    Args:
        truncate: cut too-long examples (True) or drop them (False); counts are kept.
        pack: concatenate short SFT examples into blocks of up to ``max_seq_len`` tokens.
        preference: require (True) or refuse (False) preference pairs; None accepts both.
    """
    p = Path(path)
    records = read_records(p)
    fmt = detect_format(p, records)
    is_pref = fmt in ("preference", "hh-rlhf")
    if preference is True and not is_pref:
        raise FolkError(f"{p}: DPO needs preference pairs (prompt/chosen/rejected), got {fmt}")
    if preference is False and is_pref:
        raise FolkError(f"{p}: preference pairs ({fmt}) are for --method dpo")
    ds = Dataset(p, fmt, [], len(records))
    if fmt == "text":
        ds.examples = _text_blocks(tok, records, max_seq_len)
    elif is_pref:
        for r in records:
            ex = _preference_example(tok, p, r, fmt, max_seq_len, truncate, ds)
            if ex is not None:
                ds.examples.append(ex)
    else:
        for r in records:
            ids, labels = encode_chat(tok, to_messages(p, r, fmt))
            fitted = _fit(ids, labels, max_seq_len, truncate)
            if fitted is None or all(t == IGNORE for t in fitted[1]):
                ds.dropped += 1
                continue
            ds.truncated += fitted[2]
            ds.examples.append(SFTExample(fitted[0], fitted[1]))
        if pack:
            ds.examples = pack_examples(ds.examples, max_seq_len)
    if not ds.examples:
        raise FolkError(
            f"{p}: no usable examples ({ds.records} records, {ds.dropped} dropped as longer "
            f"than max_seq_len={max_seq_len})"
        )
    return ds


def _preference_example(tok, p, r, fmt, max_len, truncate, ds) -> PreferenceExample | None:
    turns, chosen, rejected = to_preference(p, r, fmt)
    prompt = tok.apply_chat_template(turns, add_generation_prompt=True) if turns else ""
    prompt_ids = tok.hf.encode(prompt, add_special_tokens=False).ids
    answers = []
    for text in (chosen, rejected):
        ids, labels = encode_chat(tok, [*turns, {"role": "assistant", "content": text}], True)
        first = next((i for i, t in enumerate(labels) if t != IGNORE), len(ids))
        answers.append(ids[first:])
        prompt_ids = ids[:first]
    if len(prompt_ids) + max(len(a) for a in answers) > max_len:
        room = max_len - len(prompt_ids)
        if not truncate or room < 1:
            ds.dropped += 1
            return None
        answers = [a[:room] for a in answers]
        ds.truncated += 1
    if not all(answers):
        ds.dropped += 1
        return None
    return PreferenceExample(prompt_ids, answers[0], answers[1])


def _text_blocks(tok: Tokenizer, records: list[Record], block: int) -> list[SFTExample]:
    """Continued pre-training: documents + EOS, concatenated, cut into ``block`` tokens."""
    stream: list[int] = []
    eos = tok.eos_token_id
    for r in records:
        stream.extend(tok.encode(r.data["text"], add_special_tokens=False))
        if eos is not None:
            stream.append(eos)
    n = len(stream) // block if len(stream) >= block else (1 if stream else 0)
    blocks = [stream[i * block : (i + 1) * block] for i in range(n)]
    return [SFTExample(b, list(b)) for b in blocks]


def pack_examples(examples: list[SFTExample], max_len: int) -> list[SFTExample]:
    """Greedy packing in data order: whole examples concatenated up to ``max_len`` tokens.

    As TRL's basic packing, attention is not reset at example boundaries.
    """
    out: list[SFTExample] = []
    cur = SFTExample([], [])
    for ex in examples:
        if cur.input_ids and len(cur.input_ids) + len(ex.input_ids) > max_len:
            out.append(cur)
            cur = SFTExample([], [])
        cur.input_ids.extend(ex.input_ids)
        cur.labels.extend(ex.labels)
    if cur.input_ids:
        out.append(cur)
    return out
