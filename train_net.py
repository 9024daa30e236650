#!/usr/bin/env python
"""Fine-tune and evaluate detectron2 Faster / Mask R-CNN on LVIS v1, COCO or an LVIS-format dataset.

    python train_net.py --config-file configs/LVISv1/mask_rcnn_R_50_FPN_2x_drb.yaml --num-gpus 8
    python train_net.py --config-file ... --eval-only MODEL.WEIGHTS output/model_final.pth
    python train_net.py --config-file ... --resume          # continue the run in OUTPUT_DIR

The sampler (uniform / RFS / Dynamic Rebalancing) is DATALOADER.SAMPLER_TRAIN; datasets of your
own are DATASETS.LVIS_CUSTOM [[name, json, image_root], ...].
"""
from detectron2.engine import default_argument_parser
from detectron2.evaluation import verify_results
from detectron2.utils import comm

from drcl_d2.data.checks import check_evaluation_datasets
from drcl_d2.engine import Trainer, launch_from_args, setup
from drcl_d2.engine.checkpoint import AtomicDetectionCheckpointer, require_backbone_loaded


def main(args):
    cfg = setup(args)
    if args.eval_only:
        check_evaluation_datasets(cfg)
        model = Trainer.build_model(cfg)
        checkpointer = AtomicDetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR)
        checkpointer.resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
        require_backbone_loaded(checkpointer.load_summary, cfg.MODEL.ALLOW_PARTIAL_WEIGHTS)
        results = Trainer.test(cfg, model)
        if comm.is_main_process():
            verify_results(cfg, results)
        return results
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


if __name__ == "__main__":
    args = default_argument_parser().parse_args()
    launch_from_args(main, args)
