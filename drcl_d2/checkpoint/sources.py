"""What each checkpoint source (:data:`SOURCES`) holds, and the name every tensor of it gets in a
detectron2 detector: the ResNet detectron2's short names (``stem.conv1.weight``, ``res2.0.conv1.norm.weight``,
matched by suffix into FPN and C4 detectors alike); a tensor that stays behind, a group label and a reason.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

# Report rows, in the order they are printed.
MODULES = ("backbone", "fpn", "rpn", "box_head", "other")
SOURCES = ("drcl", "detco", "moco", "torchvision")

# (bottleneck blocks?, blocks in res2..res5) -> depth.
RESNET_DEPTHS = {(True, (3, 4, 6, 3)): 50, (True, (3, 4, 23, 3)): 101, (True, (3, 8, 36, 3)): 152,
                 (False, (2, 2, 2, 2)): 18, (False, (3, 4, 6, 3)): 34}

KNOWN_SOURCES = ("drcl-convert knows: drcl_d2 pretraining checkpoints (2DRCL, DetCo, MoCo v2), official MoCo "
                 "checkpoints (module.encoder_q.*) and torchvision ResNet state dicts (conv1.weight, layer1.*)")

# Where each source keeps the ResNet to transfer.
RESNET_PREFIX = {"drcl": "backbone.bottom_up.", "detco": "encoder_q.", "moco": "encoder_q.", "torchvision": ""}
# What a 2DRCL checkpoint transfers besides its ResNet: name prefix -> report row.
DRCL_KEEP = (("backbone.fpn_", "fpn"), ("backbone.top_block.", "fpn"), ("proposal_generator.rpn_head.", "rpn"),
             ("roi_heads.box_head.", "box_head"))
# What stays behind: name prefix -> reason.
_QUEUE = ("queue", "negative queue")
_KEY_ENCODER = ("encoder_k.", "momentum (key) encoder")
DROPPED = {
    "torchvision": (),
    "moco": (_KEY_ENCODER, _QUEUE),
    "detco": (_KEY_ENCODER, ("global_heads_", "global contrastive heads"),
              ("local_heads_", "local contrastive heads"), _QUEUE),
    "drcl": (("target.", "EMA target network"), ("hcl_projector.", "HCL projection head"),
             ("hcl_predictor.", "HCL prediction head"), ("lcl_projector.", "LCL projection head"),
             ("lcl_predictor.", "LCL prediction head"), ("decoder.", "appearance-reconstruction decoder"),
             ("roi_heads.box_predictor.", "class-specific box predictor (never transferred)"),
             ("proposal_generator.anchor_generator.", "anchors (rebuilt from the config)"), _QUEUE),
}


class ConversionError(Exception):
    """The input could not be converted, or the output does not fit the target model; ``report``: what
    was worked out before (None when the input was unreadable or unknown), printed before the error."""

    def __init__(self, message: str, report=None):
        super().__init__(message)
        self.report = report


@dataclass
class Rename:
    """One input tensor: ``dst`` is its output name, None when it stays behind (``group``, ``reason``)."""

    src: str
    dst: Optional[str]
    module: str
    group: str = ""
    reason: str = ""


def torchvision_to_d2(name: str) -> str:
    """torchvision ResNet name -> detectron2 short name: the renames of detectron2's
    tools/convert-torchvision-to-d2.py."""
    if not name.startswith("layer"):
        name = "stem." + name
    for t in (1, 2, 3, 4):
        name = name.replace(f"layer{t}", f"res{t + 1}")
    for t in (1, 2, 3):
        name = name.replace(f"bn{t}", f"conv{t}.norm")
    return name.replace("downsample.0", "shortcut").replace("downsample.1", "shortcut.norm")


def _resnet(names: Iterable[str], source: str) -> Iterator[Rename]:
    """Renames of one ResNet's tensors (``names`` without the source's ResNet prefix)."""
    prefix = RESNET_PREFIX[source]
    torchvision_names = source in ("moco", "torchvision")
    for name in names:
        src, top = prefix + name, name.split(".")[0]
        if name.endswith("num_batches_tracked"):
            yield Rename(src, None, "backbone", f"{prefix}*.num_batches_tracked", "BatchNorm step counter")
        elif top in ("fc", "linear"):
            head = {"moco": "MoCo projection head", "torchvision": "ImageNet classifier"}.get(source, "classifier")
            yield Rename(src, None, "other", f"{prefix}{top}.*", head)
        elif torchvision_names and (top in ("conv1", "bn1") or top.startswith("layer")):
            yield Rename(src, torchvision_to_d2(name), "backbone")
        elif not torchvision_names and (top == "stem" or re.fullmatch(r"res[2-5]", top)):
            yield Rename(src, name, "backbone")
        else:
            yield Rename(src, None, "other", f"{prefix}{top}.*", "not a ResNet parameter")


def _dropped(name: str, source: str) -> Rename:
    for prefix, reason in DROPPED[source]:
        if name.startswith(prefix):
            return Rename(name, None, "other", prefix + "*", reason)
    default = "not part of the online backbone / FPN / RPN / box head" if source == "drcl" else "not the query encoder"
    top = name.split(".")[0]
    return Rename(name, None, "other", top + (".*" if "." in name else ""), default)


def renames(source: str, state: Mapping[str, Any], backbone_only: bool = False) -> List[Rename]:
    """Where every tensor of ``state`` (a state dict of ``source``) goes, in the input's order."""
    prefix = RESNET_PREFIX[source]
    out = list(_resnet([k[len(prefix):] for k in state if k.startswith(prefix)], source))
    for name in state:
        if name.startswith(prefix):  # the ResNet (every name of a torchvision file)
            continue
        kept = next(((p, m) for p, m in DRCL_KEEP if name.startswith(p)), None) if source == "drcl" else None
        if kept is None:
            out.append(_dropped(name, source))
        elif name.endswith("num_batches_tracked"):
            out.append(Rename(name, None, kept[1], "*.num_batches_tracked", "BatchNorm step counter"))
        elif backbone_only:
            out.append(Rename(name, None, kept[1], kept[0] + "*", "left out by --backbone-only"))
        else:
            out.append(Rename(name, name, kept[1]))
    return out


