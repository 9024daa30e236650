"""Each classification loss against its paper's formula computed by hand (plain Python floats, no
torch), its statistics over steps, a resume through detectron2's checkpointer, and 2 ranks = 1 rank.

The fixed case: 3 classes — 0 frequent, 1 absent from the training set, 2 rare — and 4 RoIs labelled
[0, 2, background, background]; class 1 is never a label, so it only meets negatives.
"""
import math

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog
from detectron2.engine import launch
from detectron2.layers import ShapeSpec
from detectron2.structures import Boxes, Instances
from detectron2.utils import comm
from detectron2.utils.events import EventStorage

from drcl_d2 import add_drcl_config
from drcl_d2.data.datasets import register_datasets_from_config
from drcl_d2.modeling.box_predictor import (
    FederatedOutputLayers,
    LongTailOutputLayers,
    build_box_predictor,
    training_class_image_counts,
)
from drcl_d2.modeling.classification_losses import ECMLoss, EQLv2Loss, SeesawLoss

C = 3
LABELS = [0, 2, 3, 3]
IMAGE_COUNTS = [50.0, 0.0, 2.0]  # training images per class: frequent, absent, rare
# Three steps of logits, (4 RoIs, C + 1) for the sigmoid losses; Seesaw adds a second objectness column.
STEPS = [
    [[2.0, -1.0, 0.5, -2.0], [0.3, -0.5, -1.5, 0.2], [-1.0, 0.1, -0.3, 1.5], [0.4, -2.0, 0.9, 0.7]],
    [[1.0, 0.5, -0.5, -1.0], [-0.2, 0.3, 0.8, -0.4], [-2.0, -1.0, 0.2, 2.5], [1.2, 0.0, -0.7, 0.3]],
    [[0.1, -0.1, 0.2, 0.0], [1.5, -1.5, 0.5, -0.5], [-0.5, 0.5, -1.0, 1.0], [0.0, 1.0, 2.0, -1.0]],
]
OBJECTNESS_BG = [-0.5, 0.4, 1.2, 0.1]  # Seesaw's background objectness logit per RoI (foreground: column C)


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


def bce(z, y):
    return -(y * math.log(sigmoid(z)) + (1 - y) * math.log(1 - sigmoid(z)))


def t(rows):
    return torch.tensor(rows, dtype=torch.float32)


LABELS_T = torch.tensor(LABELS)


# ---- EQLv2 ----------------------------------------------------------------------------------------

def eqlv2_by_hand(steps, gamma=12.0, mu=0.8, alpha=4.0):
    """Losses per step and (pos, neg) accumulated gradients, from the paper's equations."""
    pos, neg, losses = [0.0] * C, [0.0] * C, []
    for step, logits in enumerate(steps):
        if step == 0:  # nothing accumulated yet: every weight is 1
            q, r = [1.0] * C, [1.0] * C
        else:
            r = [1 / (1 + math.exp(-gamma * (pos[j] / (neg[j] + 1e-10) - mu))) for j in range(C)]
            q = [1 + alpha * (1 - r[j]) for j in range(C)]
        q, r = q + [1.0], r + [1.0]  # the objectness column weighs 1
        total = 0.0
        for z_row, label in zip(logits, LABELS):
            for j, z in enumerate(z_row):
                y = 1.0 if j == label else 0.0
                w = q[j] if y else r[j]
                total += w * bce(z, y)
                if j < C:  # |dL/dz| = 1 - p for a positive, p for a negative
                    if y:
                        pos[j] += w * (1 - sigmoid(z))
                    else:
                        neg[j] += w * sigmoid(z)
        losses.append(total / len(LABELS))
    return losses, pos, neg


def test_eqlv2_losses_and_statistics_match_the_paper_over_steps():
    loss = EQLv2Loss(C)
    got = [loss(t(z), LABELS_T)["loss_cls"].item() for z in STEPS]
    want, pos, neg = eqlv2_by_hand(STEPS)
    assert got == pytest.approx(want, rel=1e-5)
    assert loss.pos_grad.tolist() == pytest.approx(pos, rel=1e-6)
    assert loss.neg_grad.tolist() == pytest.approx(neg, rel=1e-6)
    assert int(loss.num_updates) == 3
    # The absent class never had a positive gradient: its negatives are all but switched off
    # (r = f(0) ~ 7e-5), and its positives would be boosted to ~ 1 + alpha.
    q, r = loss.class_weights()
    assert r[1] < 1e-4 and q[1] > 4.99
    assert pos[1] == 0.0 and pos[0] > 0 and pos[2] > 0


