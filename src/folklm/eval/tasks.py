"""Declarative evaluation tasks: a data file plus a small spec (a dataclass, or YAML).

The spec mirrors the task configuration of EleutherAI's lm-evaluation-harness (Gao et al.,
2023, "A framework for few-shot language model evaluation", doi:10.5281/zenodo.5371628,
``lm_eval/tasks/*/*.yaml``): ``text`` is the prompt (``doc_to_text``), ``choices`` the
answer options (``doc_to_choice``), ``gold`` the right option (index or text), ``target``
the answer or continuation (``doc_to_target``), ``contexts`` the per-option prompts of
partial-scoring tasks such as Winogrande; each option is scored as
``target_delimiter + option`` after the prompt, and few-shot examples are
``text + target_delimiter + answer`` joined by ``fewshot_delimiter`` after the
``description``. Templates are Jinja (immutable sandbox: no attribute access to internals,
no changes to the record) over the record's fields.

``choices`` is either a YAML list of literal strings, the same for every record
(``["no", "yes"]``), or ONE string: a field name or a Jinja expression giving a list per
record (``"{{[sol1, sol2]}}"``). A list whose items look like templates is refused, since
each item would be taken literally; a template that renders empty is refused; a task whose
records all get the same options or the same prompt gets a one-line :class:`TaskWarning`.

Task kinds:
    multiple_choice  log-likelihood of each option; acc and acc_norm (per-character).
                     ``contexts`` + ``target``: one continuation after each context.
    loglikelihood    one continuation; perplexity and acc (greedy match), e.g. LAMBADA.
    rolling          the whole document; word perplexity, byte perplexity, bits per byte
                     (words and bytes of a record's ``count_text`` field when it has one).
    generate         greedy generation until a stop string; filters extract the answer
                     (regex, first match or ``group_select``); exact match.
"""

from __future__ import annotations

import random
import warnings
from dataclasses import dataclass, field, fields
from functools import cached_property
from pathlib import Path
from typing import Any

import jinja2
import yaml
from jinja2.sandbox import ImmutableSandboxedEnvironment

from folklm.errors import FolkError

KINDS = ("multiple_choice", "loglikelihood", "rolling", "generate")
DEFAULT_METRICS = {
    "multiple_choice": ["acc", "acc_norm"],
    "loglikelihood": ["perplexity", "acc"],
    "rolling": ["word_perplexity", "byte_perplexity", "bits_per_byte"],
    "generate": ["exact_match"],
}
# immutable: a template cannot change a record (e.g. reorder its choices) for later fields
_ENV = ImmutableSandboxedEnvironment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)


class TaskWarning(UserWarning):
    """A task spec that runs but probably does not measure what its author meant."""


@dataclass
class Filter:
    """Answer extraction for generation tasks (lm-eval's ``regex`` + ``take_first``)."""

    name: str
    regex: str
    group_select: int = 0
    fallback: str = "[invalid]"


