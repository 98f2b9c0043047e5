"""``folk tune``: LoRA / QLoRA / DoRA / full fine-tuning and DPO (thin wrapper over
:func:`folklm.tune.run.finetune`).

    folk tune MODEL --data FILE --method lora --out NAME:TAG [key=value ...] [--json]
    folk tune --print-config [--method dora] [--config recipe.yaml] [key=value ...]
    torchrun --nproc-per-node 2 -m folklm.cli.main tune MODEL ...   (DDP, gloo on CPU)
"""

from __future__ import annotations

import json

import click

from folklm.errors import FolkError


@click.command(
    "tune",
    context_settings={"ignore_unknown_options": False},
    help="Fine-tune MODEL on a data file; KEY=VALUE pairs override recipe settings.",
)
@click.argument("args", nargs=-1)
@click.option("--data", "data", type=click.Path(), help="Training data: JSON, JSONL(.gz) or .txt.")
@click.option(
    "--method",
    type=click.Choice(["lora", "qlora", "dora", "full", "dpo"]),
    default=None,
    help="What to train (default: lora, or the recipe's).",
)
@click.option("--config", "config", type=click.Path(), help="Recipe YAML file.")
@click.option("--out", "out", help="Registry NAME:TAG of the result.")
@click.option("--resume", is_flag=True, help="Continue the run of --out from its last checkpoint.")
@click.option("--merge", is_flag=True, help="Also write and register the merged model.")
@click.option("--license", "license_", help="Licence of the result (default: inherited).")
@click.option("--print-config", is_flag=True, help="Print the recipe (defaults + overrides).")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@click.option("--json", "as_json", is_flag=True, help="End with one JSON object.")
def tune(
    args, data, method, config, out, resume, merge, license_, print_config, no_progress, as_json
):
    # lazy: imports torch; `folk --help` and the hub commands start without it
    from folklm.tune.recipe import build_recipe

    positional = [a for a in args if "=" not in a]
    overrides = [a for a in args if "=" in a]
    recipe = build_recipe(config, overrides, method)
    if print_config:
        if as_json:
            click.echo(json.dumps(recipe.to_dict(), indent=2))
        else:
            click.echo(recipe.to_yaml(), nl=False)
        return
    if len(positional) != 1:
        raise FolkError(f"expected one MODEL (a registry name or a path), got {len(positional)}")
    if not data:
        raise FolkError("missing --data FILE")
    if not out:
        raise FolkError("missing --out NAME:TAG")
    # lazy: imports torch; `folk --help` and the hub commands start without it
    from folklm.cli.hub_cmds import _hub_warnings
    from folklm.tune import distributed
    from folklm.tune.run import finetune

    ctx = distributed.context()
    try:
        with _hub_warnings():
            summary = finetune(
                positional[0],
                data,
                recipe,
                out,
                resume=resume,
                merge=merge,
                progress=not no_progress and not as_json,
                license=license_,
            )
    finally:
        distributed.shutdown()
    if ctx.rank != 0:
        return
    if as_json:
        click.echo(json.dumps(summary, default=str))
        return
    _report(summary)


def _report(s: dict) -> None:
    # lazy: rich's tables and bars load only for the command that prints one
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"folk tune → {s['entry']}", show_header=False)
    ex = s["examples"]
    rows = [
        ("method", s["method"]),
        ("base", s["base"]),
        (
            "data",
            f"{s['data_format']}: {ex['train']} train / {ex['eval']} eval examples "
            f"({ex['truncated']} truncated, {ex['dropped']} dropped)",
        ),
        ("steps", str(s["steps"])),
        ("train loss", f"{s['train_loss']:.4f}" if s["train_loss"] is not None else "-"),
        ("eval loss", _fmt(s.get("eval_loss_before")) + " → " + _fmt(s.get("eval_loss"))),
        ("tokens/s", f"{s['tokens_per_s']:.0f}"),
        ("peak RSS", f"{s['peak_rss_bytes'] / 2**30:.2f} GiB"),
        ("output", s.get("adapter_path") or s.get("model_path", "-")),
        ("loss curve", s["loss_plot"]),
    ]
    if "eval_margin" in s.get("eval", {}):
        before = s.get("eval_before", {}).get("eval_margin")
        rows.append(("pref. margin", _fmt(before) + " → " + _fmt(s["eval"]["eval_margin"])))
    if s.get("merged_entry"):
        rows.append(("merged", f"{s['merged_entry']} ({s['merged_path']})"))
    for k, v in rows:
        t.add_row(k, v)
    Console().print(t)


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.4f}"


def register(app: click.Group) -> None:
    app.add_command(tune)
