"""Every configuration key drcl_d2 adds to detectron2's, with its default.

``add_drcl_config(cfg)`` is called once, right after ``get_cfg()``, as detectron2 projects do.
Keys marked "(choice)" are values the papers do not give; they are ours (see README).
"""
from detectron2.config import CfgNode as CN


def add_drcl_config(cfg: CN) -> CN:
    """Add drcl_d2's keys to a detectron2 config (in place) and return it."""
    _add_dataset_config(cfg)
    _add_checkpoint_config(cfg)
    _add_rebalance_config(cfg)
    _add_two_view_config(cfg)
    _add_pretrain_config(cfg)
    _add_drcl_model_config(cfg)
    _add_detco_config(cfg)
    _add_cls_loss_config(cfg)
    return cfg


def _add_dataset_config(cfg: CN) -> None:
    # LVIS-format datasets registered from the config, without code: a list of
    # [name, json_file, image_root] triples. DATASETS.TRAIN / TEST can then name them.
    cfg.DATASETS.LVIS_CUSTOM = []
    # How an image path is built for LVIS_CUSTOM datasets: "auto" uses the image's `file_name`
    # when it has one, else the last folder of `coco_url` (as detectron2 does for LVIS v1).
    cfg.DATASETS.LVIS_CUSTOM_PATH_RULE = "auto"
    # Whether loading an LVIS_CUSTOM json checks that every image file exists (an error naming the
    # first missing ones, before the model is built). Done once per machine; turn it off where
    # stat-ing every file is slow (network storage) and let the mapper skip unreadable images.
    cfg.DATASETS.CHECK_IMAGE_FILES = True


def _add_checkpoint_config(cfg: CN) -> None:
    # train_net.py stops when MODEL.WEIGHTS initialises less than half of the backbone's weights
    # (shapes or names that do not fit: an R-18 file in an R-50 model, an unconverted pretraining
    # checkpoint). True trains from such a file anyway (the load summary line still says how much).
    cfg.MODEL.ALLOW_PARTIAL_WEIGHTS = False
    # Gradient accumulation (drcl_d2.engine.accumulate): each optimizer step of SOLVER.IMS_PER_BATCH
    # images runs ACCUM_STEPS forward/backward passes of IMS_PER_BATCH / ACCUM_STEPS images.
    cfg.SOLVER.ACCUM_STEPS = 1


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


def _add_two_view_config(cfg: CN) -> None:
    """Two augmented views of one image with a shared box set (2DRCL pretraining data)."""
    cfg.INPUT.TWO_VIEW = CN()
    # Boxes per image per iteration, drawn at random from the source (paper: 8).
    cfg.INPUT.TWO_VIEW.NUM_BOXES = 8
    # "proposals": a class-agnostic detector's boxes from PROPOSAL_FILES (paper);
    # "gt": the dataset's ground-truth boxes used class-agnostically; "random": random boxes.
    cfg.INPUT.TWO_VIEW.BOX_SOURCE = "gt"
    # One COCO/LVIS-json proposals file per dataset of DATASETS.TRAIN (tools/make_proposals.py).
    cfg.INPUT.TWO_VIEW.PROPOSAL_FILES = ()
    # Each view: ResizeShortestEdge(INPUT.MIN_SIZE_TRAIN, MAX_SIZE_TRAIN), then a random crop
    # covering this range of the resized image's area (choice), then a horizontal flip (p=0.5).
    cfg.INPUT.TWO_VIEW.CROP_AREA = (0.5, 1.0)
    # A box "leaves" a view when less than this fraction of its area stays inside (choice);
    # it is then dropped from both views.
    cfg.INPUT.TWO_VIEW.MIN_VISIBLE = 0.5
    # Boxes smaller than this (pixels, either side, in a view) are dropped too (choice).
    cfg.INPUT.TWO_VIEW.MIN_BOX_SIZE = 8
    # Random boxes ("random" source): side lengths as a fraction of the image side (choice).
    cfg.INPUT.TWO_VIEW.RANDOM_BOX_SIDE = (0.1, 0.5)
    # MoCo v2 / BYOL photometric augmentation, per view [view1, view2] where two values are given.
    cfg.INPUT.TWO_VIEW.COLOR_JITTER = (0.4, 0.4, 0.2, 0.1)  # brightness, contrast, saturation, hue
    cfg.INPUT.TWO_VIEW.COLOR_JITTER_PROB = 0.8
    cfg.INPUT.TWO_VIEW.GRAYSCALE_PROB = 0.2
    cfg.INPUT.TWO_VIEW.BLUR_PROB = (1.0, 0.1)  # BYOL's asymmetric blur (choice)
    cfg.INPUT.TWO_VIEW.BLUR_SIGMA = (0.1, 2.0)
    cfg.INPUT.TWO_VIEW.SOLARIZE_PROB = (0.0, 0.2)  # BYOL's asymmetric solarisation (choice)
    # Crops tried per image before it is skipped because no box survives both views.
    cfg.INPUT.TWO_VIEW.MAX_ATTEMPTS = 10


