"""The real-photo benchmark over several independently drawn test sets (data seeds).

One test set holds 24 good crops cut from one strip of each photograph, so a few good crops that
happen to hold unusual but normal structure (a clover cluster on grass, a dark gap in gravel)
move a category's image AUROC by several points. Each data seed cuts other crops and paints other
defects; this module puts the per-seed results of ``linecam bench real-photo --data-seed N``
side by side with their mean, for the rows every seed measured with the same settings.

    linecam bench real-photo --data-seed 1 --teachers scratch
    linecam bench real-photo --seeds-summary          # -> benchmarks/results/real_photo_seeds.{json,md}
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from linecam.bench import real_photo as rp

STEM = "real_photo_seeds"


def load_runs(results: Path) -> list[dict[str, Any]]:
    """Every data seed's results file, seed 0 first; files measured with other settings or test
    data than seed 0's are refused (their rows could not be averaged)."""
    runs = [json.loads(p.read_text()) for p in sorted(results.glob(f"{rp.STEM}*.json"))
            if p.stem == rp.STEM or p.stem.removeprefix(f"{rp.STEM}_seed").isdigit()]
    runs.sort(key=lambda r: r.get("data_seed", 0))
    if not runs:
        raise SystemExit(f"no {rp.STEM}*.json in {results}: run `linecam bench real-photo` first")
    ref = runs[0]
    for r in runs[1:]:
        for key in ("settings", "defaults", "data_version", "crop"):
            if r.get(key) != ref.get(key):
                raise SystemExit(f"data seed {r.get('data_seed')} was measured with {key} {r.get(key)!r}, seed "
                                 f"{ref.get('data_seed', 0)} with {ref.get(key)!r}: re-run it with the same settings")
    return runs


def _value(run: dict[str, Any], cat: str, teacher: str, prec: str | None, metric: str) -> float | None:
    entry = run.get("categories", {}).get(cat, {}).get(teacher)
    if not entry or entry.get("previous_run"):
        return None
    m = rp._row(entry, prec)
    return None if not m or "overall" not in m else float(m["overall"][metric])


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per row: each seed's image and pixel AUROC per category and their category means, for the
    rows measured in every category of every seed."""
    cats = [c for c in runs[0].get("categories", {}) if all(c in r.get("categories", {}) for r in runs)]
    rows = []
    for label, teacher, prec in rp.ROWS:
        per = {c: {m: [_value(r, c, teacher, prec, m) for r in runs] for m in ("image_auroc", "pixel_auroc")}
               for c in cats}
        if not cats or any(v is None for c in cats for vals in per[c].values() for v in vals):
            continue
        by_seed = {m: [float(np.mean([per[c][m][i] for c in cats])) for i in range(len(runs))]
                   for m in ("image_auroc", "pixel_auroc")}
        rows.append({"label": label, "per_category": per, "category_mean": by_seed,
                     "mean": {m: float(np.mean(v)) for m, v in by_seed.items()}})
    return {"data_seeds": [r.get("data_seed", 0) for r in runs], "categories": cats,
            "settings": runs[0].get("settings"), "defaults": runs[0].get("defaults"),
            "machine": runs[0].get("machine"), "runs": [{k: r.get(k) for k in ("data_seed", "started", "finished")}
                                                        for r in runs], "rows": rows}


def render(s: dict[str, Any]) -> str:
    seeds = "/".join(str(x) for x in s["data_seeds"])
    lines = ["# Real-photo accuracy over independently drawn test sets", "",
             f"{s.get('machine', '')}; data seeds {seeds} (each: other crops of the same photographs, other "
             "defects; 24 good and 56 defective per category). Each cell lists the seeds' values in that order, "
             "then their mean.", "", rp.settings_line(s), ""]
    cats = s["categories"]
    lines.append("| model | " + " | ".join(f"{c} img" for c in cats) + " | mean img | mean pix |")
    lines.append("| --- " * (len(cats) + 3) + "|")

    def cell(vals: list[float]) -> str:
        return " / ".join(rp._f(v) for v in vals) + f" (**{rp._f(float(np.mean(vals)))}**)"

    for row in s["rows"]:
        cells = [cell(row["per_category"][c]["image_auroc"]) for c in cats]
        cells += [cell(row["category_mean"][m]) for m in ("image_auroc", "pixel_auroc")]
        lines.append(f"| {row['label']} | " + " | ".join(cells) + " |")
    lines.append("")
    return "\n".join(lines)


def write(results: Path | None = None) -> str:
    results = rp.RESULTS if results is None else results
    s = summarize(load_runs(results))
    (results / f"{STEM}.json").write_text(json.dumps(s, indent=1) + "\n")
    text = render(s)
    (results / f"{STEM}.md").write_text(text)
    return text
