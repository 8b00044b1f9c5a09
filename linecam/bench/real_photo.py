"""Accuracy on real photographs: teachers, their distilled students (FP32, INT8), and a plain
PatchCore reference on the same backbone, per category and per defect kind.

Data: :mod:`linecam.realdata` (scikit-image's photographs of brick, grass, gravel; defects
painted by code independent of the trainer). Each student is built with the real CLI
(``export-engine distil``) and measured with ``linecam evaluate``'s own function
(:func:`linecam.evaluate.evaluate_bundle`: the daemon's backend, preprocessing and
postprocessor). The PatchCore reference is the CNN teacher fitted on *all* training images and
scored directly (image score = max of its map), as a user of PatchCore would run it.

    linecam bench real-photo --out .cache/realphoto          # all of it
    linecam bench real-photo --keep-previous                 # old teacher rows kept, marked, until re-measured
    linecam bench real-photo --render                        # Markdown from the JSON
    linecam bench real-photo --data-seed 1 --teachers scratch  # an independently drawn test set

Results: ``benchmarks/results/real_photo_accuracy.{json,md}`` (data seed 0, the benchmark's test
set) or ``real_photo_accuracy_seed<N>.{json,md}``, written after every step so an interrupted run
keeps what it measured. Each data seed cuts other crops from the same photographs and paints
other defects: one test set holds 24 good crops from one strip of each photograph, and a few of
them decide several points of image AUROC, so :mod:`linecam.bench.real_photo_seeds` reports the
spread over seeds. Run from the checkout (paths are relative to it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

RESULTS = Path("benchmarks") / "results"
STEM = "real_photo_accuracy"
TARGET = 0.95
#: The distilled teachers measured, in table order (``--teachers`` picks among them).
TEACHERS = ("cnn", "scratch", "combined")


def _metrics(m: Any) -> dict[str, float]:
    return {"image_auroc": float(m.image_auroc), "pixel_auroc": float(m.pixel_auroc), "aupro": float(m.aupro)}


def _soft_strong(records: list[Any], scores: list[float], meta: dict[str, Any]) -> dict[str, float]:
    """Image AUROC of the soft and of the strong defects, each against all good test images."""
    from linecam.calibration.metrics import auroc

    soft = {d["file"]: d["soft"] for d in meta["defects"]}
    out = {}
    for name, want in (("soft", True), ("strong", False)):
        sel = [i for i, r in enumerate(records) if r.label == 0 or soft.get(r.path) is want]
        out[name] = float(auroc(np.array([records[i].label for i in sel]), np.array([scores[i] for i in sel])))
    return out


def evaluate_bundle(bundle: Path, data: Path, precision: str) -> dict[str, Any]:
    from linecam.evaluate import evaluate_bundle as ev

    rep = ev(bundle, data, precision=precision, intra_op_threads=2, progress=False)
    meta = json.loads((data / "defects.json").read_text())
    scores = [r.score_raw if r.score_raw is not None else float("nan") for r in rep.images]
    return {"overall": _metrics(rep.metrics), "per_kind": {k: _metrics(m) for k, m in rep.per_defect.items()},
            "by_strength": _soft_strong(rep.images, scores, meta),
            "frr_at_threshold": float(rep.metrics.false_reject_rate), "f1_at_threshold": float(rep.metrics.f1),
            "miss_at_threshold": float(rep.metrics.miss_rate)}


def patchcore_reference(data: Path, size: int) -> dict[str, Any]:
    """The CNN teacher fitted on all of train/good, scored directly (no student): images by the
    max of the map (plain PatchCore), and under ``students_rule`` by the students' own image score
    (max of the mean-pooled map at their stride), so a student's lead over the reference can be
    told apart from the score rule's."""
    from linecam.evaluate import GOOD, compute_metrics, mask_to_map, read_frame, read_mask, scan_dataset
    from linecam.export.cnn_teacher import CnnTeacher
    from linecam.export.distil import DistilOptions
    from linecam.export.scratch import list_images
    from linecam.export.student import downsample, image_score
    from linecam.preprocess import Preprocessor

    t = time.perf_counter()
    teacher = CnnTeacher.create("efficientnet-lite0", (size, size))
    teacher.fit(list_images(data / "train" / "good"), progress=False)
    pre = Preprocessor(teacher.spec)
    samples = scan_dataset(data)
    maps, gts = [], []
    for s in samples:
        img, bd = read_frame(s)
        maps.append(teacher.maps(pre(img, bd, copy=True))[0])
        gts.append(mask_to_map(read_mask(s, data, img.shape[:2]), pre, (size, size)))
    labels = np.array([s.label for s in samples])
    good = [i for i, s in enumerate(samples) if s.defect == GOOD]
    kinds = sorted({s.defect for s in samples} - {GOOD})
    meta = json.loads((data / "defects.json").read_text())

    class _R:  # the fields _soft_strong reads
        def __init__(self, s: Any) -> None:
            self.path, self.label = s.rel, s.label

    def scored(sc: np.ndarray) -> dict[str, Any]:
        thr = float(np.median(sc))  # F1/FRR are not reported for the reference
        per_kind = {}
        for d in kinds:
            sel = good + [i for i, s in enumerate(samples) if s.defect == d]
            per_kind[d] = _metrics(compute_metrics(labels[sel], sc[sel], [gts[i] for i in sel],
                                                   [maps[i] for i in sel], thr))
        return {"overall": _metrics(compute_metrics(labels, sc, gts, maps, thr)), "per_kind": per_kind,
                "by_strength": _soft_strong([_R(s) for s in samples], sc.tolist(), meta)}

    stack = np.stack(maps)
    pool = DistilOptions().score_pool
    return {**scored(stack.reshape(len(samples), -1).max(axis=1)),
            "students_rule": {**scored(image_score(downsample(stack), pool)), "score_pool": pool},
            "bank_size": int(teacher.bank.shape[0]), "seconds": time.perf_counter() - t}


