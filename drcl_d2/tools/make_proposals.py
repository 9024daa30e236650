"""Write a class-agnostic proposals file with a detectron2 model's RPN (2DRCL's box source).

    python -m drcl_d2.tools.make_proposals --config-file CFG --dataset NAME --output proposals.json \
        [--topk 100] [KEY VALUE ...]

The model is built from the config (trailing KEY VALUE pairs override it) with MODEL.WEIGHTS, and
every image of the dataset (detectron2's test loader: test-time resize, none filtered; an unreadable
image is skipped with a warning naming it) goes through the backbone and the class-agnostic RPN
only. Its top-k proposals per image (after its NMS), rescaled to the original image and clipped, are
written as a COCO detection-results list::

    [{"image_id": 1, "bbox": [x, y, w, h], "score": sigmoid(objectness), "category_id": 1}, ...]

which :func:`drcl_d2.data.proposals.load_proposals` reads (INPUT.TWO_VIEW.PROPOSAL_FILES), written
atomically. Runs on CPU when CUDA is absent; single process: run it once per dataset.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time

import torch
from detectron2.data import DatasetCatalog
from detectron2.modeling import build_model
from detectron2.modeling.postprocessing import detector_postprocess
from detectron2.structures import ImageList
from detectron2.utils.logger import setup_logger
from tqdm import tqdm

from ..data.build import build_checked_test_loader
from ..engine.checkpoint import AtomicDetectionCheckpointer
from ..utils import atomic_write_json, load_config

logger = logging.getLogger("drcl_d2.make_proposals")

__all__ = ["main", "generate_proposals"]


@torch.no_grad()
def generate_proposals(cfg, model, dataset_name: str, topk: int) -> list[dict]:
    """Top-k RPN proposals per image of the dataset, in original image pixels (detection results)."""
    if getattr(model, "proposal_generator", None) is None or not hasattr(model, "backbone"):
        raise ValueError(f"MODEL.META_ARCHITECTURE {cfg.MODEL.META_ARCHITECTURE} has no backbone + "
                         "proposal_generator (RPN): make_proposals needs an R-CNN style model")
    loader = build_checked_test_loader(cfg, dataset_name)
    results = []
    for batched_inputs in tqdm(loader, desc=f"proposals {dataset_name}", unit="img", file=sys.stderr):
        if hasattr(model, "preprocess_image"):  # GeneralizedRCNN and relatives
            images = model.preprocess_image(batched_inputs)
        else:  # ProposalNetwork, 2DRCL: the same normalisation (the model's pixel mean / std) and padding
            images = ImageList.from_tensors([(x["image"].to(model.device) - model.pixel_mean) / model.pixel_std
                                             for x in batched_inputs], model.backbone.size_divisibility,
                                            padding_constraints=model.backbone.padding_constraints)
        features = model.backbone(images.tensor)
        proposals, _ = model.proposal_generator(images, features, None)  # eval: no losses
        for inp, props in zip(batched_inputs, proposals):
            # Rescale from the resized input to the original image; clips and drops empty boxes.
            props = detector_postprocess(props, inp["height"], inp["width"])
            logits = props.objectness_logits  # (R,)
            order = torch.argsort(logits, descending=True)[:topk]
            boxes = props.proposal_boxes.tensor[order].cpu()  # (k, 4) XYXY, original pixels
            scores = torch.sigmoid(logits[order]).cpu()  # (k,)
            # class-agnostic: one "object" category
            results += [{"image_id": inp["image_id"], "bbox": [x0, y0, x1 - x0, y1 - y0], "score": s, "category_id": 1}
                        for (x0, y0, x1, y1), s in zip(boxes.tolist(), scores.tolist())]
    return results


def main(argv=None) -> dict:
    """Run the command; returns the summary {"images", "boxes", "mean_boxes_per_image", ...}."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True, metavar="FILE", help="detectron2 config (yaml)")
    parser.add_argument("--dataset", required=True, help="registered dataset name (e.g. from DATASETS.LVIS_CUSTOM)")
    parser.add_argument("--output", required=True, help="proposals json to write")
    parser.add_argument("--topk", type=int, default=100, help="proposals kept per image (default 100)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, default=[], help="config overrides: KEY VALUE ...")
    args = parser.parse_args(argv)
    if args.topk < 1:
        parser.error(f"--topk must be >= 1, got {args.topk}")
    setup_logger(name="drcl_d2")
    cfg = load_config(args.config_file, args.opts, register_datasets=True)
    if args.dataset not in DatasetCatalog.list():
        raise ValueError(f"dataset {args.dataset!r} is not registered (DATASETS.LVIS_CUSTOM names it?)")
    num_images = len(DatasetCatalog.get(args.dataset))

    model = build_model(cfg).eval()
    if not cfg.MODEL.WEIGHTS:
        logger.warning("MODEL.WEIGHTS is empty: proposals come from an untrained RPN")
    AtomicDetectionCheckpointer(model).load(cfg.MODEL.WEIGHTS)  # errors name the file; logs how much it set

    start = time.perf_counter()
    results = generate_proposals(cfg, model, args.dataset, args.topk)
    elapsed = time.perf_counter() - start
    atomic_write_json(results, args.output)

    with_boxes = len({r["image_id"] for r in results})
    summary = {"images": num_images, "images_with_boxes": with_boxes, "boxes": len(results),
               "mean_boxes_per_image": len(results) / max(num_images, 1), "seconds": elapsed, "output": args.output}
    print(f"make_proposals: {num_images} images ({with_boxes} with boxes), {len(results)} boxes, "
          f"{summary['mean_boxes_per_image']:.1f} per image, {elapsed:.1f} s -> {args.output}")
    return summary


if __name__ == "__main__":
    main()
