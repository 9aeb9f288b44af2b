"""The CLI's progress reporters: the core's long steps (`squeeze.progress.task`) on stderr.

On a terminal they are Rich bars, transient: once a step ends its bar is gone, so what a command prints is the
same with or without them. Off a terminal (a log, a pipe, CI) they are plain lines: one when a step starts, one
at most every `PlainReporter.every` seconds while it runs, one when it ends. `squeeze --quiet` shows neither.
"""

from __future__ import annotations

import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TaskID, TextColumn, TimeRemainingColumn
from rich.text import Text

__all__ = ["RichReporter", "PlainReporter", "reporter_for"]


class _Fields(ProgressColumn):
    """The unit and the labelled figures a step advanced with (`loss 0.1234  lr 1.00e-03`)."""

    def render(self, task) -> Text:
        fields = "  ".join(f"{k} {v}" for k, v in task.fields.items() if k != "unit")
        return Text(" ".join(filter(None, (task.fields.get("unit", ""), fields))))


class _Bar:
    """One task's handle: what the core calls `advance` / `describe` on."""

    def __init__(self, progress: Progress, task_id: TaskID) -> None:
        self.progress, self.task_id = progress, task_id

    def advance(self, n: float = 1, **fields: object) -> None:
        self.progress.update(self.task_id, advance=n, **fields)

    def describe(self, description: str) -> None:
        self.progress.update(self.task_id, description=description)


class RichReporter:
    """One live display for all open steps (nested ones stack); started by the first, stopped with the last."""

    def __init__(self, console: Console) -> None:
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), _Fields(),
                                 TimeRemainingColumn(), console=console, transient=True)
        self.open_tasks = 0

    def open(self, description: str, total: float | None, unit: str) -> _Bar:
        if not self.open_tasks:
            self.progress.start()
        self.open_tasks += 1
        return _Bar(self.progress, self.progress.add_task(description, total=total, unit=unit))

    def close(self, task: _Bar) -> None:
        self.progress.remove_task(task.task_id)
        self.open_tasks -= 1
        if not self.open_tasks:
            self.progress.stop()


def _figures(unit: str, fields: dict[str, object]) -> str:
    return " ".join(filter(None, (unit, "  ".join(f"{k} {v}" for k, v in fields.items()))))


class _Line:
    """One task's handle in plain-line mode: counts, figures and when it last printed."""

    def __init__(self, console: Console, every: float, description: str, total: float | None, unit: str) -> None:
        self.console, self.every = console, every
        self.description, self.total, self.unit = description, total, unit
        self.done, self.fields = 0.0, {}
        self.started = self.printed = time.monotonic()

    def count(self) -> str:
        done = f"{self.done:.4g}"
        return f"{done}/{self.total:.4g}" if self.total is not None else done

    def say(self, text: str) -> None:
        self.console.print(text, markup=False, highlight=False, soft_wrap=True)
        self.printed = time.monotonic()

    def advance(self, n: float = 1, **fields: object) -> None:
        self.done += n
        self.fields.update(fields)
        if time.monotonic() - self.printed >= self.every:
            elapsed = time.monotonic() - self.started
            self.say(f"{self.description}: {self.count()} {_figures(self.unit, self.fields)} ({elapsed:.0f} s)")

    def describe(self, description: str) -> None:
        self.description = description


class PlainReporter:
    """Progress as plain lines, for output that is not a terminal: a line per step started and ended, and
    while it runs one at most every `every` seconds with its count and figures."""

    def __init__(self, console: Console, every: float = 15.0) -> None:
        self.console, self.every = console, every

    def open(self, description: str, total: float | None, unit: str) -> _Line:
        line = _Line(self.console, self.every, description, total, unit)
        line.say(f"{description} ..." if total is None else f"{description}: 0/{total:g} {unit or 'steps'}")
        return line

    def close(self, task: _Line) -> None:
        figures = _figures("", task.fields)
        task.say(f"{task.description}: done, {task.count()} {task.unit} in {time.monotonic() - task.started:.1f} s"
                 + (f" ({figures})" if figures else ""))


def reporter_for(console: Console, quiet: bool = False) -> RichReporter | PlainReporter | None:
    """Bars on `console` if it is a terminal, plain lines otherwise; None (the core's silent default) if `quiet`."""
    if quiet:
        return None
    return RichReporter(console) if console.is_terminal else PlainReporter(console)
