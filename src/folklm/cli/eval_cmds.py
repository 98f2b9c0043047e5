"""``folk eval``: standard benchmarks on a model, stored in the hub; ``--compare A B``.

A thin front door over :mod:`folklm.eval.runner` and :mod:`folklm.eval.report`.
"""

from __future__ import annotations

import contextlib
import json
import re
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import click

from folklm.errors import FolkError


@contextlib.contextmanager
def _task_warnings() -> Iterator[None]:
    """Print each task-spec warning as one ``folk: warning:`` line (once per message)."""
    from folklm.eval.tasks import TaskWarning  # lazy: imports torch

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", TaskWarning)
        try:
            yield
        finally:
            seen = set()
            for w in caught:
                if issubclass(w.category, TaskWarning):
                    if str(w.message) not in seen:
                        seen.add(str(w.message))
                        print(f"folk: warning: {w.message}", file=sys.stderr)
                else:
                    warnings.showwarning(w.message, w.category, w.filename, w.lineno)


def _fmt(value, stderr) -> str:
    return f"{value:.4f}" + ("" if stderr is None else f" ± {stderr:.4f}")


def _print_table(title: str, headers: list[str], body: list[list[str]]) -> None:
    # lazy: rich's tables and bars load only for the command that prints one
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for h in headers:
        table.add_column(h, justify="right" if h not in ("task", "metric") else "left")
    for row in body:
        table.add_row(*row)
    Console().print(table)


def _model_name(model: str | None) -> tuple[str | None, str]:
    """(registry name to store results under or None, label for output)."""
    from folklm.hub.resolve import hub_name  # lazy: `folk --help` starts without the hub

    name = hub_name(model)
    if model is None:
        assert name is not None  # hub_name(None) is the bundled default's name
        return name, name
    return name, model


def _compare(a: str, b: str, as_json: bool) -> None:
    # lazy: imports torch; `folk --help` and the hub commands start without it
    from folklm.eval.report import compare

    table = compare(a, b)
    if as_json:
        click.echo(json.dumps({"a": a, "b": b, "rows": table}, ensure_ascii=False))
        return
    body = [
        [
            r["task"],
            r["metric"],
            _fmt(r["a"], r["a_stderr"]),
            _fmt(r["b"], r["b_stderr"]),
            f"{r['diff']:+.4f}",
        ]
        for r in table
    ]
    _print_table(f"{a} vs {b}", ["task", "metric", a, b, "B - A"], body)


def register(app: click.Group) -> None:
    @app.command("eval")
    @click.argument("model", required=False)
    @click.option("--tasks", "-t", default=None, help="Comma-separated task names or YAML specs.")
    @click.option("--limit", type=int, default=None, help="Score only the first N records.")
    @click.option("--shots", type=int, default=None, help="Few-shot examples (task default).")
    @click.option("--batch-size", type=int, default=16, show_default=True)
    @click.option("--seed", type=int, default=1234, show_default=True, help="Few-shot seed.")
    @click.option("--chat", is_flag=True, help="Wrap each prompt in the chat template.")
    @click.option(
        "--dtype", type=click.Choice(["float32", "bfloat16"]), default="float32", show_default=True
    )
    @click.option(
        "--output",
        "output",
        default="eval-results",
        show_default=True,
        help="Folder for results.json and results.png.",
    )
    @click.option("--no-store", is_flag=True, help="Do not record the results in the hub.")
    @click.option(
        "--compare",
        nargs=2,
        default=None,
        metavar="A B",
        help="Show two hub entries' stored results side by side.",
    )
    @click.option("--list", "list_tasks", is_flag=True, help="List the built-in tasks.")
    @click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
    @click.option(
        "--data-dir",
        default=None,
        help="Folder of data sets (<set>/<file>) read before the shipped copies ($FOLK_DATA).",
    )
    def eval_cmd(
        model,
        tasks,
        limit,
        shots,
        batch_size,
        seed,
        chat,
        dtype,
        output,
        no_store,
        compare,
        list_tasks,
        as_json,
        data_dir,
    ) -> None:
        """Evaluate MODEL (registry name, folder or .gguf; default: the bundled model).

        Example: folk eval --tasks hellaswag,arc_easy --limit 200
        """
        # lazy: imports torch; `folk --help` and the hub commands start without it
        from folklm.datasets import data_dir as user_data_dir
        from folklm.datasets import set_data_dir
        from folklm.eval.builtin import known_tasks, resolve_tasks

        if data_dir is not None:
            set_data_dir(data_dir)
        if list_tasks:
            names = known_tasks()
            click.echo(json.dumps(names) if as_json else "\n".join(names))
            return
        if compare:
            _compare(compare[0], compare[1], as_json)
            return
        if not tasks:
            raise FolkError("give --tasks (e.g. --tasks hellaswag,arc_easy); see folk eval --list")
        if limit is not None and limit < 1:
            raise FolkError(f"--limit must be >= 1, got {limit}")
        if shots is not None and shots < 0:
            raise FolkError(f"--shots must be >= 0, got {shots}")
        if batch_size < 1:
            raise FolkError(f"--batch-size must be >= 1, got {batch_size}")
        specs = resolve_tasks(tasks)

        # lazy: imports torch; `folk --help` and the hub commands start without it
        import folklm
        from folklm.eval import report
        from folklm.eval.runner import evaluate, prepare

        with _task_warnings():  # bad data: fail fast, before the model loads
            prepared = None if chat else prepare(specs, limit, shots, seed)
        store_as, label = _model_name(model)
        t0 = time.perf_counter()
        llm = folklm.load(model, dtype=dtype)
        with _task_warnings():
            results = evaluate(
                llm,
                specs,
                limit=limit,
                shots=shots,
                batch_size=batch_size,
                seed=seed,
                chat=chat,
                progress=not as_json,
                prepared=prepared,
            )
        seconds = time.perf_counter() - t0
        config = {
            "harness": "folklm eval",
            "limit": limit,
            "seed": seed,
            "chat": chat,
            "dtype": dtype,
            "batch_size": batch_size,
            "data_dir": str(user_data_dir()) if user_data_dir() else None,
        }
        payload = {
            "model": label,
            "source": llm.source,
            "config": config,
            "seconds": round(seconds, 2),
            **results,
        }
        folder = Path(output).expanduser() / re.sub(r"[^A-Za-z0-9_.-]+", "_", label)
        json_path = report.write_json(folder / "results.json", payload)
        table = report.rows(results)
        png_path = report.bar_chart(table, folder / "results.png", f"{label}")
        stored = 0
        if store_as and not no_store:
            stored = report.store(store_as, results, config)
        payload.update(
            results_file=str(json_path),
            chart=str(png_path),
            stored_in_hub=store_as if stored else None,
        )
        if as_json:
            click.echo(json.dumps(payload, ensure_ascii=False))
            return
        body = [[r["task"], r["metric"], _fmt(r["value"], r["stderr"]), str(r["n"])] for r in table]
        _print_table(f"{label} ({seconds:.1f} s)", ["task", "metric", "value ± stderr", "n"], body)
        click.echo(f"results: {json_path}\nchart: {png_path}")
        if stored:
            click.echo(f"stored {stored} results on {store_as} (see folk card {store_as})")
        elif store_as is None:
            click.echo("not stored in the hub: MODEL is a path (import it to keep results)")
