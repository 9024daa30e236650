"""TwoViewBoxMapper: box correspondence between views, determinism, sources and failure cases."""
import logging
import random

import numpy as np
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.structures import BoxMode
from PIL import Image

from drcl_d2 import add_drcl_config
from drcl_d2.data.datasets import load_lvis_format_json
from drcl_d2.data.drcl_views import TwoViewBoxMapper, blur_kernel_size

H, W = 200, 300
BACKGROUND = (128, 128, 128)
# Solid rectangles (x0, y0, x1, y1) with distinct colours; gt boxes lie exactly on them.
RECTS = [
    ((10, 10, 70, 60), (255, 0, 0)),
    ((120, 20, 200, 90), (0, 255, 0)),
    ((220, 30, 290, 190), (0, 0, 255)),
    ((20, 110, 110, 190), (255, 255, 0)),
    ((130, 120, 170, 150), (255, 0, 255)),
]
NO_PHOTOMETRIC = dict(color_jitter_prob=0.0, grayscale_prob=0.0, blur_prob=(0.0, 0.0), solarize_prob=(0.0, 0.0))


@pytest.fixture(scope="module")
def rect_image(tmp_path_factory):
    """A 200x300 PNG with the RECTS on grey and its dataset dict (gt in XYWH)."""
    img = np.empty((H, W, 3), np.uint8)
    img[:] = BACKGROUND
    for (x0, y0, x1, y1), colour in RECTS:
        img[y0:y1, x0:x1] = colour
    path = tmp_path_factory.mktemp("two_view") / "rects.png"
    Image.fromarray(img).save(path)
    anns = [{"bbox": [x0, y0, x1 - x0, y1 - y0], "bbox_mode": BoxMode.XYWH_ABS, "category_id": 0}
            for (x0, y0, x1, y1), _ in RECTS]
    return {"file_name": str(path), "image_id": 7, "height": H, "width": W, "annotations": anns}


def _mapper(**kw):
    args = dict(image_format="RGB", min_size=(128, 160, 240), max_size=1000, num_boxes=8)
    args.update(NO_PHOTOMETRIC)
    args.update(kw)
    return TwoViewBoxMapper(**args)


def _box_colour(image: torch.Tensor, box: torch.Tensor, shrink: int = 2) -> np.ndarray:
    """Mean RGB inside a box (3, H, W) image, a few pixels in from its edges (resize blends them)."""
    x0, y0, x1, y1 = box.tolist()
    xs, ys = int(np.ceil(x0)) + shrink, int(np.ceil(y0)) + shrink
    xe, ye = int(np.floor(x1)) - shrink, int(np.floor(y1)) - shrink
    assert xe > xs and ye > ys, box
    return image[:, ys:ye, xs:xe].float().mean(dim=(1, 2)).numpy()


def _rect_index(colour: np.ndarray) -> int:
    dists = [np.abs(colour - np.array(c)).max() for _, c in RECTS]
    assert min(dists) < 12, f"box content {colour} is no rectangle's colour"
    return int(np.argmin(dists))