def test_eqlv2_scores_are_sigmoids_times_not_background():
    z = STEPS[0][0]
    scores = EQLv2Loss(C).scores(t([z]))[0].tolist()
    bg = sigmoid(z[C])
    assert scores == pytest.approx([sigmoid(v) * (1 - bg) for v in z[:C]] + [bg], rel=1e-6)


# ---- Seesaw ---------------------------------------------------------------------------------------

def seesaw_logits(rows):
    """(N, C + 2): C class logits, objectness foreground, objectness background."""
    return [row + [bg] for row, bg in zip(rows, OBJECTNESS_BG)]


def seesaw_by_hand(logits, counts, p=0.8, q=2.0, eps=1e-2):
    """(class loss, objectness loss) of one step, counts n_j already including this batch."""
    n = [max(c, 1) for c in counts]
    cls_total, obj_total = 0.0, 0.0
    for row, label in zip(logits, LABELS):
        z = row[:C]
        if label < C:
            softmax = [math.exp(v) / sum(math.exp(u) for u in z) for v in z]
            own = max(softmax[label], eps)
            denom = math.exp(z[label])
            for j in range(C):
                if j == label:
                    continue
                mitigation = (n[j] / n[label]) ** p if n[j] < n[label] else 1.0
                compensation = (softmax[j] / own) ** q if softmax[j] > own else 1.0
                denom += mitigation * compensation * math.exp(z[j])
            cls_total += -math.log(math.exp(z[label]) / denom)
        fg, bg = row[C], row[C + 1]
        obj_total += -math.log((math.exp(fg) if label < C else math.exp(bg)) / (math.exp(fg) + math.exp(bg)))
    return cls_total / len(LABELS), obj_total / len(LABELS)


def test_seesaw_losses_and_counts_match_the_paper_over_steps():
    loss = SeesawLoss(C)
    loss.class_counts.copy_(torch.tensor([100, 0, 2]))  # a history: class 0 frequent, 2 rare, 1 absent
    counts = [100, 0, 2]
    for rows in STEPS:
        logits = seesaw_logits(rows)
        got = loss(t(logits), LABELS_T)
        counts[0], counts[2] = counts[0] + 1, counts[2] + 1  # this batch: one RoI of class 0, one of 2
        want_cls, want_obj = seesaw_by_hand(logits, counts)
        assert got["loss_cls"].item() == pytest.approx(want_cls, rel=1e-5)
        assert got["loss_cls_objectness"].item() == pytest.approx(want_obj, rel=1e-5)
    assert loss.class_counts.tolist() == [103, 0, 5]


def test_seesaw_mitigates_the_rare_class_for_a_frequent_label_and_not_the_reverse():
    loss = SeesawLoss(C, q=0.0)  # mitigation only
    loss.class_counts.copy_(torch.tensor([1000, 0, 10]))
    class_logits = torch.zeros(2, C)
    factors = loss.seesaw_factors(class_logits, torch.tensor([0, 2]))
    # label 0 (frequent): the rare class 2's negative term is scaled by (10/1000)^0.8 and the absent
    # class 1's (count 0, taken as 1) by (1/1000)^0.8; label 2 (rare): class 0 keeps its full penalty.
    assert factors[0].tolist() == pytest.approx([1.0, (1 / 1000) ** 0.8, (10 / 1000) ** 0.8], rel=1e-6)
    assert factors[1].tolist() == pytest.approx([1.0, (1 / 10) ** 0.8, 1.0], rel=1e-6)


def test_seesaw_scores_are_class_softmax_times_objectness():
    row = seesaw_logits(STEPS[0])[1]
    scores = SeesawLoss(C).scores(t([row]))[0].tolist()
    fg = math.exp(row[C]) / (math.exp(row[C]) + math.exp(row[C + 1]))
    classes = [math.exp(v) / sum(math.exp(u) for u in row[:C]) for v in row[:C]]
    assert scores == pytest.approx([c * fg for c in classes] + [1 - fg], rel=1e-6)


