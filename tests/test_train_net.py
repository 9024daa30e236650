"""train_net.py end to end on the tiny embedded dataset: train, checkpoint, crash, resume, eval."""
import argparse
import json
import logging
import os
import subprocess
import sys

import pytest
import torch
from detectron2.engine import HookBase

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import train_net  # noqa: E402

from drcl_d2.engine import Trainer, setup  # noqa: E402

CONFIG = os.path.join(ROOT, "configs", "embedded", "mask_rcnn_R_18_FPN_drb.yaml")
LVIS_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "APr", "APc", "APf")


def _opts(ds, out, **over):
    opts = {
        "DATASETS.LVIS_CUSTOM": repr([["tiny_train", ds["train_json"], ds["image_root"]],
                                      ["tiny_val", ds["val_json"], ds["image_root"]]]),
        "DATASETS.TRAIN": "('tiny_train',)", "DATASETS.TEST": "('tiny_val',)",
        "MODEL.ROI_HEADS.NUM_CLASSES": "12", "MODEL.DEVICE": "cpu",
        "INPUT.MIN_SIZE_TRAIN": "(128,)", "INPUT.MIN_SIZE_TEST": "128",
        "SOLVER.IMS_PER_BATCH": "2", "SOLVER.MAX_ITER": "6", "SOLVER.STEPS": "(4,)",
        "SOLVER.WARMUP_ITERS": "2", "SOLVER.CHECKPOINT_PERIOD": "3",
        "DATALOADER.NUM_WORKERS": "0", "DATALOADER.DRB.PERIOD": "2", "SEED": "7",
        "TEST.EVAL_PERIOD": "0", "OUTPUT_DIR": str(out),
        # An untrained detector's 100 detections per image make mask pasting and LVIS evaluation the
        # slowest part of these runs; 10 still reach every metric.
        "TEST.DETECTIONS_PER_IMAGE": "10",
    }
    opts.update({k: str(v) for k, v in over.items()})
    return [x for kv in opts.items() for x in kv]


def _args(opts, **kw):
    return argparse.Namespace(config_file=CONFIG, opts=opts, resume=kw.get("resume", False),
                              eval_only=kw.get("eval_only", False), num_gpus=1, num_machines=1, machine_rank=0,
                              dist_url="auto")


class _Recorder(HookBase):
    """Per trainer iteration: α_d in use and the image ids of the batch."""

    def __init__(self, log, crash_at=None):
        self.log, self.crash_at = log, crash_at

    def after_step(self):
        storage = self.trainer.storage
        self.log[self.trainer.iter] = {"alpha": storage.history("drb/alpha").latest(),
                                       "epoch_length": storage.history("drb/epoch_length").latest()}
        if self.trainer.iter == self.crash_at:
            raise RuntimeError("simulated crash")


class _RecordingLoader:
    """Wraps the real loader; keeps it reachable as `.dataset` (how TrainingSamplerHook finds the sampler)."""

    def __init__(self, loader, batches):
        self.dataset, self.batches = loader, batches

    def __iter__(self):
        for batch in self.dataset:
            self.batches.append([d["image_id"] for d in batch])
            yield batch


def _train(cfg, log, batches, resume=False, crash_at=None):
    class RecordingTrainer(Trainer):
        @classmethod
        def build_train_loader(cls, cfg):
            return _RecordingLoader(super().build_train_loader(cfg), batches)

    trainer = RecordingTrainer(cfg)
    trainer.register_hooks([_Recorder(log, crash_at)])
    trainer.resume_or_load(resume=resume)
    trainer.train()
    return trainer


@pytest.fixture(scope="module")
def straight_run(tiny_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    log, batches = {}, []
    cfg = setup(_args(_opts(tiny_dataset, out)))
    trainer = _train(cfg, log, batches)
    return {"out": out, "log": log, "batches": batches, "cfg": cfg, "trainer": trainer}


def test_train_writes_checkpoints_and_drb_metrics(straight_run):
    out = straight_run["out"]
    assert (out / "model_0000002.pth").exists() and (out / "model_final.pth").exists()
    assert (out / "last_checkpoint").read_text() == "model_final.pth"
    ckpt = torch.load(out / "model_0000002.pth", weights_only=False)
    assert ckpt["iteration"] == 2
    assert ckpt["trainer"]["hooks"]["TrainingSamplerHook"] == {"sampler": "DynamicRepeatFactorTrainingSampler",
                                               "total_batch_size": 2, "next_position": 6}
    log = straight_run["log"]
    # α_d = period start / MAX_ITER with PERIOD 2, MAX_ITER 6.
    assert [log[i]["alpha"] for i in range(6)] == [0, 0, 2 / 6, 2 / 6, 4 / 6, 4 / 6]
    metrics = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines()]
    assert any("drb/alpha" in m for m in metrics)
    # The evaluation at the end of training reports LVIS metrics for boxes and masks.
    final = {k: v for m in metrics for k, v in m.items()}
    for task in ("bbox", "segm"):
        for key in LVIS_KEYS:
            assert f"{task}/{key}" in final


def test_drcl_log_lines_reach_the_runs_log(straight_run):
    """drcl_d2's logger had no handler: its lines never reached stdout or log.txt."""
    text = (straight_run["out"] / "log.txt").read_text()
    assert "Using training sampler DynamicRepeatFactorTrainingSampler" in text
    assert "Loaded 160 images in LVIS format from" in text and "lvis_v1_train.json" in text


