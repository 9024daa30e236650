"""Every CLS_LOSS trains a few iterations on the tiny embedded set through train_net's Trainer and is
evaluated by LVISEvaluator; its statistics land in the checkpoint."""
import pytest
import torch

from drcl_d2.engine import Trainer, setup
from test_train_net import LVIS_KEYS, _args, _opts

# What each loss keeps in the predictor's state (and so in the checkpoint), and what must have moved.
STATE = {
    "sigmoid_bce": [],
    "federated": ["fed_loss_cls_weights"],
    "eqlv2": ["cls_loss.pos_grad", "cls_loss.neg_grad", "cls_loss.num_updates"],
    "seesaw": ["cls_loss.class_counts"],
    "ecm": ["cls_loss.class_image_counts"],
}


@pytest.mark.parametrize("loss", sorted(STATE))
def test_each_loss_trains_and_lvis_evaluates(loss, tiny_dataset, tmp_path):
    over = {"MODEL.ROI_BOX_HEAD.CLS_LOSS": loss, "MODEL.MASK_ON": False, "SOLVER.MAX_ITER": 2,
            "SOLVER.CHECKPOINT_PERIOD": 100, "INPUT.MIN_SIZE_TRAIN": "(96,)", "INPUT.MIN_SIZE_TEST": 96,
            "MODEL.ROI_BOX_HEAD.FED_LOSS_NUM_CLASSES": 6}  # 12 classes here (detectron2: 50 of LVIS's 1203)
    trainer = Trainer(setup(_args(_opts(tiny_dataset, tmp_path, **over))))
    trainer.resume_or_load(resume=False)
    trainer.train()
    results = trainer._last_eval_results["bbox"]
    assert set(LVIS_KEYS) <= set(results) and 0.0 <= results["AP"] <= 100.0
    state = torch.load(tmp_path / "model_final.pth", weights_only=False)["model"]
    for key in STATE[loss]:
        value = state["roi_heads.box_predictor." + key]
        assert bool(value.any()), f"{key} never moved"
