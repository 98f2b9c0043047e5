"""Ollama prompt templates (Go ``text/template``) for Jinja chat templates.

Ollama renders prompts with Go templates over ``.Messages`` (each with ``.Role`` and
``.Content``; https://github.com/ollama/ollama/blob/main/docs/template.md), Hugging Face
models with Jinja over ``messages``. A general translation is out of reach, so known
families are recognised by their special tokens and given the Go template that renders the
same text. :func:`render` evaluates the subset of Go templates used here, so that
:func:`default_system` can find the system message a Jinja template inserts when a
conversation has none (SmolLM2, Qwen2.5), to carry as the Modelfile's ``SYSTEM``.
"""

from __future__ import annotations

import re
from typing import Any

from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

# Known chat-template families: (name, markers all present in the Jinja template, Go
# template, stop strings). Ollama passes system messages inside .Messages (and joins them
# into .System as well), so each template walks .Messages only, in order, as the Jinja
# templates walk `messages`; llama.cpp adds the BOS token itself. tests/hub/test_pull_ollama.py
# renders both and compares them.
_FAMILIES: list[tuple[str, tuple[str, ...], str, list[str]]] = [
    (
        "chatml",
        ("<|im_start|>", "<|im_end|>"),
        "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}"
        "<|im_start|>assistant\n",
        ["<|im_start|>", "<|im_end|>"],
    ),
    (
        "llama3",
        ("<|start_header_id|>", "<|eot_id|>"),
        "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n"
        "{{ .Content }}<|eot_id|>{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n",
        ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
    ),
    (
        "gemma",
        ("<start_of_turn>", "<end_of_turn>"),
        "{{- range .Messages }}<start_of_turn>"
        '{{ if eq .Role "assistant" }}model{{ else }}{{ .Role }}{{ end }}\n'
        "{{ .Content }}<end_of_turn>\n{{ end }}<start_of_turn>model\n",
        ["<start_of_turn>", "<end_of_turn>"],
    ),
    (
        "phi3",
        ("<|user|>", "<|assistant|>", "<|end|>"),
        "{{- range .Messages }}<|{{ .Role }}|>\n{{ .Content }}<|end|>\n{{ end }}<|assistant|>\n",
        ["<|end|>", "<|user|>", "<|assistant|>"],
    ),
    (
        "mistral",
        ("[INST]", "[/INST]"),
        '{{- range .Messages }}{{ if eq .Role "user" }}[INST] {{ .Content }} [/INST]'
        '{{ else if eq .Role "assistant" }}{{ .Content }}</s>{{ end }}{{ end }}',
        ["[INST]", "[/INST]"],
    ),
]


def go_template(jinja: str | None) -> tuple[str | None, list[str], str | None]:
    """The Ollama (Go) template for a Jinja chat template: (template, stops, family).

    Only known families are translated; anything else gives ``(None, [], None)``.
    """
    if not jinja:
        return None, [], None
    for family, markers, template, stops in _FAMILIES:
        if all(m in jinja for m in markers):
            return template, list(stops), family
    return None, [], None


def render(template: str, messages: list[dict[str, str]]) -> str:
    """Render a Go template of the subset used here: text, ``{{- ``/`` -}}`` trimming,
    ``range .Messages``, ``if``/``else if``/``else`` on ``eq .Role "x"``, ``.Role``,
    ``.Content`` (https://pkg.go.dev/text/template).

    Raises:
        ValueError: an action outside that subset.
    """
    items: list[list[Any]] = []
    for part in re.split(r"({{.*?}})", template, flags=re.S):
        if part.startswith("{{"):
            left, right = part.startswith("{{- "), part.endswith(" -}}")
            items.append(["act", part[3 if left else 2 : -3 if right else -2].strip(), left, right])
        else:
            items.append(["text", part])
    for i, item in enumerate(items):
        if item[0] == "act" and item[2] and i and items[i - 1][0] == "text":
            items[i - 1][1] = items[i - 1][1].rstrip()
        if item[0] == "act" and item[3] and i + 1 < len(items) and items[i + 1][0] == "text":
            items[i + 1][1] = items[i + 1][1].lstrip()
    pos = 0

    def parse() -> tuple[list[Any], str | None]:
        nonlocal pos
        nodes: list[Any] = []
        while pos < len(items):
            kind, text = items[pos][0], items[pos][1]
            pos += 1
            if kind == "text":
                nodes.append(("text", text))
            elif text == "end" or text.startswith("else"):
                return nodes, text
            elif text == "range .Messages":
                nodes.append(("range", parse()[0]))
            elif text.startswith("if "):
                branches, cond = [], text[3:]
                while True:
                    body, stop = parse()
                    branches.append((cond, body))
                    if stop in ("end", None):
                        break
                    cond = stop[8:] if stop.startswith("else if ") else "true"
                nodes.append(("if", branches))
            elif text in (".Role", ".Content"):
                nodes.append(("var", text))
            else:
                raise ValueError(f"unsupported Go template action {{{{ {text} }}}}")
        return nodes, None

    def holds(cond: str, message: dict[str, str]) -> bool:
        if cond == "true":
            return True
        m = re.fullmatch(r'eq \.Role "(\w+)"', cond)
        if m is None:
            raise ValueError(f"unsupported Go template condition {cond!r}")
        return message.get("role") == m.group(1)

    def run(nodes: list[Any], message: dict[str, str]) -> str:
        out = []
        for node in nodes:
            if node[0] == "text":
                out.append(node[1])
            elif node[0] == "var":
                out.append(message.get("role" if node[1] == ".Role" else "content", ""))
            elif node[0] == "range":
                out += [run(node[1], m) for m in messages]
            else:
                out.append(next((run(b, message) for c, b in node[1] if holds(c, message)), ""))
        return "".join(out)

    return run(parse()[0], {})


def _raise(message: str) -> None:
    raise TemplateError(message)


def render_jinja(jinja: str, messages: list[dict[str, str]]) -> str:
    """A Hugging Face chat template rendered as for generation, in Jinja's sandbox; BOS and
    EOS empty (llama.cpp adds BOS as a token)."""
    env = ImmutableSandboxedEnvironment()
    env.globals["raise_exception"] = _raise
    return env.from_string(jinja).render(
        messages=messages, add_generation_prompt=True, bos_token="", eos_token=""
    )


def default_system(jinja: str, template: str) -> str | None:
    """The system message ``jinja`` adds to a conversation without one, if ``template``
    with that system message renders exactly what ``jinja`` renders; else ``None``."""
    user = [{"role": "user", "content": "\x00user"}]
    try:
        want = render_jinja(jinja, user)
        if render(template, user) == want:
            return None
        prefix, _, suffix = render(
            template, [{"role": "system", "content": "\x00"}, *user]
        ).partition("\x00")
    except (TemplateError, ValueError, TypeError):
        return None
    if not want.startswith(prefix) or suffix not in want[len(prefix) :]:
        return None
    system = want[len(prefix) :].split(suffix, 1)[0]
    if render(template, [{"role": "system", "content": system}, *user]) != want:
        return None
    return system
