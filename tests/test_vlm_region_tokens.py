"""Region-token injection (IAD-Unify) end to end: a tiny random-init student learns, with a
region projector, to *say where* a defect is; the IAD-Unify ablation (injection / prompt-only /
no grounding) is measured on held-out generated images; the bundle (ONNX, with the projector)
runs in the daemon, whose published descriptions are checked for content.

The data are generated (:mod:`region_data`): every image's kind, size class and location word
are known and the descriptions are written from that truth (the test plays the reviewer).
Training is sized for a shared 2-core machine (hidden size 32, 4 layers, one torch thread).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

from bundles import make_tiny_bundle  # noqa: E402
from linecam.errors import BundleError  # noqa: E402
from linecam.export.cli import main as export_main  # noqa: E402
from linecam.export.vlm.dataset import read_records, write_records  # noqa: E402
from linecam.export.vlm.evaluate import Vocabulary  # noqa: E402
from linecam.export.vlm.tiny import build_model_folder  # noqa: E402
from linecam.runtime.vlm import region_tokens as rt  # noqa: E402
from region_data import SIDE, make_dataset, true_text  # noqa: E402

N_IMAGES = 200
K = 8
TRAIN = ["--steps", "2500", "--lr", "3e-3", "--batch-size", "1", "--lora-r", "8", "--seed", "0", "--threads", "1",
         "--holdout", "0.25", "--max-new-tokens", "16", "--quantize", "none", "-q"]


def _scaled_student(path: Path) -> Path:
    # A random lm_head (std 0.02) caps the tiny student's logits near +-0.6 (see test_vlm_distil).
    from safetensors.torch import load_file, save_file

    build_model_folder("qwen2_5_vl", path, seed=0)
    w = load_file(str(path / "model.safetensors"))
    w["lm_head.weight"] = w["lm_head.weight"] * 25
    save_file(w, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("regiontok")
    truth = make_dataset(root / "images", N_IMAGES, seed=0)
    expert = make_tiny_bundle(root / "expert", size=64, image_threshold=0.3, pixel_threshold=0.45)
    teacher = build_model_folder("qwen2_5_vl", root / "teacher", seed=1)
    student = _scaled_student(root / "student")
    # the daemon's default prompt settings (no line config)
    common = ["--distil-from", str(teacher), "--images", str(root / "images"), "--bundle", str(expert)]
    raw = root / "raw.jsonl"
    assert export_main(["vlm", "--model", str(student), "--out", str(root / "unused"), *common,
                        "--review-file", str(raw), "--describe-only", "--max-new-tokens", "4", "--threads", "1",
                        "-q"]) == 0
    reviewed = write_records(root / "reviewed.jsonl", [
        r.model_copy(update={"text": true_text(truth[r.id]), "reviewed": True}) for r in read_records(raw)])
    return {"root": root, "truth": truth, "expert": expert, "teacher": teacher, "student": student,
            "common": common, "reviewed": reviewed}


@pytest.fixture(scope="module")
def injected(world):
    root = world["root"]
    rc = export_main(["vlm", "--model", str(world["student"]), "--out", str(root / "bundle"), *world["common"],
                      "--review-file", str(world["reviewed"]), "--region-tokens", str(K), "--ablation",
                      "--min-agreement", "0.5", "--min-location", "0.9", *TRAIN])
    assert rc == 0
    report = json.loads((root / "bundle" / "distillation.json").read_text())
    print("\nablation:", json.dumps({k: {f: v[f] for f in ("n", "location", "kind", "size", "runtime")}
                                     for k, v in report["ablation"]["rows"].items()}))
    return {**world, "bundle": root / "bundle", "report": report}


# --------------------------------------------------------------------------- end to end


def test_injection_reaches_location_accuracy_and_the_ablation_is_reported(injected):
    rep = injected["report"]
    ab = rep["ablation"]
    assert ab["split"] == "holdout" and rep["gate"]["split"] == "holdout"
    rows = ab["rows"]
    assert set(rows) == {"inject", "prompt", "none", "inject_onnx"}
    n = rows["inject"]["n"]
    assert n >= 40 and rows["prompt"]["n"] == rows["none"]["n"] == n  # the same held-out images in every row
    assert rows["inject_onnx"]["n"] == min(n, 32)  # the exported bundle is scored on the first 32 of them
    onnx = rows["inject_onnx"]
    assert onnx["runtime"] == "onnxruntime" and onnx["location"] >= 0.9, rows
    # IAD-Unify's point: without grounding the student cannot say where the defect is
    assert onnx["location"] - rows["none"]["location"] >= 0.4, rows
    for r in rows.values():
        assert {"location", "kind", "size"} <= set(r)
    assert rep["gate"]["location"] >= 0.9 and rep["gate"]["min_location"] == 0.9 and rep["gate"]["passed"]
    assert rep["method"]["region_tokens"] == K and not rep["method"]["train_projector_only"]
    # torch (the training side's Injector) and ONNX Runtime (the daemon's RegionProjector) say the same
    torch_says = {s["id"]: s["student"] for s in rep["after"]["holdout"]["samples"]}
    onnx_says = {s["id"]: s["student"] for s in rep["exported"]["holdout"]["samples"]}
    same = [k for k in onnx_says if k in torch_says]
    assert len(same) >= 30 and sum(torch_says[k] == onnx_says[k] for k in same) >= len(same) - 1


def test_bundle_carries_the_projector_with_hashes(injected):
    from linecam.runtime.vlm.bundle import load_vlm_bundle

    man = json.loads((injected["bundle"] / "manifest.json").read_text())
    assert {"region_projector_fp32", "region_projector_fp16", "region_projector_int8"} <= set(man["files"])
    assert man["extra"]["region_tokens"] == {"k": K, "n_features": rt.N_FEATURES,
                                             "placeholder_id": man["text"]["pad_token_id"],
                                             "features_version": rt.FEATURES_VERSION}
    q = man["quality"]
    assert q["region_tokens"]["max_rel_diff"]["fp32"] < 1e-4
    assert q["region_tokens"]["max_rel_diff"]["int8"] < 0.05
    assert set(q["grounding_ablation"]) == {"inject", "prompt", "none", "inject_onnx"}
    vb = load_vlm_bundle(injected["bundle"])
    feats = rt.region_features([{"bbox": (10, 10, 8, 8), "area": 64, "score": 2.0}], (SIDE, SIDE))
    rows = {p: rt.RegionProjector(vb, p).rows(feats) for p in ("fp32", "fp16", "int8")}
    assert rows["fp32"].shape == (K, man["text"]["hidden_size"])
    scale = np.abs(rows["fp32"]).max()
    assert np.abs(rows["fp16"] - rows["fp32"]).max() < 0.01 * scale
    assert np.abs(rows["int8"] - rows["fp32"]).max() < 0.05 * scale
    # a tampered projector is refused like every other bundle file
    tampered = injected["root"] / "tampered"
    shutil.copytree(injected["bundle"], tampered)
    with open(tampered / "region_projector.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(BundleError, match="region_projector"):
        load_vlm_bundle(tampered)


def test_daemon_descriptions_name_the_right_location(injected, broker, tmp_path):
    from helpers import collect, line_config
    from linecam import schemas
    from linecam.config import parse_config
    from linecam.runtime.service import run_service

    frames = tmp_path / "frames"
    truth = make_dataset(frames, 30, seed=7)  # new images: never seen in training
    cfg = line_config(injected["expert"], broker.port, tmp_path)
    cfg["camera"] = {"kind": "replay", "path": str(frames), "fps": 20.0}
    cfg["vlm"] = {"bundle": str(injected["bundle"]), "precision": "fp32", "max_new_tokens": 16, "backlog": 64}
    events, _ = collect(broker.port, lambda: run_service(parse_config(cfg, tmp_path / "x.yaml")),
                        types=("verdict", "defect", "description"), settle=2.0)
    for ev in events:
        schemas.validate(ev.payload)
    names = sorted(truth)
    descs = {e.payload["frame_id"]: e.payload for e in events if e.type == "description"}
    ng = [e.payload["frame_id"] for e in events if e.type == "verdict" and e.payload["verdict"] == "NG"]
    assert len(ng) >= 28 and sorted(descs) == sorted(ng)
    vocab = Vocabulary()
    right = [vocab.extract(descs[i]["text"]).get("location") == truth[names[i]]["location"] for i in ng]
    print(f"\ndaemon: location right for {sum(right)} of {len(right)} NG frames")
    assert sum(right) >= 0.9 * len(right), [(names[i], descs[i]["text"]) for i in ng]
    assert all(d["status"] == "ok" and d["latency_ms"]["inject"] >= 0 for d in descs.values())


def test_projector_only_keeps_the_vlm_frozen(world, tmp_path):
    from safetensors.torch import load_file

    from linecam.export.vlm.distil import DistilConfig, distil_vlm

    cfg = DistilConfig(steps=3, lr=1e-3, batch_size=1, seed=0, holdout=0.0, eval_limit=1, threads=1, progress=False,
                       region_tokens=2, train_projector_only=True, max_new_tokens=4)
    res = distil_vlm(world["student"], tmp_path / "b", teacher_dir=world["teacher"], images=world["root"] / "images",
                     expert_bundle=world["expert"], review_file=world["reviewed"], work_dir=tmp_path / "w",
                     config=cfg, export=False)
    base = load_file(str(world["student"] / "model.safetensors"))
    new = load_file(str(tmp_path / "w" / "student" / "model.safetensors"))
    assert new.keys() == base.keys() and all(torch.equal(base[k], new[k]) for k in base)
    proj = torch.load(tmp_path / "w" / "region_projector.pt", weights_only=True)
    assert res.report["training"]["trainable_params"] == sum(t.numel() for t in proj.values())
    assert res.report["method"]["train_projector_only"] is True


# --------------------------------------------------------------------------- small parts


def test_slots_follow_the_image_and_features_read_the_box():
    ids = np.array([[1, 5, 6, 3, 3, 3, 7, 9, 9, 2]])  # ... <vision_start> <pad>x3 <vision_end> text ...
    assert rt.slot_index(ids, 3) == 7  # after the vision end, before the prompt text
    assert rt.slot_index(np.array([[1, 9, 9]]), 3) == 0
    from linecam.runtime.vlm.engine import Encoded

    enc = rt.inject(Encoded(ids, {}), np.ones((2, 4), np.float32), placeholder_id=0, image_token_id=3)
    assert enc.input_ids.tolist() == [[1, 5, 6, 3, 3, 3, 7, 0, 0, 9, 9, 2]] and enc.injected[0] == 7
    f = rt.region_features([{"bbox": (0, 0, 10, 10), "area": 100, "score": 1.0},
                            {"bbox": (90, 60, 20, 10), "area": 150, "score": 3.0}], (120, 80))
    assert f.shape == (rt.N_FEATURES,) and f.dtype == np.float32
    assert f[:4] == pytest.approx([100 / 120, 65 / 80, 20 / 120, 10 / 80])  # the strongest region
    assert f[rt.N_GEOMETRY] == pytest.approx(np.sin(np.pi * 100 / 120)) and f[-1] == 0.0  # no map given


def test_map_crop_takes_the_map_under_the_box():
    from linecam.preprocess import Geometry

    amap = np.zeros((16, 16), np.float32)
    amap[4:8, 10:14] = np.arange(16, dtype=np.float32).reshape(4, 4) + 1
    geo = Geometry(0.0, 0.0, 64.0, 64.0)  # 4 frame px per map px
    crop = rt.map_crop(amap, (40, 16, 16, 16), geo)
    assert crop.shape == (rt.MAP_SIDE, rt.MAP_SIDE) and crop.max() == pytest.approx(1.0)
    assert crop[0, 0] < crop[-1, -1]  # the map's gradient, in the box
    f = rt.region_features([{"bbox": (40, 16, 16, 16), "area": 256, "score": 2.0}], (64, 64), crop)
    assert f[-1] == 1.0 and f[-1 - rt.MAP_SIDE ** 2:-1].reshape(8, 8) == pytest.approx(crop)


@pytest.fixture(scope="module")
def plain_bundle(tmp_path_factory):
    """A tiny VLM bundle as export-engine vlm writes it without distillation: no projector."""
    from linecam.export.vlm.export import export_vlm

    work = tmp_path_factory.mktemp("plainvlm")
    export_vlm(build_model_folder("qwen2_5_vl", work / "hf"), work / "bundle", quantize=(), agreement_prompts=1)
    return work / "bundle"


def test_bundle_without_projector_keeps_prompt_only_grounding(plain_bundle):
    from types import SimpleNamespace

    from linecam.runtime.service import _projector_factory
    from linecam.runtime.vlm.bundle import load_vlm_bundle

    vb = load_vlm_bundle(plain_bundle)
    assert not rt.projector_roles(vb) and rt.ProjectorInfo.of(vb.manifest.extra) is None
    assert _projector_factory(vb, SimpleNamespace(precision="fp32")) is None
    with pytest.raises(BundleError, match="no region projector.*--region-tokens"):
        rt.RegionProjector(vb)


def test_a_projector_of_another_model_is_refused_in_one_line(plain_bundle, tmp_path):
    from linecam.bundle import file_entry, write_manifest
    from linecam.export.vlm.projector import RegionProjectorNet, _export_onnx, export_projector
    from linecam.runtime.vlm.bundle import load_vlm_bundle

    b = tmp_path / "b"
    shutil.copytree(plain_bundle, b)
    with pytest.raises(BundleError, match="makes rows of 16 but the VLM .* reads 32"):
        export_projector(RegionProjectorNet(2, 16), b, placeholder=0)
    diffs = export_projector(RegionProjectorNet(2, 32), b, placeholder=0)  # the right size: exported, checked
    assert diffs["fp32"] < 1e-4
    # swap in a projector made for a 16-wide model (hashes updated: a bad export, not a corrupt copy)
    _export_onnx(RegionProjectorNet(2, 16), b / "region_projector.onnx")
    vb = load_vlm_bundle(b, verify=False)
    files = dict(vb.manifest.files)
    files["region_projector_fp32"] = file_entry(b, "region_projector.onnx")
    write_manifest(b, vb.manifest.model_copy(update={"files": files}))
    with pytest.raises(BundleError) as e:
        rt.RegionProjector(load_vlm_bundle(b), "fp32")
    assert "belongs to another model" in str(e.value) and "\n" not in str(e.value)


def test_bench_region_tokens_writes_both_modes(tmp_path):
    """The benchmark's mechanics (never its speed): both modes run on the same NG frames."""
    from linecam.bench.region_tokens import main

    assert main(["--size", "tiny", "--k", "2", "--frames", "6", "--new-tokens", "2", "--out",
                 str(tmp_path / "rt")]) == 0
    res = json.loads((tmp_path / "rt.json").read_text())
    assert res["ng_frames"] >= 3 and res["k"] == 2 and res["new_tokens"] == 2
    assert set(res["median_ms"]) == {"prompt_total", "inject_total", "features", "projector", "prompt_ttft",
                                     "inject_ttft"}
    assert "| description, total (ms, median) |" in (tmp_path / "rt.md").read_text()