def _add_pretrain_config(cfg: CN) -> None:
    """Keys shared by all pretraining meta-architectures (pretrain_net.py)."""
    cfg.PRETRAIN = CN()
    # An image whose mapper returns nothing usable (unreadable, no box survives the crops) is
    # replaced by another one drawn from the same seeded rng; this many failures in a row stop
    # training with an error.
    cfg.PRETRAIN.MAX_RETRIES = 20
    # Iterations between metric prints / metrics.json lines.
    cfg.PRETRAIN.LOG_PERIOD = 20
    # torch.compile the model's encoders / backbones and decoder (model.compile_step) on a GPU; on
    # CPU, or without Triton, a warning and the eager model. Off: the step is launch-bound (SPEC §7).
    cfg.PRETRAIN.COMPILE = False
    # torch.compile's mode: "default", or "reduce-overhead" (CUDA Graphs) / "max-autotune".
    cfg.PRETRAIN.COMPILE_MODE = "default"


def _add_drcl_model_config(cfg: CN) -> None:
    """2DRCL meta-architecture (drcl_d2.modeling.drcl.DRCL)."""
    cfg.MODEL.DRCL = CN()
    # Loss weights; 0 switches a term off (the paper's ablation rows are configs of these).
    cfg.MODEL.DRCL.HCL_WEIGHT = 1.0
    cfg.MODEL.DRCL.LCL_WEIGHT = 1.0
    cfg.MODEL.DRCL.AR_WEIGHT = 1.0
    cfg.MODEL.DRCL.SR_WEIGHT = 1.0
    cfg.MODEL.DRCL.RPN_WEIGHT = 1.0  # RPN trained on the boxes, class-agnostic (as AlignDet)
    # InfoNCE temperature (choice) and queue lengths (choice).
    cfg.MODEL.DRCL.TEMPERATURE = 0.2
    cfg.MODEL.DRCL.HCL_QUEUE_SIZE = 16384
    cfg.MODEL.DRCL.LCL_QUEUE_SIZE = 65536
    # Projection / prediction MLPs (paper): Linear(->HIDDEN), BN, ReLU, Linear(->DIM).
    cfg.MODEL.DRCL.MLP_HIDDEN_DIM = 256
    cfg.MODEL.DRCL.EMBED_DIM = 256
    # FPN level whose global average pool is the holistic embedding (choice: p5, the top level
    # with its own convolutions; p6 is only a subsampled p5).
    cfg.MODEL.DRCL.HCL_IN_FEATURE = "p5"
    # Target network EMA momentum: BASE rising to 1.0 on a cosine over training (choice, AlignDet).
    cfg.MODEL.DRCL.MOMENTUM = 0.996
    # Appearance reconstruction: decoder output stride (choice) and width.
    cfg.MODEL.DRCL.DECODER_STRIDE = 4
    cfg.MODEL.DRCL.DECODER_DIM = 128
    # Norm before the decoder's ReLU (choice: "GN"; "" is the earlier unnormalised block, whose
    # ReLUs all died within tens of iterations, SPEC §7).
    cfg.MODEL.DRCL.DECODER_NORM = "GN"
    # Semantic reconstruction: masked patches of the reconstruction (choice: 32 px, ratio 0.5),
    # compared with the target's maps on these FPN levels (choice: all of them).
    cfg.MODEL.DRCL.SR_PATCH_SIZE = 32
    cfg.MODEL.DRCL.SR_MASK_RATIO = 0.5
    cfg.MODEL.DRCL.SR_IN_FEATURES = ["p2", "p3", "p4", "p5", "p6"]
    # How SR normalises the maps it compares (choice): "spatial" standardises every channel over
    # space (instance norm), so a per-channel offset or a rescale of the FPN cannot lower SR;
    # "channel" is L2 over channels per position, which a per-channel offset satisfies (SPEC §7).
    cfg.MODEL.DRCL.SR_NORM = "spatial"
    # Queue keys carry their image id; keys of the query's own image are never negatives (HCL and
    # LCL). DRB repeats rare images, so without this up to a third of their queries meet themselves.
    cfg.MODEL.DRCL.EXCLUDE_SAME_IMAGE = True
    # Iterations between health measurements logged under health/ (decoder active share,
    # reconstruction-input correlation, offset-free SR, FPN std per level, fc7 norm, queue
    # self-negative rate); -1: PRETRAIN.LOG_PERIOD, 0: off.
    cfg.MODEL.DRCL.HEALTH_PERIOD = -1


