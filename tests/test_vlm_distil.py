"""VLM distillation (``export-engine vlm --distil-from``) end to end, with tiny random-weight
teacher and student built from transformers configs (the mechanics, not the quality).

The data set is generated: a bright plate with one dark defect (scratch, stain or crack,
small or large, somewhere on a 3x3 grid), so every image's kind, size and location are
known. The darkness region expert localises the defect; the tiny teacher's descriptions
are gibberish, so the test plays the reviewer and writes the true description into the
review file, which is what the student has to learn.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

from bundles import make_tiny_bundle  # noqa: E402
from linecam.errors import ConfigError  # noqa: E402
from linecam.export.cli import main as export_main  # noqa: E402
from linecam.export.vlm.dataset import list_defect_images, read_records, write_records  # noqa: E402
from linecam.export.vlm.distil import DistilConfig, DistilError, distil_vlm  # noqa: E402
from linecam.export.vlm.evaluate import Vocabulary, rouge_l, score  # noqa: E402
from linecam.export.vlm.tiny import build_model_folder  # noqa: E402
from linecam.preprocess import read_image  # noqa: E402
from linecam.runtime.vlm.prompt import RegionPromptBuilder  # noqa: E402

KINDS = ("scratch", "stain", "crack")  # words the tiny word-level tokenizer knows
N_IMAGES = 12
SIDE = 128
# Small enough for a shared 2-core machine; enough for the tiny student to memorise 12 texts.
TRAIN = ["--steps", "400", "--lr", "3e-3", "--batch-size", "1", "--lora-r", "8", "--seed", "0", "--threads", "1"]


# --------------------------------------------------------------------------- data


def location_word(cx: float, cy: float) -> str:
    v = "top" if cy < SIDE / 3 else "bottom" if cy > 2 * SIDE / 3 else ""
    h = "left" if cx < SIDE / 3 else "right" if cx > 2 * SIDE / 3 else ""
    return " ".join(x for x in (v, h) if x) or "center"


def draw_defect(rng: np.random.Generator, kind: str, size: str) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    img = np.clip(rng.normal(200, 4, (SIDE, SIDE, 3)), 0, 255).astype(np.uint8)
    s = 1.0 if size == "small" else 2.2
    cx, cy = rng.uniform(22, SIDE - 22, 2)
    m = np.zeros((SIDE, SIDE), np.uint8)
    if kind == "scratch":
        a, half = rng.uniform(0, math.pi), 9 * s
        cv2.line(m, (int(cx - half * math.cos(a)), int(cy - half * math.sin(a))),
                 (int(cx + half * math.cos(a)), int(cy + half * math.sin(a))), 255, 2)
    elif kind == "stain":
        cv2.ellipse(m, (int(cx), int(cy)), (int(5 * s), int(3.5 * s)), rng.uniform(0, 180), 0, 360, 255, -1)
    else:  # crack: a zigzag
        pts, x, y = [], cx - 8 * s, cy
        for _ in range(6):
            pts.append((int(x), int(y)))
            x, y = x + 3.2 * s, y + rng.choice([-1, 1]) * 3 * s
        cv2.polylines(m, [np.array(pts, np.int32).reshape(-1, 1, 2)], False, 255, 2)
    img[m > 0] = {"scratch": 40, "stain": 70, "crack": 25}[kind]
    x, y, w, h = cv2.boundingRect(m)
    return img, (x, y, w, h)


def make_dataset(out: Path, n: int, seed: int = 0) -> dict[str, dict]:
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    truth = {}
    for i in range(n):
        kind, size = KINDS[i % 3], ("small", "large")[(i // 3) % 2]
        img, (x, y, w, h) = draw_defect(rng, kind, size)
        name = f"{i:03d}_{kind}.png"
        cv2.imwrite(str(out / name), img[:, :, ::-1])
        truth[name] = {"kind": kind, "size": size, "bbox": (x, y, w, h),
                       "location": location_word(x + w / 2, y + h / 2)}
    return truth


def true_text(t: dict) -> str:
    return f"A {t['size']} {t['kind']} at {t['location']} of the part ."


def iou(a, b) -> float:
    ax, ay, aw, ah = a
    bx, by, bw, bh = b
    iw = max(0, min(ax + aw, bx + bw) - max(ax, bx))
    ih = max(0, min(ay + ah, by + bh) - max(ay, by))
    inter = iw * ih
    return inter / (aw * ah + bw * bh - inter)


def review(src: Path, dst: Path, truth: dict, edit=None) -> Path:
    """The person's step: write the true description into every record (``edit`` may change it)."""
    recs = []
    for r in read_records(src):
        text = true_text(truth[r.id])
        upd = {"text": edit(r.id, text) if edit else text, "reviewed": True}
        recs.append(r.model_copy(update=upd))
    return write_records(dst, recs)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("distil")
    truth = make_dataset(root / "images", N_IMAGES)
    expert = make_tiny_bundle(root / "expert", size=64, image_threshold=0.3, pixel_threshold=0.45)
    teacher = build_model_folder("qwen2_5_vl", root / "teacher", seed=1)
    student = build_model_folder("qwen2_5_vl", root / "student", seed=0)
    # A random lm_head (std 0.02) caps this tiny student's logits near +-0.6, so no adapter can make
    # it confident; a pretrained student's output layer has a real scale. Give it one (still random).
    from safetensors.torch import load_file, save_file

    wfile = student / "model.safetensors"
    w = load_file(str(wfile))
    w["lm_head.weight"] = w["lm_head.weight"] * 25
    save_file(w, str(wfile), metadata={"format": "pt"})
    raw = root / "raw.jsonl"
    rc = export_main(["vlm", "--model", str(student), "--out", str(root / "unused"), "--distil-from", str(teacher),
                      "--images", str(root / "images"), "--bundle", str(expert), "--review-file", str(raw),
                      "--describe-only", "--holdout", "0", "--max-new-tokens", "12", "--threads", "1", "-q"])
    assert rc == 0
    assert not (root / "unused").exists()
    return {"root": root, "truth": truth, "expert": expert, "teacher": teacher, "student": student, "raw": raw}


