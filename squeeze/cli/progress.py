"""The CLI's progress reporter: the core's long steps (`squeeze.progress.task`) as Rich bars on stderr.

Bars are drawn only when stderr is a terminal, and are transient: once a step ends its bar is gone, so what a
command prints (and what a log or a pipe receives) is the same with or without them.
"""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TaskID, TextColumn, TimeRemainingColumn
from rich.text import Text

__all__ = ["RichReporter", "reporter_for"]


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


def reporter_for(console: Console) -> RichReporter | None:
    """Bars on `console` if it is a terminal; None (the core's silent default) for a pipe, a file or a test."""
    return RichReporter(console) if console.is_terminal else None
