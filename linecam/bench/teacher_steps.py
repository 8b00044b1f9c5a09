"""How many training steps the scratch expert needs on real photographs (the default of
``export-engine distil --teacher-steps``), and which encoder it should segment (``--encoder``), on
the real-photo test set and on a second one drawn independently, so that the choice is not fitted
to one test set.

For each data seed (``linecam.realdata`` with that seed: other training crops, other test crops,
other painted defects), each category and each step count, the scratch expert is trained exactly
as the distil command trains its teacher (:func:`linecam.export.scratch.fit_scratch_expert`, same
split) and its own ONNX is scored with ``linecam evaluate``'s function.

    linecam bench teacher-steps --steps 1000,3000 --seeds 0,1 --out .cache/teachersteps
    linecam bench teacher-steps --steps 3000 --encoders none,efficientnet-lite0 --results scratch_teacher_encoder
    linecam bench teacher-steps --steps 3000 --encoders efficientnet-lite0 --encoder-lr-scales 0,0.1 \
        --results scratch_teacher_finetune

Results: ``benchmarks/results/<--results>.{json,md}``, written after every fit (a re-run reuses
the trained bundles in ``--out``). Run from the checkout.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from linecam.bench.real_photo import RESULTS, _f, evaluate_bundle, machine_line

DEFAULT_RESULTS = "scratch_teacher_steps"


def fit_and_score(data: Path, out: Path, size: int, steps: int, threads: int | None,
                  encoder: str = "none", encoder_lr_scale: float = 0.0) -> dict[str, Any]:
    """Train (or reuse) the scratch expert on ``data``'s training crops; score it on its test set."""
    from linecam.export.scratch import fit_scratch_expert

    seconds = None  # a bundle from an earlier run is reused: no fit time to report
    if not (out / "manifest.json").is_file():
        t = time.perf_counter()
        fit_scratch_expert(data / "train" / "good", out, input_size=(size, size), steps=steps, threads=threads,
                           progress=False, encoder=encoder, encoder_lr_scale=encoder_lr_scale)
        seconds = time.perf_counter() - t
    return {**evaluate_bundle(out, data, "fp32"), "fit_seconds": seconds}


def render(r: dict[str, Any]) -> str:
    lines = [f"# Scratch expert: {r.get('title', 'training steps')} on real photographs", "",
             f"{r.get('machine', '')}; {r.get('size')} px; image AUROC / pixel AUROC of the scratch expert's own "
             "ONNX on each category's test set (`linecam.realdata`, 24 good and 56 defective per category); "
             "data seed 0 is the real-photo benchmark's test set, other seeds are drawn independently "
             "(other crops, other defects).", "",
             "| data seed | encoder | steps | " + " | ".join(f"{c} img / pix" for c in r.get("categories", [])) +
             " | mean img | mean pix |",
             "| --- " * (len(r.get("categories", [])) + 5) + "|"]
    for row in r.get("rows", []):
        cells, imgs, pixs = [], [], []
        for c in r["categories"]:
            o = (row["per_category"].get(c) or {}).get("overall")
            if o is None:
                cells.append("–")
                continue
            imgs.append(o["image_auroc"])
            pixs.append(o["pixel_auroc"])
            cells.append(f"{_f(o['image_auroc'])} / {_f(o['pixel_auroc'])}")
        whole = len(imgs) == len(r["categories"])
        enc = row.get("encoder", "none") + (f" (fine-tuned, {row['encoder_lr_scale']:g}x lr)"
                                            if row.get("encoder_lr_scale") else "")
        lines.append(f"| {row['seed']} | {enc} | {row['steps']} | " + " | ".join(cells) +
                     f" | {_f(float(np.mean(imgs))) if whole else '–'} | {_f(float(np.mean(pixs))) if whole else '–'} |")
    lines.append("")
    return "\n".join(lines)


