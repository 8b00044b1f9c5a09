"""``--device``: the region expert's training and teacher features on the GPU, export and gate on
the CPU. Without a CUDA GPU: a one-line error before anything trains. With one (the ``cuda``
tests, skipped otherwise): GPU and CPU give the same teacher maps, a GPU checkpoint resumes on the
CPU, and ``export-engine distil --device cuda`` writes a bundle that runs on the CPU."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from click.testing import CliRunner  # noqa: E402

from bundles import make_tiny_bundle  # noqa: E402
from mvtec_synth import make_category  # noqa: E402
from test_cnn_teacher import _texture  # noqa: E402  (the same textures as the CPU test of this teacher)

from linecam.bundle import load_bundle  # noqa: E402
from linecam.calibration.metrics import pearson  # noqa: E402
from linecam.errors import BundleError  # noqa: E402
from linecam.export import distil as distil_mod  # noqa: E402
from linecam.export.backbones import RESNETS, ResNet  # noqa: E402
from linecam.export.cli import cli  # noqa: E402
from linecam.export.cnn_teacher import CnnTeacher  # noqa: E402
from linecam.export.scratch import SourceImage, list_images  # noqa: E402
from linecam.export.teachers import BundleTeacher  # noqa: E402
from linecam.export.torch_device import pick_device  # noqa: E402
from linecam.preprocess import PreprocessSpec, Preprocessor  # noqa: E402

SIZE = 64
HAS_CUDA = torch.cuda.is_available()
cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU and a CUDA build of torch")


@pytest.fixture(scope="module")
def category(tmp_path_factory) -> Path:
    return make_category(tmp_path_factory.mktemp("mvtec"), seed=5, size=SIZE, n_train=24, n_good_test=2,
                         n_per_defect=1, defects=("hole",))


def test_pick_device_rules():
    assert pick_device("cpu").type == "cpu"
    assert pick_device("auto").type == ("cuda" if HAS_CUDA else "cpu")
    with pytest.raises(BundleError, match="choose from auto, cpu, cuda"):
        pick_device("tpu")


@pytest.mark.skipif(HAS_CUDA, reason="this machine has a CUDA GPU")
@pytest.mark.parametrize("teacher", ["scratch", "cnn"])
def test_cuda_without_a_gpu_is_one_line_before_any_training(category, tmp_path, teacher):
    from linecam.export.cli import main

    work = tmp_path / "w"
    args = ["distil", "--teacher", teacher, "--images", str(category / "train" / "good"), "--out",
            str(tmp_path / "o"), "--work-dir", str(work), "--size", str(SIZE), "--device", "cuda", "-q"]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code != 0 and "--device cuda" in str(r.exception) and "--device cpu" in str(r.exception)
    assert not work.exists() or not any(work.iterdir())  # nothing trained, no teacher cached
    assert main(args) == 3
    assert main(["fit", "--images", str(category / "train" / "good"), "--out", str(tmp_path / "f"),
                 "--size", str(SIZE), "--device", "cuda", "-q"]) == 3
    assert not (tmp_path / "f").exists()


def test_gpu_out_of_memory_is_one_line_and_the_rerun_resumes(category, tmp_path, monkeypatch, capsys, caplog):
    """torch's GPU out-of-memory (raised here on the CPU, where it cannot happen by itself) ends
    distil with one line that says what to do; the student's last checkpoint survives it."""
    from linecam.export.cli import main

    args = ["distil", "--teacher", "onnx", "--teacher-model", str(make_tiny_bundle(tmp_path / "tiny", size=SIZE)),
            "--images", str(category / "train" / "good"), "--out", str(tmp_path / "o"), "--size", str(SIZE),
            "--student", "s", "--steps", "250", "--pool-size", "32", "--quantize", "none", "--threads", "1",
            "--device", "cpu", "-q"]
    calls = {"n": 0}
    real_step = torch.optim.AdamW.step

    def oom_at_150(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 150:  # after the step-100 checkpoint
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total "
                                         "capacity of 7.60 GiB of which 1.2 GiB is free. If reserved but ...")
        return real_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", oom_at_150)
    assert main(args) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: distil: the GPU ran out of memory (CUDA out of memory. "
                                               "Tried to allocate 2.00 GiB)")
    assert "--device cpu" in err[0] and "resumes" in err[0]
    monkeypatch.setattr(torch.optim.AdamW, "step", real_step)
    caplog.set_level("INFO", logger="linecam.export.distil")
    assert main(args) == 0
    assert "resuming student training at step 100 of 250" in caplog.text
    details = load_bundle(tmp_path / "o").manifest.provenance.details
    assert details["options"]["device"] == "cpu" and details["train_device"].startswith("cpu (")

    # The scratch expert's own training (fit, and distil's scratch teacher) says it the same way.
    calls["n"] = 0
    monkeypatch.setattr(torch.optim.AdamW, "step", oom_at_150)
    assert main(["fit", "--images", str(category / "train" / "good"), "--out", str(tmp_path / "f"), "--size",
                 str(SIZE), "--encoder", "none", "--steps", "200", "--threads", "1", "--device", "cpu", "-q"]) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: training the scratch expert: the GPU ran out of memory")
    assert not (tmp_path / "f" / "manifest.json").exists()


