"""One progress bar for long work: a rich bar on stderr driven by a ``(done, total, description)``
callback, the shape every long-running function of the package accepts as ``progress=``."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

__all__ = ["ProgressFn", "progress_bar"]

#: ``(steps done, steps in all, what was last done)``
ProgressFn = Callable[[int, int, str], None]


@contextmanager
def progress_bar(label: str, *, enabled: bool = True) -> Iterator[ProgressFn | None]:
    """A transient rich bar labelled ``label`` on stderr; yields its callback (None when disabled)."""
    if not enabled:
        yield None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TextColumn("{task.description}"), console=Console(stderr=True), transient=True)  # fmt: skip
    task = bar.add_task("", total=None)

    def update(done: int, total: int, description: str = "") -> None:
        bar.update(task, completed=done, total=total, description=description)

    with bar:
        yield update
