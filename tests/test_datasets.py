"""LVIS-format registration from the config, and each bad input's documented error or warning."""
import json
import logging
import sys

import numpy as np
import pytest
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from PIL import Image

from drcl_d2 import add_drcl_config
from drcl_d2.data.build import build_lvis_train_loader, build_train_dataset, build_train_sampler
from drcl_d2.data.datasets import load_lvis_format_json, register_datasets_from_config
from drcl_d2.engine.trainer import Trainer, build_evaluator


def _write_image(path, seed, size=(48, 64)):
    """A real, non-constant JPEG (a constant image is skipped by the mapper)."""
    gradient = np.add.outer(np.arange(size[0]), np.arange(size[1])) * 2 + 40 * seed
    Image.fromarray(np.repeat((gradient % 256).astype(np.uint8)[..., None], 3, axis=2)).save(path)


def _write_dataset(root, *, anns=None, categories=None, images=None):
    """A 3-image LVIS-format dataset (real JPEGs) with category ids 10 and 20 (not 1..N)."""
    (root / "train2017").mkdir(parents=True, exist_ok=True)
    images = images or [
        {"id": i, "height": 48, "width": 64, "file_name": f"train2017/{i:012d}.jpg",
         "coco_url": f"http://images.cocodataset.org/train2017/{i:012d}.jpg",
         "neg_category_ids": [], "not_exhaustive_category_ids": []}
        for i in (1, 2, 3)
    ]
    for img in images:
        _write_image(root / img["file_name"], img["id"])
    categories = categories or [
        {"id": 10, "name": "cat_a", "frequency": "f", "synset": "a.n.01", "synonyms": ["cat_a"], "def": "",
         "image_count": 2, "instance_count": 2},
        {"id": 20, "name": "cat_b", "frequency": "r", "synset": "b.n.01", "synonyms": ["cat_b"], "def": "",
         "image_count": 1, "instance_count": 1},
    ]
    poly = [[5, 5, 30, 5, 30, 30, 5, 30]]
    anns = anns if anns is not None else [
        {"id": 1, "image_id": 1, "category_id": 10, "bbox": [5, 5, 25, 25], "area": 625, "segmentation": poly},
        {"id": 2, "image_id": 2, "category_id": 10, "bbox": [5, 5, 25, 25], "area": 625, "segmentation": poly},
        {"id": 3, "image_id": 2, "category_id": 20, "bbox": [5, 5, 25, 25], "area": 625, "segmentation": poly},
    ]
    path = root / "train.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": categories}))
    return str(path), str(root)


def _cfg(name, json_file, root, sampler="DynamicRepeatFactorTrainingSampler"):
    cfg = get_cfg()
    add_drcl_config(cfg)
    cfg.DATASETS.LVIS_CUSTOM = [[name, json_file, root]]
    cfg.DATASETS.TRAIN = (name,)
    cfg.DATASETS.TEST = (name,)
    cfg.DATALOADER.SAMPLER_TRAIN = sampler
    cfg.DATALOADER.REPEAT_THRESHOLD = 0.5
    cfg.SOLVER.IMS_PER_BATCH = 2
    cfg.SOLVER.MAX_ITER = 10
    cfg.MODEL.DEVICE = "cpu"
    cfg.DATALOADER.NUM_WORKERS = 0  # warnings from the main process reach caplog
    return cfg


def test_register_from_config_with_metadata(tmp_path):
    json_file, root = _write_dataset(tmp_path)
    cfg = _cfg("ds_ok", json_file, root)
    assert register_datasets_from_config(cfg) == ["ds_ok"]
    register_datasets_from_config(cfg)  # registering the same triple twice is harmless
    meta = MetadataCatalog.get("ds_ok")
    assert meta.evaluator_type == "lvis" and meta.get("thing_classes") is None  # not read yet
    dicts = DatasetCatalog.get("ds_ok")  # the loader's parse records the metadata
    assert meta.thing_classes == ["cat_a", "cat_b"]
    assert meta.thing_dataset_id_to_contiguous_id == {10: 0, 20: 1}
    assert [d["image_id"] for d in dicts] == [1, 2, 3]
    assert dicts[1]["file_name"].endswith("train2017/000000000002.jpg")
    assert sorted(a["category_id"] for a in dicts[1]["annotations"]) == [0, 1]
    # DRB over the filtered list the loader uses: image 3 has no annotations and is dropped.
    loader = build_lvis_train_loader(cfg)
    batch = next(iter(loader))
    assert len(batch) == 2 and batch[0]["image"].shape[0] == 3
    with pytest.raises(ValueError, match="already registered"):
        register_datasets_from_config(_cfg("ds_ok", json_file + ".other", root))


