"""Export a region expert to ONNX and prove the export computes what torch computes.

The graph has one input ``image`` ``[1, 3, H, W]`` (normalised, see
:class:`linecam.preprocess.PreprocessSpec`) and two outputs, ``anomaly_map``
``[1, 1, H, W]`` and ``score`` ``[1]``, all static shapes (TensorRT builds the
fastest engines from static shapes, and the line camera's frame size is fixed).
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import torch

from linecam.errors import BundleError

logger = logging.getLogger(__name__)

OPSET = 17
INPUT_NAME = "image"
MAP_NAME = "anomaly_map"
SCORE_NAME = "score"
#: Largest |onnxruntime - torch| accepted, as a fraction of the outputs' scale (their largest
#: magnitude on the check inputs). Relative, because a map's units depend on the data (a
#: teacher's distances, a student's map scale): float32 reordering in a correct graph stays
#: around 1e-6 of the scale, a wrong op is off by tens of percent.
PARITY_RTOL = 1e-3


def export_onnx(
    model: torch.nn.Module,
    path: str | Path,
    input_size: tuple[int, int],
    *,
    opset: int = OPSET,
    check_inputs: int = 3,
    rtol: float = PARITY_RTOL,
    seed: int = 0,
    inputs: np.ndarray | None = None,
    extra_outputs: tuple[str, ...] = (),
) -> Path:
    """Write ``model`` (returning ``(anomaly_map, score)``) to ``path`` and check parity.

    Uses the TorchScript exporter (``dynamo=False``): for a plain CNN it gives a
    compact, static-shape graph without needing ``onnxscript``. The file is then
    run with onnxruntime on ``check_inputs`` random inputs plus ``inputs`` (real preprocessed
    images, ``[N, 3, H, W]``: what the model will see); a maximum absolute difference above
    ``rtol`` times the outputs' scale raises :class:`BundleError`, and the file is kept as
    ``<name>.rejected.onnx`` for the bug report. ``extra_outputs`` names outputs the model
    returns after those two (the text expert's per-prompt maps); parity covers them too.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    h, w = input_size
    model = model.eval()
    dummy = torch.zeros(1, 3, h, w)
    with warnings.catch_warnings():
        # The legacy exporter announces its deprecation on every call; it is a
        # deliberate choice here (see docstring), not something the user can act on.
        warnings.simplefilter("ignore", category=DeprecationWarning)
        warnings.simplefilter("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
        # EfficientNet's TF-style "same" padding (the encoder expert) exports as a Pad whose pads
        # the exporter cannot fold; the graph is right (parity below checks it), the warning is noise.
        warnings.filterwarnings("ignore", message=".*Only steps=1 can be constant folded.*")
        with torch.no_grad():
            torch.onnx.export(
                model,
                (dummy,),
                str(path),
                input_names=[INPUT_NAME],
                output_names=[MAP_NAME, SCORE_NAME, *extra_outputs],
                opset_version=opset,
                do_constant_folding=True,
                dynamo=False,
            )
    import onnx

    onnx.checker.check_model(str(path))
    try:
        diff, scale = parity(model, path, input_size, n=check_inputs, seed=seed, inputs=inputs,
                             outputs=(MAP_NAME, SCORE_NAME, *extra_outputs))
    except Exception:
        path.unlink(missing_ok=True)
        raise
    if not diff <= rtol * scale:
        rejected = path.with_name(path.stem + ".rejected.onnx")
        path.replace(rejected)
        raise BundleError(
            f"ONNX export differs from the torch model by {diff:.3g} = {diff / scale:.2%} of the outputs' scale "
            f"{scale:.3g} (> {rtol:.1%}): the exported graph computes something else; the graph is kept as "
            f"{rejected}; report it with the torch/onnx/onnxruntime versions"
        )
    logger.info("exported %s (opset %d), max |ort - torch| = %.2e (%.1e of the outputs' scale)", path, opset, diff,
                diff / scale)
    return path


def parity(model: torch.nn.Module, path: str | Path, input_size: tuple[int, int], *,
           n: int = 3, seed: int = 0, inputs: np.ndarray | None = None,
           outputs: tuple[str, ...] = (MAP_NAME, SCORE_NAME)) -> tuple[float, float]:
    """``(max |onnxruntime - torch|, outputs' scale)`` over ``n`` random inputs and ``inputs``.

    The scale is the largest |torch output| seen (at least 1e-6): the tolerance follows the
    outputs' units, so ×1000 outputs pass exactly when ×1 outputs do."""
    import onnxruntime as ort

    h, w = input_size
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(seed)
    checks = []
    for i in range(max(1, n)):
        # Normalised images are roughly N(0, 1); also try a smooth one (realistic structure).
        x = rng.standard_normal((1, 3, h, w)).astype(np.float32)
        if i % 2:
            x = (np.cumsum(x, axis=3) / np.sqrt(w)).astype(np.float32)
        checks.append(x)
    if inputs is not None:
        checks += [np.ascontiguousarray(inputs[i:i + 1], dtype=np.float32) for i in range(inputs.shape[0])]
    worst, scale = 0.0, 1e-6
    for x in checks:
        got = sess.run(list(outputs), {INPUT_NAME: x})
        with torch.no_grad():
            want = [t.numpy() for t in model(torch.from_numpy(x))]
        for g, e in zip(got, want):
            if g.shape != e.shape:
                raise BundleError(f"ONNX output shape {g.shape} != torch {e.shape}: the export is wrong")
            worst = max(worst, float(np.max(np.abs(g - e))))
            scale = max(scale, float(np.max(np.abs(e))))
    return worst, scale
