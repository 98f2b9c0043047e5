"""The names a server answers to: its base models and the adapters on them.

A request's ``model`` is a served base, ``base:adapter`` or an adapter's own registry
name. Adapters are hub entries of format ``adapter`` whose parent is a served base (the
lineage ``folk tune`` records), or folders given on the command line; they are checked on
first use and then loaded into the base's per-row LoRA table by the engine (LRU).
"""

from __future__ import annotations

import time
from pathlib import Path

from folklm.checkpoint.peft import is_adapter_dir
from folklm.engine.scheduler import Engine
from folklm.errors import FolkError
from folklm.hub import api
from folklm.hub.names import parse_ref
from folklm.serve.runner import ServedModel, TokenText


class ModelNotFound(FolkError):
    """The request names no served model (404 ``model_not_found``)."""


def _bare(name: str) -> str:
    return name.split(":", 1)[0]


class ModelTable:
    """Served bases, adapters found so far, and the lookup of a request's ``model``."""

    def __init__(self) -> None:
        self.models: dict[str, ServedModel] = {}
        self.bases: dict[str, ServedModel] = {}
        self.adapter_paths: dict[str, Path] = {}
        self.token_text: dict[int, TokenText] = {}

    def add_base(self, name: str, engine: Engine) -> ServedModel:
        served = ServedModel(name, engine, created=int(time.time()))
        self.models[name] = self.bases[name] = served
        self.token_text[id(engine)] = TokenText(engine.tokenizer)
        return served

    def add_adapter(self, name: str, base: str, path: Path) -> ServedModel:
        """Serve the PEFT folder ``path`` as ``name`` (and ``base:name``) on ``base``."""
        parent = self.bases.get(base)
        if parent is None:
            raise FolkError(f"adapter '{name}': its base '{base}' is not served")
        if parent.engine.lora is None:
            raise FolkError(f"adapter '{name}': the server runs without adapter support")
        self.adapter_paths[name] = Path(path)
        parent.engine.lora.check(name)  # readable, LoRA, fits the base: else a clear error
        served = ServedModel(
            name, parent.engine, adapter=name, parent=base, created=int(time.time())
        )
        self.models[name] = self.models[f"{base}:{name}"] = served
        return served

    def resolve_path(self, name: str) -> Path:
        return self.adapter_paths[name]

    def lookup(self, model: str) -> ServedModel:
        if model in self.models:
            return self.models[model]
        for base in self.bases:
            if model.startswith(base + ":") and len(model) > len(base) + 1:
                return self._from_hub(model[len(base) + 1 :], base, model)
        return self._from_hub(model, None, model)

    def _from_hub(self, name: str, base: str | None, asked: str) -> ServedModel:
        try:
            parse_ref(name)
            entry = api.show(name)
            path = api.resolve_model(name)
        except FolkError:
            raise ModelNotFound(f"The model '{asked}' does not exist") from None
        if not is_adapter_dir(path):
            raise ModelNotFound(f"The model '{asked}' does not exist (not served here)")
        parents = {_bare(p["name"]) for p in entry.parents}
        parents |= {_bare(t) for p in entry.parents for t in p.get("tags", [])}
        candidates = [b for b in self.bases if base in (None, b) and _bare(b) in parents]
        if not candidates:
            raise ModelNotFound(f"The model '{asked}' is an adapter of a model not served here")
        served = self.add_adapter(name, candidates[0], path)
        self.models[asked] = served
        return served

    def discover(self) -> list[str]:
        """Add every hub adapter whose parent is a served base; return one-line warnings
        for those that cannot be served (they stay out of the listing)."""
        warnings = []
        bare_bases = {_bare(b): b for b in self.bases}
        for row in api.list_models():
            if row.get("format") != "adapter":
                continue
            name = row["name"].removesuffix(":latest")
            base = next(
                (bare_bases[_bare(p)] for p in row["parents"] if _bare(p) in bare_bases), None
            )
            if base is None or name in self.models:
                continue
            try:
                self.add_adapter(name, base, api.resolve_model(name))
            except FolkError as exc:
                warnings.append(f"adapter {name} not served: {exc}")
        return warnings

    def listing(self) -> list[ServedModel]:
        seen, out = set(), []
        for served in self.models.values():
            if served.name not in seen:
                seen.add(served.name)
                out.append(served)
        return out
