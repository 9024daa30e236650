"""Every CLS_LOSS trains a few iterations on the tiny embedded set through train_net's Trainer and is
evaluated by LVISEvaluator; its statistics land in the checkpoint."""
import pytest
import torch

from drcl_d2.engine import Trainer, setup
from drcl_d2.modeling.box_predictor import training_class_image_counts
from test_train_net import LVIS_KEYS, _args, _opts

# What each loss keeps in the checkpoint (statistics learnt in training, which must have moved).
STATE = {
    "sigmoid_bce": [],
    "federated": [],
    "eqlv2": ["cls_loss.pos_grad", "cls_loss.neg_grad", "cls_loss.num_updates"],
    "seesaw": ["cls_loss.class_counts"],
    "ecm": [],
}
# Class frequencies read from the training set (CategoryStatistics) before the first loss, never
# from a checkpoint: (buffer, its value as a function of the training set's image counts).
FREQUENCIES = {"federated": ("fed_loss_cls_weights", lambda n: n.float() ** 0.5),
               "ecm": ("cls_loss.class_image_counts", lambda n: n)}


@pytest.mark.parametrize("loss", sorted(STATE))
def test_each_loss_trains_and_lvis_evaluates(loss, tiny_dataset, tmp_path):
    over = {"MODEL.ROI_BOX_HEAD.CLS_LOSS": loss, "MODEL.MASK_ON": False, "SOLVER.MAX_ITER": 2,
            "SOLVER.CHECKPOINT_PERIOD": 100, "INPUT.MIN_SIZE_TRAIN": "(96,)", "INPUT.MIN_SIZE_TEST": 96,
            "MODEL.ROI_BOX_HEAD.FED_LOSS_NUM_CLASSES": 6}  # 12 classes here (detectron2: 50 of LVIS's 1203)
    cfg = setup(_args(_opts(tiny_dataset, tmp_path, **over)))
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    results = trainer._last_eval_results["bbox"]
    assert set(LVIS_KEYS) <= set(results) and 0.0 <= results["AP"] <= 100.0
    state = torch.load(tmp_path / "model_final.pth", weights_only=False)["model"]
    for key in STATE[loss]:
        value = state["roi_heads.box_predictor." + key]
        assert bool(value.any()), f"{key} never moved"
    if loss in FREQUENCIES:
        key, expected = FREQUENCIES[loss]
        assert "roi_heads.box_predictor." + key not in state
        counts = training_class_image_counts(cfg)
        assert counts.sum() > 0 and counts.min() >= 1  # every tiny-set class has training images
        buffer = dict(trainer.model.roi_heads.box_predictor.named_buffers())[key]
        assert torch.allclose(buffer.double(), expected(counts).double())
