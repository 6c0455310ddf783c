"""Offline FID/KID features for 32×32 colour images: the CIFAR-10 ResNet-56 in ``../shared/data``.

No Inception-v3 weights exist on these machines. The shared data has a public CIFAR-10
ResNet-56 (He et al. 2016, the CIFAR variant: a 3×3 stem of 16 channels, three stages of
nine basic blocks with 16/32/64 channels, parameter-free "option A" shortcuts that subsample
and zero-pad channels, global average pooling, a 10-way linear layer). Its 64-d pooled
features stand in for Inception's 2048-d ones: they rank configurations against each other;
the numbers are not comparable with published FIDs.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

WEIGHTS_NAME = "cifar10_resnet56-4bfd9763.th"
# the per-channel normalisation the published weights were trained with
_MEAN = (0.485, 0.456, 0.406)
_STD = (0.229, 0.224, 0.225)


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.stride, self.pad = stride, (cout - cin) // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        skip = x
        if self.stride != 1 or self.pad:
            skip = F.pad(x[:, :, ::self.stride, ::self.stride], (0, 0, 0, 0, self.pad, self.pad))
        return F.relu(out + skip)


class ResNet56(nn.Module):
    def __init__(self, blocks: int = 9, classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        stages, cin = [], 16
        for i, cout in enumerate((16, 32, 64)):
            layer = []
            for j in range(blocks):
                layer.append(_Block(cin, cout, 2 if (j == 0 and i > 0) else 1))
                cin = cout
            stages.append(nn.Sequential(*layer))
        self.layer1, self.layer2, self.layer3 = stages
        self.linear = nn.Linear(64, classes)
        self.register_buffer("mean", torch.tensor(_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(_STD).view(1, 3, 1, 1), persistent=False)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """64-d pooled features of images in [0, 1], ``[N, 3, 32, 32]``."""
        x = (images.float() - self.mean) / self.std
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return x.mean(dim=(2, 3))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.linear(self.features(images))


def default_weights_path() -> Path:
    from .data import data_dir

    return data_dir() / "features" / WEIGHTS_NAME


def load_resnet56(path: Optional[str | os.PathLike] = None, device: str | torch.device = "cpu") -> ResNet56:
    """The shared CIFAR-10 ResNet-56 (eval mode). Raises ``FileNotFoundError`` naming the file."""
    path = Path(path) if path is not None else default_weights_path()
    if not path.is_file():
        raise FileNotFoundError(f"CIFAR-10 ResNet-56 weights not found: {path}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = state.get("state_dict", state)
    state = {k.removeprefix("module."): v for k, v in state.items()}
    model = ResNet56()
    model.load_state_dict(state)
    return model.to(device).eval()