def test_coco_url_path_rule(tmp_path):
    json_file, root = _write_dataset(tmp_path)
    data = json.loads(open(json_file).read())
    for img in data["images"]:
        del img["file_name"]
    open(json_file, "w").write(json.dumps(data))
    dicts = load_lvis_format_json(json_file, root)
    assert dicts[0]["file_name"] == f"{root}/train2017/000000000001.jpg"


def test_unknown_category_is_an_error_naming_the_annotation(tmp_path):
    json_file, root = _write_dataset(tmp_path, anns=[
        {"id": 77, "image_id": 2, "category_id": 99, "bbox": [1, 1, 5, 5], "area": 25,
         "segmentation": [[1, 1, 6, 1, 6, 6]]}])
    with pytest.raises(ValueError, match=r"annotation id 77 \(image id 2\) has category_id 99"):
        load_lvis_format_json(json_file, root)


def test_degenerate_boxes_are_skipped_with_a_counted_warning(tmp_path, caplog):
    poly = [[1, 1, 6, 1, 6, 6]]
    json_file, root = _write_dataset(tmp_path, anns=[
        {"id": 1, "image_id": 1, "category_id": 10, "bbox": [1, 1, 0, 5], "area": 0, "segmentation": poly},
        {"id": 2, "image_id": 1, "category_id": 10, "bbox": [1, 1, float("nan"), 5], "area": 0, "segmentation": poly},
        {"id": 3, "image_id": 1, "category_id": 10, "bbox": [1, 1, 5, 5], "area": 25, "segmentation": poly},
        {"id": 4, "image_id": 2, "category_id": 20, "bbox": [1, 1, 5, 5], "area": 25, "segmentation": [[1, 2]]},
    ])
    with caplog.at_level(logging.WARNING):
        dicts = load_lvis_format_json(json_file, root)
    assert [len(d["annotations"]) for d in dicts] == [1, 0, 0]
    assert "skipped 2 annotation(s) with a degenerate box" in caplog.text and "ann 1/image 1" in caplog.text
    assert "skipped 1 annotation(s) with an invalid polygon" in caplog.text and "ann 4/image 2" in caplog.text


