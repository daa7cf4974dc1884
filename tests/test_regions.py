"""Image regions: ROI average pooling against an explicit pixel reference, object regions as
bottom-up features are (boxes, n_regions, context), multi-scale grids, and the bad-box errors."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from hosa_lib.cnn import MAPS, EfficientNetLite0, grid_boxes, grid_regions, object_regions, roi_pool
from hosa_lib.sources.imagefolder import check_boxes, convert_image_folder
from hosa_lib.store import Store, StoreError

RNG = np.random.default_rng(7)


def pixel_reference(fmap: np.ndarray, box, side: int) -> np.ndarray:
    """The slow, direct form: blow the (C, h, w) map up to side x side pixels (every cell repeated
    over the pixels it covers) and average the pixels inside the box given in whole pixels."""
    c, h, w = fmap.shape
    up = fmap.repeat(side // h, axis=1).repeat(side // w, axis=2)  # (C, side, side)
    x1, y1, x2, y2 = (int(round(v * side)) for v in box)
    return up[:, y1:y2, x1:x2].mean(axis=(1, 2))


@pytest.mark.parametrize("h", [5, 7])
def test_roi_pool_equals_the_pixel_average_inside_each_box(h):
    side = h * 12  # boxes on a 1/side lattice: the pixel reference is exact
    fmap = RNG.normal(size=(2, 3, h, h))
    boxes = np.zeros((2, 6, 4))
    for b in range(2):
        for r in range(6):
            x1, x2 = sorted(RNG.choice(side + 1, 2, replace=False))
            y1, y2 = sorted(RNG.choice(side + 1, 2, replace=False))
            boxes[b, r] = np.array([x1, y1, x2, y2]) / side
    got = roi_pool(torch.tensor(fmap), torch.tensor(boxes)).numpy()  # (B, R, C)
    for b in range(2):
        for r in range(6):
            np.testing.assert_allclose(got[b, r], pixel_reference(fmap[b], boxes[b, r], side), rtol=1e-10, atol=1e-12)


def test_grid_levels_pool_the_map_cells_and_the_whole_image():
    fmap = torch.tensor(RNG.normal(size=(1, 4, 5, 5)), dtype=torch.float32)
    cells = roi_pool(fmap, grid_boxes(5)[None])  # the map's own cells, row by row
    np.testing.assert_allclose(cells[0].numpy(), fmap[0].flatten(1).T.numpy(), atol=1e-6)
    whole = roi_pool(fmap, grid_boxes(1)[None])
    np.testing.assert_allclose(whole[0, 0].numpy(), fmap[0].mean(dim=(1, 2)).numpy(), atol=1e-6)


class MapOnly(torch.nn.Module):
    """Stands in for the CNN: its 'feature map' is the input itself, so pooled values can be checked."""

    def features(self, x, stride=32):
        return x


def test_multi_scale_grid_regions_and_their_boxes():
    x = torch.tensor(RNG.normal(size=(2, 3, 5, 5)), dtype=torch.float32)
    feats, boxes, pooled = grid_regions(MapOnly(), x, (1, 2, 3, 5))
    assert feats.shape == (2, 1 + 4 + 9 + 25, 3) and boxes.shape == (39, 4)
    np.testing.assert_allclose(feats[:, 0].numpy(), x.mean(dim=(2, 3)).numpy(), atol=1e-6)
    np.testing.assert_allclose(feats[:, 14:].numpy(), x.flatten(2).transpose(1, 2).numpy(), atol=1e-6)  # 5x5 level
    np.testing.assert_allclose(boxes[1].numpy(), [0, 0, 0.5, 0.5])
    native, nboxes, _ = grid_regions(MapOnly(), x)  # default: the map's cells, as before
    assert native.shape == (2, 25, 3) and torch.equal(nboxes, grid_boxes(5))


def test_object_regions_are_the_boxes_then_the_context_and_zero_past_n_regions():
    x = torch.tensor(RNG.normal(size=(2, 3, 10, 10)), dtype=torch.float32)
    obj = [np.array([[0.0, 0.0, 0.5, 0.3], [0.2, 0.4, 0.9, 1.0]]), np.array([[0.1, 0.1, 0.4, 0.4]])]
    feats, boxes, n_regions, pooled = object_regions(MapOnly(), x, obj, context=(1, 2))
    assert feats.shape == (2, 2 + 1 + 4, 3) and n_regions.tolist() == [7, 6]
    np.testing.assert_allclose(feats[0, 0].numpy(), x[0, :, 0:3, 0:5].mean(dim=(1, 2)).numpy(), atol=1e-6)
    np.testing.assert_allclose(feats[1, 0].numpy(), x[1, :, 1:4, 1:4].mean(dim=(1, 2)).numpy(), atol=1e-6)
    np.testing.assert_allclose(feats[1, 1].numpy(), x[1].mean(dim=(1, 2)).numpy(), atol=1e-6)  # whole image
    np.testing.assert_allclose(boxes[1, 1].numpy(), [0, 0, 1, 1])
    assert not feats[1, 6].any() and not boxes[1, 6].any()  # padding past n_regions
    np.testing.assert_allclose(pooled[1].numpy(), feats[1, :6].mean(0).numpy(), atol=1e-6)  # the regions' mean


@pytest.mark.parametrize("box,match", [([0.1, 0.1, 1.2, 0.5], "outside"), ([-0.1, 0.1, 0.5, 0.5], "outside"),
                                       ([0.5, 0.1, 0.5, 0.6], "empty or inverted"),
                                       ([0.6, 0.1, 0.2, 0.6], "empty or inverted"), ([0.1, 0.2, 0.3], "list of")])
def test_bad_boxes_are_named(box, match):
    with pytest.raises(StoreError, match=match) as e:
        check_boxes([[0.1, 0.1, 0.2, 0.2], box], "cap.json: image 'a.png'")
    assert "image 'a.png'" in str(e.value)


def _folder(tmp_path, boxes=True, n=4):
    (tmp_path / "img").mkdir()
    images = []
    for i in range(n):
        Image.fromarray(RNG.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "img" / f"{i}.png")
        im = {"filename": f"{i}.png", "split": "train", "sentences": [{"raw": f"thing {i}"}]}
        if boxes:
            im["boxes"] = [[0.1, 0.1, 0.5, 0.5]] * (1 + i % 3)
        images.append(im)
    (tmp_path / "cap.json").write_text(json.dumps({"images": images}))
    return tmp_path / "img", tmp_path / "cap.json"


def test_object_store_keeps_boxes_and_n_regions_per_image(tmp_path):
    root, cap = _folder(tmp_path)
    convert_image_folder(root, cap, tmp_path / "s.h5", image_size=64, regions="objects", context=(1,), progress=False)
    with Store(tmp_path / "s.h5") as s:
        assert s.max_regions == 3 + 1 and s.n_regions.tolist() == [2, 3, 4, 2]
        np.testing.assert_allclose(s.boxes(1)[:3], [[0.1, 0.1, 0.5, 0.5]] * 2 + [[0, 0, 1, 1]])
        assert "object boxes" in s.attrs["feature_extractor"]


def test_objects_on_a_folder_without_boxes_is_one_line_naming_the_key(tmp_path):
    root, cap = _folder(tmp_path, boxes=False)
    params = tmp_path / "p.yaml"
    params.write_text(yaml.safe_dump({"base": str((__import__("pathlib").Path(__file__).parents[1] / "params" /
                                                   "base.yaml")),
                                      "data": {"source": "images", "root": str(root), "captions": str(cap),
                                               "regions": "objects", "store": str(tmp_path / "x.h5")}}))
    proc = subprocess.run([sys.executable, "-m", "hosa_lib.prepare", str(params)], capture_output=True, text=True,
                          cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr.strip()
    assert "\n" not in err and "data.regions: objects" in err and "Traceback" not in err, err


def test_box_outside_the_image_is_refused_when_the_store_is_written(tmp_path):
    root, cap = _folder(tmp_path)
    data = json.loads(cap.read_text())
    data["images"][2]["boxes"] = [[0.2, 0.2, 1.3, 0.9]]
    cap.write_text(json.dumps(data))
    with pytest.raises(StoreError, match=r"image '2.png'.*outside"):
        convert_image_folder(root, cap, tmp_path / "s.h5", image_size=64, regions="objects", progress=False)
    assert not (tmp_path / "s.h5").exists()


@pytest.mark.parametrize("stride", [8, 16])
def test_finer_maps_are_the_last_block_at_that_stride(stride):
    torch.manual_seed(0)
    model = EfficientNetLite0().eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        fmap = model.features(x, stride)
        ref = torch.nn.functional.relu6(model._bn0(model._conv_stem(x)))  # explicit: run blocks until the stride
        for block in model._blocks:
            out = block(ref)
            if out.shape[-1] < 64 // stride:  # this block halves the map below the stride's resolution
                break
            ref = out
        assert fmap.shape == (2, MAPS[stride][1], 64 // stride, 64 // stride)
        torch.testing.assert_close(fmap, ref)  # the last block that keeps this resolution
        assert torch.equal(model.features(x), model.features(x, 32))  # the default is the head, as before
    with pytest.raises(ValueError, match="stride 12"):
        model.features(x, 12)


def test_grid_regions_of_a_finer_map_pool_the_head_cells():
    x = torch.tensor(RNG.normal(size=(2, 3, 64, 64)), dtype=torch.float32)

    class Fine(MapOnly):  # a stride-8 'map': the input average-pooled 8 x 8
        def features(self, x, stride=32):
            assert stride == 8
            return torch.nn.functional.avg_pool2d(x, 8)

    feats, boxes, pooled = grid_regions(Fine(), x, (), stride=8)
    assert feats.shape == (2, 4, 3) and torch.equal(boxes, grid_boxes(2))  # 64 px -> the head's 2 x 2 cells
    for r, (x1, y1, x2, y2) in enumerate((boxes * 64).long().tolist()):
        np.testing.assert_allclose(feats[:, r].numpy(), x[:, :, y1:y2, x1:x2].mean(dim=(2, 3)).numpy(), atol=1e-5)
    np.testing.assert_allclose(pooled.numpy(), x.mean(dim=(2, 3)).numpy(), atol=1e-5)


def test_object_store_of_the_stride_8_map(tmp_path):
    root, cap = _folder(tmp_path)
    convert_image_folder(root, cap, tmp_path / "s.h5", image_size=64, regions="objects", map_stride=8, progress=False)
    with Store(tmp_path / "s.h5") as s:
        assert s.feature_dim == MAPS[8][1] and s.n_regions.tolist() == [2, 3, 4, 2]
        assert "stride-8 map" in s.attrs["feature_extractor"]


def test_map_stride_outside_the_choices_names_the_key(tmp_path):
    from hosa_lib.config import ConfigError, load

    base = str(__import__("pathlib").Path(__file__).parents[1] / "params" / "base.yaml")
    (tmp_path / "p.yaml").write_text(yaml.safe_dump({"base": base, "data": {"map_stride": 12}}))
    with pytest.raises(ConfigError, match="data.map_stride.*12"):
        load(tmp_path / "p.yaml")
