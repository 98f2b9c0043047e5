"""A rich progress bar on stderr for long evaluations (a no-op when disabled)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import Progress


@contextmanager
def bar(enabled: bool, total: int, label: str = "eval") -> Iterator[Callable[[int], None]]:
    if not enabled:
        yield lambda n=1: None
        return

    with Progress(console=Console(stderr=True), transient=True) as p:
        task = p.add_task(label, total=total)
        yield lambda n=1: p.update(task, advance=n)