# ---- ECM ------------------------------------------------------------------------------------------

def ecm_by_hand(logits, image_counts, fg_bg_ratio=6.3313):
    n_fg = [max(c, 1.0) for c in image_counts]  # an absent class counts 1 image
    n_pos = n_fg + [fg_bg_ratio * sum(n_fg)]
    total = sum(n_pos)
    total_loss = 0.0
    for row, label in zip(logits, LABELS):
        for j, z in enumerate(row):
            pos, neg = n_pos[j], total - n_pos[j]
            m_pos = -math.log(neg ** 0.25 / (pos ** 0.25 + neg ** 0.25))
            m_neg = -math.log(pos ** 0.25 / (pos ** 0.25 + neg ** 0.25))
            p = math.exp(z + m_pos) / (math.exp(z + m_pos) + math.exp(-z + m_neg))
            a = neg / pos
            weight = a * math.log((1 + a) / a)
            y = 1.0 if j == label else 0.0
            total_loss += -weight * (y * math.log(p) + (1 - y) * math.log(1 - p))
    return total_loss / len(LABELS)


def test_ecm_loss_matches_the_paper():
    loss = ECMLoss(C)
    loss.set_class_image_counts(torch.tensor(IMAGE_COUNTS))
    for rows in STEPS:
        assert loss(t(rows), LABELS_T)["loss_cls"].item() == pytest.approx(ecm_by_hand(rows, IMAGE_COUNTS), rel=1e-5)
    # The rare class's margin pushes its training logit down more than the frequent one's: at
    # inference (no margin) it then scores higher for the same raw logit.
    m_pos, m_neg, _ = loss.margins_and_weights()
    assert (m_pos - m_neg)[2] < (m_pos - m_neg)[0] < 0


def test_ecm_without_class_counts_says_so():
    with pytest.raises(RuntimeError, match="class image counts"):
        ECMLoss(C)(t(STEPS[0]), LABELS_T)


# ---- detectron2's sigmoid BCE and federated loss, wired by CLS_LOSS ------------------------------

def _cfg(loss, **box_head):
    cfg = add_drcl_config(get_cfg())
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = C
    cfg.MODEL.ROI_BOX_HEAD.CLS_LOSS = loss
    for k, v in box_head.items():
        setattr(cfg.MODEL.ROI_BOX_HEAD, k, v)
    return cfg


def test_sigmoid_bce_is_detectrons_per_class_bce_without_the_background_column():
    predictor = build_box_predictor(_cfg("sigmoid_bce"), ShapeSpec(channels=8))
    rows = STEPS[0]
    want = sum(bce(z, 1.0 if j == label else 0.0) for row, label in zip(rows, LABELS)
               for j, z in enumerate(row[:C])) / len(LABELS)
    assert predictor.sigmoid_cross_entropy_loss(t(rows), LABELS_T).item() == pytest.approx(want, rel=1e-5)


def test_federated_keeps_the_batch_classes_and_never_samples_an_absent_class():
    cfg = _cfg("federated", FED_LOSS_NUM_CLASSES=50)
    predictor = FederatedOutputLayers(cfg, ShapeSpec(channels=8),
                                      class_image_counts=lambda: torch.tensor(IMAGE_COUNTS, dtype=torch.float64))
    assert not predictor.fed_loss_cls_weights.any() and not predictor.has_class_image_counts  # read at the first loss
    rows = STEPS[1]
    got = predictor.sigmoid_cross_entropy_loss(t(rows), LABELS_T).item()
    # Weights image_count ** 0.5; 50 classes cannot be drawn from 2 of non-zero weight, so the kept
    # set is the batch's classes {0, 2} (+ background, not a class column): class 1 has no term.
    assert predictor.fed_loss_cls_weights.tolist() == pytest.approx([50 ** 0.5, 0.0, 2 ** 0.5])
    want = sum(bce(row[j], 1.0 if j == label else 0.0) for row, label in zip(rows, LABELS) for j in (0, 2)) / 4
    assert got == pytest.approx(want, rel=1e-5)