def machine_line() -> str:
    from linecam.bench.machine import cpu_model

    line = f"{cpu_model()}, {os.cpu_count()} cores ({platform.machine()}), shared"
    try:  # the GPU that distil's --device auto trains on, when torch sees one
        import torch

        from linecam.export.torch_device import describe_device, pick_device
    except ImportError:
        return line
    device = pick_device("auto")
    return line + (f"; trains on {describe_device(device)}, torch {torch.__version__}" if device.type == "cuda" else "")


def distil(teacher: str, data: Path, out: Path, size: int, extra: list[str]) -> dict[str, Any]:
    """``export-engine distil`` as a user runs it; a gate failure is recorded, then the same
    command is re-run with ``--force`` (it reuses the trained teacher and student) to measure."""
    cmd = [sys.executable, "-m", "linecam.export.cli", "distil", "--teacher", teacher, "--images",
           str(data / "train" / "good"), "--out", str(out), "--size", str(size), "-q", *extra]
    work = out.with_name(out.name + ".work")
    first = out.with_name(out.name + ".uncached.json")  # the wall time of the run that trained everything
    fresh = not work.exists()
    t = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True)
    rec: dict[str, Any] = {"command": " ".join(["export-engine", *cmd[3:]]), "rc": p.returncode,
                           "seconds": time.perf_counter() - t, "stderr_tail": p.stderr.strip().splitlines()[-3:]}
    if fresh:
        stages = json.loads((out / "distil.json").read_text())["seconds"] if (out / "distil.json").is_file() else {}
        first.write_text(json.dumps({"seconds": rec["seconds"], "stage_seconds": stages}) + "\n")
    if first.is_file():
        rec["uncached"] = json.loads(first.read_text())
    if p.returncode != 0:
        t = time.perf_counter()
        p2 = subprocess.run(cmd + ["--force"], capture_output=True, text=True)
        rec["forced_rc"] = p2.returncode
        rec["forced_rerun_seconds"] = time.perf_counter() - t
        if p2.returncode != 0:
            rec["forced_stderr_tail"] = p2.stderr.strip().splitlines()[-3:]
    rep = out / "distil.json"
    if rep.is_file():
        d = json.loads(rep.read_text())
        rec["distillation"] = d["distillation"]
        rec["stage_seconds"] = d["seconds"]
    gate = out / "gate.json"
    if gate.is_file():
        g = json.loads(gate.read_text())
        rec["gate_passed"] = g.get("passed")
        rec["gate"] = {k: {f: v.get(f) for f in ("auroc", "auroc_drop", "auroc_drop_ci95", "pearson",
                                                          "pixel_auroc")}
                       for k, v in (g.get("candidates") or {}).items() if isinstance(v, dict)}
    return rec