@dataclass
class TaskSpec:
    """One task: where its records are and how a record becomes scoring requests."""

    name: str
    kind: str
    data: str
    text: str = ""
    choices: list[str] | str | None = None
    target: str | None = None
    gold: str | int | None = None
    contexts: str | None = None
    format: str = "jsonl"
    preprocess: str | None = None
    description: str = ""
    target_delimiter: str = " "
    fewshot_delimiter: str = "\n\n"
    num_fewshot: int = 0
    fewshot_data: str | None = None
    fewshot_sampler: str = "random"
    metrics: list[str] = field(default_factory=list)
    until: list[str] = field(default_factory=list)
    max_gen_tokens: int = 256
    filters: list[Filter] = field(default_factory=list)
    regexes_to_ignore: list[str] = field(default_factory=list)
    ignore_case: bool = False
    split: str | None = None
    group: str | None = None
    origin: str = "built-in"  # the YAML file a user task came from (for error messages)

    def __post_init__(self) -> None:
        where = f"task spec {self.origin}" if self.origin != "built-in" else f"task {self.name}"
        if not isinstance(self.name, str) or not self.name.strip():
            raise FolkError(f"{where}: field 'name' must be a non-empty string")
        if self.kind not in KINDS:
            raise FolkError(
                f"{where}: field 'kind' must be one of {', '.join(KINDS)}, got {self.kind!r}"
            )
        if not isinstance(self.data, str) or not self.data:
            raise FolkError(f"{where}: field 'data' must name a data file")
        if self.kind != "rolling" and not self.text and self.contexts is None:
            raise FolkError(f"{where}: field 'text' is required for kind {self.kind}")
        if self.kind == "rolling" and not self.text:
            raise FolkError(f"{where}: field 'text' (the document template) is required")
        if self.kind == "multiple_choice" and self.choices is None and self.contexts is None:
            raise FolkError(f"{where}: field 'choices' (or 'contexts') is required")
        if self.kind == "multiple_choice" and self.gold is None:
            raise FolkError(
                f"{where}: field 'gold' (index or answer of the right option) is required"
            )
        if self.kind == "multiple_choice" and self.contexts is not None and self.target is None:
            raise FolkError(
                f"{where}: field 'target' (the continuation shared by the contexts) is required"
            )
        if self.kind in ("loglikelihood", "generate") and self.target is None:
            raise FolkError(f"{where}: field 'target' is required for kind {self.kind}")
        if not isinstance(self.num_fewshot, int) or self.num_fewshot < 0:
            raise FolkError(f"{where}: field 'num_fewshot' must be an integer >= 0")
        if self.fewshot_sampler not in ("random", "first_n"):
            raise FolkError(f"{where}: field 'fewshot_sampler' must be 'random' or 'first_n'")
        if not isinstance(self.max_gen_tokens, int) or self.max_gen_tokens < 1:
            raise FolkError(f"{where}: field 'max_gen_tokens' must be an integer >= 1")
        for key in ("until", "metrics", "regexes_to_ignore"):
            value = getattr(self, key)
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise FolkError(f"{where}: field '{key}' must be a list of strings")
        self.metrics = self.metrics or list(DEFAULT_METRICS[self.kind])
        unknown = set(self.metrics) - set(DEFAULT_METRICS[self.kind])
        if unknown:
            raise FolkError(
                f"{where}: field 'metrics' has {sorted(unknown)}; kind {self.kind} gives "
                f"{', '.join(DEFAULT_METRICS[self.kind])}"
            )
        parsed = []
        for i, f in enumerate(self.filters):
            if isinstance(f, dict):
                try:
                    f = Filter(**f)
                except TypeError as e:
                    raise FolkError(f"{where}: field 'filters[{i}]': {e}") from None
            if not isinstance(f, Filter):
                raise FolkError(f"{where}: field 'filters[{i}]' must be a mapping")
            parsed.append(f)
        self.filters = parsed
        for key in ("text", "description", "target_delimiter", "fewshot_delimiter"):
            if not isinstance(getattr(self, key), str):
                raise FolkError(f"{where}: field '{key}' must be a string")
        if isinstance(self.choices, (list, tuple)):
            looks = [c for c in self.choices if isinstance(c, str) and ("{{" in c or "{%" in c)]
            if looks:
                fields_ = ", ".join(x.strip("{} ") for x in looks)
                raise FolkError(
                    f"{where}: field 'choices' is a list, so its items are literal strings, "
                    f"but {looks[0]!r} looks like a template; for options taken from each "
                    f'record write one expression: choices: "{{{{[{fields_}]}}}}"'
                )
        try:  # compile now: a template error is a spec error, not a record error
            self._templates  # noqa: B018
        except jinja2.TemplateError as e:
            raise FolkError(f"{where}: bad template: {e}") from None

    @property
    def where(self) -> str:
        return self.origin if self.origin != "built-in" else self.name

    @cached_property
    def _templates(self) -> dict[str, Any]:
        out: dict[str, Any] = {"text": _ENV.from_string(self.text)}
        for key in ("choices", "target", "gold", "contexts"):
            value = getattr(self, key)
            if isinstance(value, str):
                out[key] = _field_getter(value)
        return out

    # -- turning a record into strings ----------------------------------------------------
    def _eval(self, key: str, doc: dict[str, Any], where: str) -> Any:
        try:
            if key == "text":
                return self._templates["text"].render(**doc)
            value = getattr(self, key)
            return self._templates[key](doc) if isinstance(value, str) else value
        except (jinja2.UndefinedError, KeyError) as e:
            raise FolkError(f"{where}: missing field for '{key}' ({_msg(e)})") from None
        except (jinja2.TemplateError, TypeError, ValueError, IndexError) as e:
            raise FolkError(f"{where}: cannot build '{key}': {_msg(e)}") from None

    def doc_text(self, doc: dict[str, Any], where: str) -> str:
        text = self._eval("text", doc, where)
        if self.text and not text.strip():
            raise FolkError(
                f"{where}: field 'text' renders empty (template {self.text!r}); "
                "the record's field is empty or the template names the wrong one"
            )
        return text

    def doc_choices(self, doc: dict[str, Any], where: str) -> list[str]:
        key = "contexts" if self.contexts is not None else "choices"
        value = self._eval(key, doc, where)
        if not isinstance(value, (list, tuple)) or not value:
            raise FolkError(f"{where}: '{key}' must give a non-empty list, got {value!r}")
        out = [str(v) for v in value]
        empty = [i for i, v in enumerate(out) if not v.strip()]
        if empty:
            raise FolkError(
                f"{where}: option {empty[0]} of '{key}' renders empty "
                f"(from {getattr(self, key)!r}): {out!r}"
            )
        return out

    def doc_target(self, doc: dict[str, Any], where: str) -> Any:
        value = self._eval("target", doc, where)
        if value is None or value == "":
            raise FolkError(f"{where}: missing answer (field for 'target' is empty)")
        return value

    def gold_index(self, doc: dict[str, Any], where: str) -> int:
        """The gold option's index (the target is an index, or one of the choices)."""
        choices = self.doc_choices(doc, where)
        target = self._eval("gold", doc, where)
        if isinstance(target, str) and target.strip().lstrip("-").isdigit():
            target = int(target)
        if isinstance(target, bool) or not isinstance(target, (int, str)):
            raise FolkError(f"{where}: gold answer must be an index or a choice, got {target!r}")
        if isinstance(target, str):
            if target not in choices:
                raise FolkError(f"{where}: gold answer {target!r} is not one of the choices")
            return choices.index(target)
        if not 0 <= target < len(choices):
            raise FolkError(f"{where}: gold index {target} out of range 0..{len(choices) - 1}")
        return target

    def shot_answer(self, doc: dict[str, Any], where: str) -> tuple[str, str]:
        """(prompt, answer) of a solved example for the few-shot context."""
        if self.kind == "multiple_choice":
            gold = self.gold_index(doc, where)
            if self.contexts is not None:
                return self.doc_choices(doc, where)[gold], str(self.doc_target(doc, where))
            return self.doc_text(doc, where), self.doc_choices(doc, where)[gold]
        return self.doc_text(doc, where), str(self.doc_target(doc, where))