def test_class_image_counts_come_from_the_training_set(tiny_dataset):
    """CategoryStatistics' image counts, per contiguous class, against a count made from the json."""
    import json

    cfg = add_drcl_config(get_cfg())
    cfg.DATASETS.LVIS_CUSTOM = [["lt_counts_train", tiny_dataset["train_json"], tiny_dataset["image_root"]]]
    cfg.DATASETS.TRAIN = ("lt_counts_train",)
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = 12
    register_datasets_from_config(cfg)
    data = json.load(open(tiny_dataset["train_json"]))
    contiguous = {c["id"]: i for i, c in enumerate(sorted(data["categories"], key=lambda c: c["id"]))}
    want = [0.0] * 12
    for cat_id, image_ids in _images_per_category(data).items():
        want[contiguous[cat_id]] = float(len(image_ids))
    assert training_class_image_counts(cfg).tolist() == want
    assert len(DatasetCatalog.get("lt_counts_train")) == len(data["images"])


def _images_per_category(data):
    images = {}
    for ann in data["annotations"]:
        images.setdefault(ann["category_id"], set()).add(ann["image_id"])
    return images


# ---- statistics through a checkpoint, and across ranks -------------------------------------------

def _proposals(step, num_images=2):
    """Two images of 4 RoIs each with the fixed labels (boxes only matter for box regression)."""
    g = torch.Generator().manual_seed(step)
    out = []
    for _ in range(num_images):
        inst = Instances((64, 64))
        xy = torch.rand(4, 2, generator=g) * 30
        inst.proposal_boxes = Boxes(torch.cat([xy, xy + 10 + torch.rand(4, 2, generator=g) * 20], 1))
        inst.gt_boxes = Boxes(inst.proposal_boxes.tensor + 1.0)
        inst.gt_classes = LABELS_T.clone()
        out.append(inst)
    return out


def _features(step, num_rois=8):
    return torch.randn(num_rois, 8, generator=torch.Generator().manual_seed(100 + step))


def _train_steps(predictor, steps, first=0):
    opt = torch.optim.SGD(predictor.parameters(), lr=0.1)
    with EventStorage(first):
        for step in range(first, first + steps):
            losses = predictor.losses(predictor(_features(step)), _proposals(step))
            opt.zero_grad()
            sum(losses.values()).backward()
            opt.step()


@pytest.mark.parametrize("loss", ["eqlv2", "seesaw"])
def test_statistics_survive_a_checkpoint_resume_bit_exactly(loss, tmp_path):
    torch.manual_seed(0)
    straight = build_box_predictor(_cfg(loss), ShapeSpec(channels=8))
    resumed = build_box_predictor(_cfg(loss), ShapeSpec(channels=8))
    resumed.load_state_dict(straight.state_dict())
    _train_steps(straight, 4)
    _train_steps(resumed, 2)
    DetectionCheckpointer(resumed, str(tmp_path)).save("model_0000001")
    fresh = build_box_predictor(_cfg(loss), ShapeSpec(channels=8))
    DetectionCheckpointer(fresh, str(tmp_path)).resume_or_load(str(tmp_path / "model_0000001.pth"), resume=True)
    _train_steps(fresh, 2, first=2)
    assert isinstance(fresh, LongTailOutputLayers)
    stats = [k for k in straight.state_dict() if k.startswith("cls_loss.")]
    assert stats  # the statistics are in the state dict, hence in the checkpoint
    for key, value in straight.state_dict().items():
        assert torch.equal(value, fresh.state_dict()[key]), key
    if loss == "seesaw":
        assert fresh.cls_loss.class_counts.tolist() == [8, 0, 8]  # 4 steps x 2 images x 1 RoI
    else:
        assert int(fresh.cls_loss.num_updates) == 4