def test_resume_after_a_crash_continues_exactly(straight_run, tiny_dataset, tmp_path):
    log, batches = {}, []
    no_eval = {"DATASETS.TEST": "()"}  # the straight run's evaluation is asserted; these end without one
    cfg = setup(_args(_opts(tiny_dataset, tmp_path, **no_eval)))
    with pytest.raises(RuntimeError, match="simulated crash"):
        _train(cfg, log, batches, crash_at=3)  # crashes after iteration 3; checkpoint of iteration 2 exists
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000002.pth"
    stale = tmp_path / ".model_0000005.pth.q8w7e6r5.tmp"  # what a crash mid-write would leave
    stale.write_bytes(b"half a checkpoint")
    resumed_log, resumed_batches = {}, []
    cfg = setup(_args(_opts(tiny_dataset, tmp_path, **no_eval), resume=True))
    trainer = _train(cfg, resumed_log, resumed_batches, resume=True)
    assert trainer.start_iter == 3
    assert not stale.exists()  # removed at start-up
    assert sorted(resumed_log) == [3, 4, 5]
    straight = straight_run["log"]
    assert all(resumed_log[i] == straight[i] for i in (3, 4, 5))
    # The resumed run sees exactly the images the uninterrupted run saw at iterations 3..5.
    assert resumed_batches == straight_run["batches"][3:6]
    assert batches[:4] == straight_run["batches"][:4]


def test_a_checkpoint_from_before_the_hook_was_renamed_still_reaches_it(straight_run, caplog):
    """Checkpoints name hook states by class: TrainingSamplerHook was RebalanceHook."""
    trainer = straight_run["trainer"]
    state = trainer.state_dict()
    state["hooks"]["RebalanceHook"] = dict(state["hooks"].pop("TrainingSamplerHook"), total_batch_size=99)
    with caplog.at_level(logging.WARNING):
        trainer.load_state_dict(state)
    assert "trained with 99" in caplog.text  # the sampler hook read the old entry and checked it


def test_eval_only_reports_lvis_metrics(straight_run, tiny_dataset, tmp_path):
    weights = str(straight_run["out"] / "model_final.pth")
    args = _args(_opts(tiny_dataset, tmp_path, **{"MODEL.WEIGHTS": weights}), eval_only=True)
    results = train_net.main(args)
    for task in ("bbox", "segm"):
        assert set(LVIS_KEYS) <= set(results[task])
        for key in LVIS_KEYS:
            value = results[task][key]
            # lvis reports -1 (x100 by detectron2) for a group with no detections at all
            assert isinstance(value, float) and (value == -100.0 or 0.0 <= value <= 100.0), (task, key, value)
        assert 0.0 <= results[task]["AP"] <= 100.0
    assert (tmp_path / "inference" / "lvis_instances_results.json").exists()


def test_two_process_gloo_training_via_launch(tiny_dataset, tmp_path):
    """`train_net.py --num-gpus 2` on CPU: 2 gloo processes, DDP without device ids."""
    opts = _opts(tiny_dataset, tmp_path, **{"SOLVER.MAX_ITER": 2, "SOLVER.CHECKPOINT_PERIOD": 100,
                                           "TEST.EVAL_PERIOD": 0, "DATASETS.TEST": "()"})
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "train_net.py"), "--config-file", CONFIG,
                           "--num-gpus", "2", "--dist-url", "auto"] + opts,
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (tmp_path / "model_final.pth").exists()
    # default_setup logs each rank to its own file: rank 1 ran in a world of 2.
    assert "World size: 2" in (tmp_path / "log.txt.rank1").read_text()


def test_a_checkpoint_of_another_depth_stops_fine_tuning_unless_allowed(straight_run, tiny_dataset, tmp_path, caplog):
    """The R-18 run's checkpoint in an R-50 model trained a mostly random backbone with only warnings."""
    over = {"MODEL.WEIGHTS": str(straight_run["out"] / "model_final.pth"), "MODEL.RESNETS.DEPTH": 50,
            "MODEL.RESNETS.RES2_OUT_CHANNELS": 256}
    trainer = Trainer(setup(_args(_opts(tiny_dataset, tmp_path, **over))))
    with pytest.raises(RuntimeError, match=r"Loaded \d+ of \d+ model tensors from .*model_final.pth \(backbone: \d+ of "
                                           r"\d+ tensors, \d+% of its weights\).*Less than 50% of the backbone.*"
                                           r"MODEL.ALLOW_PARTIAL_WEIGHTS True"):
        trainer.resume_or_load(resume=False)
    assert trainer.checkpointer.load_summary.backbone_fraction < 0.5
    trainer.cfg.defrost()
    trainer.cfg.MODEL.ALLOW_PARTIAL_WEIGHTS = True
    trainer.resume_or_load(resume=False)  # asked for: trains from it


def test_eval_only_with_an_empty_weights_file_names_it(tiny_dataset, tmp_path):
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    args = _args(_opts(tiny_dataset, tmp_path, **{"MODEL.WEIGHTS": str(empty)}), eval_only=True)
    with pytest.raises(RuntimeError, match=r"Cannot read the checkpoint .*empty.pth \(0 bytes\)"):
        train_net.main(args)