def test_boxes_cover_the_same_content_in_both_views(rect_image):
    mapper = _mapper()
    dropped_some = 0
    for seed in range(30):
        out = mapper(rect_image, np.random.default_rng(seed))
        assert out is not None
        b1, b2 = out["boxes_v1"], out["boxes_v2"]
        assert b1.dtype == torch.float32 and b1.shape == b2.shape and b1.shape[1] == 4
        assert 1 <= len(b1) <= len(RECTS) and out["num_candidate_boxes"] == len(RECTS)
        for img, boxes in ((out["image_v1"], b1), (out["image_v2"], b2)):
            assert img.dtype == torch.uint8 and img.shape[0] == 3
            h, w = img.shape[1:]
            assert (boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all()
            assert (boxes[:, 2] <= w).all() and (boxes[:, 3] <= h).all()
            assert ((boxes[:, 2:] - boxes[:, :2]) >= 8).all()  # min_box_size
        seen = []
        for i in range(len(b1)):
            i1 = _rect_index(_box_colour(out["image_v1"], b1[i]))
            i2 = _rect_index(_box_colour(out["image_v2"], b2[i]))
            assert i1 == i2, f"seed {seed}: box {i} is rectangle {i1} in view 1 but {i2} in view 2"
            seen.append(i1)
        assert len(set(seen)) == len(seen)  # each rectangle at most once
        dropped_some += len(b1) < len(RECTS)
    assert dropped_some > 0  # the dropping path ran


def test_keep_rule_matches_pixel_counts(rect_image):
    """At scale 1 (no resize) a rectangle's pixels in a view give its visible fraction exactly:
    a box is kept iff it is >= min_visible inside and >= min_box_size wide and high in BOTH views,
    and its view box is the bounding box of its pixels."""
    mapper = _mapper(min_size=(H,), crop_area=(0.3, 0.7), min_visible=0.5, min_box_size=8)
    mapped = one_view_only = 0
    for seed in range(30):
        out = mapper(rect_image, np.random.default_rng(seed))
        if out is None:
            continue
        mapped += 1
        expected, found_boxes = [], {1: {}, 2: {}}
        for k, ((x0, y0, x1, y1), colour) in enumerate(RECTS):
            ok, ok_in = True, []
            for v in (1, 2):
                img = out[f"image_v{v}"].permute(1, 2, 0).numpy()  # (h, w, 3)
                mask = (img == np.array(colour, np.uint8)).all(axis=2)
                frac = mask.sum() / ((x1 - x0) * (y1 - y0))
                if mask.any():
                    ys, xs = np.nonzero(mask)
                    box = [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
                    found_boxes[v][k] = box
                    ok_in.append(frac >= 0.5 and box[2] - box[0] >= 8 and box[3] - box[1] >= 8)
                else:
                    ok_in.append(False)
                ok &= ok_in[-1]
            one_view_only += ok_in[0] != ok_in[1]
            if ok:
                expected.append(k)
        got = [_rect_index(_box_colour(out["image_v1"], b, shrink=0)) for b in out["boxes_v1"]]
        assert sorted(got) == expected, f"seed {seed}"
        for i, k in enumerate(got):
            np.testing.assert_allclose(out["boxes_v1"][i].numpy(), found_boxes[1][k], atol=1e-3)
            np.testing.assert_allclose(out["boxes_v2"][i].numpy(), found_boxes[2][k], atol=1e-3)
    # Enough images mapped, and boxes that stayed in one view only were seen (and dropped).
    assert mapped >= 20 and one_view_only > 0


def test_same_seed_same_output_and_no_global_rng(rect_image):
    mapper = _mapper(**dict(color_jitter_prob=0.8, grayscale_prob=0.2, blur_prob=(1.0, 0.1),
                            solarize_prob=(0.0, 0.2)))
    np.random.seed(123)
    torch.manual_seed(123)
    random.seed(123)
    np_state, torch_state, py_state = np.random.get_state(), torch.get_rng_state(), random.getstate()
    a = mapper(rect_image, np.random.default_rng(5))
    b = mapper(rect_image, np.random.default_rng(5))
    # Global generators untouched: their states are the ones before the calls.
    after = np.random.get_state()
    assert after[0] == np_state[0] and np.array_equal(after[1], np_state[1]) and after[2:] == np_state[2:]
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert random.getstate() == py_state
    for key in a:
        if isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key]), key
        else:
            assert a[key] == b[key], key
    # Different seeds give different crops.
    shapes = {tuple(mapper(rect_image, np.random.default_rng(s))["image_v1"].shape) for s in range(6)}
    assert len(shapes) > 1
    c = mapper(rect_image, np.random.default_rng(6))
    assert a["image_v1"].shape != c["image_v1"].shape or not torch.equal(a["image_v1"], c["image_v1"])