#: The distil options whose defaults decide a row (they have changed between versions).
DEFAULTS_SHOWN = ("student", "steps", "teacher_steps", "encoder", "pool_size", "holdout", "backbone")


def distil_defaults(extra: list[str]) -> dict[str, Any]:
    """This version's ``export-engine distil`` defaults of :data:`DEFAULTS_SHOWN` that ``extra``
    leaves unset, read from the command itself: a results file then says what "default" meant."""
    from linecam.export.cli import distil as command

    given = {t.split("=")[0] for t in extra if t.startswith("--")}
    return {p.name: p.default for p in command.params
            if p.name in DEFAULTS_SHOWN and not given & set(p.opts)}


def settings_line(r: dict[str, Any]) -> str:
    line = f"Settings: `{r.get('settings', '')}`"
    d = r.get("defaults")
    if d:
        line += "; other options at their defaults then: " + ", ".join(
            f"`--{k.replace('_', '-')} {v}`" for k, v in d.items())
    return line


def outputs(data_seed: int = 0) -> tuple[Path, Path]:
    """The results files (JSON, Markdown) of one data seed; seed 0 keeps the benchmark's names."""
    stem = STEM if data_seed == 0 else f"{STEM}_seed{data_seed}"
    return RESULTS / f"{stem}.json", RESULTS / f"{stem}.md"


def save(results: dict[str, Any]) -> None:
    json_out, md_out = outputs(results.get("data_seed", 0))
    RESULTS.mkdir(parents=True, exist_ok=True)
    json_out.write_text(json.dumps(results, indent=1, default=float) + "\n")
    md_out.write_text(render(results))


def _f(v: Any) -> str:
    return "–" if v is None or (isinstance(v, float) and not np.isfinite(v)) else f"{v:.3f}"


#: The tables' rows: (label, entry in a category's results, which of its evaluations).
ROWS = (("PatchCore reference (effnet-lite0, direct)", "patchcore", None),
        ("same, scored like the students (max of the pooled map)", "patchcore", "students_rule"),
        ("cnn teacher -> student FP32", "cnn", "fp32"), ("cnn teacher -> student INT8", "cnn", "int8"),
        ("scratch teacher (direct, its ONNX)", "scratch", "teacher"),
        ("scratch teacher -> student FP32", "scratch", "fp32"), ("scratch teacher -> student INT8", "scratch", "int8"),
        ("combined teacher (cnn + scratch) -> student FP32", "combined", "fp32"),
        ("combined teacher (cnn + scratch) -> student INT8", "combined", "int8"))


def _row(entry: dict[str, Any] | None, prec: str | None) -> dict[str, Any] | None:
    """One table row's metrics: the entry itself, one of its evaluations, or one of its sub-results."""
    if not entry:
        return None
    if prec is None:
        return entry
    return entry.get("eval", {}).get(prec) or entry.get(prec)


