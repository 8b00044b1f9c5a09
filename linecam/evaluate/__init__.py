"""``linecam evaluate``: how well a region-expert bundle separates good from defective parts,
measured on a dataset in MVTec AD layout::

    <category>/test/good/*.png                    good parts (label 0)
    <category>/test/<defect>/*.png                defective parts (label 1), one folder per defect type
    <category>/ground_truth/<defect>/<name>_mask.png   0 background, 255 defect; the image's size
    <category>/train/good/*.png                   (not used here)

Every image goes through the line daemon's own code path: the bundle is loaded and
verified with :func:`linecam.bundle.load_bundle`, the backend is chosen and opened with
:func:`linecam.runtime.backends.select.choose_backend` / ``open_runner``, the file is read
into the camera frame layout exactly as the replay camera does, and
:class:`linecam.preprocess.Preprocessor` (configured from the manifest) makes the model
input; the verdict and the NaN/Inf check are the daemon's
:class:`~linecam.runtime.postprocess.Postprocessor`. So ``score_raw`` here is what the daemon
publishes for the same image (a test checks it through a real broker), and ``score`` is the
published ``score_raw / image threshold`` (1.0 = at the threshold).

Ground truth meets the anomaly map at the *evaluation size*: the map's own, or the model input's
when the map is coarser (a coarse map is upsampled bilinearly); masks get there by :data:`MASK_RESIZE`.

Metrics (:mod:`linecam.calibration.metrics`): image AUROC, pixel AUROC and AU-PRO up to 30 %
FPR on all test images; F1, false-reject rate (good flagged NG) and miss rate (defective
passed OK) at the bundle's image threshold (score >= threshold is NG, the daemon's rule);
the same per defect type, each against all the good images. Output: ``report.json`` and,
with matplotlib, ``roc.png``, ``scores_hist.png`` and ``worst_XX_<name>.png`` overlays.

torch is never imported (the edge can evaluate the bundle it runs).
"""

from __future__ import annotations

from linecam.evaluate.dataset import (GOOD, MASK_RESIZE, DatasetError, Sample, mask_to_map, read_frame, read_mask,
                                      scan_dataset)
from linecam.evaluate.plots import worst_cases
from linecam.evaluate.report import EvalReport, ImageRecord, Metrics, compute_metrics, print_report
from linecam.evaluate.run import evaluate_bundle

__all__ = ["GOOD", "MASK_RESIZE", "DatasetError", "EvalReport", "ImageRecord", "Metrics", "Sample",
           "compute_metrics", "evaluate_bundle", "mask_to_map", "print_report", "read_frame", "read_mask",
           "scan_dataset", "worst_cases"]