def test_worker_injects_with_the_frames_map_and_only_with_a_projector():
    """The worker's two paths, with stand-ins: a projector gets features carrying the NG frame's
    map crop (the outbox passes map and geometry) and its rows reach generate_encoded; without
    one the worker calls generate as before."""
    from types import SimpleNamespace

    from linecam.preprocess import Geometry
    from linecam.runtime.vlm.worker import DescriptionWorker

    calls: list[tuple[str, object]] = []

    class Engine:
        def encode(self, image, prompt):
            return SimpleNamespace(input_ids=np.zeros((1, 3), np.int64))

        def generate_encoded(self, enc, **kw):
            calls.append(("encoded", enc))
            return SimpleNamespace(text="A small stain at top left .", tokens=[1], stop_reason="stop_token",
                                   timings_ms={})

        def generate(self, image, prompt, **kw):
            calls.append(("plain", prompt))
            return SimpleNamespace(text="x", tokens=[1], stop_reason="stop_token", timings_ms={})

    class Projector:
        def inject(self, enc, features):
            calls.append(("features", features))
            return SimpleNamespace(input_ids=enc.input_ids, injected=(0, np.ones((2, 4), np.float32)))

    image = np.full((64, 64, 3), 200, np.uint8)
    amap = np.zeros((16, 16), np.float32)
    amap[2:4, 2:4] = 5.0
    region = {"bbox": (8, 8, 8, 8), "area": 64, "max_score": 3.0}
    for projector in (Projector(), None):
        calls.clear()
        msgs: list[dict] = []
        w = DescriptionWorker(Engine(), msgs.append, line="l", camera="c", nice=0, projector=projector).start()
        w.submit(image, [region], "ev-1", frame_id=1, anomaly_map=amap, geometry=Geometry(0, 0, 64, 64))
        assert w.wait_idle(10)
        w.stop()
        assert msgs[-1]["status"] == "ok"
        if projector is not None:
            (_, feats), (kind, _) = calls
            assert kind == "encoded" and feats[-1] == 1.0 and feats[:2] == pytest.approx([12 / 64, 12 / 64])
            assert "inject" in msgs[-1]["latency_ms"]
        else:
            assert [c[0] for c in calls] == ["plain"] and "inject" not in msgs[-1]["latency_ms"]
