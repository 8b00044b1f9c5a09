"""Progress bars for the distillation stages (the shared :mod:`linecam.progress`)."""

from linecam.progress import NoProgress, make_progress

__all__ = ["NoProgress", "make_progress"]
