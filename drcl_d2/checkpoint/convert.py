"""Convert a pretraining checkpoint into weights that detectron2's DetectionCheckpointer loads into
Faster R-CNN / Mask R-CNN (FPN and C4, R-50 and R-101).

Sources (--source, detected by default from the file's "drcl_d2" metadata or its key names):
  drcl         2DRCL checkpoint of drcl_d2: transfers the online ResNet, FPN, RPN head and RoI box head;
               never the EMA target, projection/prediction heads, decoder, queues or box predictor.
  detco        DetCo / MoCo v2 checkpoint of drcl_d2: transfers the query ResNet (encoder_q.*).
  moco         official MoCo / MoCo v2 checkpoint: transfers module.encoder_q.* without its fc head.
  torchvision  torchvision ResNet state dict (bare or under "state_dict" / "model").

OUTPUT (.pkl) holds {"model": {name: array}, "__author__": "drcl_d2", "matching_heuristics": True}:
detectron2 matches names by suffix, so the ResNet gets short names (stem.*, res2.* ... res5.*) that fit
FPN (backbone.bottom_up.*) and C4 (backbone.res2-4, roi_heads.res5) detectors; FPN / RPN / box-head
tensors keep their full names. OUTPUT is replaced atomically, only on success; INPUT is only read. The
report lists per module the transferred, dropped and (with --target-config) missing keys. Exit status
1 when the input is unknown or unreadable, nothing transfers, or the output does not fit the target.

--target-config (a yaml path or a detectron2 model-zoo name) builds that detector on CPU, loads the
output into it with DetectionCheckpointer before OUTPUT is replaced, and checks every transferred
tensor at its destination. It then measures the transfer scale (drcl_d2.checkpoint.scale) against the
same detector freshly initialised, on --scale-images test-time-resized images of the config's
DATASETS.TEST[0] (else TRAIN[0]; or --scale-dataset): FPN std per level, box-head (fc7) norm,
fresh-classifier logits, RPN objectness. Scales outside the goals are warnings (exit status still 0);
the numbers go to OUTPUT.scale.json.

examples:
  drcl-convert output/pretrain_drcl/model_final.pth drcl_r50.pkl \\
      --target-config COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml
  drcl-convert output/pretrain_detco/model_final.pth detco_r50.pkl      # FPN or C4 detectors
  drcl-convert moco_v2_800ep_pretrain.pth.tar moco_v2_r50.pkl --source moco \\
      --target-config COCO-Detection/faster_rcnn_R_50_C4_1x.yaml --opts MODEL.RESNETS.STRIDE_IN_1X1 False ...

then fine-tune with MODEL.WEIGHTS drcl_r50.pkl. torchvision and MoCo weights come from a torchvision
ResNet (stride in the 3x3 conv, RGB input, torchvision normalisation): the fine-tuning config must set
  MODEL.RESNETS.STRIDE_IN_1X1 False   INPUT.FORMAT RGB
  MODEL.PIXEL_MEAN [123.675, 116.28, 103.53]   MODEL.PIXEL_STD [58.395, 57.12, 57.375]
"""
from __future__ import annotations

import argparse
import logging
import os
import pickle
import sys
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
from detectron2.modeling import build_model
from fvcore.common.checkpoint import get_missing_parameters_message
from tabulate import tabulate

from ..engine.checkpoint import AtomicDetectionCheckpointer, quiet_checkpoint_logs
from ..utils import atomic_write, load_config
from .scale import report_transfer_scale
from .sources import (DRCL_KEEP, KNOWN_SOURCES, MODULES, RESNET_DEPTHS, SOURCES, ConversionError, describe,
                      detect_source, find_state_dict, preview, renames, resnet_layout, strip_module_prefix)

__all__ = ["ConversionError", "ConversionReport", "convert_checkpoint", "detect_source", "load_checkpoint_file", "main"]

# The pixel statistics torchvision's ImageNet ResNets were trained with (RGB, 0-255 scale).
TORCHVISION_PIXEL_MEAN = (123.675, 116.28, 103.53)
TORCHVISION_PIXEL_STD = (58.395, 57.12, 57.375)