def test_missing_image_file_is_an_error_naming_it(tmp_path):
    json_file, root = _write_dataset(tmp_path)
    (tmp_path / "train2017" / "000000000003.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=r"1 of 3 image files are missing.*000000000003.jpg \(image id 3\)"):
        load_lvis_format_json(json_file, root)


def _image_ids_drawn_by_the_loader(name, json_file, root, caplog, draws=12):
    """Image ids of the first `draws` one-image batches of the training loader, warnings captured."""
    cfg = _cfg(name, json_file, root, sampler="TrainingSampler")
    cfg.SOLVER.IMS_PER_BATCH = 1
    cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS = False
    register_datasets_from_config(cfg)
    loader = iter(build_lvis_train_loader(cfg))
    with caplog.at_level(logging.WARNING):
        return [next(loader)[0]["image_id"] for _ in range(draws)]


def test_corrupt_image_is_skipped_by_the_mapper_with_a_warning(tmp_path, caplog):
    json_file, root = _write_dataset(tmp_path)
    (tmp_path / "train2017" / "000000000002.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    seen = _image_ids_drawn_by_the_loader("ds_corrupt", json_file, root, caplog)
    assert 2 not in seen and {1, 3} <= set(seen)
    assert "000000000002.jpg (image id 2): unreadable" in caplog.text


def test_empty_and_malformed_json(tmp_path):
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({"images": [], "annotations": [], "categories": [{"id": 1}]}))
    with pytest.raises(ValueError, match="empty.json: the dataset has no images"):
        load_lvis_format_json(str(empty), str(tmp_path))
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(ValueError, match="broken.json is not valid JSON"):
        load_lvis_format_json(str(broken), str(tmp_path))
    nokey = tmp_path / "nokey.json"
    nokey.write_text(json.dumps({"images": []}))
    with pytest.raises(ValueError, match="missing top-level key 'annotations'"):
        load_lvis_format_json(str(nokey), str(tmp_path))


def test_all_images_empty_after_filtering_is_an_error(tmp_path):
    json_file, root = _write_dataset(tmp_path, anns=[])
    cfg = _cfg("ds_no_anns", json_file, root)
    register_datasets_from_config(cfg)
    with pytest.raises(Exception, match="hold no images|No valid data found|empty"):
        build_lvis_train_loader(cfg)


def test_missing_or_unknown_frequency_fails_before_training_when_lvis_evaluation_will_run(tmp_path):
    """lvis raised "'x' is not in list" after the whole training; now unknown letters are caught
    like a missing frequency, before the first iteration, when DATASETS.TEST will be evaluated."""
    cats = [{"id": 10, "name": "cat_a"}, {"id": 20, "name": "cat_b", "frequency": "x"},
            {"id": 30, "name": "cat_c", "frequency": "R"}]
    json_file, root = _write_dataset(tmp_path, categories=cats)
    cfg = _cfg("ds_nofreq", json_file, root)
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = 3
    register_datasets_from_config(cfg)
    build_lvis_train_loader(cfg)  # DRB computes frequencies from the data: training is fine
    msg = (r"train.json: 3 categories lack a 'frequency' of 'r', 'c' or 'f' \(lower case\).*id 10 \(cat_a, "
           r"frequency=None\), id 20 \(cat_b, frequency='x'\), id 30 \(cat_c, frequency='R'\)")
    with pytest.raises(ValueError, match=msg):
        Trainer.check_inputs(cfg)
    with pytest.raises(ValueError, match=msg):
        build_evaluator(cfg, "ds_nofreq", str(tmp_path / "eval"))
    cfg.DATASETS.TEST = ()
    Trainer.check_inputs(cfg)  # no evaluation: no frequency needed


def test_unknown_sampler_name(tmp_path):
    json_file, root = _write_dataset(tmp_path)
    cfg = _cfg("ds_sampler", json_file, root, sampler="FancySampler")
    register_datasets_from_config(cfg)
    with pytest.raises(ValueError, match="Unknown DATALOADER.SAMPLER_TRAIN 'FancySampler'.*DynamicRepeatFactorTrainingSampler"):
        build_train_sampler(cfg, DatasetCatalog.get("ds_sampler"))


# ---- silent wrong results, now caught at load --------------------------------------------------------
def test_boxes_outside_their_image_are_skipped_with_a_counted_warning(tmp_path, caplog):
    """Image 2's boxes lie right of its 64 px width (its polygons inside): detectron2 would clip
    them to nothing and train on an empty target. They are skipped, counted and named; the image
    is then empty and filtered out of training."""
    poly = [[5, 5, 30, 5, 30, 30, 5, 30]]
    json_file, root = _write_dataset(tmp_path, anns=[
        {"id": 1, "image_id": 1, "category_id": 10, "bbox": [5, 5, 25, 25], "area": 625, "segmentation": poly},
        {"id": 2, "image_id": 2, "category_id": 10, "bbox": [70, 5, 25, 25], "area": 625, "segmentation": poly},
        {"id": 3, "image_id": 2, "category_id": 20, "bbox": [5, -40, 25, 25], "area": 625, "segmentation": poly},
        {"id": 4, "image_id": 3, "category_id": 20, "bbox": [50, 40, 25, 25], "area": 625, "segmentation": poly},
    ])
    with caplog.at_level(logging.WARNING):
        dicts = load_lvis_format_json(json_file, root)
    assert [len(d["annotations"]) for d in dicts] == [1, 0, 1]  # partly outside (image 3): kept, clipped later
    assert "skipped 2 annotation(s) whose box lies entirely outside its image" in caplog.text
    assert "ann 2/image 2 bbox=[70, 5, 25, 25] image 64x48" in caplog.text and "ann 3/image 2" in caplog.text
    cfg = _cfg("ds_outside", json_file, root)
    register_datasets_from_config(cfg)
    assert [d["image_id"] for d in build_train_dataset(cfg)] == [1, 3]


def test_num_classes_must_equal_the_category_count(tmp_path):
    """Fewer classes than categories made the last category the background label; more made the
    LVIS evaluator fail after training. Both stop before the model is built, naming the key."""
    json_file, root = _write_dataset(tmp_path)
    cfg = _cfg("ds_numcls", json_file, root)
    register_datasets_from_config(cfg)
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = 1
    with pytest.raises(ValueError, match=r"MODEL.ROI_HEADS.NUM_CLASSES is 1 but DATASETS.TRAIN dataset 'ds_numcls' "
                                         r"\(.*train.json\) has 2 categories: its last 1 categories would be trained "
                                         r"as background. Set MODEL.ROI_HEADS.NUM_CLASSES 2"):
        Trainer(cfg)
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = 5
    with pytest.raises(ValueError, match=r"NUM_CLASSES is 5 but DATASETS.TRAIN .* has 2 categories: the evaluator"):
        Trainer(cfg)
    cfg.DATASETS.TRAIN = ()  # the evaluation dataset is checked too
    with pytest.raises(ValueError, match=r"NUM_CLASSES is 5 but DATASETS.TEST dataset 'ds_numcls'"):
        Trainer.check_inputs(cfg)
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = 2
    Trainer.check_inputs(cfg)


def test_a_category_id_listed_twice_is_an_error(tmp_path):
    cat = {"id": 10, "name": "cat_a", "frequency": "f"}
    json_file, root = _write_dataset(tmp_path, categories=[
        cat, {"id": 20, "name": "cat_b", "frequency": "r"}, dict(cat, name="cat_a_again")])
    with pytest.raises(ValueError, match=r"train.json: category id\(s\) 10 are listed more than once"):
        load_lvis_format_json(json_file, root)
    register_datasets_from_config(_cfg("ds_dup_cat", json_file, root))  # reads nothing yet
    with pytest.raises(ValueError, match=r"category id\(s\) 10 are listed more than once"):
        DatasetCatalog.get("ds_dup_cat")  # the first use: the trainer's start, before the model


def test_an_image_that_decodes_to_a_constant_image_is_skipped_with_a_warning(tmp_path, caplog):
    """A float TIFF (PIL mode F, values 0..1) becomes a constant black image in detectron2's
    8-bit conversion: skipped, naming the file, image id and the PIL mode."""
    json_file, root = _write_dataset(tmp_path)
    path = tmp_path / "train2017" / "000000000002.jpg"
    Image.fromarray(np.random.default_rng(0).random((48, 64), dtype=np.float32)).save(path, format="TIFF")
    seen = _image_ids_drawn_by_the_loader("ds_constant", json_file, root, caplog)
    assert 2 not in seen and {1, 3} <= set(seen)
    assert "000000000002.jpg (image id 2): it decodes to a constant image" in caplog.text
    assert "PIL mode 'F'" in caplog.text


# ---- checked before the first iteration ------------------------------------------------------------------
def _mask_cfg(name, json_file, root, mask_format="polygon"):
    cfg = _cfg(name, json_file, root)
    cfg.MODEL.MASK_ON, cfg.INPUT.MASK_FORMAT, cfg.MODEL.ROI_HEADS.NUM_CLASSES = True, mask_format, 2
    register_datasets_from_config(cfg)
    return cfg


def test_masks_must_fit_the_mask_head_before_training(tmp_path):
    """RLE under INPUT.MASK_FORMAT polygon, or annotations without segmentation under Mask R-CNN,
    crashed at the first image that showed them; now both stop before the first iteration."""
    def anns(**first_segmentation):  # image 1's annotation with the segmentation given, image 2's a polygon
        return [{"id": 1, "image_id": 1, "category_id": 10, "bbox": [5, 5, 25, 25], "area": 625, **first_segmentation},
                {"id": 2, "image_id": 2, "category_id": 20, "bbox": [5, 5, 25, 25], "area": 625,
                 "segmentation": [[5, 5, 30, 5, 30, 30]]}]

    json_file, root = _write_dataset(tmp_path / "rle", anns=anns(segmentation={"size": [48, 64], "counts": "PPYo01"}))
    cfg = _mask_cfg("ds_rle", json_file, root)
    with pytest.raises(ValueError, match=r"INPUT.MASK_FORMAT is 'polygon' but 1 training annotations of ds_rle have "
                                         r"RLE .*image ids 1\): set INPUT.MASK_FORMAT bitmask"):
        Trainer.build_train_loader(cfg)
    cfg.INPUT.MASK_FORMAT = "bitmask"
    Trainer.build_train_loader(cfg)

    json_file, root = _write_dataset(tmp_path / "nosegm", anns=anns())
    cfg = _mask_cfg("ds_nosegm", json_file, root)
    with pytest.raises(ValueError, match=r"MODEL.MASK_ON is True but 1 of 2 training annotations of ds_nosegm have no "
                                         r"'segmentation' \(image ids 1\).*MODEL.MASK_ON False"):
        Trainer.build_train_loader(cfg)
    # ... and the evaluation json needs it for mask AP
    with pytest.raises(ValueError, match=r"DATASETS.TEST dataset 'ds_nosegm' .*: 1 annotations lack 'segmentation' "
                                         r"\(annotation ids 1\), which mask evaluation"):
        Trainer.check_inputs(cfg)
    cfg.MODEL.MASK_ON = False
    Trainer.build_train_loader(cfg)
    Trainer.check_inputs(cfg)


def test_an_evaluation_json_without_area_fails_before_training(tmp_path):
    json_file, root = _write_dataset(tmp_path, anns=[
        {"id": 7, "image_id": 1, "category_id": 10, "bbox": [5, 5, 25, 25], "segmentation": [[5, 5, 30, 5, 30, 30]]}])
    cfg = _cfg("ds_noarea", json_file, root)
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = 2
    register_datasets_from_config(cfg)
    with pytest.raises(ValueError, match=r"DATASETS.TEST dataset 'ds_noarea' \(.*train.json\): 1 annotations lack "
                                         r"'area' \(annotation ids 7\), which LVIS evaluation"):
        Trainer.check_inputs(cfg)
    cfg.DATASETS.TEST = ()
    Trainer.check_inputs(cfg)  # training alone does not read `area`


def test_every_training_image_unreadable_is_a_clear_error(tmp_path):
    """detectron2's MapDataset ran out of images to draw ("Sample larger than population")."""
    json_file, root = _write_dataset(tmp_path)
    for i in (1, 2, 3):
        (tmp_path / "train2017" / f"{i:012d}.jpg").write_bytes(b"not an image")
    cfg = _cfg("ds_all_bad", json_file, root, sampler="TrainingSampler")
    cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS = False
    register_datasets_from_config(cfg)
    with pytest.raises(RuntimeError, match=r"3 images in a row could not be used .*check_dataset"):
        next(iter(build_lvis_train_loader(cfg)))


def test_an_image_whose_size_differs_from_the_json_is_skipped_with_a_warning(tmp_path, caplog):
    """detectron2's SizeMismatchError stopped training (every rank) when the image was drawn."""
    json_file, root = _write_dataset(tmp_path)
    _write_image(tmp_path / "train2017" / "000000000002.jpg", 2, size=(40, 64))
    cfg = _cfg("ds_size", json_file, root, sampler="TrainingSampler")
    cfg.SOLVER.IMS_PER_BATCH = 1
    cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS = False
    register_datasets_from_config(cfg)
    loader = iter(build_lvis_train_loader(cfg))
    with caplog.at_level(logging.WARNING):
        seen = [next(loader)[0]["image_id"] for _ in range(12)]
    assert 2 not in seen and {1, 3} <= set(seen)
    assert "Skipping image" in caplog.text and "(image id 2): Mismatched image shape" in caplog.text
    assert "got (64, 40), expect (64, 48)" in caplog.text


def test_an_unreadable_test_image_is_skipped_with_a_warning_not_replaced(tmp_path, caplog):
    """detectron2's test loader raised a bare OSError at the evaluation after training; with a
    fallback it would evaluate another image twice. Now the image is dropped, named and counted."""
    json_file, root = _write_dataset(tmp_path)
    (tmp_path / "train2017" / "000000000002.jpg").write_bytes(b"\xff\xd8 truncated")
    cfg = _cfg("ds_bad_test", json_file, root)
    register_datasets_from_config(cfg)
    loader = Trainer.build_test_loader(cfg, "ds_bad_test")
    assert len(loader) == 3
    with caplog.at_level(logging.WARNING):
        batches = list(loader)
    assert [[d["image_id"] for d in b] for b in batches] == [[1], [3]]
    assert "000000000002.jpg (image id 2): unreadable" in caplog.text
    assert "1 image(s) of ds_bad_test were skipped" in caplog.text


# ---- one parse per start -----------------------------------------------------------------------------
class _JsonOpens:
    """Counts the times each of some files is opened in this process (Python's 'open' audit event:
    json.load, pycocotools and the LVIS API all open through it)."""

    active = None  # audit hooks cannot be removed: one hook, switched by this slot

    def __init__(self, *paths):
        self.counts = {str(p): 0 for p in paths}

    def __enter__(self):
        if not getattr(_JsonOpens, "_installed", False):
            sys.addaudithook(_JsonOpens._hook)
            _JsonOpens._installed = True
        _JsonOpens.active = self
        return self

    def __exit__(self, *exc):
        _JsonOpens.active = None

    @staticmethod
    def _hook(event, args):
        counter = _JsonOpens.active
        if event == "open" and counter is not None and isinstance(args[0], str) and args[0] in counter.counts:
            counter.counts[args[0]] += 1


def _three_datasets(tmp_path):
    files = {}
    for name in ("train", "val", "unused"):
        json_file, root = _write_dataset(tmp_path / name)
        files[name] = (json_file, root)
    cfg = _cfg("once_train", *files["train"])
    cfg.DATASETS.LVIS_CUSTOM = [[f"once_{n}", j, r] for n, (j, r) in files.items()]
    cfg.DATASETS.TRAIN, cfg.DATASETS.TEST = ("once_train",), ("once_val",)
    cfg.MODEL.MASK_ON = False
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    cfg.MODEL.RESNETS.DEPTH = 18
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = 2
    cfg.MODEL.FPN.OUT_CHANNELS = 32
    return cfg, {n: j for n, (j, _) in files.items()}


def test_a_start_reads_each_json_once_and_unused_datasets_never(tmp_path, monkeypatch):
    """Registration reads nothing; the trainer's start parses the training json once (its loader's
    parse also feeds the checks and ECM's class counts), the test json once for the checks before
    training (then from the metadata cache on the next start), and a listed dataset that the run
    does not use never."""
    monkeypatch.setenv("DRCL_D2_CACHE", str(tmp_path / "cache"))
    cfg, jsons = _three_datasets(tmp_path)
    cfg.MODEL.BACKBONE.NAME, cfg.MODEL.ROI_HEADS.NAME = "build_resnet_fpn_backbone", "LongTailROIHeads"
    cfg.MODEL.RPN.IN_FEATURES, cfg.MODEL.ROI_HEADS.IN_FEATURES = ["p2", "p3", "p4", "p5", "p6"], ["p2", "p3", "p4", "p5"]
    cfg.MODEL.ANCHOR_GENERATOR.SIZES = [[32], [64], [128], [256], [512]]
    cfg.MODEL.RESNETS.OUT_FEATURES = cfg.MODEL.FPN.IN_FEATURES = ["res2", "res3", "res4", "res5"]
    cfg.MODEL.ROI_BOX_HEAD.NAME, cfg.MODEL.ROI_BOX_HEAD.NUM_FC = "FastRCNNConvFCHead", 2
    cfg.MODEL.ROI_BOX_HEAD.CLS_LOSS = "ecm"  # reads the training set's class counts at its first loss
    with _JsonOpens(*jsons.values()) as opens:
        register_datasets_from_config(cfg)
        assert sum(opens.counts.values()) == 0
        trainer = Trainer(cfg)
        predictor = trainer.model.roi_heads.box_predictor
        assert predictor.class_image_counts_source().tolist() == [2, 1]  # cat_a in images 1-2, cat_b in 2
    assert opens.counts == {jsons["train"]: 1, jsons["val"]: 1, jsons["unused"]: 0}
    assert MetadataCatalog.get("once_val").thing_classes == ["cat_a", "cat_b"]
    for n in jsons:  # a new process: fresh catalogs, the same files
        DatasetCatalog.remove(f"once_{n}")
        MetadataCatalog.remove(f"once_{n}")
    with _JsonOpens(*jsons.values()) as opens:
        register_datasets_from_config(cfg)
        Trainer(cfg)
    assert opens.counts == {jsons["train"]: 1, jsons["val"]: 0, jsons["unused"]: 0}
    assert MetadataCatalog.get("once_val").category_frequencies == ["f", "r"]


def test_the_metadata_cache_follows_changes_of_the_json(tmp_path, monkeypatch):
    from drcl_d2.data.datasets import ensure_dataset_metadata

    monkeypatch.setenv("DRCL_D2_CACHE", str(tmp_path / "cache"))
    json_file, root = _write_dataset(tmp_path)
    register_datasets_from_config(_cfg("cache_v1", json_file, root))
    ensure_dataset_metadata("cache_v1")  # parses, writes the cache
    data = json.loads(open(json_file).read())
    data["categories"][1]["frequency"] = "c"
    data["categories"].append({"id": 30, "name": "cat_c", "frequency": "r"})
    open(json_file, "w").write(json.dumps(data))  # another size (and time): the entry is stale
    register_datasets_from_config(_cfg("cache_v2", json_file, root))
    with _JsonOpens(json_file) as opens:
        ensure_dataset_metadata("cache_v2")
    assert opens.counts[json_file] == 1
    meta = MetadataCatalog.get("cache_v2")
    assert meta.thing_classes == ["cat_a", "cat_b", "cat_c"] and meta.category_frequencies == ["f", "c", "r"]
    assert meta.thing_dataset_id_to_contiguous_id == {10: 0, 20: 1, 30: 2}


def test_missing_images_stop_the_start_before_the_model_is_built_unless_the_check_is_off(tmp_path, monkeypatch):
    built = []
    monkeypatch.setattr(Trainer, "build_model", classmethod(lambda cls, cfg: built.append(cfg)))
    json_file, root = _write_dataset(tmp_path)
    (tmp_path / "train2017" / "000000000002.jpg").unlink()
    cfg = _cfg("ds_missing_start", json_file, root)
    register_datasets_from_config(cfg)
    with pytest.raises(FileNotFoundError, match=r"1 of 3 image files are missing.*000000000002.jpg \(image id 2\)"):
        Trainer(cfg)
    assert built == []
    cfg.DATASETS.CHECK_IMAGE_FILES = False
    cfg.DATASETS.LVIS_CUSTOM = [["ds_missing_unchecked", json_file, root]]
    cfg.DATASETS.TRAIN = cfg.DATASETS.TEST = ("ds_missing_unchecked",)
    register_datasets_from_config(cfg)
    assert len(DatasetCatalog.get("ds_missing_unchecked")) == 3  # the mapper skips it when drawn
