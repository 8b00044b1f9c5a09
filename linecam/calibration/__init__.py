"""Thresholds from scores of the deployed model (numpy only, importable without torch)."""

from linecam.calibration.thresholds import (
    ThresholdFit,
    fit_image_threshold,
    fit_pixel_threshold,
    fit_thresholds,
    frr_upper_bound,
    to_thresholds,
)

__all__ = [
    "ThresholdFit",
    "fit_image_threshold",
    "fit_pixel_threshold",
    "fit_thresholds",
    "frr_upper_bound",
    "to_thresholds",
]