@pytest.fixture(scope="module")
def distilled(world):
    root = world["root"]
    reviewed = review(world["raw"], root / "reviewed.jsonl", world["truth"])
    rc = export_main(["vlm", "--model", str(world["student"]), "--out", str(root / "bundle"),
                      "--distil-from", str(world["teacher"]), "--images", str(root / "images"),
                      "--bundle", str(world["expert"]), "--review-file", str(reviewed), "--holdout", "0",
                      "--min-agreement", "0.9", "--quantize", "none", *TRAIN, "-q"])
    assert rc == 0
    report = json.loads((root / "bundle" / "distillation.json").read_text())
    return {**world, "bundle": root / "bundle", "report": report, "reviewed": reviewed}


# --------------------------------------------------------------------------- tests


def test_review_file_has_the_daemons_region_grounded_prompts(world):
    recs = read_records(world["raw"])
    assert sorted(r.id for r in recs) == sorted(world["truth"])
    builder = RegionPromptBuilder()  # the daemon's default prompt settings
    for r in recs:
        t = world["truth"][r.id]
        assert r.verdict == "NG" and len(r.regions) == 1 and r.usable
        # the region expert found the drawn defect ...
        assert iou(r.regions[0]["bbox"], t["bbox"]) > 0.5, (r.id, r.regions, t)
        # ... and the prompt is the one the daemon builds for these regions
        image, depth = read_image(r.image)
        g = builder.build(image, r.regions, threshold=1.0, bit_depth=depth)
        assert r.prompt == g.prompt
        x, y = r.regions[0]["bbox"][:2]
        assert f"x={x}, y={y} in the frame" in r.prompt
        # the teacher answered (gibberish from random weights), nobody reviewed yet
        assert r.teacher_text and r.text == r.teacher_text and not r.reviewed and r.teacher == "teacher"


def test_student_learns_the_reviewed_descriptions_and_exports(distilled):
    rep = distilled["report"]
    before, after = rep["before"]["train"], rep["after"]["train"]
    assert before["n"] == after["n"] == N_IMAGES
    assert before["agreement"] <= 0.1 and before["fields"].get("kind", 0) < 0.5
    assert after["agreement"] >= 0.9 and after["fields"]["kind"] >= 0.9
    assert after["overlap"] > before["overlap"] + 0.5
    assert rep["training"]["loss_last"] < rep["training"]["loss_first"] / 4
    assert rep["gate"] == {"split": "train", "agreement": after["agreement"], "min_agreement": 0.9,
                           "location": after["fields"]["location"], "min_location": 0.0,
                           "passed": True, "forced": False}
    assert "ablation" not in rep and rep["method"]["region_tokens"] == 0
    # The exported ONNX bundle, run by the edge runtime, says what the torch student said.
    assert rep["exported"]["train"]["agreement"] >= 0.9
    torch_says = {s["id"]: s["student"] for s in after["samples"]}
    onnx_says = {s["id"]: s["student"] for s in rep["exported"]["train"]["samples"]}
    assert sum(torch_says[k] == onnx_says[k] for k in torch_says) >= N_IMAGES - 1
    man = json.loads((distilled["bundle"] / "manifest.json").read_text())
    assert man["kind"] == "vlm" and man["quality"]["distillation"]["agreement"] == after["agreement"]
    assert man["extra"]["distillation"]["method"]["mode"] == "lora"
    assert set(man["files"]) == {"vision_fp32", "embedding_fp32", "decoder_fp32", "tokenizer", "generation_config",
                                 "preprocessor_config"}


