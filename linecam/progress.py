"""Progress bars (rich) for long work, or nothing when quiet: one definition for every trainer."""

from __future__ import annotations

from typing import Any


class NoProgress:
    """Stands in for :class:`rich.progress.Progress` when bars are off."""

    def __enter__(self) -> NoProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def add_task(self, *a: Any, **k: Any) -> int:
        return 0

    def update(self, *a: Any, **k: Any) -> None:
        return None


def make_progress(enabled: bool, fields: str = "{task.fields[info]}") -> Any:
    """A bar with count, elapsed and remaining time; ``fields`` formats the tasks' extra
    fields (e.g. ``"loss {task.fields[loss]:.4f}"``)."""
    if not enabled:
        return NoProgress()
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
        TimeRemainingColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn(fields), TimeElapsedColumn(), TimeRemainingColumn())
