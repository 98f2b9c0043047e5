"""``folk merge CONFIG.yaml --out NAME:TAG``: run a merge recipe, register the result.

A thin wrapper over :func:`folklm.merge.merge_models`; prints a summary table, or with
``--json`` one JSON object (name, hash, parents, inputs, peak RSS).
"""

from __future__ import annotations

import json

import click


@click.command("merge")
@click.argument("config", metavar="CONFIG.yaml", type=click.Path(dir_okay=False))
@click.option("--out", "-o", "out", required=True, help="NAME[:TAG] of the merged entry.")
@click.option(
    "--shard-size",
    type=click.IntRange(min=1),
    default=2048,
    show_default=True,
    help="Largest output shard, in MiB.",
)
@click.option("--license", "license_", help="Licence id to record (default: from the parents).")
@click.option("--force", is_flag=True, help="Record it even if the parents' licences conflict.")
@click.option("--json", "as_json", is_flag=True, help="Print the new entry as one JSON object.")
def merge_cmd(
    config: str, out: str, shard_size: int, license_: str | None, force: bool, as_json: bool
) -> None:
    """Merge models with a mergekit-style YAML recipe (linear, task_arithmetic, ties,
    dare_linear, dare_ties, slerp, lora_fuse) and register the result as NAME[:TAG].

    Inputs are registry names or Hugging Face folders; MODEL+ADAPTER fuses a PEFT
    adapter first. Example: folk merge recipe.yaml --out my-merge:v1
    """
    # lazy: imports torch; `folk --help` and the hub commands start without it
    from rich.console import Console
    from rich.progress import Progress

    from folklm.cli.hub_cmds import _console, _hub_warnings
    from folklm.merge import merge_models

    console = Console(stderr=True)
    with _hub_warnings(), Progress(console=console, transient=True, disable=as_json) as bar:
        task = bar.add_task("merging", total=None)

        def progress(done: int, total: int, name: str) -> None:
            bar.update(task, completed=done, total=total, description=name[-40:])

        report = merge_models(
            config,
            out,
            max_shard_bytes=shard_size * 1024**2,
            license=license_,
            force=force,
            progress=progress,
        )
    data = report.to_dict()
    if as_json:
        click.echo(json.dumps(data, ensure_ascii=False))
        return
    # lazy: rich's tables and bars load only for the command that prints one
    from rich.table import Table

    table = Table(show_header=False, box=None)
    for key in ("name", "hash", "operation", "tensors", "seconds"):
        table.add_row(key, str(data[key]))
    for p in data["parents"]:
        table.add_row("parent", f"{p['name']} ({p['content_hash']})")
    for r in data["inputs"]:
        if "path" in r:
            table.add_row("input", f"{r['path']} ({r['content_hash']})")
        if "adapter" in r:
            table.add_row("adapter", f"{r['adapter']} ({r['adapter_hash']})")
    rss = data["peak_rss_bytes"] / 2**20
    table.add_row(
        "peak RSS",
        f"{rss:,.0f} MiB ({data['peak_rss_over_model']}x the largest input's weights)",
    )
    _console().print(table)


def register(app: click.Group) -> None:
    app.add_command(merge_cmd)