def _add_detco_config(cfg: CN) -> None:
    """DetCo / MoCo v2 meta-architecture (drcl_d2.modeling.detco.DetCo) and its views (data.detco_views)."""
    # Unlabeled image folders [[name, folder], ...]: every image file under folder, no annotations.
    cfg.DATASETS.IMAGE_FOLDERS = []

    cfg.MODEL.DETCO = CN()
    # Encoder levels with their own heads, queues and losses (paper: res2..res5; MoCo v2: res5).
    cfg.MODEL.DETCO.LEVELS = ["res2", "res3", "res4", "res5"]
    # Loss weight w_i per level, in LEVELS order (choice: 0.1, 0.4, 0.7, 1.0, widely cited).
    cfg.MODEL.DETCO.LEVEL_WEIGHTS = [0.1, 0.4, 0.7, 1.0]
    # Local jigsaw branch with the l<->l and g<->l terms (paper: on; off = MoCo v2).
    cfg.MODEL.DETCO.LOCAL = True
    # Output width of every head (paper: 128).
    cfg.MODEL.DETCO.EMBED_DIM = 128
    # Hidden width of the local heads, 0 = the level's channels C (choice: C).
    cfg.MODEL.DETCO.LOCAL_HIDDEN_DIM = 0
    # Keys per queue; one global and one local queue per level (paper: 65536).
    cfg.MODEL.DETCO.QUEUE_SIZE = 65536
    # InfoNCE temperature tau (paper: 0.2, MoCo v2).
    cfg.MODEL.DETCO.TEMPERATURE = 0.2
    # Key encoder momentum m, applied before the keys are computed (paper: 0.999).
    cfg.MODEL.DETCO.MOMENTUM = 0.999
    # Shuffle BN across ranks for the key encoder (paper, MoCo); off only with SyncBN.
    cfg.MODEL.DETCO.SHUFFLE_BN = True

    cfg.INPUT.DETCO = CN()
    # Side of the two global views after RandomResizedCrop (paper: 224).
    cfg.INPUT.DETCO.VIEW_SIZE = 224
    # Area range of the global views' RandomResizedCrop (paper: 0.2-1).
    cfg.INPUT.DETCO.VIEW_SCALE = (0.2, 1.0)
    # Area range of the crop each jigsaw patch set is cut from (paper: >= 60 %).
    cfg.INPUT.DETCO.PATCH_CROP_SCALE = (0.6, 1.0)
    # Side the patch-set crop is resized to; must be 3 x CELL_SIZE (paper: 255).
    cfg.INPUT.DETCO.PATCH_CANVAS_SIZE = 255
    # Side of each of the 3x3 grid cells (paper: 85).
    cfg.INPUT.DETCO.CELL_SIZE = 85
    # Side of the random crop taken in each cell (paper: 64).
    cfg.INPUT.DETCO.PATCH_SIZE = 64
    # Colour jitter strengths (brightness, contrast, saturation, hue) (paper, MoCo v2).
    cfg.INPUT.DETCO.COLOR_JITTER = (0.4, 0.4, 0.4, 0.1)
    # Probability of the colour jitter (paper: 0.8).
    cfg.INPUT.DETCO.COLOR_JITTER_PROB = 0.8
    # Probability of grayscale (paper: 0.2).
    cfg.INPUT.DETCO.GRAYSCALE_PROB = 0.2
    # Probability of Gaussian blur (paper: 0.5).
    cfg.INPUT.DETCO.BLUR_PROB = 0.5
    # Gaussian blur sigma range (paper: 0.1-2).
    cfg.INPUT.DETCO.BLUR_SIGMA = (0.1, 2.0)
    # Probability of a horizontal flip (paper: 0.5).
    cfg.INPUT.DETCO.FLIP_PROB = 0.5
    # RandAugment ops per global view, 0 = off (choice: off here; the DetCo configs set 2).
    cfg.INPUT.DETCO.RANDAUGMENT_NUM_OPS = 0
    # RandAugment magnitude out of 30 (choice: 9, torchvision's default).
    cfg.INPUT.DETCO.RANDAUGMENT_MAGNITUDE = 9


