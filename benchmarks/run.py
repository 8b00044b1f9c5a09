#!/usr/bin/env python
"""The one benchmark command: every mode, results in benchmarks/results/, README table regenerated.

    python benchmarks/run.py              # full run (a few minutes), from the repository root
    python benchmarks/run.py --quick      # seconds: checks the machinery, writes to .cache/bench/quick
    python benchmarks/run.py --help       # every option (same as `linecam bench --help`)

Without ``--quick`` (and unless ``--readme`` or ``--no-readme`` says otherwise) the table
between the bench markers of ./README.md is regenerated from the new results.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(ROOT))

from linecam.bench.cli import bench_command  # noqa: E402
from linecam.errors import LinecamError  # noqa: E402


def main() -> None:
    typed = sys.argv[1:]
    args = [a for a in typed if a != "--no-readme"]
    sys.argv = [sys.argv[0], *args]  # the command recorded in the results is what was typed
    # Paths relative to the checkout, not to wherever the command is run from.
    for opt, path in (("--demo-cache", ".cache/demo"), ("--workdir", ".cache/bench")):
        if opt not in typed:
            args += [opt, str(ROOT / path)]
    if "--out" not in typed and "--quick" not in typed:
        args += ["--out", str(ROOT / "benchmarks" / "results")]
    wants_readme = not ({"--no-readme", "--quick", "--readme", "--help"} & set(typed))
    if wants_readme:
        if (ROOT / "README.md").is_file():
            args = [*args, "--readme", str(ROOT / "README.md")]
        else:
            print(f"note: {ROOT / 'README.md'} not found: the README table will not be updated", file=sys.stderr)
    try:
        bench_command.main(args=args, prog_name="python benchmarks/run.py", standalone_mode=False)
    except LinecamError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)


if __name__ == "__main__":
    main()
