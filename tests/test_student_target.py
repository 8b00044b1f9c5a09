"""The unit a student learns its teacher's map in (:class:`linecam.export.pool.Target`): linear for a
teacher whose defects stay within a few good-pixel scales (PatchCore distances), log1p for a
confident one (a scratch expert's probability map), decided from the distillation pool."""

from __future__ import annotations

import numpy as np
import pytest

from linecam.export.pool import LOG_RANGE, Pool, student_target


def _pool(tmp_path, defect_level: float) -> Pool:
    rng = np.random.default_rng(0)
    pool = Pool(tmp_path / f"pool-{defect_level}", 40, (32, 32))
    t = rng.uniform(0.0, 0.01, size=pool.t.shape).astype(np.float32)  # good pixels: up to 0.01
    bad = np.arange(40) % 2 == 1
    t[bad, 1:3, 1:3] = defect_level  # a defect blob on every other sample
    pool.t[:] = t
    pool.bad[:] = bad
    pool.mark(40)
    return pool


def test_a_confident_teacher_is_learnt_on_a_log_scale(tmp_path):
    pool = _pool(tmp_path, 1.0)  # ~100 good scales: a probability map
    target = student_target(pool)
    assert target.log and target.defect_peak > LOG_RANGE
    assert target.scale == pytest.approx(np.quantile(pool.t[~pool.bad[:]], 0.999), rel=0.05)
    t = pool.t[1]
    np.testing.assert_allclose(target(t), np.log1p(t / target.scale), rtol=1e-6)
    assert target(np.array([-1.0], np.float32))[0] == 0.0  # a negative map value is no defect, not a NaN
    assert target.describe().startswith("log1p(teacher map / ")


def test_a_distance_map_stays_linear(tmp_path):
    pool = _pool(tmp_path, 0.02)  # defects at ~2 good scales: PatchCore-like
    target = student_target(pool)
    assert not target.log and 1.0 < target.defect_peak < LOG_RANGE
    t = pool.t[1]
    np.testing.assert_allclose(target(t), t / target.scale, rtol=1e-6)
    assert target.describe().startswith("teacher map / ")
