"""``folk`` commands for the local model hub: import, ls, show, rm, tag, verify, gc, lineage,
export, card, transparency.

Each command is a thin wrapper over :mod:`folklm.hub.api` (and :mod:`folklm.export`,
``hub.card``, ``hub.transparency``): it validates nothing itself, prints a ``rich`` table
or, with ``--json``, one JSON document, and lets ``FolkError`` become the one-line
``folk: error: ...`` of ``folk``'s ``main()``. Licence and naming warnings recorded with
an entry are printed as ``folk: warning: ...`` on stderr.
"""

from __future__ import annotations

import json
import shutil
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import click

from folklm.errors import FolkError


def _print_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, ensure_ascii=False, default=str))


@contextmanager
def _hub_warnings() -> Iterator[None]:
    """Print the hub's warnings as ``folk: warning:`` lines; pass any other on."""
    # lazy: `folk --help` starts without the hub's modules
    from folklm.hub.api import HubWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", HubWarning)
        yield
    for w in caught:
        if issubclass(w.category, HubWarning):
            click.echo(f"folk: warning: {w.message}", err=True)
        else:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)


def _console():
    # lazy: rich's tables and bars load only for the command that prints one
    from rich.console import Console

    # Piped output (scripts, tests) gets wide lines instead of rich's 80-column default.
    width = None if sys.stdout.isatty() else max(shutil.get_terminal_size((160, 24)).columns, 160)
    return Console(highlight=False, soft_wrap=False, width=width)


def human_count(n: int | None) -> str:
    if not n:
        return "-"
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}".replace(".0", "")
    return str(n)


def human_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def _licence_text(expression: str | None, commercial: bool | None) -> str:
    text = expression or "unknown"
    return text + (" (non-commercial)" if commercial is False else "")


@click.command("import")
@click.argument("path")
@click.option("--name", "-n", help="NAME[:TAG] for the entry (default: from the file name).")
@click.option("--license", "license_", help="Licence id (SPDX or Hugging Face) to record.")
@click.option(
    "--ollama-models",
    metavar="DIR",
    help="The Ollama store for ollama:NAME (default $OLLAMA_MODELS, else ~/.ollama/models).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the new entry as JSON.")
def import_cmd(
    path: str, name: str | None, license_: str | None, ollama_models: str | None, as_json: bool
) -> None:
    """Import a model from disk into the local hub.

    PATH is a Hugging Face folder or a GGUF file (copied); a Hugging Face cache snapshot
    (.../models--ORG--NAME/snapshots/REV) or hf:ORG/REPO[@REVISION] from the cache; or
    ollama:NAME[:TAG] from the Ollama store. Cache files are linked (reflink or hard link)
    instead of copied where the file system allows, after the same hash checks.
    """
    # lazy: `folk --help` starts without the hub's modules
    from folklm.hub.sources import import_source

    with _hub_warnings():
        entry, placed = import_source(path, name, license_, ollama_models=ollama_models)
    if as_json:
        _print_json({**entry.to_dict(), "placed": placed})
        return
    how: dict[str, int] = {}
    for method in placed.values():
        how[method] = how.get(method, 0) + 1
    note = ("  (" + ", ".join(f"{n} {m}" for m, n in sorted(how.items())) + ")") if how else ""
    click.echo(
        f"imported {entry.name}  sha256:{entry.digest[:12]}  {entry.architecture}  "
        f"{human_count(entry.parameters)} parameters  {human_bytes(entry.size)}  "
        f"licence {_licence_text(entry.license['expression'], entry.license['commercial'])}"
        f"{note}"
    )