@dataclass
class ConversionReport:
    """What a conversion moved, per module (:data:`MODULES`): ``transferred`` the names written,
    ``dropped`` the input's names left out (``dropped_groups``: label -> (count, reason)); with a target
    model (``verified``) ``missing`` its keys that received nothing, ``loaded`` written name -> its key."""

    input_path: str
    output_path: str
    source: str = ""
    detected_by: str = ""
    depth: Optional[int] = None
    blocks: Optional[tuple] = None
    transferred: Dict[str, List[str]] = field(default_factory=lambda: {m: [] for m in MODULES})
    dropped: Dict[str, List[str]] = field(default_factory=lambda: {m: [] for m in MODULES})
    dropped_groups: Dict[str, tuple] = field(default_factory=dict)
    missing: Dict[str, List[str]] = field(default_factory=dict)
    loaded: Dict[str, str] = field(default_factory=dict)
    verified: bool = False
    target: str = ""
    written: bool = False
    notes: List[str] = field(default_factory=list)

    @property
    def num_transferred(self) -> int:
        return sum(len(v) for v in self.transferred.values())

    def format(self) -> str:
        """The report the command prints."""
        lines = [f"input:  {self.input_path}", f"output: {self.output_path}"]
        if self.source:
            lines.append(f"source: {self.source} ({self.detected_by})")
        if self.blocks:
            name = f"ResNet-{self.depth}" if self.depth else "ResNet of unrecognised depth"
            lines.append(f"backbone: {name} (res2..res5 blocks {'-'.join(map(str, self.blocks))})")
        headers = ["module", "transferred", "dropped"] + (["missing in target"] if self.verified else [])
        rows = [[m, len(self.transferred[m]), len(self.dropped[m])] + ([len(self.missing[m])] if self.verified else [])
                for m in MODULES]
        rows.append(["total"] + [sum(r[i] for r in rows) for i in range(1, len(headers))])
        lines += ["", tabulate(rows, headers=headers, tablefmt="simple")]
        if self.dropped_groups:
            width = max(len(p) for p in self.dropped_groups)
            lines += ["", "dropped (never transferred):"] + [
                f"  {label:<{width}}  {count:>5} keys  {reason}" for label, (count, reason) in sorted(self.dropped_groups.items())]
        if self.verified:
            unchanged = ", all unchanged" if len(self.loaded) == self.num_transferred else f" of {self.num_transferred}"
            lines += ["", f"target: {self.target}", f"  {len(self.loaded)} tensors loaded by DetectionCheckpointer{unchanged}"]
            missing = [k for keys in self.missing.values() for k in keys]
            if missing:  # fvcore's grouping; they keep their initialisation
                lines.append("  " + get_missing_parameters_message(missing).replace("\n", "\n    "))
        if self.notes:
            lines += ["", "notes:"] + [f"  - {n}" for n in self.notes]
        if self.written:
            lines += ["", f"wrote {self.output_path} ({self.num_transferred} tensors, matched by name suffix)"]
        return "\n".join(lines)


def load_checkpoint_file(path: str) -> Any:
    """A checkpoint, read as detectron2 reads weights: ``.pkl`` as a pickle, anything else with torch.load
    (``weights_only=True`` first, then fully unpickled when it holds other objects): only convert files you trust."""
    if not os.path.isfile(path):
        raise ConversionError(f"{path}: no such file")
    try:
        if path.endswith(".pkl"):
            with open(path, "rb") as f:
                return pickle.load(f, encoding="latin1")
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            logging.getLogger(__name__).warning("%s holds Python objects besides tensors: unpickling it fully", path)
            return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - any failure to read means "unreadable"
        raise ConversionError(f"{path}: could not be read ({os.path.getsize(path)} bytes; truncated or corrupt?): "
                              f"{type(e).__name__}: {e}") from e


def _model_key_module(key: str) -> str:
    """The report row of a detector's state-dict key."""
    if key.startswith(("backbone.bottom_up.", "backbone.stem.", "backbone.res", "roi_heads.res5.")):
        return "backbone"
    return next((m for p, m in DRCL_KEEP if key.startswith(p)), "other")