@cuda
def test_cnn_teacher_on_the_gpu_gives_the_cpu_maps(tmp_path):
    """Same bank (the CPU fit's cache, loaded onto the GPU), same maps up to TF32 rounding; a bank
    fitted on the GPU is cached as a CPU tensor and loads on the CPU."""
    block, layers, width = RESNETS["resnet18"]
    torch.manual_seed(0)
    torch.save(ResNet(block, layers, width).state_dict(), tmp_path / "r18.pth")
    rng = np.random.default_rng(0)
    good = [SourceImage(Path(f"{i}.png"), _texture(rng), 8, str(i)) for i in range(12)]
    bad = _texture(rng)
    bad[20:36, 20:36] = 255

    def teacher(device: str) -> CnnTeacher:
        return CnnTeacher.create("resnet18", (SIZE, SIZE), tmp_path / "r18.pth", coreset_ratio=0.5,
                                 feature_scale=1, device=device)

    cpu = teacher("cpu")
    cpu.fit(good, cache=tmp_path / "cpu-bank.pt", progress=False)
    gpu = teacher("cuda")
    gpu.fit(good, cache=tmp_path / "cpu-bank.pt", progress=False)
    assert gpu.bank.device.type == "cuda"
    x = np.concatenate([Preprocessor(cpu.spec)(img, 8, copy=True) for img in (bad, good[0].image)])
    a, b = cpu.maps(x), gpu.maps(x)
    assert isinstance(b, np.ndarray) and b.shape == a.shape
    assert np.abs(a - b).max() <= 0.01 * (a.max() - a.min())
    fitted = teacher("cuda")
    fitted.fit(good, cache=tmp_path / "gpu-bank.pt", progress=False)
    saved = torch.load(tmp_path / "gpu-bank.pt", weights_only=True)
    assert saved.device.type == "cpu" and saved.shape == cpu.bank.shape
    assert pearson(fitted.maps(x), a) > 0.99  # its own coreset (float rounding may pick other ties)


@cuda
def test_a_gpu_checkpoint_resumes_on_the_cpu(category, tmp_path):
    spec = PreprocessSpec(input_size=(SIZE, SIZE))
    teacher = BundleTeacher(make_tiny_bundle(tmp_path / "tiny", size=SIZE))
    pool = distil_mod.Pool(tmp_path / "pool", 32, (SIZE, SIZE))
    sampler = distil_mod.AnomalySampler(list_images(category / "train" / "good"), spec, np.random.default_rng(0))
    distil_mod.build_pool(pool, teacher, sampler, seed=0, progress=False)
    target = distil_mod.student_target(pool)
    ckpt = tmp_path / "s.pt"
    torch.manual_seed(0)
    model = distil_mod.make_student("s")
    first = distil_mod.train_student(model, pool, target, ckpt, "k", steps=20, batch_size=4, lr=3e-3, seed=0,
                                     every=10, progress=False, device=torch.device("cuda"))
    assert all(p.device.type == "cpu" for p in model.parameters())  # back on the CPU for export
    assert any(v.is_cuda for v in torch.load(ckpt, weights_only=True)["model"].values())
    fresh = distil_mod.make_student("s")
    losses = distil_mod.train_student(fresh, pool, target, ckpt, "k", steps=30, batch_size=4, lr=3e-3, seed=0,
                                      every=10, progress=False, device=torch.device("cpu"))
    assert losses[:20] == first and len(losses) == 30  # resumed at step 20, not restarted


@cuda
@pytest.mark.slow
def test_distil_on_the_gpu_writes_a_bundle_the_cpu_runs(category, tmp_path):
    out = tmp_path / "b"
    r = CliRunner().invoke(cli, [
        "distil", "--teacher", "scratch", "--encoder", "none", "--teacher-steps", "300", "--images",
        str(category / "train" / "good"), "--out", str(out), "--size", str(SIZE), "--steps", "300",
        "--pool-size", "64", "--gate-images", "16", "--student", "s", "--device", "cuda", "--force", "-q"])
    assert r.exit_code == 0, r.output + repr(r.exception)
    m = load_bundle(out).manifest
    assert m.provenance.details["options"]["device"] == "cuda"
    assert m.provenance.details["train_device"].startswith("cuda (")
    teacher_bundle = next((out.parent / "b.work").glob("teacher-scratch-*"))
    assert load_bundle(teacher_bundle).manifest.provenance.details["train_device"].startswith("cuda")
    report = json.loads((out / "distil.json").read_text())
    # Trained on the GPU, exported and judged on the CPU: the student still follows its teacher.
    assert report["distillation"]["map_pearson"] > 0.5
