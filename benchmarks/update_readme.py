#!/usr/bin/env python
"""Regenerate README.md's benchmark table from a committed results file.

    python benchmarks/update_readme.py [--results benchmarks/results/bench.json] [--readme README.md]

Replaces the text between ``<!-- bench:start -->`` and ``<!-- bench:end -->`` with the
headline table and the command that produced the results. Fails with one line if the
README or its markers are missing (it never creates a README).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from linecam.bench.readme import replace_block  # noqa: E402
from linecam.bench.report import load_results, readme_block  # noqa: E402
from linecam.errors import LinecamError  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results" / "bench.json")
    ap.add_argument("--readme", type=Path, default=ROOT / "README.md")
    a = ap.parse_args(argv)
    try:
        if not a.results.is_file():
            raise LinecamError(f"{a.results} not found: run `python benchmarks/run.py` first")
        results = load_results(a.results)
        if results["quick"]:
            raise LinecamError(f"{a.results} is a --quick run (measures nothing): run the full benchmark first")
        replace_block(a.readme, readme_block(results))
    except LinecamError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"updated the benchmark table in {a.readme} from {a.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