def test_distilled_student_runs_in_the_daemon(distilled, broker, tmp_path):
    from linecam import schemas
    from linecam.config import parse_config
    from linecam.runtime.service import run_service
    from helpers import collect, line_config

    images = distilled["root"] / "images"
    cfg = line_config(distilled["expert"], broker.port, tmp_path)
    cfg["camera"] = {"kind": "replay", "path": str(images), "fps": 20.0}
    cfg["vlm"] = {"bundle": str(distilled["bundle"]), "precision": "fp32", "max_new_tokens": 16, "backlog": 64}
    events, _ = collect(broker.port, lambda: run_service(parse_config(cfg, tmp_path / "x.yaml")),
                        types=("verdict", "defect", "description"), settle=2.0)
    for ev in events:
        schemas.validate(ev.payload)
    names = sorted(p.name for p in images.iterdir())
    descs = {e.payload["frame_id"]: e.payload for e in events if e.type == "description"}
    assert sorted(descs) == list(range(N_IMAGES))  # every frame is NG, each gets one description
    vocab = Vocabulary()
    got = score([(names[i], true_text(distilled["truth"][names[i]]), d["text"]) for i, d in descs.items()], vocab)
    assert all(d["status"] == "ok" for d in descs.values())
    assert got.agreement >= 0.9, got.samples


def test_editing_the_review_file_changes_what_the_student_learns(distilled, tmp_path):
    """Same images, seed and settings; only the reviewed text differs: scratches become dents
    and one image is switched off. The student follows the file, not the teacher."""
    edited = review(distilled["raw"], tmp_path / "edited.jsonl", distilled["truth"],
                    edit=lambda rid, text: text.replace("scratch", "dent"))
    recs = read_records(edited)
    off = recs[1].id
    recs[1] = recs[1].model_copy(update={"use": False})
    write_records(edited, recs)
    cfg = DistilConfig(steps=400, lr=3e-3, batch_size=1, lora_r=8, seed=0, holdout=0.0, threads=1, progress=False)
    res = distil_vlm(distilled["student"], tmp_path / "b", teacher_dir=distilled["teacher"],
                     images=distilled["root"] / "images", expert_bundle=distilled["expert"], review_file=edited,
                     config=cfg, export=False)
    assert res.bundle is None and not (tmp_path / "b").exists()
    now = {s["id"]: s["student"] for s in res.report["after"]["train"]["samples"]}
    then = {s["id"]: s["student"] for s in distilled["report"]["after"]["train"]["samples"]}
    assert off not in now and len(now) == N_IMAGES - 1
    scratches = [k for k in now if distilled["truth"][k]["kind"] == "scratch"]
    vocab = Vocabulary(["dent"])
    assert sum(vocab.extract(now[k]).get("kind") == "dent" for k in scratches) >= len(scratches) - 1
    assert sum(vocab.extract(then[k]).get("kind") == "scratch" for k in scratches) >= len(scratches) - 1
    assert not any("dent" in then[k] for k in then)
    assert res.report["after"]["train"]["agreement"] >= 0.9


def test_gate_refuses_a_weak_student_unless_forced(distilled, tmp_path, capsys):
    args = ["vlm", "--model", str(distilled["student"]), "--out", str(tmp_path / "b"),
            "--distil-from", str(distilled["teacher"]), "--images", str(distilled["root"] / "images"),
            "--bundle", str(distilled["expert"]), "--review-file", str(distilled["reviewed"]),
            "--work-dir", str(tmp_path / "w"), "--steps", "0", "--holdout", "0.3", "--min-agreement", "0.5",
            "--quantize", "none", "--threads", "1", "-q"]
    assert export_main(args) == 3
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: distilled student agrees") and "--force" in err
    assert not (tmp_path / "b").exists()
    rep = json.loads((tmp_path / "w" / "distillation.json").read_text())
    assert rep["gate"]["split"] == "holdout" and not rep["gate"]["passed"]
    assert rep["after"]["holdout"]["n"] >= 1 and rep["after"]["train"]["n"] >= 1
    assert rep["after"]["holdout"]["n"] + rep["after"]["train"]["n"] == N_IMAGES
    assert export_main(args + ["--force"]) == 0
    man = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert man["quality"]["distillation"]["forced"] is True


