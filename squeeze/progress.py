"""Progress of long steps, reported by the core through one callback the CLI renders.

The core never draws: a step that can take more than a few seconds opens a task with `progress.task(...)`
and advances it; whoever runs squeeze installs a `Reporter` (the CLI's Rich bars on a terminal,
nothing at all off one or for a notebook that did not ask). The default reporter does nothing.

    with progress.task("fine-tune", total=epochs) as step:
        for ...:
            step.advance(1, loss=f"{loss:.4f}")
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from typing import Protocol

__all__ = ["Reporter", "Task", "task", "reporting", "current"]


class Task(Protocol):
    def advance(self, n: float = 1, **fields: object) -> None:
        """Move on by `n` units; `fields` are short labelled figures shown with the bar (loss, best, ...)."""

    def describe(self, description: str) -> None:
        """Replace the task's label (a layer name, an episode number)."""


class Reporter(Protocol):
    def open(self, description: str, total: float | None, unit: str) -> Task: ...

    def close(self, task: Task) -> None: ...


class _Silent:
    def advance(self, n: float = 1, **fields: object) -> None:
        pass

    def describe(self, description: str) -> None:
        pass


class _SilentReporter:
    def open(self, description: str, total: float | None, unit: str) -> Task:
        return _Silent()

    def close(self, task: Task) -> None:
        pass


_reporter: contextvars.ContextVar[Reporter] = contextvars.ContextVar("squeeze_progress", default=_SilentReporter())


def current() -> Reporter:
    return _reporter.get()


@contextlib.contextmanager
def reporting(reporter: Reporter) -> Iterator[Reporter]:
    """Install `reporter` for the steps run inside the block."""
    token = _reporter.set(reporter)
    try:
        yield reporter
    finally:
        _reporter.reset(token)


@contextlib.contextmanager
def task(description: str, total: float | None = None, unit: str = "") -> Iterator[Task]:
    """One long step: `total` units (None: unknown), closed when the block ends, even on error."""
    reporter = current()
    handle = reporter.open(description, total, unit)
    try:
        yield handle
    finally:
        reporter.close(handle)
