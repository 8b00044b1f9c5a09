"""``linecam bench``: every benchmark in one home; results go to ``benchmarks/results/``.

``linecam bench [options]`` runs the latency suite (ceiling, naive loop, the daemon, end to
end, the VLM on NG frames); its subcommands run the other benchmarks, each with its own
options (``linecam bench <name> --help``): ``engines`` (the student on TensorRT / ORT CUDA /
torch / CPU), ``region-expert`` (DINOv2 teacher vs students), ``linescan`` (lines/s),
``vlm-compare`` (linecam's VLM vs transformers' generate), ``region-tokens`` (what region-token
injection costs per NG frame), ``soak`` (100k frames, RSS/fds;
``--spool-cost``), ``prometheus`` (the per-frame cost of the daemon's /metrics), ``faults``, ``real-photo``
(accuracy on real photographs: PatchCore reference, teachers, students FP32/INT8), ``teacher-steps``
(the scratch expert's training steps on two real-photo test sets) and ``readme``
(the README's table from a results file). Run them from the checkout: paths default to
``benchmarks/results``, ``.cache/demo`` and ``.cache/bench`` there.

Imports nothing heavy at module level: ``linecam --help`` must stay fast and torch-free.
"""

from __future__ import annotations

import shlex
import sys
import time
from pathlib import Path

import click

DEFAULT_OUT = Path("benchmarks/results")


def _command_line(prefix: str) -> str:
    """What was typed after ``bench``, behind ``prefix`` (``linecam bench``), for the results."""
    args = sys.argv[1:]
    if "bench" in args:
        args = args[args.index("bench") + 1:]
    return " ".join([prefix, *(shlex.quote(a) for a in args)])


@click.group("bench", invoke_without_command=True)
@click.option("--bundle", type=click.Path(path_type=Path, exists=True, file_okay=False), default=None,
              help="Bundle to benchmark. Default: the demo expert (fitted once into --demo-cache; needs torch).")
@click.option("--demo-cache", type=click.Path(path_type=Path), default=Path(".cache/demo"), show_default=True)
@click.option("--workdir", type=click.Path(path_type=Path), default=Path(".cache/bench"), show_default=True,
              help="Frames, snapshots and subscriber files.")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=None,
              help=f"Results folder. Default: {DEFAULT_OUT} (with --quick: <workdir>/quick).")
@click.option("--mode", "modes", multiple=True, type=click.Choice(["model", "naive", "pipeline", "e2e", "vlm"]),
              help="Run only these modes (repeatable). Default: all. pipeline/e2e also measure the model ceiling.")
@click.option("--quick", is_flag=True, help="Seconds instead of minutes: checks the machinery, measures nothing.")
@click.option("--workers", type=int, default=None, help="Force the daemon's workers (with --intra-op-threads).")
@click.option("--intra-op-threads", type=int, default=None, help="Force ONNX Runtime intra-op threads (0 = default).")
@click.option("--no-snapshots", is_flag=True, help="Run the daemon without NG snapshots (default: on, as deployed).")
@click.option("--no-spool", is_flag=True, help="Run the daemon without its durable spool (default: on, as deployed).")
@click.option("--no-unpaced", is_flag=True, help="Skip the unpaced (max-rate) replay run.")
@click.option("--no-plots", is_flag=True, help="Skip the PNG plots (no matplotlib needed).")
@click.option("--readme", type=click.Path(path_type=Path), default=None,
              help="Also regenerate the benchmark table between the bench markers of this README.")
@click.option("--e2e-seconds", type=float, default=None, help="Measured seconds of the 80 % / e2e run.")
@click.option("--vlm-bundle", type=click.Path(path_type=Path, exists=True, file_okay=False), default=None,
              help="VLM bundle for the vlm mode. Default: a reference one (SmolVLM-256M dimensions, random weights), "
                   "built once into --workdir (needs torch); with --quick the vlm mode runs only when given.")
@click.option("--vlm-precision", type=click.Choice(["fp32", "fp16", "int8", "int4"]), default="int8", show_default=True,
              help="Decoder precision of the vlm mode (the daemon's default is int8).")
@click.pass_context
def bench_command(ctx: click.Context, **options: object) -> None:
    """Latency benchmarks: bare model ceiling, naive loop, daemon pipeline, end to end (see benchmarks/README.md).

    Subcommands run the other benchmarks (each has --help)."""
    if ctx.invoked_subcommand is not None:
        return
    run_bench_cli(**options, command=_command_line(ctx.command_path))  # type: ignore[arg-type]


_PASS_THROUGH = {"ignore_unknown_options": True, "allow_extra_args": True, "help_option_names": []}


def _script(name: str, module: str, doc: str) -> None:
    """A subcommand handing its arguments to ``linecam.bench.<module>.main(argv)`` (argparse)."""

    @bench_command.command(name, context_settings=_PASS_THROUGH, add_help_option=False, help=doc)
    @click.pass_context
    def _run(ctx: click.Context) -> None:
        import importlib

        from linecam.errors import LinecamError

        main = importlib.import_module(f"linecam.bench.{module}").main
        sys.argv = [f"linecam bench {name}", *ctx.args]  # what the results record as the command
        try:
            rc = main(list(ctx.args))
        except LinecamError as e:
            click.echo(f"error: {e}", err=True)
            ctx.exit(e.exit_code)
        ctx.exit(int(rc or 0))


