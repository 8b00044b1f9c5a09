"""The grounding modes of a distilled student and the IAD-Unify ablation that compares them.

* ``inject``: the daemon's region-grounded prompt (crop around the regions, boxes drawn
  and written into the text) *plus* K region tokens from the region projector.
* ``prompt``: the region-grounded prompt only (what every bundle without a projector gets).
* ``none``: no grounding at all: the whole frame, no boxes, no tokens, a generic question.

:func:`run_ablation` trains one student per missing mode with the run's settings on the
same training records and scores all of them on the same held-out records, so the
report's rows differ only in grounding: location-word, defect-kind and size-class
accuracy (:mod:`.evaluate`'s structured fields).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from linecam.export.vlm.dataset import DescriptionRecord, grounded
from linecam.export.vlm.evaluate import Vocabulary, score
from linecam.export.vlm.train import Example
from linecam.runtime.vlm.prompt import PromptConfig, RegionPromptBuilder

logger = logging.getLogger(__name__)

MODES = ("inject", "prompt", "none")
NO_GROUNDING_TEMPLATE = ("Describe the defect in this {image_w}x{image_h} camera frame in one sentence: its type, "
                         "where it is and how large it is.")


def builder_for(mode: str, prompt: PromptConfig) -> RegionPromptBuilder:
    if mode == "none":
        return RegionPromptBuilder(replace(prompt, template=NO_GROUNDING_TEMPLATE, region_template="", crop=False,
                                           overlay="none"))
    return RegionPromptBuilder(prompt)


def make_splits(records: Sequence[DescriptionRecord], builder: RegionPromptBuilder,
                features_of: Callable[[DescriptionRecord, Any], np.ndarray] | None = None) -> dict[str, list[Example]]:
    """Train / held-out :class:`Example` lists (with region features when ``features_of`` is given)."""
    splits: dict[str, list[Example]] = {"train": [], "holdout": []}
    for r in records:
        g = grounded(r, builder)
        feats = features_of(r, g) if features_of is not None else None
        splits[r.split].append(Example(r, g, kl=r.text == r.teacher_text, features=feats))
    return splits


def torch_generator(student: Any, injector: Any, max_new: int) -> Callable[[Example], str]:
    """Greedy text of the torch student for one example (with its region tokens if ``injector``)."""
    if injector is not None:
        return lambda ex: injector.generate(ex.grounded.image, ex.grounded.prompt, ex.features,
                                            max_new_tokens=max_new)
    return lambda ex: student.generate(ex.grounded.image, ex.grounded.prompt, max_new_tokens=max_new)


def onnx_generator(bundle: Path, max_new: int, projector: bool) -> Callable[[Example], str]:
    """Greedy text of the exported bundle on ONNX Runtime, as the daemon's worker runs it."""
    from linecam.runtime.vlm.engine import VlmEngine
    from linecam.runtime.vlm.region_tokens import RegionProjector

    engine = VlmEngine(bundle, device="auto")
    if not projector:
        return lambda ex: engine.generate(ex.grounded.image, ex.grounded.prompt, max_new_tokens=max_new).text
    proj = RegionProjector(engine.bundle, "fp32")

    def gen(ex: Example) -> str:
        enc = proj.inject(engine.encode(ex.grounded.image, ex.grounded.prompt), ex.features)
        return engine.generate_encoded(enc, max_new_tokens=max_new).text

    return gen


def row(agreement: dict[str, Any], runtime: str) -> dict[str, Any]:
    """One ablation row from an evaluation dict (:meth:`Agreement.as_dict`)."""
    f = agreement.get("fields", {})
    return {"n": agreement.get("n", 0), "location": f.get("location"), "kind": f.get("kind"), "size": f.get("size"),
            "agreement": agreement.get("agreement"), "runtime": runtime}


def evaluate(generate: Callable[[Example], str], examples: Sequence[Example], vocab: Vocabulary, progress: Any,
             what: str) -> dict[str, Any]:
    task = progress.add_task(what, total=len(examples), info="")
    pairs = []
    for ex in examples:
        pairs.append((ex.record.id, ex.record.text, generate(ex)))
        progress.update(task, advance=1)
    return score(pairs, vocab).as_dict()


def run_ablation(student_dir: Path, records: Sequence[DescriptionRecord], cfg: Any, vocab: Vocabulary, work: Path,
                 progress: Any, max_new: int, modes: Sequence[str] = ("prompt", "none")) -> dict[str, dict[str, Any]]:
    """Train and score one student per grounding mode in ``modes`` (see the module doc)."""
    from linecam.export.vlm.hfmodel import HfVlm
    from linecam.export.vlm.train import merged_model, seed_everything, train_student

    rows: dict[str, dict[str, Any]] = {}
    ablation_cfg = replace(cfg, region_tokens=0, train_projector_only=False)
    for mode in modes:
        splits = make_splits(records, builder_for(mode, cfg.prompt))
        split = "holdout" if splits["holdout"] else "train"
        seed_everything(cfg.seed)
        student = HfVlm(student_dir, device=cfg.device, dtype="fp32" if cfg.full_finetune else "auto",
                        trainable=True)
        fp = hashlib.sha256(json.dumps([mode, [(e.record.id, e.grounded.prompt, e.record.text)
                                               for e in splits["train"]], cfg.steps, cfg.lr, cfg.seed,
                                        cfg.batch_size, cfg.lora_r]).encode()).hexdigest()
        trained, _ = train_student(student, splits["train"], ablation_cfg, checkpoint=work / f"ablation_{mode}.pt",
                                   fingerprint=fp, progress=progress)
        student.model = merged_model(trained)
        exs = sorted(splits[split], key=lambda e: e.record.id)[: cfg.eval_limit]
        res = evaluate(torch_generator(student, None, max_new), exs, vocab, progress, f"ablation: {mode} ({split})")
        rows[mode] = {**row(res, "torch"), "split": split, "samples": res["samples"][:10]}
        logger.info("ablation %s (%s): location %s, kind %s, size %s", mode, split, rows[mode]["location"],
                    rows[mode]["kind"], rows[mode]["size"])
    return rows