def render(r: dict[str, Any]) -> str:
    lines = [f"# {r.get('title', 'Real-photo accuracy')}", "",
             f"{r.get('machine', '')}; data: `linecam.realdata` (scikit-image photographs, {r.get('crop')} px crops, "
             f"data seed {r.get('data_seed', 0)}, "
             "defects painted by code independent of the trainer). Image AUROC / pixel AUROC / AU-PRO@30 % on "
             "each category's test set (24 good, 56 defective: 7 kinds x 8, half soft, half strong).", "",
             settings_line(r), ""]
    cats = list(r.get("categories", {}))
    lines.append("| model | " + " | ".join(f"{c} img / pix / pro" for c in cats) + " | mean img | mean pix |")
    lines.append("| --- " * (len(cats) + 3) + "|")
    for label, teacher, prec in ROWS:
        cells, imgs, pixs = [], [], []
        for c in cats:
            m = _row(r["categories"][c].get(teacher), prec)
            if not m or "overall" not in m:
                cells.append("–")
                continue
            o = m["overall"]
            imgs.append(o["image_auroc"])
            pixs.append(o["pixel_auroc"])
            cells.append(f"{_f(o['image_auroc'])} / {_f(o['pixel_auroc'])} / {_f(o['aupro'])}")
        whole = len(imgs) == len(cats) and cats and not _mixed(r, teacher)  # no mean across two runs
        mi = _f(float(np.mean(imgs))) if whole else "–"
        mp = _f(float(np.mean(pixs))) if whole else "–"
        lines.append(f"| {label}{_previous_note(r, teacher)} | " + " | ".join(cells) + f" | {mi} | {mp} |")
    lines += ["", "Per defect kind, image AUROC (pixel AUROC), mean over categories:", ""]
    kinds = sorted({k for c in cats for k in (r["categories"][c].get("patchcore") or {}).get("per_kind", {})})
    lines.append("| model | " + " | ".join(kinds) + " | soft | strong |")
    lines.append("| --- " * (len(kinds) + 3) + "|")
    for label, teacher, prec in ROWS:
        ms = []
        for c in cats:
            m = _row(r["categories"][c].get(teacher), prec)
            if m and "per_kind" in m:
                ms.append(m)
        if len(ms) != len(cats) or not cats or _mixed(r, teacher):
            continue
        cells = [f"{_f(np.mean([m['per_kind'][k]['image_auroc'] for m in ms]))} "
                 f"({_f(np.mean([m['per_kind'][k]['pixel_auroc'] for m in ms]))})" for k in kinds]
        cells += [_f(np.mean([m["by_strength"][s] for m in ms])) for s in ("soft", "strong")]
        lines.append(f"| {label}{_previous_note(r, teacher)} | " + " | ".join(cells) + " |")
    has_ci = any(((e.get("distil") or {}).get("gate") or {}).get("onnx_int8", {}).get("auroc_drop_ci95")
                 for c in cats for e in r["categories"][c].values() if isinstance(e, dict))
    lines += ["", "Distillation (export-engine distil, wall time on this machine; gate = the INT8/FP16 accuracy gate):", "",
              "| category | teacher | seconds (first run, nothing cached) | gate passed | INT8 AUROC drop on held-out "
              f"(pts; below 0: INT8 higher{'; its 95 % interval' if has_ci else ''}) | student vs teacher map r | "
              "at the bundle threshold (INT8): FRR of new good parts / defects missed |", "| --- " * 7 + "|"]
    for c in cats:
        for teacher in TEACHERS:
            e = r["categories"][c].get(teacher)
            if not e:
                continue
            d = e.get("distil", {})
            int8 = (d.get("gate") or {}).get("onnx_int8", {})
            drop, ci = int8.get("auroc_drop"), int8.get("auroc_drop_ci95")
            at = e.get("eval", {}).get("int8") or {}
            miss = at.get("miss_at_threshold")
            # A run over an existing work dir has no first-run time: say so rather than pass a
            # cached re-run's seconds off as the cost of a distil.
            first = (d.get("uncached") or {}).get("seconds")
            secs = f"{first:.0f}" if first is not None else f"– (cached re-run: {d.get('seconds', 0):.0f})"
            was = e.get("previous_run")
            note = f" (previous run {was.get('started')}, test data v{was.get('data_version')})" if was else ""
            lines.append(f"| {c} | {teacher}{note} | {secs} | {d.get('gate_passed')} | "
                         f"{'–' if drop is None else f'{drop:+.2f}'}"
                         f"{'' if not ci else f' ({ci[0]:+.2f} to {ci[1]:+.2f})'} | "
                         f"{_f((d.get('distillation') or {}).get('map_pearson'))} | "
                         f"{_f(at.get('frr_at_threshold'))} / {'–' if miss is None else _f(miss)} |")
    lines.append("")
    return "\n".join(lines)


def _keep_previous(results: dict[str, Any]) -> None:
    """Start from the teacher rows of the results file, marked as a previous run's: each is
    replaced when this run measures it, so an interrupted run leaves old rows marked, not gaps."""
    json_out = outputs(results.get("data_seed", 0))[0]
    if not json_out.is_file():
        return
    prev = json.loads(json_out.read_text())
    stamp = {"started": prev.get("started"), "data_version": prev.get("data_version", 1),
             "settings": prev.get("settings")}
    for c in results["categories"]:
        for t, rec in (prev.get("categories", {}).get(c) or {}).items():
            if t in TEACHERS:
                results["categories"][c][t] = {**rec, "previous_run": rec.get("previous_run", stamp)}


