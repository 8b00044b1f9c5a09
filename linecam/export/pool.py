"""The distillation pool on disk: augmented good images, half with synthetic anomalies, and the
teacher's maps of them at the student's resolution; sample ``i`` depends on ``(seed, i)`` only,
so an interrupted build resumes and gives the same pool. And the map unit the student regresses.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from linecam.errors import BundleError
from linecam.export.sampler import AnomalySampler
from linecam.export.student import downsample, map_size
from linecam.export.teachers import Teacher
from linecam.progress import make_progress

#: Quantile of good-sample teacher pixels that the student's map unit is set to.
SCALE_QUANTILE = 0.999
#: Defects beyond this many good scales make the student learn the log of the map (:class:`Target`).
#: Measured on the real-photo pools: PatchCore teachers 1.6-2.0, combined 5.5-12, scratch 310-620.
LOG_RANGE = 4.0

class Pool:
    """Distillation samples on disk: inputs (float16), teacher maps (float32), anomaly flags."""

    def __init__(self, folder: Path, n: int, hw: tuple[int, int]) -> None:
        self.folder = folder
        self.n = n
        folder.mkdir(parents=True, exist_ok=True)
        h, w = hw
        mh, mw = map_size(hw)
        mode = "r+" if (folder / "x.npy").is_file() else "w+"
        self.x = np.lib.format.open_memmap(folder / "x.npy", mode=mode, dtype=np.float16, shape=(n, 3, h, w))
        self.t = np.lib.format.open_memmap(folder / "t.npy", mode=mode, dtype=np.float32, shape=(n, mh, mw))
        self.bad = np.lib.format.open_memmap(folder / "bad.npy", mode=mode, dtype=np.bool_, shape=(n,))
        state = folder / "done.json"
        self.done = json.loads(state.read_text())["done"] if state.is_file() and mode == "r+" else 0

    def mark(self, done: int) -> None:
        for a in (self.x, self.t, self.bad):
            a.flush()
        tmp = self.folder / "done.json.tmp"
        tmp.write_text(json.dumps({"done": done}))
        tmp.replace(self.folder / "done.json")
        self.done = done


def build_pool(pool: Pool, teacher: Teacher, sampler: AnomalySampler, seed: int, *, chunk: int = 16,
               progress: bool = True) -> None:
    h, w = teacher.spec.input_size
    xb = np.empty((chunk, 3, h, w), np.float32)
    yb = np.empty((chunk, 1, h, w), np.float32)
    bar = make_progress(progress)
    with bar:
        task = bar.add_task("teacher maps for distillation", total=pool.n, completed=pool.done, info="")
        for start in range(pool.done, pool.n, chunk):
            k = min(chunk, pool.n - start)
            for j in range(k):
                sampler.rng = np.random.default_rng([seed, 7, start + j])  # sample i depends on (seed, i) only
                sampler.sample(xb[j], yb[j])
            pool.t[start:start + k] = downsample(teacher.maps(xb[:k]))  # at the student's resolution
            pool.x[start:start + k] = xb[:k]
            pool.bad[start:start + k] = yb[:k].reshape(k, -1).max(axis=1) > 0
            pool.mark(start + k)
            bar.update(task, completed=start + k)


@dataclass(frozen=True)
class Target:
    """What the student regresses: ``teacher map / scale``, or its ``log1p`` when the teacher's
    defects reach far beyond its good pixels (``defect_peak`` > :data:`LOG_RANGE`).

    Why the log: a confident teacher (a scratch expert's probability map: good pixels ~0.002,
    defects ~1) gives defects targets of 300-600 good-pixel units on the linear scale, and the
    squared loss spends the student on them; the good images' maps, whose tails decide the image
    AUROC and the false rejects, went unlearned (a grass student's per-image map correlation with
    its teacher on held-out images: median 0.10; 0.85 with the log). A distance map (PatchCore:
    defects at 1.6-2 x its good scale) is learnt well linearly and stays so. Monotonic either
    way: the teacher's ranking is kept."""

    scale: float
    log: bool
    defect_peak: float  # 99th percentile of the anomalous pool samples' map maxima / scale

    def __call__(self, t: np.ndarray) -> np.ndarray:
        if self.log:
            return np.log1p(np.maximum(t, 0.0) / self.scale).astype(np.float32)
        return (t / self.scale).astype(np.float32)

    def describe(self) -> str:
        unit = f"teacher map / {self.scale:.6g}"
        return (f"log1p({unit})" if self.log else unit) + \
            f" ({self.scale:.6g}: the teacher's {SCALE_QUANTILE:.1%} good-pixel quantile)"


def student_target(pool: Pool) -> Target:
    """The student's target for this pool: its scale (:func:`map_scale`) and whether it is a log."""
    scale = map_scale(pool)
    bad = np.flatnonzero(pool.bad[:])
    peak = float(np.quantile([pool.t[i].max() for i in bad], 0.99)) / scale if bad.size else 0.0
    return Target(scale, peak > LOG_RANGE, peak)


def map_scale(pool: Pool) -> float:
    good = np.flatnonzero(~pool.bad[:])
    if good.size == 0:
        raise BundleError("the distillation pool has no good samples: raise --pool-size")
    # A strided subsample keeps this cheap for big pools; the quantile is stable.
    vals = np.concatenate([pool.t[i].ravel()[::7] for i in good])
    s = float(np.quantile(vals, SCALE_QUANTILE))
    if not np.isfinite(s) or s <= 0:
        raise BundleError(f"the teacher's maps of good images are all {s:g}: the teacher outputs nothing "
                          "useful (check its output name and preprocessing)")
    return s
