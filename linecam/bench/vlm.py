"""``vlm`` mode: time-to-first-token and tokens/s of the compact VLM on NG frames.

Not available yet: the compact VLM (issue 5) does not exist in this tree. The mode
is kept in every result, marked unavailable, so a table never shows a number that
was not measured.
"""

from __future__ import annotations

from typing import Any


def run_vlm() -> dict[str, Any]:
    return {
        "available": False,
        "reason": "not available yet: the compact VLM (issue 5) is not implemented; nothing was measured",
        "time_to_first_token_ms": None,
        "tokens_per_s": None,
    }
