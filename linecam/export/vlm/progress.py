"""Progress bars (rich) for the distillation stages, or nothing when quiet."""

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


def make_progress(enabled: bool) -> Any:
    """Tasks take an ``info`` field (e.g. the running loss)."""
    if not enabled:
        return NoProgress()
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
        TimeRemainingColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn())