def test_training_resumes_exactly_where_it_stopped(distilled, tmp_path):
    from safetensors.torch import load_file

    def run(work: Path, resume: bool = False, stop_at: int | None = None):
        def on_step(step: int, loss: float) -> None:
            if step == stop_at:
                raise KeyboardInterrupt
        cfg = DistilConfig(steps=12, save_every=4, lr=3e-3, batch_size=2, lora_r=4, seed=3, holdout=0.0,
                           eval_limit=1, threads=1, progress=False, resume=resume)
        return distil_vlm(distilled["student"], tmp_path / "b", teacher_dir=distilled["teacher"],
                          images=distilled["root"] / "images", expert_bundle=distilled["expert"],
                          review_file=distilled["reviewed"], work_dir=work, config=cfg, export=False,
                          on_step=on_step)

    whole = run(tmp_path / "a")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b", stop_at=10)  # the last checkpoint is at step 8
    resumed = run(tmp_path / "b", resume=True)
    assert resumed.report["training"]["resumed_from"] == 8 and whole.report["training"]["resumed_from"] == 0
    wa, wb = (load_file(str(tmp_path / d / "student" / "model.safetensors")) for d in ("a", "b"))
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    base = load_file(str(distilled["student"] / "model.safetensors"))
    assert any(not torch.equal(wa[k], base[k]) for k in wa if k in base)  # training did change the weights
    # settings that change the run refuse the old checkpoint
    with pytest.raises(DistilError, match="checkpoint"):
        distil_vlm(distilled["student"], tmp_path / "b", teacher_dir=distilled["teacher"],
                   images=distilled["root"] / "images", expert_bundle=distilled["expert"],
                   review_file=distilled["reviewed"], work_dir=tmp_path / "b", export=False,
                   config=DistilConfig(steps=12, save_every=4, lr=1e-3, batch_size=2, lora_r=4, seed=3, holdout=0.0,
                                       eval_limit=1, threads=1, progress=False, resume=True))


def test_full_finetune_trains_every_weight(distilled, tmp_path):
    from safetensors.torch import load_file

    cfg = DistilConfig(steps=2, lr=1e-3, batch_size=1, full_finetune=True, seed=0, holdout=0.0, eval_limit=1,
                       threads=1, progress=False)
    res = distil_vlm(distilled["student"], tmp_path / "b", teacher_dir=distilled["teacher"],
                     images=distilled["root"] / "images", expert_bundle=distilled["expert"],
                     review_file=distilled["reviewed"], work_dir=tmp_path / "w", config=cfg, export=False)
    base = load_file(str(distilled["student"] / "model.safetensors"))
    new = load_file(str(tmp_path / "w" / "student" / "model.safetensors"))
    assert res.report["method"]["mode"] == "full"
    assert res.report["training"]["trainable_params"] == sum(t.numel() for t in base.values())
    # LoRA never touches the output layer; a full fine-tune does
    assert not torch.equal(base["lm_head.weight"], new["lm_head.weight"])
    lora = load_file(str(distilled["bundle"].parent / "bundle.distil" / "student" / "model.safetensors"))
    assert torch.equal(base["lm_head.weight"], lora["lm_head.weight"])


def test_logit_distillation_pulls_the_student_to_the_teacher(world, tmp_path):
    shutil.copyfile(world["raw"], tmp_path / "raw.jsonl")  # unedited: the teacher's own texts
    cfg = DistilConfig(steps=30, lr=3e-3, batch_size=1, lora_r=8, seed=0, holdout=0.0, kl_weight=1.0,
                       eval_limit=1, threads=1, progress=False)
    res = distil_vlm(world["student"], tmp_path / "b", teacher_dir=world["teacher"], images=world["root"] / "images",
                     expert_bundle=world["expert"], review_file=tmp_path / "raw.jsonl", work_dir=tmp_path / "w",
                     config=cfg, export=False)
    t = res.report["training"]
    assert t["kl_first"] > 0 and t["kl_last"] < 0.5 * t["kl_first"]
    other = build_model_folder("idefics3", tmp_path / "idefics3")
    with pytest.raises(DistilError, match="share a tokenizer"):
        distil_vlm(world["student"], tmp_path / "b", teacher_dir=other, images=world["root"] / "images",
                   expert_bundle=world["expert"], review_file=tmp_path / "raw.jsonl", work_dir=tmp_path / "w",
                   config=cfg, export=False)


