"""Progress on stderr (rich): a spinner per slow step, a bar per task the API reports through
its ``progress(task, done, total)`` callback. Shown only on a terminal, so piped output and
tests stay clean; on a terminal each finished step leaves one line with its duration."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)


class Reporter:
    def __init__(self, console: Console):
        self.console = console
        self.progress = Progress(
            SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
            MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("{task.fields[status]}"),
            console=console, transient=True,
            disable=not console.is_terminal)
        self._tasks: dict[str, tuple[int, float]] = {}
        self.timings: dict[str, float] = {}

    def __enter__(self) -> Reporter:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._finish_open()
        self.progress.__exit__(*exc)

    def _done(self, message: str, seconds: float) -> None:
        self.timings[message] = round(seconds, 3)
        if self.console.is_terminal:
            self.progress.console.print(f"[green]✓[/] {message} ({seconds:.1f} s)")

    @contextmanager
    def step(self, message: str) -> Iterator[None]:
        """An indeterminate task while the block runs."""
        self._finish_open()
        start = time.perf_counter()
        task = self.progress.add_task(f"{message}…", total=None, status="")
        try:
            yield
        finally:
            self.progress.remove_task(task)
        self._done(message, time.perf_counter() - start)

    def callback(self, name: str, done: int, total: int, status: str = "") -> None:
        """The API's progress callback: one bar per task name, with the pass's status (e.g.
        heal's running loss) beside it."""
        if name not in self._tasks:
            self._finish_open()
            self._tasks[name] = (self.progress.add_task(name, total=total or None, status=""),
                                 time.perf_counter())
        task, start = self._tasks[name]
        self.progress.update(task, completed=done, total=total or None, status=status)
        if total and done >= total:
            self.progress.remove_task(task)
            self._tasks[name] = (-1, start)
            self._done(name, time.perf_counter() - start)

    def _finish_open(self) -> None:
        for name, (task, start) in list(self._tasks.items()):
            if task >= 0:
                self.progress.remove_task(task)
                self._tasks[name] = (-1, start)
                self._done(name, time.perf_counter() - start)
