#!/usr/bin/env python
"""Pretrain a detector (2DRCL) or a backbone (DetCo, MoCo v2) with detectron2's engine.

    python pretrain_net.py --config-file configs/pretrain/drcl_R_50_FPN_1x_lvis.yaml --num-gpus 8
    python pretrain_net.py --config-file ... --resume        # continue exactly where it stopped
    python pretrain_net.py --config-file ... --num-machines 2 --machine-rank 0 --dist-url tcp://host:port

The meta-architecture (MODEL.META_ARCHITECTURE: DRCL, DetCo) picks its own inputs; the sampler
(uniform / RFS / Dynamic Rebalancing) is DATALOADER.SAMPLER_TRAIN. Checkpoints in OUTPUT_DIR hold
everything needed to resume; `drcl-convert` turns them into detectron2 detector weights.
"""
from detectron2.engine import default_argument_parser

import drcl_d2.modeling  # noqa: F401  (registers the pretraining meta-architectures)
from drcl_d2.engine.pretrain import PretrainTrainer
from drcl_d2.engine.trainer import launch_from_args, setup


def main(args):
    cfg = setup(args)
    trainer = PretrainTrainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


if __name__ == "__main__":
    args = default_argument_parser().parse_args()
    if args.eval_only:
        raise SystemExit("pretrain_net.py has no --eval-only: convert the checkpoint (drcl-convert) and "
                         "evaluate the detector with train_net.py")
    launch_from_args(main, args)
