"""drcl-convert against real detectron2 models and real torchvision ResNets.

Every converted file is loaded with detectron2's DetectionCheckpointer into a real Faster / Mask
R-CNN built on CPU, and every transferred tensor is compared with its source at the model key
where it must land. Source tensors are filled with random values first, so that a tensor left at
its initialisation (BatchNorm ones and zeros) can never pass for a transferred one.
Each detectron2 model is built once per module (fixtures); the R-101 one once in total.
"""
import copy
import hashlib
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
import torchvision
from detectron2 import model_zoo
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_model
from detectron2.modeling.backbone import build_resnet_backbone
from torch import nn

from drcl_d2.checkpoint import ConversionError, convert_checkpoint
from drcl_d2.checkpoint.convert import main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MASK_R50_FPN = "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml"
FASTER_R50_C4 = "COCO-Detection/faster_rcnn_R_50_C4_1x.yaml"
FASTER_R101_FPN = "COCO-Detection/faster_rcnn_R_101_FPN_3x.yaml"
# The torchvision conventions the --help tells users to set.
TV_OPTS = [
    "MODEL.RESNETS.STRIDE_IN_1X1", "False",
    "INPUT.FORMAT", "RGB",
    "MODEL.PIXEL_MEAN", "[123.675, 116.28, 103.53]",
    "MODEL.PIXEL_STD", "[58.395, 57.12, 57.375]",
]
R50_RESNET_TENSORS = 53 * 5  # 53 convs, each weight + FrozenBN/BN weight, bias, mean, var


def _cfg(zoo_name, opts=TV_OPTS):
    cfg = get_cfg()
    cfg.merge_from_file(model_zoo.get_config_file(zoo_name))
    cfg.merge_from_list(list(opts))
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    return cfg


def _build(zoo_name):
    torch.manual_seed(0)
    return build_model(_cfg(zoo_name)).eval()


@pytest.fixture(scope="module")
def fpn_model():
    return _build(MASK_R50_FPN)


@pytest.fixture(scope="module")
def c4_model():
    return _build(FASTER_R50_C4)


def _randomized(state, seed):
    """A copy of ``state`` with every float tensor replaced by seeded random values."""
    g = torch.Generator().manual_seed(seed)
    return {
        k: torch.randn(v.shape, generator=g).to(v.dtype) if v.is_floating_point() else v.clone()
        for k, v in state.items()
    }


def _randomize_module(module, seed):
    module.load_state_dict(_randomized(module.state_dict(), seed))
    return module


def _tv_resnet(depth, seed):
    torch.manual_seed(seed)
    net = {50: torchvision.models.resnet50, 101: torchvision.models.resnet101}[depth](weights=None)
    return _randomized(net.state_dict(), seed)


def _tv_name_to_d2(name):
    """torchvision -> detectron2 short name, written independently of the converter."""
    if name.startswith("conv1."):
        return "stem." + name
    if name.startswith("bn1."):
        return "stem.conv1.norm." + name[len("bn1."):]
    layer, block, rest = name.split(".", 2)
    rest = rest.replace("downsample.0.", "shortcut.").replace("downsample.1.", "shortcut.norm.")
    for k in "123":
        rest = rest.replace(f"bn{k}.", f"conv{k}.norm.")
    return f"res{int(layer[len('layer'):]) + 1}.{block}.{rest}"


def _tv_expected(tv_state):
    """{detectron2 short name: tensor} of the weights that must transfer (no fc, no counters)."""
    return {
        _tv_name_to_d2(k): v
        for k, v in tv_state.items()
        if not k.startswith("fc.") and not k.endswith("num_batches_tracked")
    }


def _fpn_dest(short):
    return "backbone.bottom_up." + short


def _c4_dest(short):
    return ("roi_heads." if short.startswith("res5.") else "backbone.") + short


def _assert_landed(model, expected):
    """Every {model key: tensor} of ``expected`` holds exactly that tensor in ``model``."""
    state = model.state_dict()
    assert expected
    for key, value in expected.items():
        assert key in state, key
        assert torch.equal(state[key], value.to(state[key].dtype)), key


def _backbone_keys(model):
    return {
        k for k in model.state_dict()
        if k.startswith(("backbone.bottom_up.", "backbone.stem.", "backbone.res", "roi_heads.res5."))
    }


def _load(model, path):
    DetectionCheckpointer(model).load(str(path))


def _sha(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _read_pkl(path):
    with open(path, "rb") as f:
        return pickle.load(f)


def _leftovers(directory):
    return sorted(n for n in os.listdir(directory) if ".tmp" in n)


def _fail(argv, capsys):
    """Run main(argv), expect exit status 1, return stderr."""
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in argv])
    assert exc.value.code == 1
    return capsys.readouterr().err