def _check_depth(report: ConversionReport, model: torch.nn.Module, cfg) -> None:
    """Refuse a ResNet whose blocks per stage differ from the target's, before anything loads."""
    # A C4 model keeps res5 in its RoI head, an FPN model in its backbone: both are counted.
    model_blocks, _ = resnet_layout(k for k in model.state_dict() if _model_key_module(k) == "backbone")
    if not report.blocks or not model_blocks or report.blocks == model_blocks:
        return
    depth = cfg.MODEL.RESNETS.DEPTH if cfg is not None else RESNET_DEPTHS.get((True, model_blocks))
    stages = ", ".join(
        f"res{s} has {a} blocks in the checkpoint vs {b} in the target ("
        + (f"res{s}.{b}..{a - 1}.* would be unexpected keys" if a > b else f"res{s}.{a}..{b - 1}.* would stay missing") + ")"
        for s, a, b in zip((2, 3, 4, 5), report.blocks, model_blocks) if a != b)
    src = f"ResNet-{report.depth}" if report.depth else "a ResNet"
    fix = f"; use a ResNet-{report.depth} target (MODEL.RESNETS.DEPTH {report.depth})" if report.depth else ""
    dst = f"ResNet-{depth}" if depth else "a ResNet"
    raise ConversionError(f"depth mismatch: the checkpoint holds {src} but the target model is {dst}"
                          f"{f' (MODEL.RESNETS.DEPTH {depth})' if cfg is not None else ''}: {stages}{fix}", report)


def _torchvision_notes(report: ConversionReport, cfg) -> None:
    want = ("torchvision ResNets need MODEL.RESNETS.STRIDE_IN_1X1 False, INPUT.FORMAT RGB, "
            f"MODEL.PIXEL_MEAN {list(TORCHVISION_PIXEL_MEAN)}, MODEL.PIXEL_STD {list(TORCHVISION_PIXEL_STD)}")
    if cfg is None:
        report.notes.append(want)
        return
    wrong = [text for bad, text in (
        (cfg.MODEL.RESNETS.STRIDE_IN_1X1, "MODEL.RESNETS.STRIDE_IN_1X1 is True"),
        (cfg.INPUT.FORMAT != "RGB", f"INPUT.FORMAT is {cfg.INPUT.FORMAT}"),
        (not np.allclose(cfg.MODEL.PIXEL_MEAN, TORCHVISION_PIXEL_MEAN, atol=1e-2), f"MODEL.PIXEL_MEAN is {list(cfg.MODEL.PIXEL_MEAN)}"),
        (not np.allclose(cfg.MODEL.PIXEL_STD, TORCHVISION_PIXEL_STD, atol=1e-2), f"MODEL.PIXEL_STD is {list(cfg.MODEL.PIXEL_STD)}"),
    ) if bad]
    if wrong:
        report.notes.append(f"WARNING: the target config's {', '.join(wrong)}; {want}")


def _verify(report: ConversionReport, path: str, arrays: Dict[str, np.ndarray], model: torch.nn.Module) -> None:
    """Load ``path`` into ``model`` with DetectionCheckpointer and check that every tensor landed unchanged
    (at the model key it is the longest dotted suffix of, as detectron2 matches); fvcore's incompatible
    keys say what did not load."""
    checkpointer = AtomicDetectionCheckpointer(model, save_to_disk=False)
    try:
        with quiet_checkpoint_logs():
            checkpointer.load(path)
    except Exception as e:  # noqa: BLE001 - detectron2's ValueError for ambiguous names, unreadable files...
        raise ConversionError(f"DetectionCheckpointer could not load the output: {e}", report) from e
    incompatible = checkpointer.incompatible
    missing = set(incompatible.missing_keys)
    state = model.state_dict()
    for key in state:
        parts = key.split(".")
        name = next((n for n in (".".join(parts[i:]) for i in range(len(parts))) if n in arrays), None)
        if name is not None and key not in missing:
            report.loaded[name] = key
    problems = [f"{name} -> {key}: the value in the model differs from the checkpoint"
                for name, key in sorted(report.loaded.items())
                if not torch.equal(state[key], torch.from_numpy(np.asarray(arrays[name])).to(state[key].dtype))]
    problems += [f"{k}: shape {tuple(a)} does not fit {k} {tuple(b)}" for k, a, b in incompatible.incorrect_shapes]
    unexpected: Dict[str, int] = {}
    for name in incompatible.unexpected_keys:
        fits = [k for k in state if k.endswith("." + name)]
        if fits:
            problems.append(f"{name}: shape {tuple(arrays[name].shape)} does not fit {fits[0]} {tuple(state[fits[0]].shape)}")
        else:  # grouped by what the name belongs to
            label = next((p + "*" for p, _ in DRCL_KEEP if name.startswith(p)), ".".join(name.split(".")[:2]) + ".*")
            unexpected[label] = unexpected.get(label, 0) + 1
    problems += [f"{label}: no such parameter in the target model ({n} unexpected keys)" for label, n in unexpected.items()]
    report.missing = {m: [] for m in MODULES}
    for key in sorted(missing):
        if not key.endswith("num_batches_tracked"):  # a step counter, not a weight
            report.missing[_model_key_module(key)].append(key)
    report.verified = True
    if not report.loaded:
        problems.insert(0, "nothing was loaded into the target model")
    if problems:
        more = f"\n  ... and {len(problems) - 12} more" if len(problems) > 12 else ""
        raise ConversionError(f"the output does not fit the target model ({len(problems)} problems):\n  "
                              + "\n  ".join(problems[:12]) + more, report)