def test_bgr_is_rgb_with_channels_reversed(rect_image):
    kw = dict(color_jitter_prob=1.0, grayscale_prob=0.0, blur_prob=(1.0, 1.0), solarize_prob=(0.0, 1.0))
    rgb = _mapper(**kw)(rect_image, np.random.default_rng(3))
    bgr = _mapper(image_format="BGR", **kw)(rect_image, np.random.default_rng(3))
    assert torch.equal(bgr["image_v1"], rgb["image_v1"].flip(0))
    assert torch.equal(bgr["image_v2"], rgb["image_v2"].flip(0))
    assert torch.equal(bgr["boxes_v1"], rgb["boxes_v1"])


def test_photometric_ops_take_effect(rect_image):
    # Grayscale on: R = G = B everywhere.
    out = _mapper(grayscale_prob=1.0)(rect_image, np.random.default_rng(0))
    for v in ("image_v1", "image_v2"):
        assert torch.equal(out[v][0], out[v][1]) and torch.equal(out[v][1], out[v][2])
    # Solarise view 2 only: >= 128 inverted, so a red (255, 0, 0) box turns black, grey 128 -> 127.
    out = _mapper(solarize_prob=(0.0, 1.0))(rect_image, np.random.default_rng(0))
    for i in range(len(out["boxes_v1"])):
        c1 = _box_colour(out["image_v1"], out["boxes_v1"][i])
        c2 = _box_colour(out["image_v2"], out["boxes_v2"][i])
        np.testing.assert_allclose(c2, np.where(c1 >= 128, 255 - c1, c1), atol=3)
    # Blur view 1 only: new in-between values appear there, not in view 2 beyond the resize's.
    plain = _mapper()(rect_image, np.random.default_rng(1))
    blurred = _mapper(blur_prob=(1.0, 0.0))(rect_image, np.random.default_rng(1))
    assert torch.equal(plain["image_v2"], blurred["image_v2"])
    assert not torch.equal(plain["image_v1"], blurred["image_v1"])
    assert blurred["image_v1"].float().std() < plain["image_v1"].float().std()
    # Kernel: +-3 sigma, at most ~10 % of the shorter side, at least 3, inside the view.
    assert blur_kernel_size(224, 300, 5.0) == 23 and blur_kernel_size(224, 300, 2.0) == 13
    assert blur_kernel_size(800, 1000, 2.0) == 13 and blur_kernel_size(128, 128, 2.0) == 13
    assert blur_kernel_size(100, 128, 2.0) == 11 and blur_kernel_size(224, 224, 0.1) == 3
    assert blur_kernel_size(10, 5, 2.0) == 3 and blur_kernel_size(2, 9, 1.0) == 3 and blur_kernel_size(1, 9, 1.0) == 0


