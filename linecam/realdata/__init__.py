"""Real-photograph evaluation data: photographs that ship inside PyPI wheels, cut into an
MVTec-AD-layout category, with defects drawn by code independent of the trainer's synthetic
anomalies (:mod:`linecam.export.anomalies` is never imported here).

``python -m linecam.realdata --out data/real`` writes one category per photograph.
"""

from linecam.realdata.build import CATEGORIES, BuildResult, build_category, build_all

__all__ = ["CATEGORIES", "BuildResult", "build_category", "build_all"]