def check_uniform(spec: TaskSpec, texts: list[str], options: list[list[str]]) -> None:
    """Warn (one line, :class:`TaskWarning`) when every record got the same options from a
    per-record ``choices`` expression, or the same prompt from ``text``: such a task scores
    the model on one question, whatever its data holds."""
    if len(texts) < 2 and len(options) < 2:
        return
    source = spec.contexts if spec.contexts is not None else spec.choices
    if len(options) >= 2 and isinstance(source, str) and all(o == options[0] for o in options):
        warnings.warn(
            f"task {spec.where}: all {len(options)} records got the same options "
            f"{options[0]!r} from choices {source!r}; if they should come from each record, "
            'name its fields in one expression, e.g. choices: "{{[sol1, sol2]}}"',
            TaskWarning,
            stacklevel=3,
        )
    if len(texts) >= 2 and spec.text and all(t == texts[0] for t in texts):
        warnings.warn(
            f"task {spec.where}: all {len(texts)} records got the same prompt "
            f"{texts[0][:60]!r} from text {spec.text!r}; insert a record's field as "
            "{{field}}",
            TaskWarning,
            stacklevel=3,
        )


def _msg(e: Exception) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _field_getter(expr: str):
    """A field name, or a Jinja expression (``{{ choices.text }}`` or ``choices.text``)."""
    body = expr.strip()
    if body.startswith("{{") and body.endswith("}}") and body.count("{{") == 1:
        body = body[2:-2].strip()
    elif "{{" in body or "{%" in body:  # a template: its rendered text
        template = _ENV.from_string(expr)
        return lambda doc: template.render(**doc)
    if body.isidentifier():
        return lambda doc: doc[body]
    compiled = _ENV.compile_expression(body, undefined_to_none=False)
    return lambda doc: compiled(**doc)