def test_num_boxes_cap_and_candidate_count(tmp_path):
    img = np.full((120, 200, 3), 90, np.uint8)
    path = tmp_path / "grid.png"
    Image.fromarray(img).save(path)
    anns = [{"bbox": [10 * (k % 10) + 5, 40 * (k // 10) + 10, 30, 30], "bbox_mode": BoxMode.XYWH_ABS}
            for k in range(20)]
    d = {"file_name": str(path), "image_id": 1, "height": 120, "width": 200, "annotations": anns}
    # Nothing is ever dropped (min_visible 0, min_box_size 0): exactly num_boxes survive.
    mapper = _mapper(num_boxes=8, min_visible=0.0, min_box_size=0.0)
    chosen = set()
    for seed in range(5):
        out = mapper(d, np.random.default_rng(seed))
        assert out["num_candidate_boxes"] == 20
        assert len(out["boxes_v1"]) == len(out["boxes_v2"]) == 8
        chosen.add(tuple(out["boxes_v1"][:, 0].tolist()))
    assert len(chosen) > 1  # a different random subset per draw


def test_random_and_proposal_sources(rect_image):
    rnd = _mapper(box_source="random", num_boxes=6, min_size=(H,), random_box_side=(0.2, 0.4))
    for seed in range(5):
        out = rnd(rect_image, np.random.default_rng(seed))
        assert out is not None and out["num_candidate_boxes"] == 6
        assert 1 <= len(out["boxes_v1"]) == len(out["boxes_v2"]) <= 6
        sides = out["boxes_v1"][:, 2:] - out["boxes_v1"][:, :2]  # scale 1: at most 0.4 x the side
        assert (sides[:, 0] <= 0.4 * W + 1e-3).all() and (sides[:, 1] <= 0.4 * H + 1e-3).all()
    # Proposals: two of the rectangles, given XYXY.
    props = {7: np.array([RECTS[2][0], RECTS[3][0]], np.float32)}
    mapper = _mapper(box_source="proposals", proposals=props)
    found = set()
    for seed in range(10):
        out = mapper(rect_image, np.random.default_rng(seed))
        if out is None:
            continue
        assert out["num_candidate_boxes"] == 2
        for i in range(len(out["boxes_v1"])):
            k1 = _rect_index(_box_colour(out["image_v1"], out["boxes_v1"][i]))
            assert k1 == _rect_index(_box_colour(out["image_v2"], out["boxes_v2"][i]))
            found.add(k1)
    assert found == {2, 3}
    with pytest.raises(KeyError, match="image id 8"):
        mapper(dict(rect_image, image_id=8), np.random.default_rng(0))
    with pytest.raises(ValueError, match="no proposals"):
        _mapper(box_source="proposals")


def test_none_when_no_box_can_survive(rect_image, tmp_path):
    tiny = dict(rect_image, annotations=[{"bbox": [10, 10, 4, 4], "bbox_mode": BoxMode.XYWH_ABS}])
    mapper = _mapper(min_size=(H,), min_box_size=8, max_attempts=3)
    assert all(mapper(tiny, np.random.default_rng(s)) is None for s in range(5))
    assert mapper(dict(rect_image, annotations=[]), np.random.default_rng(0)) is None


def test_unreadable_image_returns_none_with_warning(rect_image, tmp_path, caplog):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"this is not a jpeg")
    with caplog.at_level(logging.WARNING, logger="drcl_d2.data.drcl_views"):
        out = _mapper()(dict(rect_image, file_name=str(bad), image_id=99), np.random.default_rng(0))
    assert out is None
    assert str(bad) in caplog.text and "image id 99" in caplog.text


def test_from_config_on_tiny_dataset(tiny_dataset):
    cfg = get_cfg()
    add_drcl_config(cfg)
    cfg.INPUT.FORMAT = "RGB"
    cfg.INPUT.MIN_SIZE_TRAIN = (96, 128)
    cfg.INPUT.MAX_SIZE_TRAIN = 200
    mapper = TwoViewBoxMapper(cfg)
    assert mapper.num_boxes == 8 and mapper.box_source == "gt" and mapper.blur_prob == (1.0, 0.1)
    dicts = load_lvis_format_json(tiny_dataset["train_json"], tiny_dataset["image_root"])
    mapped = 0
    for pos, d in enumerate(dicts[:12]):
        out = mapper(d, np.random.default_rng([0, pos]))
        if out is None:
            continue
        mapped += 1
        assert out["image_id"] == d["image_id"] and (out["height"], out["width"]) == (128, 160)
        assert len(out["boxes_v1"]) == len(out["boxes_v2"]) >= 1
        assert len(out["boxes_v1"]) <= min(8, len(d["annotations"])) == min(8, out["num_candidate_boxes"])
        for v in (1, 2):
            img, boxes = out[f"image_v{v}"], out[f"boxes_v{v}"]
            assert img.dtype == torch.uint8 and img.shape[0] == 3 and max(img.shape[1:]) <= 200
            assert (boxes >= 0).all() and (boxes[:, 2] <= img.shape[2]).all() and (boxes[:, 3] <= img.shape[1]).all()
    assert mapped >= 8
    cfg.INPUT.TWO_VIEW.BOX_SOURCE = "proposals"
    with pytest.raises(ValueError, match="proposals"):
        TwoViewBoxMapper(cfg)
    props = {d["image_id"]: np.array([[0, 0, 100, 100]], np.float32) for d in dicts[:2]}
    assert TwoViewBoxMapper(cfg, proposals=props).proposals is props


def test_blur_equals_torchvision_within_one_grey_level():
    """Shifted sums (no oneDNN convolution, see photometric.gaussian_blur) against torchvision's
    convolution: same reflect padding, same truncated kernel; float images to float rounding."""
    import torchvision.transforms.v2.functional as TF

    from drcl_d2.data.photometric import gaussian_blur

    gen = torch.Generator().manual_seed(0)
    for h, w, k, sigma in [(37, 53, 3, 0.3), (120, 161, 13, 1.9), (5, 7, 9, 2.0), (64, 64, 23, 4.0)]:
        img = torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=gen)
        ours, theirs = gaussian_blur(img, k, sigma), TF.gaussian_blur(img, [k, k], [sigma, sigma])
        assert ours.dtype == torch.uint8 and ours.shape == img.shape
        assert (ours.int() - theirs.int()).abs().max() <= 1
        assert (ours != theirs).float().mean() < 0.01
        f = img.float() / 255
        torch.testing.assert_close(gaussian_blur(f, k, sigma), TF.gaussian_blur(f, [k, k], [sigma, sigma]),
                                   atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="odd and >= 3"):
        gaussian_blur(img, 4, 1.0)


def _private_mib() -> float:
    """This process's private memory (clean + dirty pages it alone maps), MiB."""
    fields = {}
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            if line.startswith("Private_"):
                fields[line.split(":")[0]] = int(line.split()[1])
    return sum(fields.values()) / 1024


def test_pretraining_mappers_do_not_grow_memory_over_changing_sizes(tiny_dataset):
    """A torch convolution on crops whose size changes every sample grew a loader worker by ~1.1
    MB per blurred sample (oneDNN keeps a compiled plan per shape, up to 1024 of them): 120 samples
    would add ~130 MiB. Both pretraining mappers, every view blurred, must stay flat."""
    from drcl_d2.modeling.detco import DetCo

    dicts = load_lvis_format_json(tiny_dataset["train_json"], tiny_dataset["image_root"])
    cfg = add_drcl_config(get_cfg())
    cfg.merge_from_file("configs/embedded/detco_R_18_embedded.yaml")
    cfg.INPUT.DETCO.BLUR_PROB = 1.0
    detco_mapper = DetCo.build_mapper(cfg, dicts)[0]
    two_view = _mapper(min_size=(96, 128, 160, 192, 224), blur_prob=(1.0, 1.0))
    NUM_SAMPLES = 120
    for name, mapper in (("2DRCL two views", two_view), ("DetCo views", detco_mapper)):
        for i in range(30):  # warm-up: allocator pools, lazy imports
            mapper(dict(dicts[i % len(dicts)]), np.random.default_rng([1, i]))
        before = _private_mib()
        shapes = set()
        for i in range(NUM_SAMPLES):
            out = mapper(dict(dicts[i % len(dicts)]), np.random.default_rng([2, i]))
            if out is not None and "image_v1" in out:
                shapes.add(tuple(out["image_v1"].shape))
        growth = _private_mib() - before
        assert growth < 40, f"{name}: private memory grew by {growth:.0f} MiB over {NUM_SAMPLES} samples"
        if name == "2DRCL two views":
            assert len(shapes) > NUM_SAMPLES // 2  # the case that grew: a new view size almost every sample