def convert_checkpoint(input_path: str, output_path: str, source: str = "auto", target_config: Optional[str] = None,
                       opts: Sequence[str] = (), backbone_only: bool = False,
                       target_model: Optional[torch.nn.Module] = None) -> ConversionReport:
    """Convert ``input_path`` (``source``: "auto" or one of :data:`SOURCES`) into detectron2 weights at
    ``output_path`` (a ``.pkl``) that must load into ``target_config`` (with ``opts``) or ``target_model``
    when given; ``backbone_only``: only the ResNet of a 2DRCL checkpoint (for C4 detectors). Raises
    ConversionError, leaving an existing output as it was."""
    if source not in ("auto",) + SOURCES:
        raise ConversionError(f"unknown --source {source!r}; choose from auto, {', '.join(SOURCES)}")
    if opts and not target_config:
        raise ConversionError("--opts needs --target-config")
    if os.path.exists(output_path) and os.path.exists(input_path) and os.path.samefile(input_path, output_path):
        raise ConversionError("OUTPUT is the INPUT file: the input is never modified")
    if not output_path.endswith(".pkl"):
        raise ConversionError(f"OUTPUT must end in .pkl (detectron2 matches it by name suffix; it fits FPN "
                              f"and C4 detectors), not {output_path!r}")
    if not os.path.isdir(os.path.dirname(os.path.abspath(output_path))):
        raise ConversionError(f"the output directory of {output_path} does not exist")

    report = ConversionReport(input_path, output_path)
    obj = load_checkpoint_file(input_path)
    report.source, report.detected_by = detect_source(obj) if source == "auto" else (source, "given with --source")
    sd = find_state_dict(obj)[1]
    if sd is None:
        raise ConversionError(f"--source {source}: no state dict in the checkpoint: {describe(obj)}")
    sd, stripped = strip_module_prefix(sd)

    arrays: Dict[str, np.ndarray] = {}
    for r in renames(report.source, sd, backbone_only):
        value = sd[r.src]
        if r.dst is not None and not isinstance(value, (torch.Tensor, np.ndarray)):
            r.dst, r.module, r.group, r.reason = None, "other", r.src, "not a tensor"
        if r.dst is None:
            report.dropped[r.module].append(stripped + r.src)
            count = report.dropped_groups.get(stripped + r.group, (0,))[0]
            report.dropped_groups[stripped + r.group] = (count + 1, r.reason)
        else:
            t = value.detach().cpu() if isinstance(value, torch.Tensor) else torch.from_numpy(value)
            arrays[r.dst] = (t.float() if t.dtype == torch.bfloat16 else t).numpy()  # numpy has no bfloat16
            report.transferred[r.module].append(r.dst)

    backbone = report.transferred["backbone"]
    if "stem.conv1.weight" not in backbone or not any(k.startswith("res") for k in backbone):
        raise ConversionError(
            f"found no ResNet backbone to transfer as --source {report.source} ({len(sd)} tensors, e.g. "
            f"{preview([stripped + k for k in sd], 6)}); nothing would transfer. {KNOWN_SOURCES}",
            report if report.num_transferred else None)
    report.blocks, bottleneck = resnet_layout(backbone)
    report.depth = RESNET_DEPTHS.get((bottleneck, report.blocks))
    meta = obj.get("drcl_d2") if isinstance(obj, dict) else None
    if isinstance(meta, dict) and meta.get("depth") and report.depth and int(meta["depth"]) != report.depth:
        report.notes.append(f'the "drcl_d2" metadata says depth {meta["depth"]}, the weights are ResNet-{report.depth}')
    if 0 in report.blocks:
        report.notes.append(f"the ResNet is incomplete: res2..res5 blocks {report.blocks}")

    cfg, model = None, target_model
    if target_config:
        try:
            cfg = load_config(target_config, opts, device="cpu")
        except ValueError as e:
            raise ConversionError(f"--target-config: {e}") from e
        report.target = target_config + (f" with {' '.join(opts)}" if opts else "")
    if report.source in ("torchvision", "moco"):
        _torchvision_notes(report, cfg)
    else:
        report.notes.append("fine-tune with the pretraining config's MODEL.RESNETS.STRIDE_IN_1X1, INPUT.FORMAT and "
                            "MODEL.PIXEL_MEAN / PIXEL_STD (those of torchvision when it started from torchvision R-50)")
    if cfg is not None and model is None:
        try:
            model = build_model(cfg).eval()
        except Exception as e:  # noqa: BLE001
            raise ConversionError(f"could not build the target model: {type(e).__name__}: {e}") from e
    if model is not None:
        report.target = report.target or f"the given {type(model).__name__}"
        _check_depth(report, model, cfg)

    data = {"model": arrays, "__author__": "drcl_d2", "matching_heuristics": True}
    try:
        atomic_write(output_path, lambda f: pickle.dump(data, f, protocol=pickle.HIGHEST_PROTOCOL),
                     check=None if model is None else (lambda tmp: _verify(report, tmp, arrays, model)))
    except OSError as e:
        raise ConversionError(f"could not write {output_path}: {e}", report) from e
    report.written = True
    return report


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The command: 0, or SystemExit(1) with the reason on stderr (transfer-scale warnings never fail it)."""
    p = argparse.ArgumentParser(prog="drcl-convert", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", metavar="INPUT", help="checkpoint to convert (only read)")
    p.add_argument("output", metavar="OUTPUT", help="weights to write (.pkl)")
    p.add_argument("--source", choices=("auto",) + SOURCES, default="auto",
                   help="checkpoint format (default: auto, detected and reported)")
    p.add_argument("--target-config", metavar="CONFIG.yaml",
                   help="config of the detector to fine-tune: OUTPUT is written only when it loads into it")
    p.add_argument("--backbone-only", action="store_true", help="transfer only the ResNet of a drcl checkpoint")
    p.add_argument("--scale-images", type=int, default=4, metavar="N",
                   help="with --target-config: images to measure the transfer scale on (default: 4; 0: off)")
    p.add_argument("--scale-dataset", metavar="NAME",
                   help="with --target-config: dataset to measure the transfer scale on (default: the config's)")
    p.add_argument("--opts", nargs=argparse.REMAINDER, default=[], metavar="KEY VALUE",
                   help="overrides for --target-config, as detectron2's KEY VALUE pairs (must come last)")
    args = p.parse_args(argv)
    usage_error = (f"--scale-images must be >= 0, not {args.scale_images}" if args.scale_images < 0 else
                   "--scale-dataset needs --target-config" if args.scale_dataset and not args.target_config else None)
    if usage_error:
        print(f"drcl-convert: error: {usage_error}", file=sys.stderr)
        raise SystemExit(1)
    try:
        report = convert_checkpoint(args.input, args.output, source=args.source, target_config=args.target_config,
                                    opts=args.opts or (), backbone_only=args.backbone_only)
    except ConversionError as e:
        if e.report is not None:
            print(e.report.format())
        print(f"drcl-convert: error: {e}", file=sys.stderr)
        if os.path.exists(args.output):
            print(f"drcl-convert: {args.output} was left unchanged", file=sys.stderr)
        raise SystemExit(1) from None
    print(report.format())
    if args.target_config and args.scale_images > 0:
        cfg = load_config(args.target_config, args.opts or (), device="cpu")
        report_transfer_scale(cfg, args.output, args.scale_dataset, args.scale_images)
    return 0


if __name__ == "__main__":
    sys.exit(main())