@click.command("ls")
@click.option("--json", "as_json", is_flag=True, help="Print the list as JSON.")
def ls_cmd(as_json: bool) -> None:
    """List the models in the local hub."""
    # lazy: `folk --help` starts without the hub's modules
    from rich.markup import escape
    from rich.table import Table

    from folklm.hub import api

    rows = api.list_models()
    if as_json:
        _print_json(rows)
        return
    if not rows:
        click.echo("no models yet: folk import PATH (a Hugging Face folder or a .gguf file)")
        return
    table = Table(box=None, pad_edge=False)
    for col in ("NAME", "ID", "ARCH", "PARAMS", "SIZE", "QUANT", "LICENCE", "CREATED"):
        table.add_column(
            col, justify="right" if col in ("PARAMS", "SIZE") else "left", no_wrap=col != "LICENCE"
        )
    for r in rows:
        table.add_row(
            r["name"],
            r["content_hash"][7:19],
            r["architecture"] or "-",
            human_count(r["parameters"]),
            human_bytes(r["size"]),
            r["quantization"] or "-",
            escape(_licence_text(r["license"], r["commercial"])),
            r["created_at"][:16].replace("T", " "),
        )
    _console().print(table)


@click.command("show")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print the full record as JSON.")
def show_cmd(name: str, as_json: bool) -> None:
    """Show a model's record: config, files, hashes, licence, parents, recipe, evaluations."""
    # lazy: `folk --help` starts without the hub's modules
    from rich.markup import escape
    from rich.table import Table

    from folklm.hub import api

    e = api.show(name)
    if as_json:
        _print_json(e.to_dict())
        return
    con = _console()
    lic = e.license
    fields = [
        ("name", e.name),
        ("tags", ", ".join(e.tags)),
        ("content hash", f"sha256:{e.digest}"),
        ("format", e.format),
        ("architecture", e.architecture or "-"),
        ("parameters", f"{e.parameters:,}" if e.parameters else "-"),
        ("quantization", e.quantization or "-"),
        ("size", f"{human_bytes(e.size)} ({e.size:,} bytes)"),
        ("created", e.created_at),
        ("operation", e.operation),
        ("licence", f"{_licence_text(lic['expression'], lic['commercial'])}  [{lic['source']}]"),
        ("seed", "-" if e.seed is None else str(e.seed)),
        ("folklm", e.folklm_version),
    ]
    head = Table(box=None, show_header=False, pad_edge=False)
    head.add_column(style="bold")
    head.add_column()
    for k, v in fields:
        head.add_row(k, escape(v))
    con.print(head)
    for title, key in (
        ("licence notes", "notes"),
        ("obligations", "obligations"),
        ("warnings", "warnings"),
    ):
        if lic.get(key):
            con.print(f"\n[bold]{title}[/bold]")
            for x in lic[key]:
                con.print(f"  - {x}", markup=False)
    sections = [
        ("parents", [f"{p['name']}  {p['content_hash']}  {p['license']}" for p in e.parents]),
        (
            "data files",
            [
                f"{d['name']}  sha256:{d['sha256']}  {d['license'] or 'licence unknown'}"
                for d in e.data_files
            ],
        ),
        (
            "evaluations",
            [
                f"{r['task']}  {r['metric']} = {r['value']:.4g}"
                + ("" if r["stderr"] is None else f" ± {r['stderr']:.2g}")
                for r in e.evaluations
            ],
        ),
    ]
    for title, lines in sections:
        if lines:
            con.print(f"\n[bold]{title}[/bold]")
            for line in lines:
                con.print(f"  {line}", markup=False)
    for title, value in (
        ("recipe", e.recipe),
        ("source", e.source),
        ("compute", e.compute),
        ("config", e.config),
    ):
        if value:
            con.print(f"\n[bold]{title}[/bold]")
            con.print(json.dumps(value, indent=2, ensure_ascii=False), markup=False)
    files = Table(title=None, box=None, pad_edge=False)
    for col in ("FILE", "SIZE", "SHA256"):
        files.add_column(col, justify="right" if col == "SIZE" else "left")
    for f in e.files:
        files.add_row(f["path"], human_bytes(f["size"]), f["sha256"])
    con.print("\n[bold]files[/bold]")
    con.print(files)


