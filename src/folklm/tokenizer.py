"""Tokenizer: Hugging Face ``tokenizers`` plus the model's own chat template.

Chat templates are Jinja programs shipped inside model files written by strangers, so they
are rendered in ``jinja2.sandbox.ImmutableSandboxedEnvironment`` (no attribute access to
Python internals, no mutation of the passed objects), with the same environment settings
and helpers (``raise_exception``, ``tojson``, ``strftime_now``, ``{% break %}``,
``{% generation %}``, ``tools=None``) that transformers provides, so templates render
identically.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

from jinja2 import TemplateError, nodes
from jinja2.exceptions import TemplateSyntaxError
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer

from folklm.errors import CheckpointError, FolkError


def _token_str(value: Any) -> str | None:
    """tokenizer_config.json stores special tokens as strings or AddedToken dicts."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _raise_exception(message: str):
    raise TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # transformers' filter: no HTML escaping (unlike Jinja's own tojson), separators exposed
    return json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


class _Generation(Extension):
    """``{% generation %}...{% endgeneration %}``: transformers marks assistant text with it (for
    its assistant-token masks); it renders its body unchanged."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.Scope(body).set_lineno(lineno)


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split()) or type(error).__name__


@lru_cache(maxsize=16)
def _compile_template(source: str):
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols, _Generation]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


class Tokenizer:
    """Text <-> token ids, special tokens, and chat-template rendering."""

    def __init__(self, tokenizer: HFTokenizer, config: dict | None = None, source: str = ""):
        self.hf = tokenizer
        self.config = dict(config or {})
        self.source = source
        template = self.config.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default") or next(iter(named.values()), None)
        self.chat_template: str | None = template
        self.bos_token = _token_str(self.config.get("bos_token"))
        self.eos_token = _token_str(self.config.get("eos_token"))
        self.pad_token = _token_str(self.config.get("pad_token"))
        self.unk_token = _token_str(self.config.get("unk_token"))

    # -- construction -------------------------------------------------------------------
    @classmethod
    def from_folder(cls, folder: str | Path) -> Tokenizer:
        folder = Path(folder)
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise CheckpointError(f"{folder}: no tokenizer.json")
        try:
            hf = HFTokenizer.from_file(str(path))
        except Exception as e:  # noqa: BLE001 - the Rust error says what is wrong with the file
            raise CheckpointError(f"{path}: cannot read tokenizer ({e})") from None
        config: dict = {}
        cfg_path = folder / "tokenizer_config.json"
        if cfg_path.is_file():
            try:
                config = json.loads(cfg_path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise CheckpointError(f"{cfg_path}: not valid JSON ({e})") from None
        for name in ("chat_template.jinja",):  # newer transformers save the template apart
            if (folder / name).is_file():
                config["chat_template"] = (folder / name).read_text(encoding="utf-8")
        legacy = folder / "chat_template.json"
        if "chat_template" not in config and legacy.is_file():
            try:
                data = json.loads(legacy.read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise CheckpointError(f"{legacy}: not valid JSON ({e})") from None
            config["chat_template"] = data.get("chat_template") if isinstance(data, dict) else None
        return cls(hf, config, source=str(folder))

    def files(self) -> dict[str, str]:
        """The files that recreate this tokenizer in a Hugging Face folder."""
        cfg = {k: v for k, v in self.config.items() if v is not None}
        cfg.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
        return {
            "tokenizer.json": self.hf.to_str(),
            "tokenizer_config.json": json.dumps(cfg, indent=2, ensure_ascii=False) + "\n",
        }

    # -- ids ------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    def token_id(self, token: str | None) -> int | None:
        return None if token is None else self.hf.token_to_id(token)

    @property
    def bos_token_id(self) -> int | None:
        return self.token_id(self.bos_token)

    @property
    def eos_token_id(self) -> int | None:
        return self.token_id(self.eos_token)

    @property
    def pad_token_id(self) -> int | None:
        return self.token_id(self.pad_token)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.hf.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    # -- chat -----------------------------------------------------------------------------
    def apply_chat_template(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **kwargs: Any
    ) -> str:
        """Render ``messages`` with the model's template (sandboxed Jinja)."""
        if not self.chat_template:
            raise FolkError(
                f"{self.source or 'this model'} has no chat template; use plain prompts "
                "(--no-chat) instead"
            )
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise FolkError(f"message {i} must be an object with 'role' and 'content'")
        # As transformers: keys whose value is None are dropped (OpenAI clients send
        # content=None beside tool_calls), and tools/documents are None unless given.
        messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
        variables = {
            "bos_token": self.bos_token or "",
            "eos_token": self.eos_token or "",
            "pad_token": self.pad_token or "",
            "unk_token": self.unk_token or "",
            "tools": None,
            "documents": None,
            **kwargs,
        }
        where = f"chat template of {self.source or 'this model'}"
        try:
            template = _compile_template(self.chat_template)
            return template.render(
                variables, messages=messages, add_generation_prompt=add_generation_prompt
            )
        except TemplateSyntaxError as e:
            raise FolkError(f"{where}: syntax error ({_one_line(e)})") from None
        except TemplateError as e:
            raise FolkError(f"{where}: {_one_line(e)}") from None
        except Exception as e:  # noqa: BLE001 - a stranger's program failed (1/0, 'a' + 1, ...)
            raise FolkError(f"{where}: {type(e).__name__}: {_one_line(e)}") from None

    def encode_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True):
        """Token ids of the rendered conversation (the template adds BOS itself if needed)."""
        text = self.apply_chat_template(messages, add_generation_prompt)
        return self.encode(text, add_special_tokens=False)
