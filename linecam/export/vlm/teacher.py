"""The teacher writes the descriptions: one greedy answer per record, cached in the review file.

The teacher sees exactly the crop and prompt the daemon will give the student
(:func:`linecam.export.vlm.dataset.grounded`). Work is saved every few records, so an
interrupted run (a large teacher is slow) continues where it stopped.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from linecam.export.vlm.dataset import DescriptionRecord, grounded
from linecam.export.vlm.hfmodel import HfVlm
from linecam.runtime.vlm.prompt import RegionPromptBuilder

logger = logging.getLogger(__name__)

#: Save the review file at least this often while the teacher works.
SAVE_EVERY_S = 30.0


def needs_teacher(r: DescriptionRecord) -> bool:
    return r.use and bool(r.regions) and r.teacher_text is None and not r.person_owned


def describe(records: list[DescriptionRecord], teacher: HfVlm, builder: RegionPromptBuilder, *,
             max_new_tokens: int, save: Callable[[], Any], progress: Any) -> int:
    """Fill ``teacher_text`` (and ``text``) of the records that need it, in place (``save()`` writes
    ``records`` out); returns how many were described."""
    todo = [i for i, r in enumerate(records) if needs_teacher(r)]
    if not todo:
        return 0
    task = progress.add_task(f"teacher {teacher.name}", total=len(todo), info="")
    last_save = time.monotonic()
    for n, i in enumerate(todo, 1):
        r = records[i]
        g = grounded(r, builder)
        text = teacher.generate(g.image, g.prompt, max_new_tokens=max_new_tokens).strip()
        records[i] = r.model_copy(update={"teacher": teacher.name, "teacher_text": text, "text": text})
        progress.update(task, advance=1)
        if time.monotonic() - last_save > SAVE_EVERY_S or n == len(todo):
            save()
            last_save = time.monotonic()
    logger.info("teacher %s described %d image(s)", teacher.name, len(todo))
    return len(todo)
