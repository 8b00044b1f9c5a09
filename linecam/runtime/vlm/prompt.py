"""Region-grounded prompts: what the region expert found becomes what the VLM is asked.

A small VLM is only useful on the line when it is told *where* to look (IAD-Unify: no
grounding, > 76 points less location accuracy). For each NG frame the builder

* crops the frame around the regions (union of the strongest ``max_regions`` boxes,
  grown by a margin), so the defect fills the encoder's few hundred image tokens;
* optionally draws the boxes on the crop (``overlay="box"``);
* writes each region's box (frame pixels *and* crop pixels), area and score into the text
  through a configurable template.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import cv2
import numpy as np

from linecam.runtime.postprocess import Region
from linecam.runtime.vlm.image import to_rgb_u8

DEFAULT_TEMPLATE = ("The line inspection model flagged {n_regions} anomalous region(s) in this {crop_w}x{crop_h} "
                    "crop of a {image_w}x{image_h} camera frame.\n{regions}"
                    "Describe the defect in one sentence: its type, where it is and how large it is.")
DEFAULT_REGION_TEMPLATE = ("Region {index}: box x={cx}, y={cy}, w={w}, h={h} in this crop "
                           "(x={x}, y={y} in the frame), area {area} px, anomaly score {score:.2f} "
                           "(1.00 = threshold){label_text}.\n")


@dataclass(frozen=True, slots=True)
class PromptConfig:
    """How regions become a prompt. Templates are ``str.format`` strings.

    ``template`` fields: n_regions, regions (the joined region lines), image_w, image_h,
    crop_w, crop_h. ``region_template`` fields: index (1-based), x, y, w, h (frame pixels),
    cx, cy (top-left in crop pixels), area, score (normalised, 1.0 = threshold), labels (the
    text expert's prompt names that fired, comma separated; "" for other experts) and
    label_text (``", matching the inspection prompt(s): scratch"``, or "" without labels).
    """

    template: str = DEFAULT_TEMPLATE
    region_template: str = DEFAULT_REGION_TEMPLATE
    crop: bool = True
    #: Margin around the regions' union, as a fraction of its larger side, at least ``min_margin_px``.
    margin: float = 0.5
    min_margin_px: int = 32
    max_regions: int = 4
    overlay: Literal["none", "box"] = "box"
    overlay_color: tuple[int, int, int] = (255, 0, 0)  # RGB


@dataclass(frozen=True, slots=True)
class GroundedPrompt:
    image: np.ndarray  # (h, w, 3) uint8 RGB, owned (a copy)
    prompt: str
    crop_box: tuple[int, int, int, int]  # x, y, w, h in frame pixels
    regions: list[dict[str, Any]] = field(default_factory=list)  # those in the prompt, normalised scores


def _as_dict(r: Region | Mapping[str, Any], threshold: float) -> dict[str, Any]:
    if isinstance(r, Region):
        return {"bbox": tuple(int(v) for v in r.bbox), "area": int(r.area), "score": r.max_score / threshold,
                "labels": list(r.labels)}
    # A defect message's region: max_score is already normalised.
    return {"bbox": tuple(int(v) for v in r["bbox"]), "area": int(r["area"]), "score": float(r["max_score"]),
            "labels": [str(v) for v in r.get("labels") or ()]}


def _label_text(labels: Sequence[str]) -> str:
    # IAD-GPT's mask fusion in text: the expert's region labels go to the VLM with its boxes.
    return f", matching the inspection prompt(s): {', '.join(labels)}" if labels else ""


class RegionPromptBuilder:
    """Builds one :class:`GroundedPrompt` per NG frame. Stateless; safe to share between threads."""

    def __init__(self, config: PromptConfig | None = None) -> None:
        self.config = config or PromptConfig()
        # Fail at construction, not on the first defect, if a template names an unknown field.
        self._render([{"bbox": (0, 0, 1, 1), "area": 1, "score": 1.0}], (0, 0, 1, 1), 1, 1)

    def _render(self, regs: list[dict[str, Any]], crop: tuple[int, int, int, int], iw: int, ih: int) -> str:
        c = self.config
        x0, y0, cw, ch = crop
        lines = "".join(c.region_template.format(index=i + 1, x=r["bbox"][0], y=r["bbox"][1], w=r["bbox"][2],
                                                 h=r["bbox"][3], cx=r["bbox"][0] - x0, cy=r["bbox"][1] - y0,
                                                 area=r["area"], score=r["score"],
                                                 labels=", ".join(r.get("labels", ())),
                                                 label_text=_label_text(r.get("labels", ())))
                        for i, r in enumerate(regs))
        return c.template.format(n_regions=len(regs), regions=lines, image_w=iw, image_h=ih, crop_w=cw, crop_h=ch)

    def crop_box(self, regs: list[dict[str, Any]], iw: int, ih: int) -> tuple[int, int, int, int]:
        c = self.config
        if not c.crop or not regs:
            return 0, 0, iw, ih
        x0 = min(r["bbox"][0] for r in regs)
        y0 = min(r["bbox"][1] for r in regs)
        x1 = max(r["bbox"][0] + r["bbox"][2] for r in regs)
        y1 = max(r["bbox"][1] + r["bbox"][3] for r in regs)
        m = max(int(round(c.margin * max(x1 - x0, y1 - y0))), c.min_margin_px)
        x0, y0, x1, y1 = max(0, x0 - m), max(0, y0 - m), min(iw, x1 + m), min(ih, y1 + m)
        return x0, y0, max(1, x1 - x0), max(1, y1 - y0)

    def build(self, image: np.ndarray, regions: Sequence[Region | Mapping[str, Any]], *, threshold: float = 1.0,
              bit_depth: int = 8) -> GroundedPrompt:
        """``image``: a linecam frame image; ``regions``: postprocess Regions (raw scores, divided by
        ``threshold``) or defect-message region dicts (already normalised)."""
        ih, iw = image.shape[:2]
        regs = sorted((_as_dict(r, threshold) for r in regions), key=lambda r: -r["score"])
        regs = regs[: self.config.max_regions]
        box = self.crop_box(regs, iw, ih)
        x0, y0, cw, ch = box
        crop = to_rgb_u8(image[y0:y0 + ch, x0:x0 + cw], bit_depth)
        crop = np.array(crop, copy=True)  # owned: the frame buffer may be reused by the source
        if self.config.overlay == "box":
            for r in regs:
                x, y, w, h = r["bbox"]
                cv2.rectangle(crop, (x - x0, y - y0), (x - x0 + w - 1, y - y0 + h - 1), self.config.overlay_color, 2)
        return GroundedPrompt(crop, self._render(regs, box, iw, ih), box, regs)