def _rank_statistics(out_dir):
    """Each rank: its half of a fixed 8-RoI batch through EQLv2 and Seesaw for 3 steps."""
    world, rank = comm.get_world_size(), comm.get_rank()
    eqlv2, seesaw = EQLv2Loss(C), SeesawLoss(C)
    labels = torch.tensor(LABELS + [2, 0, 3, 1])  # 8 RoIs; here class 1 appears once
    half = slice(rank * 8 // world, (rank + 1) * 8 // world)
    losses = []
    for step in range(3):
        logits = torch.randn(8, C + 2, generator=torch.Generator().manual_seed(step))
        losses.append([eqlv2(logits[half, :C + 1], labels[half])["loss_cls"].item(),
                       seesaw(logits[half], labels[half])["loss_cls"].item()])
    torch.save({"eqlv2": eqlv2.state_dict(), "seesaw": seesaw.state_dict(), "losses": losses},
               f"{out_dir}/world{world}_rank{rank}.pth")


def test_two_ranks_accumulate_what_one_rank_does(tmp_path):
    launch(_rank_statistics, 2, dist_url="auto", args=(str(tmp_path),))
    _rank_statistics(str(tmp_path))
    ranks = [torch.load(tmp_path / f"world2_rank{r}.pth") for r in (0, 1)]
    single = torch.load(tmp_path / "world1_rank0.pth")
    for name in ("eqlv2", "seesaw"):
        for key, value in single[name].items():
            assert torch.equal(ranks[0][name][key], ranks[1][name][key]), (name, key)
            if value.dtype.is_floating_point:  # float64 sums, only their order differs
                assert torch.allclose(ranks[0][name][key], value, rtol=1e-12, atol=0), (name, key)
            else:
                assert torch.equal(ranks[0][name][key], value), (name, key)
    assert single["seesaw"]["class_counts"].tolist() == [6, 3, 6]
    # Each rank normalises by its own RoIs; DDP averages the ranks, which is the 1-rank loss.
    for step in range(3):
        for i in range(2):
            mean = (ranks[0]["losses"][step][i] + ranks[1]["losses"][step][i]) / 2
            assert mean == pytest.approx(single["losses"][step][i], rel=1e-5)


# ---- where the key is read ------------------------------------------------------------------------

def test_cascade_heads_give_every_stage_the_loss_with_its_own_box_transform():
    from detectron2.modeling.roi_heads import build_roi_heads

    cfg = _cfg("eqlv2")
    cfg.MODEL.ROI_HEADS.NAME = "LongTailCascadeROIHeads"
    cfg.MODEL.ROI_HEADS.IN_FEATURES = ["p2", "p3"]
    cfg.MODEL.ROI_BOX_HEAD.NAME, cfg.MODEL.ROI_BOX_HEAD.NUM_FC, cfg.MODEL.ROI_BOX_HEAD.FC_DIM = "FastRCNNConvFCHead", 1, 16
    cfg.MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG = True
    shapes = {"p2": ShapeSpec(channels=8, stride=4), "p3": ShapeSpec(channels=8, stride=8)}
    heads = build_roi_heads(cfg, shapes)
    stages = list(heads.box_predictor)
    assert [type(p) for p in stages] == [LongTailOutputLayers] * 3
    assert [p.box2box_transform.weights for p in stages] == [tuple(w) for w in cfg.MODEL.ROI_BOX_CASCADE_HEAD.BBOX_REG_WEIGHTS]
    assert len({id(p.cls_loss) for p in stages}) == 3  # each stage its own statistics


def test_roi_heads_that_ignore_the_key_stop_training():
    from drcl_d2.modeling.box_predictor import check_roi_heads_read_cls_loss

    cfg = _cfg("seesaw")
    cfg.MODEL.ROI_HEADS.NAME = "StandardROIHeads"
    with pytest.raises(ValueError, match="CLS_LOSS 'seesaw' is read by MODEL.ROI_HEADS.NAME 'LongTailROIHeads'"):
        check_roi_heads_read_cls_loss(cfg)
    cfg.MODEL.ROI_BOX_HEAD.CLS_LOSS, cfg.MODEL.ROI_BOX_HEAD.USE_FED_LOSS = "eqlv2", True
    cfg.MODEL.ROI_HEADS.NAME = "LongTailROIHeads"
    with pytest.raises(ValueError, match="leave USE_SIGMOID_CE and USE_FED_LOSS False"):
        check_roi_heads_read_cls_loss(cfg)