def test_line_config_supplies_the_daemons_prompt_and_expert(world, tmp_path):
    import yaml

    line = {"camera": {"kind": "synthetic"}, "model": {"bundle": str(world["expert"])},
            "vlm": {"template": "{n_regions} defect(s) in a {image_w}x{image_h} frame.\n{regions}What is it?",
                    "region_template": "Region {index}: area {area} px.\n", "crop_margin": 0.25}}
    (tmp_path / "line.yaml").write_text(yaml.safe_dump(line))
    rc = export_main(["vlm", "--model", str(world["student"]), "--out", str(tmp_path / "b"),
                      "--distil-from", str(world["teacher"]), "--images", str(world["root"] / "images"),
                      "--line-config", str(tmp_path / "line.yaml"), "--review-file", str(tmp_path / "r.jsonl"),
                      "--describe-only", "--max-new-tokens", "4", "--threads", "1", "-q"])
    assert rc == 0
    recs = read_records(tmp_path / "r.jsonl")
    assert len(recs) == N_IMAGES
    for r in recs:
        area = r.regions[0]["area"]
        assert r.prompt == f"1 defect(s) in a {SIDE}x{SIDE} frame.\nRegion 1: area {area} px.\nWhat is it?"


# --------------------------------------------------------------------------- small parts


def test_mvtec_layout_and_plain_folders(tmp_path):
    img = np.full((8, 8, 3), 200, np.uint8)
    for rel in ("bottle/train/good/000.png", "bottle/test/good/000.png", "bottle/test/broken_large/000.png",
                "bottle/test/contamination/001.png", "bottle/ground_truth/broken_large/000_mask.png",
                "cable/test/cut_inner_insulation/002.png", "cable/test/good/003.png"):
        (tmp_path / "mv" / rel).parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(tmp_path / "mv" / rel), img)
    got = [(d.id, d.label) for d in list_defect_images(tmp_path / "mv")]
    assert got == [("bottle/test/broken_large/000.png", "broken_large"),
                   ("bottle/test/contamination/001.png", "contamination"),
                   ("cable/test/cut_inner_insulation/002.png", "cut_inner_insulation")]
    assert [d.id for d in list_defect_images(tmp_path / "mv" / "bottle")] == [
        "test/broken_large/000.png", "test/contamination/001.png"]
    for rel in ("a.png", "dents/b.png"):
        (tmp_path / "plain" / rel).parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(tmp_path / "plain" / rel), img)
    (tmp_path / "plain" / "notes.txt").write_text("not an image")
    got = [(d.id, d.label) for d in list_defect_images(tmp_path / "plain")]
    assert got == [("a.png", None), ("dents/b.png", "dents")]


def test_structured_agreement_and_overlap():
    v = Vocabulary(["metal_contamination"])
    assert v.extract("A small scratch at the top left of the part.") == {"kind": "scratch", "location": "top left",
                                                                          "size": "small"}
    assert v.extract("Two large holes near the upper-right edge") == {"kind": "hole", "location": "top right",
                                                                      "size": "large"}
    assert v.extract("metal contamination in the middle") == {"kind": "metal contamination", "location": "center"}
    assert v.extract("w12 w13 x y") == {}
    assert rouge_l("a small scratch at top left", "a small scratch at top left") == 1.0
    assert rouge_l("a b c d", "a x c y") == pytest.approx(0.5)
    assert rouge_l("a b", "c d") == 0.0
    s = score([("1", "A small scratch at top left.", "a small scratch, top left"),
               ("2", "A large stain in the center.", "A large crack in the center."),
               ("3", "Nothing to see", "nothing to see")], v)
    assert s.n == 3 and s.agreement == pytest.approx(2 / 3)
    assert s.fields == {"kind": 0.5, "location": 1.0, "size": 1.0}


def test_review_file_errors_name_the_line(tmp_path):
    p = tmp_path / "r.jsonl"
    p.write_text('{"id": "a"}\n')
    with pytest.raises(ConfigError, match="line 1, field"):
        read_records(p)
    p.write_text("\n\n{not json\n")
    with pytest.raises(ConfigError, match="line 3 is not valid JSON"):
        read_records(p)


def test_cli_distillation_options_need_a_teacher(tmp_path, capsys):
    assert export_main(["vlm", "--model", str(tmp_path), "--out", str(tmp_path / "o"), "--steps", "3"]) == 2
    assert "--steps is a distillation option" in capsys.readouterr().err
    assert export_main(["vlm", "--model", str(tmp_path), "--out", str(tmp_path / "o"),
                        "--distil-from", str(tmp_path)]) == 2
    assert "--images" in capsys.readouterr().err
