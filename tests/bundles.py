"""Tiny bundles for tests that exercise mechanics, not accuracy (no torch, no training): the
darkness bundle of :mod:`linecam.bench.darkness` (viky's dark ball scores high), plus manifest
helpers and an independent numpy reference of the darkness score."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from linecam.bench.darkness import MEAN, STD, darkness_model, make_tiny_bundle


def read_manifest(root: Path) -> dict:
    return json.loads((root / "manifest.json").read_text())


def write_raw_manifest(root: Path, data: dict) -> None:
    (root / "manifest.json").write_text(json.dumps(data))


def darkness_reference(image: np.ndarray) -> float:
    """Independent numpy computation of the tiny model's score for an RGB uint8 image
    already at model size (no resize involved)."""
    x = image.astype(np.float64) / 255.0
    dark = 1.0 - x.mean(axis=2)
    h, w = dark.shape
    pooled = dark.reshape(h // 4, 4, w // 4, 4).mean(axis=(1, 3))
    return float(pooled.max())


__all__ = ["MEAN", "STD", "darkness_model", "darkness_reference", "make_tiny_bundle", "read_manifest",
           "write_raw_manifest"]