def _add_cls_loss_config(cfg: CN) -> None:
    """The box predictor's classification loss (drcl_d2.modeling.box_predictor); the RoI heads
    LongTailROIHeads / LongTailCascadeROIHeads read it."""
    # softmax_ce (detectron2's default), sigmoid_bce, federated (detectron2's own, sampling weights
    # from the training set's image counts; keys FED_LOSS_FREQ_WEIGHT_POWER, FED_LOSS_NUM_CLASSES),
    # eqlv2, seesaw, ecm.
    cfg.MODEL.ROI_BOX_HEAD.CLS_LOSS = "softmax_ce"
    # EQLv2 (paper): r_j = 1 / (1 + exp(-GAMMA (g_j - MU))), q_j = 1 + ALPHA (1 - r_j).
    cfg.MODEL.ROI_BOX_HEAD.EQLV2 = CN()
    cfg.MODEL.ROI_BOX_HEAD.EQLV2.GAMMA = 12.0
    cfg.MODEL.ROI_BOX_HEAD.EQLV2.MU = 0.8
    cfg.MODEL.ROI_BOX_HEAD.EQLV2.ALPHA = 4.0
    # Seesaw (paper): mitigation (n_j / n_y)^P, compensation (σ_j / σ_y)^Q, σ_y floored at EPS.
    cfg.MODEL.ROI_BOX_HEAD.SEESAW = CN()
    cfg.MODEL.ROI_BOX_HEAD.SEESAW.P = 0.8
    cfg.MODEL.ROI_BOX_HEAD.SEESAW.Q = 2.0
    cfg.MODEL.ROI_BOX_HEAD.SEESAW.EPS = 0.01
    # The cosine (normalised linear) classifier of Seesaw's LVIS models, logits scaled by SCALE.
    cfg.MODEL.ROI_BOX_HEAD.SEESAW.NORMED_LINEAR = True
    cfg.MODEL.ROI_BOX_HEAD.SEESAW.SCALE = 20.0
    # ECM (paper): background "image count" = FG_BG_RATIO x the classes' total, the empirical
    # foreground/background ratio of Mask R-CNN's sampled RoIs given by its authors.
    cfg.MODEL.ROI_BOX_HEAD.ECM = CN()
    cfg.MODEL.ROI_BOX_HEAD.ECM.FG_BG_RATIO = 6.3313
