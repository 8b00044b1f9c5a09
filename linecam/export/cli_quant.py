"""The quantization and accuracy-gate options every region-expert export takes
(``export-engine distil`` and ``text-expert``): one definition, so both offer the same ones
with the same defaults, those of :class:`linecam.export.variants.QuantOptions` (written here as
literals so that ``--help`` imports nothing but click; ``tests/test_int8_search.py`` checks they agree).

A command decorated with :func:`quant_options` receives them as ``**quant`` and hands
:func:`quant_kwargs` of them to its options dataclass.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import click

F = TypeVar("F", bound=Callable[..., Any])


def quant_options(quantize_help: str) -> Callable[[F], F]:
    """Decorator: --quantize (help ``quantize_help``), --int8-method, --quant-tool, the three
    gate bounds, --int8-max-float, --gate-images and --force."""
    options = [
        click.option("--quantize", "quantize", default="fp16,int8", show_default=True, help=quantize_help),
        click.option("--int8-method", type=click.Choice(["minmax", "percentile", "entropy"]), default=None,
                     help="INT8 calibration method (default: the quantizer's)."),
        click.option("--quant-tool", "int8_tool", type=click.Choice(["auto", "ort", "modelopt"]), default="auto",
                     show_default=True, help="Q/DQ quantizer: ONNX Runtime, or NVIDIA ModelOpt when installed."),
        click.option("--max-auroc-drop", type=click.FloatRange(min=0), default=0.5, show_default=True,
                     help="Accuracy gate: largest image-AUROC loss (points) of FP16/INT8 vs FP32."),
        click.option("--min-map-pearson", type=click.FloatRange(-1, 1), default=0.9, show_default=True,
                     help="Accuracy gate: smallest anomaly-map correlation of FP16/INT8 with FP32."),
        click.option("--max-score-diff", type=click.FloatRange(min=0, min_open=True), default=0.1,
                     show_default=True, help="Accuracy gate: largest |score - FP32 score| as a share of the FP32 "
                                             "map's range (thresholds are fitted on FP32)."),
        click.option("--int8-max-float", type=click.IntRange(min=0), default=None,
                     help="When INT8 fails the accuracy gate, keep up to this many of its most sensitive "
                          "convolutions in float until it passes (0: fail as is; default: a quarter of the "
                          "model's quantized convolutions, at least 3)."),
        click.option("--gate-images", type=click.IntRange(min=8), default=None,
                     help="Good and synthetic-defect images, each, that the gate and the thresholds are measured "
                          "on (held-out images, jittered copies, anomalies painted on them; default: distil 64, "
                          "text-expert 100 good and 32 defective). More make the AUROC drop steadier; its 95 % "
                          "interval is in gate.json."),
        click.option("--force", is_flag=True, help="Write the bundle even when the accuracy gate fails."),
    ]

    def decorate(f: F) -> F:
        for option in reversed(options):  # listed in --help in the order above
            f = option(f)
        return f

    return decorate


def parse_precisions(value: str) -> tuple[str, ...]:
    """``"fp16,int8"`` -> ``("fp16", "int8")``; ``"none"`` -> ``()``."""
    return tuple(p.strip() for p in value.lower().split(",") if p.strip() and p.strip() != "none")


def quant_kwargs(quant: dict[str, Any]) -> dict[str, Any]:
    """The ``**quant`` a decorated command received, as keyword arguments of QuantOptions."""
    return {**quant, "quantize": parse_precisions(quant["quantize"])}