# ----------------------------------------------------------------------------------------------


def test_torchvision_r50_into_mask_rcnn_fpn_and_faster_rcnn_c4(tmp_path, fpn_model, c4_model, capsys):
    tv = _tv_resnet(50, seed=1)
    src = tmp_path / "resnet50.pth"
    torch.save(tv, src)
    digest = _sha(src)
    expected = _tv_expected(tv)
    assert len(expected) == R50_RESNET_TENSORS

    # FPN: through the API, checked against the fixture model.
    out = tmp_path / "r50.pkl"
    report = convert_checkpoint(str(src), str(out), target_model=fpn_model)
    assert report.source == "torchvision" and "torchvision ResNet names" in report.detected_by
    assert report.depth == 50 and report.blocks == (3, 4, 6, 3)
    assert sorted(report.transferred["backbone"]) == sorted(expected)
    assert all(not report.transferred[m] for m in ("fpn", "rpn", "box_head", "other"))
    assert sorted(report.dropped["other"]) == ["fc.bias", "fc.weight"]
    assert len(report.dropped["backbone"]) == 53  # BatchNorm counters
    assert report.missing["backbone"] == []
    assert len(report.missing["fpn"]) == 16 and len(report.missing["rpn"]) == 6
    assert report.loaded == {k: _fpn_dest(k) for k in expected}
    _assert_landed(fpn_model, {_fpn_dest(k): v for k, v in expected.items()})
    assert _backbone_keys(fpn_model) == {_fpn_dest(k) for k in expected}

    data = _read_pkl(out)
    assert data["__author__"] == "drcl_d2" and data["matching_heuristics"] is True
    assert set(data["model"]) == set(expected)
    assert all(isinstance(v, np.ndarray) for v in data["model"].values())
    assert np.array_equal(data["model"]["res4.5.conv3.norm.running_var"],
                          expected["res4.5.conv3.norm.running_var"].numpy())

    # C4: through the command with --target-config and --opts, then into the C4 fixture.
    out_c4 = tmp_path / "r50_c4.pkl"
    assert main([str(src), str(out_c4), "--target-config", FASTER_R50_C4, "--opts", *TV_OPTS]) == 0
    printed = capsys.readouterr().out
    assert "source: torchvision" in printed and "missing in target" in printed
    assert "265 tensors loaded by DetectionCheckpointer, all unchanged" in printed
    assert "WARNING" not in printed  # the target sets the torchvision conventions
    _load(c4_model, out_c4)
    _assert_landed(c4_model, {_c4_dest(k): v for k, v in expected.items()})
    assert _backbone_keys(c4_model) == {_c4_dest(k) for k in expected}

    # Without the torchvision conventions the report warns (but converts).
    out_bgr = tmp_path / "r50_bgr.pkl"
    assert main([str(src), str(out_bgr), "--target-config", FASTER_R50_C4]) == 0
    assert "WARNING: the target config's MODEL.RESNETS.STRIDE_IN_1X1 is True" in capsys.readouterr().out
    assert _sha(src) == digest


def test_torchvision_r101_and_depth_mismatch(tmp_path, capsys):
    tv = _tv_resnet(101, seed=7)
    src = tmp_path / "resnet101.pth"
    torch.save({"model": tv, "epoch": 90}, src)  # a dict holding the state dict under "model"
    digest = _sha(src)
    expected = _tv_expected(tv)

    r101 = _build(FASTER_R101_FPN)
    report = convert_checkpoint(str(src), str(tmp_path / "r101.pkl"), target_model=r101)
    assert report.depth == 101 and report.blocks == (3, 4, 23, 3)
    assert len(report.transferred["backbone"]) == len(expected) == 104 * 5
    assert report.missing["backbone"] == []
    _assert_landed(r101, {_fpn_dest(k): v for k, v in expected.items()})
    assert _backbone_keys(r101) == {_fpn_dest(k) for k in expected}
    del r101

    # R-101 weights into an R-50 config: refused, nothing written.
    out = tmp_path / "into_r50.pkl"
    err = _fail([src, out, "--target-config", MASK_R50_FPN, "--opts", *TV_OPTS], capsys)
    assert "depth mismatch" in err and "ResNet-101" in err and "MODEL.RESNETS.DEPTH 50" in err
    assert "res4 has 23 blocks in the checkpoint vs 6 in the target" in err
    assert "res4.6..22.* would be unexpected keys" in err
    assert not out.exists() and _leftovers(tmp_path) == []
    assert _sha(src) == digest


