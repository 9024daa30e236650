"""Every configuration key drcl_d2 adds to detectron2's, with its default.

``add_drcl_config(cfg)`` is called once, right after ``get_cfg()``, as detectron2 projects do.
Keys marked "(choice)" are values the papers do not give; they are ours (see README).
"""
from detectron2.config import CfgNode as CN


def add_drcl_config(cfg: CN) -> CN:
    """Add drcl_d2's keys to a detectron2 config (in place) and return it."""
    _add_dataset_config(cfg)
    _add_rebalance_config(cfg)
    return cfg


def _add_dataset_config(cfg: CN) -> None:
    # LVIS-format datasets registered from the config, without code: a list of
    # [name, json_file, image_root] triples. DATASETS.TRAIN / TEST can then name them.
    cfg.DATASETS.LVIS_CUSTOM = []
    # How an image path is built for LVIS_CUSTOM datasets: "auto" uses the image's `file_name`
    # when it has one, else the last folder of `coco_url` (as detectron2 does for LVIS v1).
    cfg.DATASETS.LVIS_CUSTOM_PATH_RULE = "auto"


def _add_rebalance_config(cfg: CN) -> None:
    # DATALOADER.SAMPLER_TRAIN also accepts "DynamicRepeatFactorTrainingSampler" (Dynamic
    # Rebalancing, 2DRCL). It shares DATALOADER.REPEAT_THRESHOLD (t; LVIS standard 0.001) with RFS.
    cfg.DATALOADER.DRB = CN()
    # f_in(c): "fraction_of_instances" = instances of c / all instances (choice), or
    # "instances_per_image" = instances of c / number of images.
    cfg.DATALOADER.DRB.INSTANCE_FREQUENCY = "fraction_of_instances"
    # Repeat factors are recomputed every PERIOD iterations, at alpha_d = T / T_max (choice: 500).
    cfg.DATALOADER.DRB.PERIOD = 500
    # T_max of alpha_d = T / T_max; 0 means SOLVER.MAX_ITER (choice: iterations).
    cfg.DATALOADER.DRB.MAX_ITER = 0
