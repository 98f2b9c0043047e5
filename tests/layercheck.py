"""The import-layer checker behind ``tests/test_layers.py``: read every module with ``ast``.

Every ``import`` statement counts, at module level or inside a function (a function-local
import is a dependency all the same, only a hidden one). A module's layer is the layer of
its top-level subpackage (``folklm.hub.store`` -> ``hub``); an import may only point to the
same or a lower layer, and no set of modules may import each other in a cycle.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Import:
    """One ``import`` statement of ``module`` naming ``target`` (a module of the package)."""

    module: str
    target: str
    line: int
    local: bool  # inside a function body
    commented: bool  # a comment on its line or on the line just above its import block


def modules(src: Path, package: str) -> dict[str, Path]:
    """``{"pkg.sub.mod": path}`` for every ``.py`` file under ``src/package``."""
    out = {}
    for path in sorted((src / package).rglob("*.py")):
        parts = list(path.relative_to(src).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _targets(node: ast.Import | ast.ImportFrom, module: str, is_pkg: bool, known) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    base = node.module or ""
    if node.level:  # relative: from the module's package, one level up per extra dot
        parts = module.split(".") if is_pkg else module.split(".")[:-1]
        parts = parts[: len(parts) - node.level + 1]
        base = ".".join(parts + ([node.module] if node.module else []))
    # ``from pkg import sub`` imports the submodule ``pkg.sub`` when there is one
    subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in known]
    return subs if subs and len(subs) == len(node.names) else [base, *subs]


def _commented(lines: list[str], node: ast.stmt, body: list[ast.stmt]) -> bool:
    """A comment on the import's line, or just above the first import of its block."""
    i = body.index(node)
    while i > 0 and isinstance(body[i - 1], ast.Import | ast.ImportFrom):
        i -= 1
    first = body[i].lineno
    above = lines[first - 2].strip() if first >= 2 else ""
    return "#" in lines[node.lineno - 1] or "#" in lines[first - 1] or above.startswith("#")


def imports(src: Path, package: str) -> list[Import]:
    """Every import statement of every module of ``package``, whatever it imports."""
    known = modules(src, package)
    found: list[Import] = []
    for module, path in known.items():
        text = path.read_text()
        lines = text.splitlines()
        scan = _Scan(module, path.name == "__init__.py", known, lines, found)
        scan.visit(ast.parse(text, str(path)).body, in_function=False)
    return found


def internal(found: list[Import], package: str) -> list[Import]:
    """The imports of a module of ``package`` itself."""
    return [i for i in found if i.target == package or i.target.startswith(package + ".")]


@dataclass
class _Scan:
    module: str
    is_pkg: bool
    known: dict[str, Path]
    lines: list[str]
    found: list[Import]

    def visit(self, body: list[ast.stmt], in_function: bool) -> None:
        for node in body:
            if isinstance(node, ast.Import | ast.ImportFrom):
                commented = _commented(self.lines, node, body)
                for target in _targets(node, self.module, self.is_pkg, self.known):
                    imp = Import(self.module, target, node.lineno, in_function, commented)
                    self.found.append(imp)
            nested = in_function or isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
            for field in ("body", "orelse", "finalbody"):
                child = getattr(node, field, None)
                if isinstance(child, list) and child and isinstance(child[0], ast.stmt):
                    self.visit(child, nested)
            for handler in getattr(node, "handlers", None) or []:
                self.visit(handler.body, nested)
            for case in getattr(node, "cases", None) or []:
                self.visit(case.body, nested)


def layer_of(module: str, package: str, layers: dict[str, int], root_layer: int) -> int:
    """The layer of ``module``: its top-level subpackage's, the root package's for itself."""
    parts = module.split(".")
    if len(parts) == 1:
        return root_layer
    if parts[1] not in layers:
        raise KeyError(f"{module}: {parts[1]!r} has no layer; add it to the layer map")
    return layers[parts[1]]


def upward(found: list[Import], package: str, layers: dict[str, int], root_layer: int):
    """The imports that point to a higher layer, as ``"a (layer i) -> b (layer j), line n"``."""
    out = []
    for imp in internal(found, package):
        a = layer_of(imp.module, package, layers, root_layer)
        b = layer_of(imp.target, package, layers, root_layer)
        if b > a:
            out.append(f"{imp.module} (layer {a}) -> {imp.target} (layer {b}), line {imp.line}")
    return out


def cycles(found: list[Import], package: str) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    graph: dict[str, set[str]] = {}
    for imp in internal(found, package):
        graph.setdefault(imp.module, set())
        graph.setdefault(imp.target, set())
        if imp.module != imp.target:
            graph[imp.module].add(imp.target)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out
