"""``evaluate_bundle``: every test image through the daemon's own :class:`~linecam.runtime.inspector.Inspector`."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import cv2
import numpy as np

from linecam.bundle import Bundle, load_bundle
from linecam.calibration.metrics import MAX_EXACT_PIXELS
from linecam.errors import BundleError, LinecamError
from linecam.preprocess import aspect_size
from linecam.progress import make_progress
from linecam.runtime.inspector import Inspector, Thresholds
from linecam.evaluate.dataset import GOOD, DatasetError, mask_to_map, read_frame, read_mask, scan_dataset
from linecam.evaluate.plots import write_plots
from linecam.evaluate.report import EvalReport, ImageRecord, Metrics, compute_metrics, write_json

logger = logging.getLogger(__name__)

def _open(bundle: Bundle, backend: str, precision: str | None, intra_op_threads: int | None):
    """Choose and open the runner exactly as the daemon would for this backend setting."""
    from linecam.runtime.backends.select import choose_backend, open_runner
    from linecam.runtime.device import DeviceFacts, probe_device

    # ``onnxruntime`` never looks at the device (the daemon does not probe for it either).
    facts = DeviceFacts() if backend == "onnxruntime" else probe_device()
    choice = choose_backend(bundle, backend, precision, facts)
    runner = open_runner(bundle, choice, intra_op_threads=intra_op_threads or 0, workers=1,
                         auto=backend == "auto")
    return choice, runner


def evaluate_bundle(bundle_dir: str | Path, dataset_dir: str | Path, out_dir: str | Path | None = None, *,
                    backend: str = "onnxruntime", precision: str | None = None,
                    intra_op_threads: int | None = None, worst: int = 6, progress: bool = True) -> EvalReport:
    """Run every test image of ``dataset_dir`` (MVTec AD layout) through the bundle the way the
    daemon does and measure it; with ``out_dir``, write ``report.json`` and the plots there.

    ``backend``: onnxruntime | onnxruntime-cuda | tensorrt | auto (as ``model.backend``);
    ``precision``: fp32 | fp16 | int8 (None: ONNX Runtime takes fp32 first, TensorRT the fp16 engine first);
    ``intra_op_threads``: ONNX Runtime threads (None or 0: one per core); ``worst``: how many
    worst cases to draw. Raises :class:`~linecam.errors.LinecamError` subclasses (one line
    each) for a bad bundle, backend or dataset.
    """
    t_start = time.monotonic()
    bundle = load_bundle(bundle_dir)
    root = Path(dataset_dir)
    samples = scan_dataset(root)
    man = bundle.manifest
    thresholds = Thresholds.of(bundle)
    thr_img, thr_px = thresholds.image, thresholds.pixel
    choice, runner = _open(bundle, backend, precision, intra_op_threads)
    try:  # the daemon's preprocessing, verdict rule and output check
        inspector = Inspector(bundle, runner, thresholds)
    except BundleError:
        runner.close()
        raise
    pre, post = inspector.preprocessor, inspector.postprocessor

    scores: list[float] = []
    maps: list[np.ndarray] = []
    gts: list[np.ndarray] = []
    valid: list[bool] = []
    first: tuple[str, tuple[int, int]] | None = None
    map_hw: tuple[int, int] | None = None
    eval_hw: tuple[int, int] = (0, 0)
    try:
        with make_progress(progress) as bar:
            task = bar.add_task(f"evaluate {man.name}", total=len(samples), info="")
            for s in samples:
                image, bit_depth = read_frame(s)
                hw = (int(image.shape[0]), int(image.shape[1]))
                if first is None:
                    first = (s.rel, hw)
                    # (With a crop the model sees the crop, whose shape the export already checked.)
                    if man.preprocess.crop is None and (size := aspect_size(man.preprocess, *hw)):
                        in_h, in_w = man.preprocess.input_size
                        logger.warning("SIZE: the test images are %dx%d but the bundle's input is %dx%d: they "
                                       "are stretched to it (a bundle for images of this shape would take about "
                                       "%dx%d); is this the dataset the bundle was made for?",
                                       hw[1], hw[0], in_w, in_h, size[1], size[0])
                elif hw != first[1]:
                    raise DatasetError(f"image {s.rel} is {hw[1]}x{hw[0]} but {first[0]} is "
                                       f"{first[1][1]}x{first[1][0]}: the line has one frame size, so must the "
                                       f"test images; resize or remove it")
                mask = read_mask(s, root, hw)
                try:
                    ins = inspector.inspect(image, bit_depth)
                except ValueError as e:
                    raise DatasetError(f"image {s.rel}: {e}: is this the dataset the bundle was made for? "
                                       f"(its preprocess.crop needs larger frames)") from None
                amap = np.array(ins.anomaly_map, dtype=np.float32)  # kept for the metrics: a copy
                if map_hw is None:
                    map_hw = (int(amap.shape[0]), int(amap.shape[1]))
                    in_h, in_w = man.preprocess.input_size
                    eval_hw = (in_h, in_w) if map_hw[0] < in_h or map_hw[1] < in_w else map_hw
                elif amap.shape != map_hw:
                    raise LinecamError(f"the model gave a {amap.shape} anomaly map for {s.rel} but {map_hw} "
                                       f"before: the bundle's model is inconsistent; re-export it")
                ok = ins.valid
                if not ok:
                    logger.warning("%s: model output has NaN/Inf; left out of the metrics (the daemon "
                                   "would publish SKIPPED invalid_model_output)", s.rel)
                scores.append(float(ins.score_raw))
                if eval_hw != map_hw:
                    amap = cv2.resize(amap, (eval_hw[1], eval_hw[0]), interpolation=cv2.INTER_LINEAR)
                maps.append(amap)
                gts.append(mask_to_map(mask, pre, eval_hw))
                valid.append(ok)
                bar.update(task, advance=1, info=s.rel)
    finally:
        runner.close()
    assert first is not None and map_hw is not None  # scan_dataset guarantees one sample

    records = [
        ImageRecord(path=s.rel, defect=s.defect, label=s.label, score_raw=sc if ok else None,
                    score=sc / thr_img if ok else None, verdict=post.verdict(sc) if ok else None,
                    defect_px=int(g.sum()))
        for s, sc, g, ok in zip(samples, scores, gts, valid)
    ]
    vidx = [i for i, ok in enumerate(valid) if ok]
    if not vidx:
        raise LinecamError("the model gave NaN/Inf for every test image: the bundle is broken; re-export it")
    labels = np.array([samples[i].label for i in vidx])
    vscores = np.array([scores[i] for i in vidx])
    vgts = [gts[i] for i in vidx]
    vmaps = [maps[i] for i in vidx]
    for s, g in zip(samples, gts):
        if s.label and not g.any():
            logger.warning("%s: its defect covers less than half of any anomaly-map pixel, so it counts for "
                           "the image metrics but adds no region to the pixel metrics", s.rel)
    overall = compute_metrics(labels, vscores, vgts, vmaps, thr_img)
    per_defect: dict[str, Metrics] = {}
    good = [k for k, i in enumerate(vidx) if samples[i].defect == GOOD]
    for d in sorted({s.defect for s in samples} - {GOOD}):
        sel = good + [k for k, i in enumerate(vidx) if samples[i].defect == d]
        per_defect[d] = compute_metrics(labels[sel], vscores[sel], [vgts[k] for k in sel],
                                        [vmaps[k] for k in sel], thr_img)
    if overall.n_good == 0 or overall.n_bad == 0:
        logger.warning("the test set has %s: AUROC, AU-PRO and F1 are undefined (null in the report)",
                       "no good images" if overall.n_good == 0 else "no defect images")

    n_px = sum(m.size for m in vmaps)
    report = EvalReport(
        bundle_name=man.name, bundle_dir=str(bundle.root), model_sha256=bundle.model_sha256,
        backend=choice.backend, role=choice.role, backend_reason=choice.reason, dataset_dir=str(root),
        image_threshold=thr_img, pixel_threshold=thr_px, image_size=(first[1][1], first[1][0]),
        map_size=(map_hw[1], map_hw[0]), eval_size=(eval_hw[1], eval_hw[0]), metrics=overall, per_defect=per_defect, images=records,
        seconds=0.0, pixel_method="exact" if n_px <= MAX_EXACT_PIXELS else "histogram",
        n_invalid=len(valid) - len(vidx))
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        report.out_dir = str(out)
        write_json(report, t_start)  # first: the numbers survive whatever happens to the plots
        report.files = write_plots(out, report, samples, maps, pre, worst)
    report.seconds = time.monotonic() - t_start
    if out_dir is not None:
        write_json(report, t_start)
    logger.info("evaluated %s on %d images in %.1f s: image AUROC %.4f, pixel AUROC %.4f, AU-PRO %.4f",
                man.name, len(records), report.seconds, overall.image_auroc, overall.pixel_auroc, overall.aupro)
    return report