def resnet_layout(keys: Iterable[str]) -> Tuple[Optional[Tuple[int, ...]], bool]:
    """(blocks in res2..res5, bottleneck?) from any names that contain ``resN.i.``."""
    blocks: dict = {}
    bottleneck = False
    for k in keys:
        m = re.search(r"(?:^|\.)res([2-5])\.(\d+)\.", k)
        if m:
            blocks.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
            bottleneck = bottleneck or ".conv3." in k[m.end() - 1:]
    if not blocks:
        return None, bottleneck
    return tuple(len(blocks.get(s, ())) for s in (2, 3, 4, 5)), bottleneck


def find_state_dict(obj: Any) -> Tuple[Optional[str], Optional[Mapping[str, Any]]]:
    """(container key, state dict): ``obj["model"]``, ``obj["state_dict"]`` or ``obj`` itself
    (a mapping of names, at least half of whose values are arrays)."""

    def as_state_dict(x):
        if not isinstance(x, Mapping) or not x or not all(isinstance(k, str) for k in x):
            return None
        arrays = sum(isinstance(v, (torch.Tensor, np.ndarray)) for v in x.values())
        return x if arrays and arrays >= len(x) / 2 else None

    if not isinstance(obj, Mapping):
        return None, None
    for key in ("model", "state_dict"):
        if as_state_dict(obj.get(key)) is not None:
            return key, obj[key]
    return None, as_state_dict(obj)


def preview(keys: Sequence[Any], n: int = 8) -> str:
    shown = ", ".join(repr(k) for k in list(keys)[:n])
    return f"[{shown}{f', ... ({len(keys) - n} more)' if len(keys) > n else ''}]"


def describe(obj: Any) -> str:
    """A short description of an unknown object, for error messages."""
    if not isinstance(obj, Mapping):
        extra = f" of {len(obj)} items" if isinstance(obj, (list, tuple, set)) else ""
        return f"the top-level object is a {type(obj).__name__}{extra}, not a dict"
    text = f"a top-level {type(obj).__name__} with {len(obj)} keys {preview(list(obj))}"
    container, sd = find_state_dict(obj)
    if sd is not None:
        where = f"under {container!r}" if container else "at the top level"
        text += f"; a state dict {where} with {len(sd)} entries, e.g. {preview(list(sd), 6)}"
    return text


def strip_module_prefix(sd: Mapping[str, Any]) -> Tuple[dict, str]:
    """``sd`` without DataParallel's ``module.`` when every key carries it, and the prefix removed."""
    if sd and all(k.startswith("module.") for k in sd):
        return {k[len("module."):]: v for k, v in sd.items()}, "module."
    return dict(sd), ""


def detect_source(obj: Any) -> Tuple[str, str]:
    """(source, how it was detected) of a loaded checkpoint, from its ``drcl_d2`` metadata when present,
    else from the state dict's names; ConversionError when it is none of :data:`SOURCES`."""
    meta = obj.get("drcl_d2") if isinstance(obj, Mapping) else None
    if isinstance(meta, Mapping) and "method" in meta:
        detail = ", ".join(f"{k}={meta[k]}" for k in ("method", "depth") if k in meta)
        source = {"drcl": "drcl", "detco": "detco", "moco_v2": "detco"}.get(str(meta["method"]))
        if source is None:
            raise ConversionError(f'unknown "drcl_d2" method {meta["method"]!r} in the checkpoint ({detail})')
        return source, f'from the checkpoint\'s "drcl_d2" metadata: {detail}'

    container, sd = find_state_dict(obj)
    if sd is None:
        raise ConversionError(f"not a checkpoint drcl-convert knows: {describe(obj)}. {KNOWN_SOURCES}")
    sd, _ = strip_module_prefix(sd)
    where = f"state dict under {container!r}" if container else "top-level state dict"
    query = [k[len("encoder_q."):] for k in sd if k.startswith("encoder_q.")]
    if any(k == "conv1.weight" or k.startswith("layer1.") for k in query):
        return "moco", f"from key patterns: {where} with encoder_q.* in torchvision names"
    if any(k.startswith(("stem.", "res2.")) for k in query):
        return "detco", f"from key patterns: {where} with encoder_q.* in detectron2 names"
    if any(k.startswith("backbone.bottom_up.") for k in sd):
        return "drcl", f"from key patterns: {where} with detectron2 GeneralizedRCNN names"
    if "conv1.weight" in sd and any(k.startswith("layer1.") for k in sd):
        return "torchvision", f"from key patterns: {where} with torchvision ResNet names"
    if "stem.conv1.weight" in sd or any(k.startswith("res2.") for k in sd):
        raise ConversionError(f"the {where} already holds detectron2 ResNet names ({preview(list(sd), 4)}): "
                         "nothing to convert, use the file as MODEL.WEIGHTS directly")
    raise ConversionError(f"found no ResNet backbone in the checkpoint: {describe(obj)}. {KNOWN_SOURCES}")
