"""The fine-tuning trainer: detectron2's DefaultTrainer with drcl_d2's data pipeline.

What differs from DefaultTrainer, and why:
- the training json is parsed first (once per process), then check_inputs: what the run would
  otherwise trip over late (missing images, NUM_CLASSES against the datasets, masks against the
  mask head, what the evaluation after training needs, RoI heads that would ignore
  ROI_BOX_HEAD.CLS_LOSS) is checked before the model is built (drcl_d2.data.checks);
- build_train_loader: the LVIS pipeline (checked mapper + uniform / RFS / DRB sampler by name),
  every sampler resuming at the trainer's iteration;
- build_test_loader: detectron2's, with the checked mapper: an unusable test image is skipped with a
  warning naming file and image id (detectron2's would stop the evaluation after training);
- build_evaluator: LVISEvaluator or COCOEvaluator, picked from the dataset's metadata;
- checkpoints are written atomically (stale temporaries of a crashed write removed at start-up);
  loading MODEL.WEIGHTS says how much of the model it set, and stops when it set less than half
  of the backbone (unless MODEL.ALLOW_PARTIAL_WEIGHTS);
- TrainingSamplerHook keeps the sampler on the trainer's iteration and logs Dynamic Rebalancing;
- StopOnRequestHook checkpoints and stops between steps when the SLURM launcher is signalled;
- SOLVER.ACCUM_STEPS > 1: gradient accumulation (drcl_d2.engine.accumulate);
- DDP without device_ids on CPU, so `--num-gpus 2` runs as 2 gloo processes (tests do this).
"""
from __future__ import annotations

import contextvars
import logging
import os
import weakref

from detectron2.engine import AMPTrainer, DefaultTrainer, SimpleTrainer, TrainerBase, default_setup, launch
from detectron2.engine.defaults import create_ddp_model
from detectron2.evaluation import COCOEvaluator, LVISEvaluator
from detectron2.data import MetadataCatalog
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from ..data.build import build_checked_test_loader, build_lvis_train_loader, build_train_dataset, micro_batch_size
from ..data.checks import check_evaluation_datasets, check_num_classes, check_training_dicts
from ..data.datasets import FREQUENCIES, check_lvis_frequencies, ensure_dataset_metadata
from ..modeling.box_predictor import check_roi_heads_read_cls_loss, provide_class_image_counts
from ..utils import load_config
from .accumulate import AccumulatingTrainer
from .checkpoint import AtomicDetectionCheckpointer, require_backbone_loaded
from .hooks import TrainingSamplerHook, StopOnRequestHook, find_train_sampler

__all__ = ["Trainer", "setup", "launch_from_args", "build_evaluator", "ddp_device_ids"]

# (cfg, training dicts) while Trainer.__init__ builds its loader: see Trainer.prebuilt_train_dataset.
_PREBUILT_TRAIN_DATASET: contextvars.ContextVar = contextvars.ContextVar("drcl_prebuilt_train_dataset", default=None)


def ddp_device_ids(cfg):
    """DDP's device_ids: the local GPU, or None for CPU processes (gloo)."""
    return None if cfg.MODEL.DEVICE == "cpu" else [comm.get_local_rank()]


def build_evaluator(cfg, dataset_name: str, output_folder: str | None = None):
    """LVISEvaluator for LVIS-format datasets, COCOEvaluator for COCO ones (by metadata)."""
    if output_folder is None:
        output_folder = os.path.join(cfg.OUTPUT_DIR, "inference")
    ensure_dataset_metadata(dataset_name)
    meta = MetadataCatalog.get(dataset_name)
    evaluator_type = getattr(meta, "evaluator_type", None)
    if evaluator_type == "lvis":
        if any(f not in FREQUENCIES for f in getattr(meta, "category_frequencies", None) or ()):
            check_lvis_frequencies(meta.json_file)  # raises, naming the file and categories
        tasks = ("bbox", "segm") if cfg.MODEL.MASK_ON else ("bbox",)
        return LVISEvaluator(dataset_name, tasks=tasks, output_dir=output_folder,
                             max_dets_per_image=cfg.TEST.DETECTIONS_PER_IMAGE)
    if evaluator_type == "coco":
        return COCOEvaluator(dataset_name, output_dir=output_folder,
                             max_dets_per_image=cfg.TEST.DETECTIONS_PER_IMAGE)
    raise NotImplementedError(
        f"No evaluator for dataset {dataset_name!r} (evaluator_type={evaluator_type!r}); "
        "drcl_d2 evaluates LVIS- and COCO-format datasets"
    )