def _mixed(r: dict[str, Any], teacher: str) -> bool:
    """Some categories of this teacher are from this run and some kept from a previous one."""
    return len({bool((c.get(teacher) or {}).get("previous_run")) for c in r.get("categories", {}).values()}) > 1


def _previous_note(r: dict[str, Any], teacher: str) -> str:
    """`` (previous run ...)`` when this teacher's rows were kept from an earlier run."""
    old = {name: (c.get(teacher) or {}).get("previous_run") for name, c in r.get("categories", {}).items()}
    old = {k: v for k, v in old.items() if v}
    if not old:
        return ""
    p = next(iter(old.values()))
    return (f" (previous run {p.get('started')}, test data v{p.get('data_version')}: {', '.join(old)})")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="linecam bench real-photo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path(".cache") / "realphoto")
    ap.add_argument("--categories", default="brick,grass,gravel")
    ap.add_argument("--teachers", default=",".join(TEACHERS), help=f"comma list of {', '.join(TEACHERS)}")
    ap.add_argument("--size", type=int, default=128, help="model input size (= the crops' size)")
    ap.add_argument("--extra", default="", help="more distil options, e.g. '--steps 600'")
    ap.add_argument("--data-seed", type=int, default=0,
                    help="test set drawn with this seed (0: the benchmark's; others go to real_photo_accuracy_seed<N>.*)")
    ap.add_argument("--render", action="store_true", help="only rebuild the Markdown from the JSON")
    ap.add_argument("--seeds-summary", action="store_true",
                    help="only tabulate the data seeds' results side by side (real_photo_seeds.*)")
    ap.add_argument("--keep-previous", action="store_true",
                    help="start from the existing results' teacher rows, marked as a previous run's until re-measured")
    a = ap.parse_args(argv)
    if a.data_seed < 0:
        ap.error(f"--data-seed must be 0 or more, got {a.data_seed}")
    json_out, md_out = outputs(a.data_seed)
    if a.seeds_summary:
        from linecam.bench.real_photo_seeds import write

        print(write())
        return
    if a.render:
        md_out.write_text(render(json.loads(json_out.read_text())))
        return
    from linecam.realdata import build_category
    from linecam.realdata.build import CROP, DATA_VERSION

    extra = a.extra.split()
    cats = [c for c in a.categories.split(",") if c]
    results: dict[str, Any] = {
        "machine": machine_line(),
        "crop": CROP, "data_version": DATA_VERSION, "data_seed": a.data_seed, "settings": f"export-engine distil --size {a.size} {a.extra}".strip(),
        "defaults": distil_defaults(extra),
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "categories": {c: {} for c in cats}}
    teachers = [t for t in a.teachers.split(",") if t]
    if set(teachers) - set(TEACHERS):
        ap.error(f"unknown teacher(s) {sorted(set(teachers) - set(TEACHERS))}: choose from {', '.join(TEACHERS)}")
    if a.keep_previous:
        _keep_previous(results)
    # Seed 0 keeps the folders it always had, so its cached teachers and students are reused.
    suffix = "" if a.data_seed == 0 else f"-seed{a.data_seed}"
    data = {c: build_category(c, a.out / f"data{suffix}", seed=a.data_seed).root for c in cats}
    for c in cats:
        results["categories"][c]["patchcore"] = patchcore_reference(data[c], a.size)
        save(results)
    for teacher in teachers:
        for c in cats:
            out = a.out / f"bundles{suffix}" / f"{teacher}-{c}"
            entry: dict[str, Any] = {"distil": distil(teacher, data[c], out, a.size, extra), "eval": {}}
            if (out / "manifest.json").is_file():
                for prec in ("fp32", "int8"):
                    entry["eval"][prec] = evaluate_bundle(out, data[c], prec)
                if teacher == "scratch":
                    work = out.with_name(out.name + ".work")
                    tb = sorted(work.glob("teacher-scratch-*"))
                    if tb:
                        entry["eval"]["teacher"] = evaluate_bundle(tb[0], data[c], "fp32")
            results["categories"][c][teacher] = entry  # replaces a kept previous row only now, measured
            save(results)
    results["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    save(results)
    print(md_out.read_text())

