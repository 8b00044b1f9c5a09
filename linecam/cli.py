"""``linecam``: the edge-side command line (run, check, events, demo)."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import click

from linecam import __version__
from linecam.errors import LinecamError


def setup_logging(level: str = "INFO") -> None:
    # journald adds its own timestamps; a terminal wants them.
    fmt = "%(levelname)s %(name)s: %(message)s" if os.environ.get("JOURNAL_STREAM") else \
        "%(asctime)s %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=getattr(logging, level), format=fmt, stream=sys.stderr, force=True)
    for noisy in ("PIL", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


class _Group(click.Group):
    """Turns any LinecamError into ``error: <one line>`` and its exit code."""

    def invoke(self, ctx: click.Context):  # type: ignore[override]
        try:
            return super().invoke(ctx)
        except LinecamError as e:
            click.echo(f"error: {e}", err=True)
            ctx.exit(e.exit_code)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="linecam")
def cli() -> None:
    """linecam: region expert on every frame, verdicts over MQTT."""


@cli.command()
@click.option("--config", "config_path", required=True, type=click.Path(path_type=Path),
              help="YAML config for one camera (see README).")
@click.option("--log-level", type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"]), default=None,
              help="Overrides the config's log_level.")
def run(config_path: Path, log_level: str | None) -> None:
    """Run the line daemon for one camera until SIGTERM / Ctrl-C (or the source ends).

    \b
    Trusted inputs: the config, the GenTL producer (.cti, native code), the model and VLM
    bundles (hash-checked against their manifest, which is no signature; a TensorRT engine
    is native code). Camera frames and the broker's traffic are not trusted."""
    from linecam.config import load_config

    cfg = load_config(config_path)
    setup_logging(log_level or cfg.log_level)
    from linecam.runtime.service import run_service

    summary = run_service(cfg)
    c = summary.counters
    click.echo(f"frames {c.get('frames', 0)}  OK {c.get('ok', 0)}  NG {c.get('ng', 0)}  "
               f"skipped {c.get('skipped', 0)}  in {summary.seconds:.1f} s", err=True)


@cli.command()
@click.option("--config", "config_path", required=True, type=click.Path(path_type=Path))
def check(config_path: Path) -> None:
    """Run every check `linecam run` makes before its first frame (config, bundle and runner,
    MQTT password and TLS files, camera source, line-scan geometry, VLM bundle, state folders),
    without connecting or grabbing the camera. Exits with the code `run` would."""
    from linecam.config import load_config
    from linecam.runtime.preflight import preflight

    cfg = load_config(config_path)
    setup_logging("WARNING")
    click.echo(f"config ok: line {cfg.line}, camera {cfg.camera_id} ({cfg.camera.kind})")
    for line in preflight(cfg):
        click.echo(line)


@cli.command()
@click.option("--config", "config_path", required=True, type=click.Path(path_type=Path),
              help="The line-scan line config (camera:, linescan:).")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Folder for the tile PNGs.")
@click.option("--count", type=click.IntRange(min=1), default=1000, show_default=True, help="Tiles to write.")
@click.option("--tile", type=click.IntRange(min=16), default=None,
              help="Tile size in px (the model input size to fit); default: linescan.tile_size, else 256.")
@click.option("--every", type=click.IntRange(min=1), default=1, show_default=True,
              help="Keep one tile row in N (spans more web).")
def tiles(config_path: Path, out: Path, count: int, tile: int | None, every: int) -> None:
    """Save a line-scan web's tiles as PNGs, to fit a web expert on: export-engine fit --images OUT."""
    from linecam.config import load_config
    from linecam.runtime.collect_tiles import collect_tiles

    cfg = load_config(config_path)
    setup_logging("WARNING")
    n = collect_tiles(cfg, out, count=count, tile=tile, every=every)
    click.echo(f"{n} tile(s) written to {out}; next: export-engine fit --images {out} --size {tile or 256} "
               "--out bundles/<name>")


@cli.command()
@click.option("--camera", type=click.Choice(["synthetic", "viky"]), default="synthetic",
              help="synthetic: a simulated line with known defects; viky: the GenICam virtual camera via harvesters.")
@click.option("--frames", type=int, default=120, show_default=True, help="Frames to inspect.")
@click.option("--fps", type=float, default=15.0, show_default=True)
@click.option("--workdir", type=click.Path(path_type=Path), default=Path(".cache/demo"), show_default=True,
              help="Where the demo bundle (cached), config, broker and snapshots live.")
@click.option("--json", "as_json", is_flag=True, help="Print received events as JSON lines.")
@click.option("--view", is_flag=True, help="Also run linecam record + linecam view: the live page beside the line.")
@click.option("--view-port", type=int, default=8080, show_default=True, help="HTTP port of the page (--view).")
def demo(camera: str, frames: int, fps: float, workdir: Path, as_json: bool, view: bool, view_port: int) -> None:
    """Simulated line end to end: private mosquitto, demo expert, daemon, live subscriber."""
    setup_logging("WARNING")
    from linecam.demo import run_demo

    run_demo(camera=camera, frames=frames, fps=fps, workdir=workdir, as_json=as_json,
             view_port=view_port if view else None)


@cli.command()
@click.option("--bundle", "bundle_dir", required=True, type=click.Path(path_type=Path),
              help="The region-expert bundle folder (manifest.json).")
@click.option("--data", "data_dir", required=True, type=click.Path(path_type=Path),
              help="One MVTec AD category folder: test/good, test/<defect>, ground_truth/<defect>/*_mask.png.")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=None,
              help="Where report.json and the plots go.  [default: eval-<bundle>-<category>]")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "int8"]), default=None,
              help="Model file to run (default: ONNX Runtime fp32 first; TensorRT the fp16 engine first).")
@click.option("--backend", type=click.Choice(["onnxruntime", "onnxruntime-cuda", "tensorrt", "auto"]),
              default="onnxruntime", show_default=True, help="As model.backend in the line config.")
@click.option("--threads", type=click.IntRange(min=0), default=None,
              help="ONNX Runtime intra-op threads (default 0: one per core).")
@click.option("--worst", type=click.IntRange(min=0), default=6, show_default=True,
              help="Worst cases to draw (highest-scoring good, lowest-scoring defective).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def evaluate(bundle_dir: Path, data_dir: Path, out_dir: Path | None, precision: str | None, backend: str,
             threads: int | None, worst: int, quiet: bool) -> None:
    """Measure a bundle on an MVTec-AD-layout dataset: image/pixel AUROC, AU-PRO, F1 at its threshold."""
    setup_logging("WARNING")
    from linecam.evaluate import evaluate_bundle, print_report

    if out_dir is None:
        out_dir = Path(f"eval-{bundle_dir.resolve().name}-{data_dir.resolve().name}")
    report = evaluate_bundle(bundle_dir, data_dir, out_dir, backend=backend, precision=precision,
                             intra_op_threads=threads, worst=worst, progress=not quiet)
    print_report(report)


def _add_optional_commands() -> None:
    from linecam.events import events_command

    cli.add_command(events_command)
    from linecam.bench.cli import bench_command; cli.add_command(bench_command)  # noqa: E702
    from linecam.station.cli import register; register(cli)  # noqa: E702  (record, history, view, ask)


_add_optional_commands()


def main() -> None:
    cli(prog_name="linecam")


if __name__ == "__main__":
    main()