class Trainer(DefaultTrainer):
    def __init__(self, cfg):
        TrainerBase.__init__(self)
        if not logging.getLogger("detectron2").isEnabledFor(logging.INFO):
            setup_logger()
        cfg = DefaultTrainer.auto_scale_workers(cfg, comm.get_world_size())
        micro_batch_size(cfg)  # SOLVER.ACCUM_STEPS fits IMS_PER_BATCH and the process count
        # The training json is parsed once, here, before the model is built: what the data can get
        # wrong (missing images, categories, masks) stops the run in seconds, not after the build.
        train_dataset = self.build_train_dataset(cfg)
        self.check_inputs(cfg)
        model = self.build_model(cfg)
        provide_class_image_counts(model, train_dataset, cfg.MODEL.ROI_HEADS.NUM_CLASSES)  # federated, ECM
        optimizer = self.build_optimizer(cfg, model)
        # detectron2's signature build_train_loader(cfg) stays (subclasses override it); the list
        # parsed above is handed over instead of parsing the json a second time.
        token = _PREBUILT_TRAIN_DATASET.set((cfg, train_dataset))
        try:
            data_loader = self.build_train_loader(cfg)
        finally:
            _PREBUILT_TRAIN_DATASET.reset(token)
        model = create_ddp_model(
            model, broadcast_buffers=False, device_ids=ddp_device_ids(cfg),
            # A pretraining model with a loss term switched off leaves that term's modules unused.
            find_unused_parameters=bool(getattr(model, "has_unused_parameters", False)),
        )
        if cfg.SOLVER.ACCUM_STEPS > 1:
            self._trainer = AccumulatingTrainer(model, data_loader, optimizer, cfg.SOLVER.ACCUM_STEPS,
                                                amp=cfg.SOLVER.AMP.ENABLED)
        else:
            self._trainer = (AMPTrainer if cfg.SOLVER.AMP.ENABLED else SimpleTrainer)(model, data_loader, optimizer)
        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        self.checkpointer = AtomicDetectionCheckpointer(model, cfg.OUTPUT_DIR, trainer=weakref.proxy(self))
        self.checkpointer.remove_stale_temporaries()  # main process only (save_to_disk)
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        self.register_hooks(self.build_hooks())
        # Last, in both trainers: a stop request (SLURM's USR2) ends training between steps.
        self.register_hooks([StopOnRequestHook(self.checkpointer)])

    def build_hooks(self):
        hooks = super().build_hooks()
        # First, so the sampler knows the start iteration before anything touches the loader.
        hooks.insert(0, TrainingSamplerHook(find_train_sampler(self.data_loader), self.cfg.SOLVER.IMS_PER_BATCH))
        return hooks

    def load_state_dict(self, state_dict):
        hooks = state_dict.get("hooks", {})
        if "RebalanceHook" in hooks:  # the hook's name in checkpoints written before its rename
            hooks["TrainingSamplerHook"] = hooks.pop("RebalanceHook")
        super().load_state_dict(state_dict)

    def resume_or_load(self, resume=True):
        resuming = resume and self.checkpointer.has_checkpoint()
        super().resume_or_load(resume=resume)
        if not resuming:  # MODEL.WEIGHTS: made for this model?
            require_backbone_loaded(self.checkpointer.load_summary, self.cfg.MODEL.ALLOW_PARTIAL_WEIGHTS)

    @classmethod
    def check_inputs(cls, cfg):
        """Config against datasets, before the model is built (after build_train_dataset, whose parse
        recorded the training datasets' metadata)."""
        check_num_classes(cfg, cfg.DATASETS.TRAIN, "DATASETS.TRAIN")
        check_evaluation_datasets(cfg)
        check_roi_heads_read_cls_loss(cfg)

    @classmethod
    def build_train_dataset(cls, cfg) -> list[dict]:
        """DATASETS.TRAIN's dicts as the loader will use them (one parse per json), checked."""
        dataset = build_train_dataset(cfg)
        check_training_dicts(cfg, dataset)
        return dataset

    @classmethod
    def build_train_loader(cls, cfg):
        return build_lvis_train_loader(cfg, dataset=cls.prebuilt_train_dataset(cfg))

    @classmethod
    def prebuilt_train_dataset(cls, cfg) -> list[dict]:
        """The list the trainer built (and checked) at its start for this cfg, else a new one."""
        prebuilt = _PREBUILT_TRAIN_DATASET.get()
        if prebuilt is not None and prebuilt[0] is cfg:
            return prebuilt[1]
        return cls.build_train_dataset(cfg)

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        return build_checked_test_loader(cfg, dataset_name)

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        return build_evaluator(cfg, dataset_name, output_folder)


def launch_from_args(main, args) -> None:
    """Run ``main(args)`` in args.num_gpus processes on each of args.num_machines machines
    (detectron2's launch; the arguments of default_argument_parser)."""
    print("Command Line Args:", args)
    launch(main, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
           dist_url=args.dist_url, args=(args,))


def setup(args):
    """The config of default_argument_parser's args (utils.load_config: file + opts, drcl_d2's datasets
    registered, not read), frozen; then detectron2's default_setup, and drcl_d2's logger beside it."""
    cfg = load_config(args.config_file, args.opts, register_datasets=True)
    cfg.freeze()
    default_setup(cfg, args)  # detectron2's and fvcore's loggers: stdout and OUTPUT_DIR/log.txt
    # drcl_d2's own lines (datasets loaded, sampler, Dynamic Rebalancing, health) go to the same places.
    # Propagated: records also reach the root logger's handlers (an application's own logging,
    # pytest's caplog); scripts leave the root without handlers. The full name is kept: an
    # abbreviation would rename the records themselves (detectron2's formatter edits record.name).
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="drcl_d2", enable_propagation=True)
    return cfg