@click.command("rm")
@click.argument("names", nargs=-1, required=True, metavar="NAME...")
@click.option("--json", "as_json", is_flag=True, help="Print what was removed as JSON.")
def rm_cmd(names: tuple[str, ...], as_json: bool) -> None:
    """Remove models (blobs other entries still use are kept)."""
    # lazy: `folk --help` starts without the hub's modules
    from folklm.hub import api

    reports = api.remove_many(list(names))  # one transaction: all of them or none
    if as_json:
        _print_json(reports)
        return
    for r in reports:
        if r["other_tags"]:
            click.echo(f"removed {r['removed']} (the model keeps: {', '.join(r['other_tags'])})")
        else:
            click.echo(
                f"removed {r['removed']}: {r['deleted_blobs']} blob(s) deleted, "
                f"{human_bytes(r['freed_bytes'])} freed, "
                f"{r['kept_shared_blobs']} shared blob(s) kept"
            )


@click.command("tag")
@click.argument("src")
@click.argument("dst")
@click.option("--json", "as_json", is_flag=True, help="Print the entry as JSON.")
def tag_cmd(src: str, dst: str, as_json: bool) -> None:
    """Give model SRC another name DST (NAME[:TAG])."""
    # lazy: `folk --help` starts without the hub's modules
    from folklm.hub import api

    with _hub_warnings():
        entry = api.tag(src, dst)
    if as_json:
        _print_json(entry.to_dict())
    else:
        click.echo(f"tagged {entry.name} -> sha256:{entry.digest[:12]}")


@click.command("verify")
@click.argument("name", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def verify_cmd(name: str | None, as_json: bool) -> None:
    """Re-hash every blob; exit 1 if any file is missing or changed."""
    # lazy: `folk --help` starts without the hub's modules
    from folklm.hub import api

    rep = api.verify(name)
    if as_json:
        _print_json(rep)
    else:
        for p in rep["problems"]:
            click.echo(
                f"FAILED {p['entries']}: {p['file']} (sha256:{p['sha256'][:12]}): {p['problem']}"
            )
        note = f", {rep['unreferenced']} unreferenced (folk gc)" if rep["unreferenced"] else ""
        click.echo(
            f"{rep['checked']} blob(s), {human_bytes(rep['bytes'])} checked: "
            f"{len(rep['problems'])} problem(s); catalogue {rep['catalogue']}{note}"
        )
    if rep["problems"]:
        sys.exit(1)


@click.command("gc")
@click.option("--json", "as_json", is_flag=True, help="Print what was removed as JSON.")
def gc_cmd(as_json: bool) -> None:
    """Delete blobs no entry references and leftovers of interrupted operations."""
    # lazy: `folk --help` starts without the hub's modules
    from folklm.hub import api

    rep = api.collect_garbage()
    if as_json:
        _print_json(rep)
    else:
        click.echo(
            f"removed {rep['blobs']} blob(s) ({human_bytes(rep['bytes'])}), "
            f"{rep['entry_folders']} entry folder(s), {rep['temporary']} temporary file(s)"
        )


@click.command("lineage")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print the tree as JSON.")
def lineage_cmd(name: str, as_json: bool) -> None:
    """Show the ancestry tree: each model's operation, content hash and licence."""
    # lazy: `folk --help` starts without the hub's modules
    from folklm.hub import api
    from folklm.hub.catalogue import render_tree

    tree = api.lineage(name)
    if as_json:
        _print_json(tree.to_dict())
    else:
        click.echo(render_tree(tree))


@click.command("export")
@click.argument("name")
@click.argument("out", metavar="[DIR]", required=False)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["hf", "gguf", "ollama"]),
    default="hf",
    show_default=True,
    help="Hugging Face folder, GGUF file, or Ollama (Modelfile + GGUF in DIR, or --store).",
)
@click.option(
    "--store",
    metavar="DIR",
    help="ollama: write into this Ollama store (e.g. ~/.ollama/models) instead of DIR.",
)
@click.option(
    "--dtype",
    type=click.Choice(["auto", "f32", "f16", "bf16", "q8_0", "q4_0", "q4_1"]),
    default="auto",
    show_default=True,
    help="Tensor type when converting (q8_0/q4_0/q4_1: GGUF only; auto for a quantized "
    "entry: q8_0 for int8 and q4_1 for int4/GPTQ, both without re-rounding; q4_0 for nf4).",
)
@click.option("--force", is_flag=True, help="Overwrite an existing output.")
@click.option("--json", "as_json", is_flag=True, help="Print what was written as JSON.")
def export_cmd(
    name: str, out: str | None, fmt: str, store: str | None, dtype: str, force: bool, as_json: bool
) -> None:
    """Export a model as a Hugging Face folder (DIR), a GGUF file (in DIR), or for Ollama:
    a Modelfile + GGUF in DIR (`ollama create NAME -f DIR/Modelfile`) or, with --store, the
    model written into an Ollama store so that `ollama list` shows it."""
    # lazy: imports torch; `folk --help` and the hub commands start without it
    from folklm.export import export_report

    dtypes = {k: k for k in ("auto", "f32", "f16", "bf16", "q8_0", "q4_0", "q4_1")}
    if fmt == "hf":
        if dtype in ("q8_0", "q4_0", "q4_1"):
            raise FolkError(f"--dtype {dtype} is a GGUF block type: use it with --format gguf")
        dtypes = {"auto": "auto", "f32": "float32", "f16": "float16", "bf16": "bfloat16"}
    report = export_report(name, out, fmt, dtype=dtypes[dtype], force=force, store=store)
    if as_json:
        _print_json({"format": fmt, **report})
    elif fmt == "ollama" and store:
        click.echo(f"exported {name} to the Ollama store {store} as {report['ollama_name']}")
    else:
        click.echo(f"exported {name} to {report['path']}")
    for note in report.get("notes", []) if not as_json else []:
        click.echo(f"folk: note: {note}", err=True)