def test_moco_checkpoint_transfers_only_the_query_encoder(tmp_path, fpn_model, capsys):
    q, k = _tv_resnet(50, seed=2), _tv_resnet(50, seed=3)
    g = torch.Generator().manual_seed(4)
    state = {"module.encoder_q." + n: v for n, v in q.items() if not n.startswith("fc.")}
    state.update({"module.encoder_k." + n: v for n, v in k.items() if not n.startswith("fc.")})
    for enc in ("encoder_q", "encoder_k"):  # MoCo v2's MLP head replaces fc
        state[f"module.{enc}.fc.0.weight"] = torch.randn(2048, 2048, generator=g)
        state[f"module.{enc}.fc.0.bias"] = torch.randn(2048, generator=g)
        state[f"module.{enc}.fc.2.weight"] = torch.randn(128, 2048, generator=g)
        state[f"module.{enc}.fc.2.bias"] = torch.randn(128, generator=g)
    state["module.queue"] = torch.randn(128, 4096, generator=g)
    state["module.queue_ptr"] = torch.zeros(1, dtype=torch.long)
    optimizer = {"state": {}, "param_groups": [{"lr": 0.03, "momentum": 0.9, "params": [0, 1]}]}
    src = tmp_path / "checkpoint_0199.pth.tar"
    torch.save({"epoch": 200, "arch": "resnet50", "state_dict": state, "optimizer": optimizer}, src)
    digest = _sha(src)

    out = tmp_path / "moco.pkl"
    assert main([str(src), str(out)]) == 0
    printed = capsys.readouterr().out
    assert "source: moco (from key patterns" in printed
    assert "module.encoder_k.*" in printed and "momentum (key) encoder" in printed

    report = convert_checkpoint(str(src), str(out), source="moco")
    expected = _tv_expected(q)
    assert sorted(report.transferred["backbone"]) == sorted(expected)
    groups = report.dropped_groups
    assert groups["module.encoder_k.*"][0] == len(k) - 2 + 4
    assert groups["module.encoder_q.fc.*"][0] == 4
    assert groups["module.queue*"][0] == 2
    assert set(_read_pkl(out)["model"]) == set(expected)

    _load(fpn_model, out)
    _assert_landed(fpn_model, {_fpn_dest(n): v for n, v in expected.items()})
    weight = fpn_model.state_dict()["backbone.bottom_up.res3.1.conv2.weight"]
    assert not torch.equal(weight, k["layer2.1.conv2.weight"])  # the key encoder stayed behind
    assert _sha(src) == digest


class _DetCo(nn.Module):
    """The names of a drcl_d2 DetCo model: a detectron2 ResNet query/key encoder, heads, queues."""

    def __init__(self, encoder):
        super().__init__()
        self.encoder_q = encoder
        self.encoder_k = copy.deepcopy(encoder)
        for side in ("q", "k"):
            setattr(self, f"global_heads_{side}", nn.ModuleList(
                nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)) for _ in range(4)))
            setattr(self, f"local_heads_{side}", nn.ModuleList(
                nn.Sequential(nn.Linear(9 * 8, 8), nn.ReLU(), nn.Linear(8, 4)) for _ in range(4)))
        for level in ("res2", "res3", "res4", "res5"):
            for kind in ("global", "local"):
                self.register_buffer(f"queue_{kind}_{level}", torch.randn(4, 32))
                self.register_buffer(f"queue_{kind}_{level}_ptr", torch.zeros(1, dtype=torch.long))


def test_detco_checkpoint_fits_c4_and_fpn(tmp_path, fpn_model, c4_model):
    cfg = get_cfg()
    cfg.MODEL.RESNETS.NORM = "BN"  # pretraining BN: its num_batches_tracked must be dropped
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    detco = _DetCo(build_resnet_backbone(cfg, ShapeSpec(channels=3)))
    _randomize_module(detco, seed=5)  # query and key encoders get different values
    optimizer = torch.optim.SGD(detco.parameters(), lr=0.03, momentum=0.9)
    DetectionCheckpointer(detco, save_dir=str(tmp_path), optimizer=optimizer).save(
        "model_0000099", iteration=99, drcl_d2={"method": "detco", "depth": 50})
    src = tmp_path / "model_0000099.pth"
    digest = _sha(src)
    query = {
        k[len("encoder_q."):]: v for k, v in detco.state_dict().items()
        if k.startswith("encoder_q.") and not k.endswith("num_batches_tracked")
    }
    assert len(query) == R50_RESNET_TENSORS

    out = tmp_path / "detco.pkl"
    report = convert_checkpoint(str(src), str(out), target_model=c4_model)
    assert report.source == "detco" and '"drcl_d2" metadata: method=detco, depth=50' in report.detected_by
    assert sorted(report.transferred["backbone"]) == sorted(query)
    assert report.missing["backbone"] == []
    groups = report.dropped_groups
    assert groups["encoder_q.*.num_batches_tracked"][0] == 53
    assert groups["encoder_k.*"][0] == len(query) + 53
    assert groups["global_heads_*"][0] == groups["local_heads_*"][0] == 2 * 4 * 4  # q and k
    assert groups["queue*"][0] == 16  # 8 queues and their pointers
    _assert_landed(c4_model, {_c4_dest(k): v for k, v in query.items()})
    assert _backbone_keys(c4_model) == {_c4_dest(k) for k in query}

    # The same file fits an FPN detector.
    _load(fpn_model, out)
    _assert_landed(fpn_model, {_fpn_dest(k): v for k, v in query.items()})
    assert _sha(src) == digest


