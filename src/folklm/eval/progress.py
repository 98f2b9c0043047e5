"""A rich progress bar on stderr for long evaluations (a no-op when disabled)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import Progress


@contextmanager
def bar(enabled: bool, total: int, label: str = "eval") -> Iterator[Callable[[int], None]]:
    if not enabled:

        def skip(n: int = 1) -> None:
            pass

        yield skip
        return

    with Progress(console=Console(stderr=True), transient=True) as p:
        task = p.add_task(label, total=total)

        def advance(n: int = 1) -> None:
            p.update(task, advance=n)

        yield advance