@click.command("card")
@click.argument("name")
@click.option(
    "--out", type=click.Path(file_okay=False), help="Write DIR/README.md (default: print the card)."
)
@click.option("--force", is_flag=True, help="Overwrite an existing README.md.")
@click.option("--json", "as_json", is_flag=True, help="Print {model, path, card} as JSON.")
def card_cmd(name: str, out: str | None, force: bool, as_json: bool) -> None:
    """Write a Hugging Face model card (README.md) for a model."""
    # lazy: `folk --help` starts without the hub's modules
    from folklm.hub.card import model_card, write_card

    path = write_card(name, out, force) if out else None
    text = path.read_text(encoding="utf-8") if path else model_card(name)
    if as_json:
        _print_json({"model": name, "path": str(path) if path else None, "card": text})
    elif path:
        click.echo(f"wrote {path}")
    else:
        click.echo(text, nl=False)


@click.command("transparency")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def transparency_cmd(name: str, as_json: bool) -> None:
    """Score a model on the Foundation Model Transparency Index indicators it can meet."""
    # lazy: `folk --help` starts without the hub's modules
    from rich.markup import escape
    from rich.table import Table

    from folklm.hub import api
    from folklm.hub.transparency import report

    rep = report(api.show(name), api.lineage(name))
    d = rep.to_dict()
    if as_json:
        _print_json(d)
        return
    table = Table(box=None, pad_edge=False)
    for col in ("DOMAIN", "INDICATOR", "STATUS", "EVIDENCE"):
        table.add_column(col, overflow="fold")
    colours = {"met": "green", "unmet": "red", "unknown": "yellow"}
    for i in rep.indicators:
        table.add_row(
            f"{i.domain} / {i.subdomain}",
            i.name,
            f"[{colours[i.status]}]{i.status}[/]",
            escape(i.evidence),
        )
    con = _console()
    con.print(table)
    con.print(
        f"\n{d['model']}: {d['met']}/{d['total']} indicators met, {d['unmet']} unmet, "
        f"{d['unknown']} unknown (score {d['score']:.0%})",
        markup=False,
    )


COMMANDS = (
    import_cmd,
    ls_cmd,
    show_cmd,
    rm_cmd,
    tag_cmd,
    verify_cmd,
    gc_cmd,
    lineage_cmd,
    export_cmd,
    card_cmd,
    transparency_cmd,
)


def register(app: click.Group) -> None:
    """Add the hub commands to ``folk``."""
    for command in COMMANDS:
        app.add_command(command)