class _Drcl(nn.Module):
    """The names of a drcl_d2 2DRCL model: an online GeneralizedRCNN's modules plus extras."""

    def __init__(self, detector):
        super().__init__()
        self.backbone = copy.deepcopy(detector.backbone)
        self.proposal_generator = copy.deepcopy(detector.proposal_generator)
        self.roi_heads = nn.Module()
        self.roi_heads.box_head = copy.deepcopy(detector.roi_heads.box_head)
        self.roi_heads.box_predictor = copy.deepcopy(detector.roi_heads.box_predictor)
        self.target = nn.Module()  # the EMA copy
        self.target.backbone = copy.deepcopy(detector.backbone)
        self.target.proposal_generator = copy.deepcopy(detector.proposal_generator)
        self.target.box_head = copy.deepcopy(detector.roi_heads.box_head)
        for name in ("hcl_projector", "hcl_predictor", "lcl_projector", "lcl_predictor"):
            setattr(self, name, nn.Sequential(nn.Linear(16, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 16)))
        self.decoder = nn.Sequential(nn.Conv2d(256, 8, 3), nn.ReLU(), nn.Conv2d(8, 3, 1))
        self.register_buffer("queue_hcl", torch.randn(16, 64))
        self.register_buffer("queue_hcl_ptr", torch.zeros(1, dtype=torch.long))
        self.register_buffer("queue_lcl", torch.randn(16, 64))
        self.register_buffer("queue_lcl_ptr", torch.zeros(1, dtype=torch.long))


def test_drcl_checkpoint_transfers_backbone_fpn_rpn_box_head(tmp_path, fpn_model, c4_model, capsys):
    drcl = _randomize_module(_Drcl(fpn_model), seed=6)
    DetectionCheckpointer(drcl, save_dir=str(tmp_path)).save(
        "model_final", iteration=89999, drcl_d2={"method": "drcl", "depth": 50})
    src = tmp_path / "model_final.pth"
    digest = _sha(src)
    state = drcl.state_dict()
    online = {
        k: v for k, v in state.items()
        if k.startswith(("backbone.", "proposal_generator.rpn_head.", "roi_heads.box_head."))
    }
    never = ("target.", "hcl_", "lcl_", "decoder.", "queue", "roi_heads.box_predictor.")

    out = tmp_path / "drcl.pkl"
    report = convert_checkpoint(str(src), str(out), target_model=fpn_model)
    assert report.source == "drcl" and "method=drcl" in report.detected_by
    counts = {m: len(v) for m, v in report.transferred.items()}
    assert counts == {"backbone": R50_RESNET_TENSORS, "fpn": 16, "rpn": 6, "box_head": 4, "other": 0}
    assert {m: len(v) for m, v in report.missing.items() if m != "other"} == {
        "backbone": 0, "fpn": 0, "rpn": 0, "box_head": 0}
    assert any(k.startswith("roi_heads.box_predictor.") for k in report.missing["other"])
    assert any(k.startswith("roi_heads.mask_head.") for k in report.missing["other"])
    groups = report.dropped_groups
    assert groups["target.*"][0] == sum(k.startswith("target.") for k in state)
    assert groups["roi_heads.box_predictor.*"][0] == 4
    assert groups["decoder.*"][0] == 4 and groups["queue*"][0] == 4
    dropped = [k for v in report.dropped.values() for k in v]
    assert all(any(k.startswith(p) for p in never) for k in dropped)

    written = _read_pkl(out)["model"]
    assert not any(k.startswith(never) for k in written)
    assert {k for k in written if not k.startswith(("stem.", "res"))} == {
        k for k in online if not k.startswith("backbone.bottom_up.")}
    _assert_landed(fpn_model, online)
    loaded = fpn_model.state_dict()
    assert not torch.equal(loaded["backbone.fpn_lateral3.weight"], state["target.backbone.fpn_lateral3.weight"])
    assert not torch.equal(loaded["roi_heads.box_predictor.cls_score.weight"],
                           state["roi_heads.box_predictor.cls_score.weight"])

    # One output format: the .pkl above fits FPN and C4 alike.
    assert "OUTPUT must end in .pkl" in _fail([src, tmp_path / "drcl_fpn.pth"], capsys)
    assert not (tmp_path / "drcl_fpn.pth").exists()

    # Into a C4 detector the FPN / RPN tensors do not fit: refused, the old output stays.
    out_c4 = tmp_path / "drcl_c4.pkl"
    out_c4.write_bytes(b"previous output")
    with pytest.raises(ConversionError) as exc:
        convert_checkpoint(str(src), str(out_c4), target_model=c4_model)
    message = str(exc.value)
    assert "backbone.fpn_*: no such parameter in the target model (16 unexpected keys)" in message
    assert "roi_heads.box_head.*: no such parameter in the target model (4 unexpected keys)" in message
    assert "proposal_generator.rpn_head.conv.weight: shape (256, 256, 3, 3) does not fit" in message
    assert out_c4.read_bytes() == b"previous output" and _leftovers(tmp_path) == []

    # --backbone-only fits C4, and replaces the old output.
    report = convert_checkpoint(str(src), str(out_c4), target_model=c4_model, backbone_only=True)
    assert {m: len(v) for m, v in report.transferred.items()}["fpn"] == 0
    assert report.dropped_groups["backbone.fpn_*"] == (16, "left out by --backbone-only")
    assert len(_read_pkl(out_c4)["model"]) == R50_RESNET_TENSORS
    bottom_up = {k[len("backbone.bottom_up."):]: v for k, v in online.items() if k.startswith("backbone.bottom_up.")}
    _assert_landed(c4_model, {_c4_dest(k): v for k, v in bottom_up.items()})
    assert _sha(src) == digest and _leftovers(tmp_path) == []