# -- few-shot ---------------------------------------------------------------------------------
def fewshot_prefix(
    spec: TaskSpec,
    shots: int,
    pool: list[dict[str, Any]],
    rng: random.Random,
    exclude: dict[str, Any] | None,
) -> str:
    """``description`` + ``shots`` solved examples, each followed by ``fewshot_delimiter``.

    As lm-eval 0.4's ``ContextSampler.sample`` (``lm_eval/api/samplers.py``): one
    ``random.Random(seed)`` per task, drawn from record after record. ``exclude`` is the
    record being evaluated when the pool is its own split (no ``fewshot_data``): then
    ``shots + 1`` are drawn and the record removed, so it is never its own shot. From a
    separate few-shot split (``exclude=None``, e.g. gsm8k's train) exactly ``shots`` are
    drawn, so every prompt after the first matches the harness's too.
    """
    prefix = spec.description
    if shots == 0:
        return prefix
    if spec.fewshot_sampler == "first_n":
        chosen = [d for d in pool if exclude is None or d != exclude][:shots]
    elif exclude is None:
        chosen = rng.sample(pool, shots) if shots <= len(pool) else []
    else:
        chosen = rng.sample(pool, min(len(pool), shots + 1))
        chosen = [d for d in chosen if d != exclude][:shots]
        if len(chosen) < shots:  # the record occurs twice in the pool: the harness redraws
            rest = [d for d in pool if d != exclude]
            chosen = rng.sample(rest, shots) if shots <= len(rest) else chosen
    if len(chosen) < shots:
        raise FolkError(f"task {spec.name}: {shots} shots asked, {len(pool)} examples available")
    parts = []
    for i, d in enumerate(chosen):
        q, a = spec.shot_answer(d, f"{spec.name} few-shot record {i}")
        parts.append(q + spec.target_delimiter + a + spec.fewshot_delimiter)
    return prefix + "".join(parts)


# -- YAML -------------------------------------------------------------------------------------
SPEC_FIELDS = [f.name for f in fields(TaskSpec) if f.name != "origin"]


def spec_from_dict(raw: Any, origin: str, base: Path | None = None) -> TaskSpec:
    """A TaskSpec from a parsed YAML mapping; data paths are relative to ``base``."""
    if not isinstance(raw, dict):
        raise FolkError(
            f"task spec {origin}: expected a mapping of fields, got {type(raw).__name__}"
        )
    unknown = sorted(set(raw) - set(SPEC_FIELDS))
    if unknown:
        raise FolkError(
            f"task spec {origin}: unknown field '{unknown[0]}' (known: {', '.join(SPEC_FIELDS)})"
        )
    for key in ("name", "kind", "data"):
        if key not in raw:
            raise FolkError(f"task spec {origin}: missing required field '{key}'")
    values = dict(raw)
    for key in ("data", "fewshot_data"):
        if (
            isinstance(values.get(key), str)
            and base is not None
            and not values[key].startswith("builtin:")  # a shipped file (folklm.datasets)
        ):
            p = Path(values[key]).expanduser()
            values[key] = str(p if p.is_absolute() else (base / p))
    for key in ("until", "metrics", "regexes_to_ignore", "filters"):
        if values.get(key) is None:
            values.pop(key, None)
    return TaskSpec(**values, origin=origin)


def load_spec(path: str | Path) -> TaskSpec:
    """Read a task spec from a YAML file (its ``data`` path is relative to the file)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise FolkError(f"{p}: no such task spec file")
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise FolkError(f"task spec {p}: not valid YAML: {_msg(e)}") from None
    return spec_from_dict(raw, str(p), p.parent)
