"""The e2e mode's subscriber: a separate process, like a plant client, timing each verdict.

    python -m linecam.bench.subscriber --port 1883 --prefix linecam/bench/e2e --out rx.json

Prints ``READY`` once the broker confirmed the subscription, then records every
verdict with ``time.monotonic_ns()`` at receipt (paho's network thread, before any
decoding). One host, one monotonic clock: ``received - frame_mono_ns`` is frame
ready → verdict received. A line on stdin with the number of verdicts to expect
ends it once they are all in (or after ``--idle`` seconds without one); ``EOF`` too.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

from linecam.events import subscribe


def _read_expected(box: dict[str, int | None], got: threading.Event) -> None:
    line = sys.stdin.readline()
    try:
        box["expected"] = int(line.strip())
    except ValueError:  # EOF or "stop": end as soon as the stream goes quiet
        box["expected"] = 0
    got.set()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m linecam.bench.subscriber")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--prefix", required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--idle", type=float, default=5.0)
    ap.add_argument("--timeout", type=float, default=900.0)
    a = ap.parse_args(argv)

    cols: dict[str, list] = {"frame_id": [], "verdict": [], "frame_mono_ns": [], "mono_ns": [],
                             "received_ns": [], "inference_ms": []}
    box: dict[str, int | None] = {"expected": None}
    got = threading.Event()
    hard_end = time.monotonic() + a.timeout
    with subscribe(a.host, a.port, prefix=a.prefix, types=("verdict",), validate=False, timeout=None) as sub:
        print("READY", flush=True)
        threading.Thread(target=_read_expected, args=(box, got), daemon=True).start()
        last = time.monotonic()
        while time.monotonic() < hard_end:
            ev = sub.poll(timeout=0.2)
            now = time.monotonic()
            if ev is not None:
                p = ev.payload
                cols["frame_id"].append(p["frame_id"])
                cols["verdict"].append(p["verdict"])
                cols["frame_mono_ns"].append(p["frame_mono_ns"])
                cols["mono_ns"].append(p["mono_ns"])
                cols["received_ns"].append(ev.received_mono_ns)
                cols["inference_ms"].append(p.get("latency_ms", {}).get("inference"))
                last = now
            if got.is_set():
                expected = box["expected"] or 0
                if (expected and len(cols["frame_id"]) >= expected) or now - last > a.idle:
                    break
    a.out.write_text(json.dumps(cols))
    return 0


if __name__ == "__main__":
    sys.exit(main())