def test_unknown_and_broken_inputs_exit_non_zero(tmp_path, capsys):
    out = tmp_path / "out.pkl"

    random_pickle = tmp_path / "random.pkl"
    with open(random_pickle, "wb") as f:
        pickle.dump({"weights": np.random.rand(3), "owner": "someone", "step": 7}, f)
    err = _fail([random_pickle, out], capsys)
    assert "not a checkpoint drcl-convert knows" in err
    assert "a top-level dict with 3 keys ['weights', 'owner', 'step']" in err

    a_list = tmp_path / "list.pkl"
    with open(a_list, "wb") as f:
        pickle.dump([1, 2, 3], f)
    assert "the top-level object is a list of 3 items, not a dict" in _fail([a_list, out], capsys)

    full = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), full)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(full.read_bytes()[: full.stat().st_size * 2 // 5])
    err = _fail([truncated, out], capsys)
    assert "truncated or corrupt" in err and "truncated.pth" in err

    no_backbone = tmp_path / "heads.pth"
    torch.save({"model": {"head.weight": torch.randn(4, 4), "head.bias": torch.randn(4)}, "iteration": 3}, no_backbone)
    digest = _sha(no_backbone)
    err = _fail([no_backbone, out], capsys)
    assert "found no ResNet backbone" in err and "'head.weight'" in err

    err = _fail([full, out, "--source", "detco"], capsys)  # a torchvision file is no DetCo file
    assert "found no ResNet backbone to transfer as --source detco" in err and "'conv1.weight'" in err

    assert "OUTPUT must end in .pkl" in _fail([full, tmp_path / "out.bin"], capsys)
    assert "the input is never modified" in _fail([no_backbone, no_backbone], capsys)
    assert "--opts needs --target-config" in _fail([full, out, "--opts", "MODEL.RESNETS.DEPTH", "50"], capsys)

    assert not out.exists() and _leftovers(tmp_path) == [] and _sha(no_backbone) == digest


def test_help_runs_as_a_module():
    result = subprocess.run(
        [sys.executable, "-m", "drcl_d2.checkpoint", "--help"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    text = result.stdout
    assert text.startswith("usage: drcl-convert")
    for needle in ("--source {auto,drcl,detco,moco,torchvision}", "--target-config", "examples:",
                   "MODEL.RESNETS.STRIDE_IN_1X1 False", "INPUT.FORMAT RGB",
                   "MODEL.PIXEL_MEAN [123.675, 116.28, 103.53]", "MODEL.PIXEL_STD [58.395, 57.12, 57.375]"):
        assert needle in text, needle
