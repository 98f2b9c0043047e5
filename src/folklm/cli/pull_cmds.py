"""``folk pull``: a model from the Hugging Face Hub (``hf:``) or an Ollama registry
(``ollama:``) into the local hub, with a progress bar (size, speed) per transfer.

A thin wrapper over :mod:`folklm.hub.pull`. With ``--json`` the entry, the transfers and
how each file entered the hub are printed as one JSON document and no bar is drawn.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import click

from folklm.cli.hub_cmds import _hub_warnings, _licence_text, _print_json, human_bytes, human_count


def progress_display(enabled: bool) -> tuple[Callable[[str, int, int | None], None] | None, Any]:
    """A progress callback drawing ``rich`` bars on stderr (size, speed, time left), and
    the ``rich.progress.Progress`` to stop; ``(None, None)`` when not ``enabled``."""
    if not enabled:
        return None, None
    # lazy: rich's live display loads only for a transfer
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    bars = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
    )
    bars.start()
    tasks: dict[str, Any] = {}

    def update(what: str, done: int, total: int | None) -> None:
        label = what if len(what) <= 40 else "…" + what[-39:]
        if what not in tasks:
            tasks[what] = bars.add_task(label, total=total, completed=done)
        bars.update(tasks[what], completed=done, total=total)

    return update, bars


def transfer_line(t: dict[str, Any]) -> str:
    """``fetched FILE  SIZE in SECONDS s (SPEED)`` for a finished transfer."""
    if not t["fetched"]:
        return f"cached  {t['file']}  {human_bytes(t['size'])} (already downloaded)"
    speed = f"{human_bytes(t['bytes_per_s'])}/s" if t["bytes_per_s"] else "-"
    resumed = f", resumed at {human_bytes(t['resumed_from'])}" if t["resumed_from"] else ""
    return (
        f"fetched {t['file']}  {human_bytes(t['fetched'])} in {t['seconds']:.1f} s "
        f"({speed}{resumed})"
    )


def placed_summary(placed: dict[str, str]) -> str:
    """``2 file(s) linked (hardlink), 1 copied``: how files entered the hub."""
    counts: dict[str, int] = {}
    for how in placed.values():
        counts[how] = counts.get(how, 0) + 1
    return ", ".join(f"{n} {how}" for how, n in sorted(counts.items()))


@click.command("pull")
@click.argument("source", metavar="SOURCE")
@click.option("--name", "-n", help="NAME[:TAG] for the entry (default: from the source).")
@click.option("--license", "license_", help="Licence id to record instead of the detected one.")
@click.option(
    "--include",
    multiple=True,
    metavar="GLOB",
    help="hf: only the repository files matching GLOB (repeatable; default: the top-level "
    "files but pickles and other runtimes' weights).",
)
@click.option(
    "--registry",
    metavar="URL",
    help="ollama: the registry (default $FOLK_OLLAMA_REGISTRY, else https://registry.ollama.ai).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the entry and transfers as JSON.")
def pull_cmd(
    source: str,
    name: str | None,
    license_: str | None,
    include: tuple[str, ...],
    registry: str | None,
    as_json: bool,
) -> None:
    """Download a model into the local hub and record where it came from.

    SOURCE is hf:ORG/REPO[@REVISION] (a Hugging Face model; the revision is pinned to a
    commit), hf:ORG/REPO/FILE.gguf (one GGUF of a repository) or
    ollama:[NAMESPACE/]MODEL[:TAG] (an Ollama registry model: GGUF, template, params,
    licence). Files are checked against the hashes the source publishes; an interrupted
    download resumes. The token for gated Hugging Face models is $HF_TOKEN or the login of
    `hf auth login`.

    Example: folk pull hf:HuggingFaceTB/SmolLM2-135M-Instruct
    """
    # lazy: the pull machinery (huggingface_hub, the hub) loads only for this command
    from folklm.errors import FolkError
    from folklm.hub import pull

    if source.startswith("hf:"):
        if registry:
            raise FolkError("--registry is for ollama: sources")
        fetch = lambda progress: pull.pull_hf(  # noqa: E731
            source, name, license_, include=list(include), progress=progress
        )
    elif source.startswith("ollama:"):
        if include:
            raise FolkError("--include is for hf: sources")
        fetch = lambda progress: pull.pull_ollama(  # noqa: E731
            source, name, license_, registry=registry, progress=progress
        )
    else:
        raise FolkError(
            f"unknown source {source!r}: expected hf:ORG/REPO or ollama:MODEL[:TAG] "
            "(files on disk: folk import PATH)"
        )
    progress, bars = progress_display(not as_json and sys.stderr.isatty())
    try:
        with _hub_warnings():
            result = fetch(progress)
    finally:
        if bars is not None:
            bars.stop()
    report = result.to_dict()
    if as_json:
        _print_json(report)
        return
    if bars is None:
        for t in report["transfers"]:
            click.echo(transfer_line(t), err=True)
    e = result.entry
    click.echo(
        f"pulled {e.name}  sha256:{e.digest[:12]}  {e.architecture}  "
        f"{human_count(e.parameters)} parameters  {human_bytes(e.size)}  "
        f"licence {_licence_text(e.license['expression'], e.license['commercial'])}  "
        f"from {result.source}  ({placed_summary(result.placed)})"
    )


def register(app: click.Group) -> None:
    """Add ``folk pull`` to ``folk``."""
    app.add_command(pull_cmd)