_script("engines", "engines", "The student region expert on TensorRT, ONNX Runtime CUDA, torch and the CPU.")
_script("region-expert", "region_expert", "The DINOv2 memory-bank teacher vs the distilled students on the CPU.")
_script("text-expert", "text_expert", "The CLIP text-prompted expert at FP32/INT8 and its distilled student on the CPU.")
_script("linescan", "linescan", "Line-scan throughput: web lines/s processed vs offered.")
_script("vlm-compare", "vlm_compare", "linecam's ONNX Runtime VLM vs transformers' generate.")
_script("region-tokens", "region_tokens", "What region-token injection costs per NG frame (features, projector, "
        "K extra prefill rows).")
_script("soak", "soak", "The daemon for 100k frames: RSS, fds, threads (--spool-cost: the spool per message).")
_script("prometheus", "prometheus", "Per-frame CPU of the daemon's Prometheus histograms, and of one scrape.")
_script("faults", "faults", "Faults through a TCP proxy to a real mosquitto: detection, loss, duplicates, recovery.")
_script("real-photo", "real_photo", "Accuracy on real photographs: PatchCore reference, cnn/scratch teachers, "
        "students FP32/INT8.")
_script("teacher-steps", "teacher_steps", "The scratch expert's accuracy on real photographs per training-step "
        "count and encoder, on two independently drawn test sets.")


@bench_command.command("readme")
@click.option("--results", type=click.Path(path_type=Path), default=DEFAULT_OUT / "bench.json", show_default=True)
@click.option("--readme", type=click.Path(path_type=Path), default=Path("README.md"), show_default=True)
def readme_command(results: Path, readme: Path) -> None:
    """Regenerate the README's benchmark table (between the bench markers) from a results file."""
    from linecam.errors import LinecamError

    from .readme import replace_block
    from .report import load_results, readme_block

    try:
        if not results.is_file():
            raise LinecamError(f"{results} not found: run `linecam bench` first")
        data = load_results(results)
        if data["quick"]:
            raise LinecamError(f"{results} is a --quick run (measures nothing): run the full benchmark first")
        replace_block(readme, readme_block(data))
    except LinecamError as e:  # bad input: one line, exit status 2
        click.echo(f"error: {e}", err=True)
        raise SystemExit(2) from None
    click.echo(f"updated the benchmark table in {readme} from {results}")


def run_bench_cli(*, bundle: Path | None, demo_cache: Path, workdir: Path, out_dir: Path | None,
                  modes: tuple[str, ...], quick: bool, workers: int | None, intra_op_threads: int | None,
                  no_snapshots: bool, no_spool: bool, no_unpaced: bool, no_plots: bool, readme: Path | None,
                  e2e_seconds: float | None, command: str, vlm_bundle: Path | None = None,
                  vlm_precision: str = "int8") -> dict:
    import logging

    from linecam.errors import LinecamError

    from .pipeline import PipelineSetting
    from .report import headline_rows, readme_block, write_results
    from .suite import MODES, BenchOptions, Durations, run_suite

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if (workers is None) != (intra_op_threads is None):
        raise LinecamError("give --workers and --intra-op-threads together (or neither, to let the bench choose)")
    if workers is not None and (workers < 1 or intra_op_threads < 0):  # type: ignore[operator]
        raise LinecamError("--workers must be >= 1 and --intra-op-threads >= 0")
    if not no_plots:
        from .plots import _pyplot

        _pyplot()  # fail now, not after minutes of measuring
    durations = Durations.quick() if quick else Durations()
    if e2e_seconds is not None:
        durations.e2e_s = e2e_seconds
    setting = (PipelineSetting(workers, intra_op_threads, snapshots=not no_snapshots,  # type: ignore[arg-type]
                               spool=not no_spool)
               if workers is not None else None)
    opts = BenchOptions(bundle=bundle, demo_cache=demo_cache, workdir=workdir, modes=tuple(modes) or MODES,
                        durations=durations, setting=setting, snapshots=not no_snapshots, spool=not no_spool,
                        quick=quick, unpaced=not no_unpaced, command=command, vlm_bundle=vlm_bundle,
                        vlm_build=not quick, vlm_precision=vlm_precision)
    if quick:
        opts.offered_fractions = (1.1,)
        opts.e2e_extra_fractions = ()
        opts.frames = 8
        opts.vlm_tokens, opts.vlm_runs = 4, 2
    out = out_dir or (workdir / "quick" if quick else DEFAULT_OUT)
    t0 = time.monotonic()

    def say(msg: str) -> None:
        click.echo(f"[{time.monotonic() - t0:6.1f} s] {msg}", err=True)

    results, raw = run_suite(opts, say)
    paths = write_results(results, out)
    if not no_plots:
        from .plots import write_plots

        paths.update(write_plots(results, raw, out))
    click.echo("\n" + "\n".join(f"| {a} | {b} | {c} | {d} |" for a, b, c, d in headline_rows(results)))
    click.echo("\nwrote " + ", ".join(str(p) for p in paths.values()))
    if readme is not None:
        if quick:
            raise LinecamError("a --quick run measures nothing: not writing it into the README (drop --readme)")
        from .readme import replace_block

        replace_block(readme, readme_block(results))
        click.echo(f"updated the benchmark table in {readme}")
    return results