def save(r: dict[str, Any], name: str = DEFAULT_RESULTS) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(r, indent=1, default=float) + "\n")
    md = RESULTS / f"{name}.md"
    md.write_text(render(r))
    return md


def _ints(text: str, what: str, ap: argparse.ArgumentParser) -> list[int]:
    try:
        vals = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        ap.error(f"--{what} {text!r}: give a comma list of whole numbers, e.g. 1000,3000")
    if not vals or min(vals) < (1 if what == "steps" else 0):
        ap.error(f"--{what} {text!r}: give at least one value, steps >= 1, seeds >= 0")
    return vals


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="linecam bench teacher-steps", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path(".cache") / "teachersteps")
    ap.add_argument("--steps", default="1000,3000", help="comma list of training step counts")
    ap.add_argument("--seeds", default="0,1", help="comma list of data seeds (0: the real-photo benchmark's)")
    ap.add_argument("--encoders", default="none", help="comma list of scratch-expert encoders (none, efficientnet-lite0)")
    ap.add_argument("--encoder-lr-scales", default="0",
                    help="comma list of encoder learning-rate shares for pretrained encoders (0: frozen)")
    ap.add_argument("--results", default=DEFAULT_RESULTS, help="results file stem in benchmarks/results")
    ap.add_argument("--categories", default="brick,grass,gravel")
    ap.add_argument("--size", type=int, default=128, help="model input size (= the crops' size)")
    ap.add_argument("--threads", type=int, default=None, help="torch/ONNX Runtime threads (default: theirs)")
    a = ap.parse_args(argv)
    steps, seeds = _ints(a.steps, "steps", ap), _ints(a.seeds, "seeds", ap)
    from linecam.realdata import build_category
    from linecam.realdata.build import CATEGORIES

    from linecam.export.encoder_expert import ENCODERS

    encoders = [e for e in a.encoders.split(",") if e]
    if not encoders or set(encoders) - set(ENCODERS):
        ap.error(f"--encoders {a.encoders!r}: choose from {', '.join(ENCODERS)}")
    try:
        scales = [float(v) for v in a.encoder_lr_scales.split(",") if v.strip()]
    except ValueError:
        scales = []
    if not scales or min(scales) < 0:
        ap.error(f"--encoder-lr-scales {a.encoder_lr_scales!r}: give a comma list of numbers >= 0, e.g. 0,0.1")
    if not a.results.replace("_", "").replace("-", "").isalnum():
        ap.error(f"--results {a.results!r}: give a file stem of letters, digits, - and _")
    cats = [c for c in a.categories.split(",") if c]
    if set(cats) - set(CATEGORIES):
        ap.error(f"unknown categories {sorted(set(cats) - set(CATEGORIES))}: choose from {', '.join(CATEGORIES)}")
    r: dict[str, Any] = {"machine": machine_line(), "title": "encoder and training steps" if encoders != ["none"]
                         else "training steps",
                         "size": a.size, "categories": cats, "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                         "rows": []}
    for seed in seeds:
        data = {c: build_category(c, a.out / f"data-seed{seed}", seed=seed).root for c in cats}
        for enc, scale in [(e, s) for e in encoders for s in ([0.0] if e == "none" else scales)]:
            for n in steps:
                row: dict[str, Any] = {"seed": seed, "encoder": enc, "encoder_lr_scale": scale, "steps": n,
                                       "per_category": {}}
                r["rows"].append(row)
                for c in cats:
                    # From-scratch and frozen-encoder bundles keep their old folder names: an earlier
                    # run's are reused.
                    out = a.out / (f"seed{seed}-{c}-{n}" + ("" if enc == "none" else f"-{enc}")
                                   + (f"-ft{scale:g}" if scale else ""))
                    row["per_category"][c] = fit_and_score(data[c], out, a.size, n, a.threads, enc, scale)
                    save(r, a.results)
    r["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    print(save(r, a.results).read_text())
