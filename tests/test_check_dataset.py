"""python -m drcl_d2.tools.check_dataset: the full, opt-in pass reports every problem with its id."""
import json

import numpy as np
from PIL import Image

from drcl_d2.tools import check_dataset


def _image(path, h=48, w=64, seed=0):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)


def _dataset(root, images, anns, categories=None):
    categories = categories or [{"id": 1, "name": "a", "frequency": "f"}, {"id": 2, "name": "b", "frequency": "r"}]
    path = root / "data.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": categories}))
    return str(path)


def _img(i, h=48, w=64):
    return {"id": i, "height": h, "width": w, "file_name": f"{i}.png"}


def _ann(i, image_id, **kw):
    ann = {"id": i, "image_id": image_id, "category_id": 1, "bbox": [4, 4, 20, 20], "area": 400,
           "segmentation": [[4, 4, 24, 4, 24, 24]]}
    ann.update(kw)
    return {k: v for k, v in ann.items() if v is not None}


def test_a_clean_dataset_passes(tmp_path, capsys):
    for i in (1, 2):
        _image(tmp_path / f"{i}.png", seed=i)
    json_file = _dataset(tmp_path, [_img(1), _img(2)], [_ann(1, 1), _ann(2, 2, category_id=2)])
    assert check_dataset.main([json_file, str(tmp_path), "--mask-format", "polygon", "--num-classes", "2",
                               "--workers", "1"]) == 0
    assert "0 error(s), 0 warning(s): no problems" in capsys.readouterr().out


def test_every_problem_is_reported_with_its_id(tmp_path, capsys):
    _image(tmp_path / "1.png")                       # fine
    _image(tmp_path / "2.png", h=40)                 # json says 48 high
    (tmp_path / "3.png").write_bytes(b"\x89PNG truncated")
    Image.fromarray(np.full((48, 64, 3), 9, np.uint8)).save(tmp_path / "4.png")
    # 5.png missing; 6: 16-bit, not constant
    Image.fromarray((np.arange(48 * 64).reshape(48, 64) % 200).astype(np.uint16)).save(tmp_path / "6.png")
    images = [_img(i) for i in (1, 2, 3, 4, 5, 6)]
    rle = {"size": [48, 64], "counts": "PPYo01"}
    anns = [_ann(1, 1, bbox=[100, 4, 20, 20]), _ann(2, 1, segmentation=None), _ann(3, 1, segmentation=rle),
            _ann(4, 1, area=None), _ann(5, 1, bbox=[4, 4, 0, 20]), _ann(6, 9), _ann(7, 1, category_id=5)]
    cats = [{"id": 1, "name": "a", "frequency": "x"}, {"id": 2, "name": "b", "frequency": "r"},
            {"id": 2, "name": "b2", "frequency": "r"}]
    json_file = _dataset(tmp_path, images, anns, cats)
    assert check_dataset.main([json_file, str(tmp_path), "--mask-format", "polygon", "--num-classes", "3",
                               "--workers", "1"]) == 1
    out = capsys.readouterr().out
    expected = [
        "error   duplicate category id: category id 2 (b2)",
        "warning frequency: category id 1 (a): frequency 'x'",
        "error   num classes: json: 2 categories, but --num-classes 3",
        "error   box outside image: annotation id 1 (image id 1): bbox [100, 4, 20, 20] lies outside the 64x48 image",
        "error   no segmentation: annotation id 2 (image id 1)",
        "error   rle under polygon: annotation id 3 (image id 1)",
        "warning no area: annotation id 4 (image id 1)",
        "error   degenerate box: annotation id 5 (image id 1)",
        "error   unknown image: annotation id 6 (image id 9)",
        "error   unknown category: annotation id 7 (image id 1): category_id 5",
        f"error   size mismatch: image id 2 ({tmp_path / '2.png'}): json height x width 48x64, decoded 40x64",
        f"error   unreadable: image id 3 ({tmp_path / '3.png'})",
        f"error   constant image: image id 4 ({tmp_path / '4.png'}): decodes to one value (9)",
        f"error   missing file: image id 5 ({tmp_path / '5.png'})",
        f"warning not 8-bit: image id 6 ({tmp_path / '6.png'}): PIL mode 'I;16'",
    ]
    for line in expected:
        assert line in out, line
    assert "image id 1 (" not in out  # the good image has no problem
    assert "12 error(s), 3 warning(s)" in out
    # The same problems with decoding spread over 2 processes.
    problems = check_dataset.check_dataset(json_file, str(tmp_path), mask_format="polygon", workers=2, progress=False)
    assert sorted(map(str, problems)) == sorted(
        map(str, check_dataset.check_dataset(json_file, str(tmp_path), mask_format="polygon", progress=False)))


def test_an_unreadable_json_is_exit_status_2(tmp_path, capsys):
    (tmp_path / "bad.json").write_text("{")
    assert check_dataset.main([str(tmp_path / "bad.json"), str(tmp_path)]) == 2
    assert "bad.json is not valid JSON" in capsys.readouterr().err
