"""Convert pretraining checkpoints into weights detectron2 loads into Faster / Mask R-CNN.

``drcl-convert INPUT OUTPUT`` (also ``python -m drcl_d2.checkpoint``) reads one of

* ``drcl``: a 2DRCL pretraining checkpoint of this project. The online detector carries
  detectron2's GeneralizedRCNN names; its ResNet, FPN, RPN head and RoI box head are transferred.
  The EMA target network, projection / prediction heads, decoder, queues and the class-specific
  box predictor never are.
* ``detco``: a DetCo / MoCo v2 pretraining checkpoint of this project (query encoder
  ``encoder_q.*``, a detectron2 ResNet). Only the query ResNet is transferred.
* ``moco``: an official MoCo / MoCo v2 checkpoint (``state_dict`` with ``module.encoder_q.*``,
  torchvision names). Only the query ResNet, without its fc head, is transferred.
* ``torchvision``: a torchvision ResNet state dict (bare, or under ``state_dict`` / ``model``).

and writes a detectron2 ``.pkl`` (``{"model": {name: ndarray}, "__author__": "drcl_d2",
"matching_heuristics": True}``). detectron2's DetectionCheckpointer matches such a file by name
suffix, so the ResNet is written with short names (``stem.conv1.weight``, ``res2.0.conv1.norm.weight``)
that land in ``backbone.bottom_up.*`` of FPN models and in ``backbone.res2-4`` / ``roi_heads.res5``
of C4 models; FPN, RPN and box-head tensors keep their full GeneralizedRCNN names. A ``.pth``
output with full names for one architecture (``--target-arch fpn|c4``) is loaded by exact names.

With ``--target-config`` the output is loaded with DetectionCheckpointer into the detector that
config builds (on CPU) and every transferred tensor is checked at its destination before the output
replaces anything. The command then measures the transfer scale (:mod:`drcl_d2.checkpoint.scale`):
the detector with the output loaded against the same detector freshly initialised, on
``--scale-images`` test-time-resized images of the config's dataset (or ``--scale-dataset``):
FPN std per level, box-head (fc7) norm, fresh-classifier logits and RPN objectness. It prints a
table and warnings for scales outside the goal (warnings only: the exit status stays 0) and writes
the numbers to ``OUTPUT.scale.json``. The Python entry point is :func:`convert_checkpoint`.
"""
from __future__ import annotations

import argparse
import io
import logging
import os
import pickle
import re
import sys
import tempfile
import warnings
import zipfile
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from tabulate import tabulate

__all__ = [
    "MODULES",
    "SOURCES",
    "ConversionError",
    "ConversionReport",
    "convert_checkpoint",
    "detect_source",
    "load_checkpoint_file",
    "main",
]

# Report rows, in the order they are printed.
MODULES = ("backbone", "fpn", "rpn", "box_head", "other")
SOURCES = ("drcl", "detco", "moco", "torchvision")

# The pixel statistics torchvision's ImageNet ResNets were trained with (RGB, 0-255 scale).
TORCHVISION_PIXEL_MEAN = (123.675, 116.28, 103.53)
TORCHVISION_PIXEL_STD = (58.395, 57.12, 57.375)

# Bottleneck / basic-block counts of res2..res5 for the standard depths.
_RESNET_LAYOUTS = {
    (True, (3, 4, 6, 3)): 50,
    (True, (3, 4, 23, 3)): 101,
    (True, (3, 8, 36, 3)): 152,
    (False, (2, 2, 2, 2)): 18,
    (False, (3, 4, 6, 3)): 34,
}
_DEPTH_BLOCKS = {depth: blocks for (_, blocks), depth in _RESNET_LAYOUTS.items()}

# A detectron2 ResNet parameter / buffer under its short (build_resnet_backbone) name.
_D2_RESNET_KEY = re.compile(
    r"^(?:stem\.conv1\.(?:weight|bias|norm\.\w+)"
    r"|res[2-5]\.\d+\.(?:conv\d|shortcut)\.(?:weight|bias|norm\.\w+))$"
)
# torchvision ResNet names (the classifier fc is handled separately).
_TV_STEM = re.compile(r"^(conv1\.weight)$|^bn1\.(\w+)$")
_TV_BLOCK = re.compile(r"^layer([1-4])\.(\d+)\.(?:conv(\d)\.(\w+)|bn(\d)\.(\w+)|downsample\.([01])\.(\w+))$")
_RES_BLOCK_IN_KEY = re.compile(r"(?:^|\.)res([2-5])\.(\d+)\.")


class ConversionError(Exception):
    """The input could not be converted, or the output does not fit the target model.

    ``report`` holds what was worked out before the failure (None when the input was unreadable
    or unknown); the command prints it before the error.
    """

    def __init__(self, message: str, report: Optional["ConversionReport"] = None):
        super().__init__(message)
        self.report = report


@dataclass
class ConversionReport:
    """What a conversion moved, per module (one of :data:`MODULES`).

    ``transferred`` maps a module to the names written to the output; ``dropped`` to the input's
    names that were left out (with ``dropped_groups``: prefix -> (count, reason));
    ``missing`` (filled only when a target model was checked, ``verified``) to the target model's
    keys that received nothing. ``loaded`` maps each written name to the target model key it
    landed in.
    """

    input_path: str
    output_path: str
    source: str = ""
    detected_by: str = ""
    depth: Optional[int] = None
    blocks: Optional[Tuple[int, ...]] = None
    transferred: Dict[str, List[str]] = field(default_factory=lambda: {m: [] for m in MODULES})
    dropped: Dict[str, List[str]] = field(default_factory=lambda: {m: [] for m in MODULES})
    dropped_groups: Dict[str, Tuple[int, str]] = field(default_factory=dict)
    missing: Dict[str, List[str]] = field(default_factory=dict)
    loaded: Dict[str, str] = field(default_factory=dict)
    verified: bool = False
    target: str = ""
    output_format: str = ""
    written: bool = False
    notes: List[str] = field(default_factory=list)

    @property
    def num_transferred(self) -> int:
        return sum(len(v) for v in self.transferred.values())

    def table(self) -> str:
        """Per-module counts as a text table."""
        headers = ["module", "transferred", "dropped"]
        if self.verified:
            headers.append("missing in target")
        rows = []
        for m in MODULES:
            row = [m, len(self.transferred.get(m, [])), len(self.dropped.get(m, []))]
            if self.verified:
                row.append(len(self.missing.get(m, [])))
            rows.append(row)
        rows.append(["total"] + [sum(r[i] for r in rows) for i in range(1, len(headers))])
        return tabulate(rows, headers=headers, tablefmt="simple")

    def format(self) -> str:
        """The full human-readable report the command prints."""
        lines = [f"input:  {self.input_path}", f"output: {self.output_path}"]
        if self.source:
            lines.append(f"source: {self.source} ({self.detected_by})")
        if self.blocks:
            name = f"ResNet-{self.depth}" if self.depth else "ResNet of unrecognised depth"
            lines.append(f"backbone: {name} (res2..res5 blocks {'-'.join(map(str, self.blocks))})")
        lines += ["", self.table()]
        if self.dropped_groups:
            lines += ["", "dropped (never transferred):"]
            width = max(len(p) for p in self.dropped_groups)
            for prefix, (count, reason) in sorted(self.dropped_groups.items()):
                lines.append(f"  {prefix:<{width}}  {count:>5} keys  {reason}")
        if self.verified:
            groups = _group_prefixes(k for v in self.missing.values() for k in v)
            lines += ["", f"target: {self.target}"]
            lines.append(
                f"  {len(self.loaded)} tensors loaded by DetectionCheckpointer, all unchanged"
                if self.loaded and len(self.loaded) == self.num_transferred
                else f"  {len(self.loaded)} of {self.num_transferred} tensors loaded"
            )
            if groups:
                lines.append("  missing in target (keep their initialisation):")
                width = max(len(p) for p in groups)
                for prefix, count in groups.items():
                    lines.append(f"    {prefix:<{width}}  {count:>5} keys")
        if self.notes:
            lines += ["", "notes:"] + [f"  - {n}" for n in self.notes]
        if self.written:
            lines += ["", f"wrote {self.output_path} ({self.output_format}, {self.num_transferred} tensors)"]
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Reading the input


def load_checkpoint_file(path: str) -> Any:
    """Load a checkpoint file read-only: a torch file (zip or legacy) or a plain pickle.

    torch files are first loaded with ``weights_only=True``; files holding other Python objects
    (e.g. sampler state) are then fully unpickled, as are plain pickles (as detectron2 itself does
    for ``.pkl`` weights): only convert files you trust.
    """
    if not os.path.isfile(path):
        raise ConversionError(f"{path}: no such file")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(4)
    if size == 0:
        raise ConversionError(f"{path}: the file is empty")

    if zipfile.is_zipfile(path):
        return _torch_load(path)
    if head.startswith(b"PK"):
        # torch.save writes a zip whose directory sits at the end: a cut file loses it.
        raise ConversionError(
            f"{path}: looks like a torch zip checkpoint ({size} bytes) but its zip directory is "
            "missing: the file is truncated or corrupt"
        )
    try:
        with open(path, "rb") as f:
            obj = pickle.load(f, encoding="latin1")
    except Exception as e:  # noqa: BLE001 - any unpickling failure means "unreadable"
        raise ConversionError(
            f"{path}: could not be read as a torch checkpoint or a pickle ({size} bytes; "
            f"truncated or corrupt?): {type(e).__name__}: {e}"
        ) from e
    if isinstance(obj, int) and obj == torch.serialization.MAGIC_NUMBER:
        # The legacy (pre-zip) torch format starts with a pickled magic number.
        return _torch_load(path)
    return obj


def _torch_load(path: str) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights_only" not in str(e) and "Weights only" not in str(e):
            raise ConversionError(f"{path}: could not be read (truncated or corrupt?): {e}") from e
    except Exception as e:  # noqa: BLE001
        raise ConversionError(
            f"{path}: could not be read as a torch checkpoint (truncated or corrupt?): "
            f"{type(e).__name__}: {e}"
        ) from e
    logging.getLogger(__name__).warning(
        "%s holds Python objects besides tensors: loading it with full unpickling "
        "(convert only files you trust)", path
    )
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001
        raise ConversionError(f"{path}: could not be read: {type(e).__name__}: {e}") from e


def _is_array(v: Any) -> bool:
    return isinstance(v, (torch.Tensor, np.ndarray))


def _as_state_dict(obj: Any) -> Optional[Mapping[str, Any]]:
    """``obj`` itself when it is a name -> tensor mapping, else None."""
    if not isinstance(obj, Mapping) or not obj:
        return None
    if not all(isinstance(k, str) for k in obj):
        return None
    n_arrays = sum(_is_array(v) for v in obj.values())
    return obj if n_arrays and n_arrays >= len(obj) / 2 else None


def _find_state_dict(obj: Any) -> Tuple[Optional[str], Optional[Mapping[str, Any]]]:
    """(container key, state dict): ``obj["model"]``, ``obj["state_dict"]`` or ``obj`` itself."""
    if not isinstance(obj, Mapping):
        return None, None
    for key in ("model", "state_dict"):
        sd = _as_state_dict(obj.get(key))
        if sd is not None:
            return key, sd
    return None, _as_state_dict(obj)


def _describe(obj: Any) -> str:
    """A short description of an unknown object, for error messages."""
    if not isinstance(obj, Mapping):
        extra = f" of {len(obj)} items" if isinstance(obj, (list, tuple, set)) else ""
        return f"the top-level object is a {type(obj).__name__}{extra}, not a dict"
    keys = list(obj.keys())
    text = f"a top-level {type(obj).__name__} with {len(keys)} keys {_preview(keys)}"
    container, sd = _find_state_dict(obj)
    if sd is not None:
        where = f"under {container!r}" if container else "at the top level"
        text += f"; a state dict {where} with {len(sd)} entries, e.g. {_preview(list(sd), 6)}"
    return text


def _preview(keys: Sequence[Any], n: int = 8) -> str:
    shown = ", ".join(repr(k) for k in list(keys)[:n])
    more = f", ... ({len(keys) - n} more)" if len(keys) > n else ""
    return f"[{shown}{more}]"


def _strip_common_prefix(sd: Mapping[str, Any], prefix: str) -> Tuple[Dict[str, Any], str]:
    """Strip ``prefix`` (e.g. DataParallel's ``module.``) when every key carries it."""
    if sd and all(k.startswith(prefix) for k in sd):
        return {k[len(prefix):]: v for k, v in sd.items()}, prefix
    return dict(sd), ""


# ----------------------------------------------------------------------------------------------
# Source detection


def detect_source(obj: Any) -> Tuple[str, str]:
    """Return (source, how it was detected) for a loaded checkpoint, or raise ConversionError.

    The ``drcl_d2`` metadata decides when present; otherwise the state dict's key patterns:
    ``encoder_q.`` with torchvision names (moco) or detectron2 names (detco),
    ``backbone.bottom_up.`` (drcl), ``conv1.weight`` + ``layer1.*`` (torchvision).
    """
    meta = obj.get("drcl_d2") if isinstance(obj, Mapping) else None
    if isinstance(meta, Mapping) and "method" in meta:
        method = str(meta["method"])
        detail = ", ".join(f"{k}={meta[k]}" for k in ("method", "depth") if k in meta)
        if method == "drcl":
            return "drcl", f'from the checkpoint\'s "drcl_d2" metadata: {detail}'
        if method in ("detco", "moco_v2"):
            return "detco", f'from the checkpoint\'s "drcl_d2" metadata: {detail}'
        raise ConversionError(f'unknown "drcl_d2" method {method!r} in the checkpoint ({detail})')

    container, sd = _find_state_dict(obj)
    if sd is None:
        raise ConversionError(f"not a checkpoint drcl-convert knows: {_describe(obj)}. {_KNOWN}")
    sd, _ = _strip_common_prefix(sd, "module.")
    where = f"state dict under {container!r}" if container else "top-level state dict"
    query = [k[len("encoder_q."):] for k in sd if k.startswith("encoder_q.")]
    if any(k == "conv1.weight" or k.startswith("layer1.") for k in query):
        return "moco", f"from key patterns: {where} with encoder_q.* in torchvision names"
    if any(k.startswith("stem.") or k.startswith("res2.") for k in query):
        return "detco", f"from key patterns: {where} with encoder_q.* in detectron2 names"
    if any(k.startswith("backbone.bottom_up.") for k in sd):
        return "drcl", f"from key patterns: {where} with detectron2 GeneralizedRCNN names"
    if "conv1.weight" in sd and any(k.startswith("layer1.") for k in sd):
        return "torchvision", f"from key patterns: {where} with torchvision ResNet names"
    if "stem.conv1.weight" in sd or any(k.startswith("res2.") for k in sd):
        raise ConversionError(
            f"the {where} already holds detectron2 ResNet names ({_preview(list(sd), 4)}): "
            "nothing to convert, use the file as MODEL.WEIGHTS directly"
        )
    raise ConversionError(
        f"found no ResNet backbone in the checkpoint: {_describe(obj)}. {_KNOWN}"
    )


_KNOWN = (
    "drcl-convert knows: drcl_d2 pretraining checkpoints (2DRCL, DetCo, MoCo v2), official "
    "MoCo checkpoints (module.encoder_q.*) and torchvision ResNet state dicts (conv1.weight, layer1.*)"
)


# ----------------------------------------------------------------------------------------------
# Name mapping. Each converter yields _Entry(src, dst, module, group, reason): dst is the output
# name for a transferred tensor, None for a dropped one (with the group label and reason).


@dataclass
class _Entry:
    src: str
    dst: Optional[str]
    module: str
    group: str = ""
    reason: str = ""


def _torchvision_to_d2(name: str) -> Optional[str]:
    """torchvision ResNet name -> detectron2 short ResNet name (None if not a ResNet weight)."""
    m = _TV_STEM.match(name)
    if m:
        return "stem.conv1.weight" if m.group(1) else f"stem.conv1.norm.{m.group(2)}"
    m = _TV_BLOCK.match(name)
    if not m:
        return None
    stage, block = int(m.group(1)) + 1, m.group(2)
    prefix = f"res{stage}.{block}"
    if m.group(3):  # convK.weight
        return f"{prefix}.conv{m.group(3)}.{m.group(4)}"
    if m.group(5):  # bnK.* -> convK.norm.*
        return f"{prefix}.conv{m.group(5)}.norm.{m.group(6)}"
    if m.group(7) == "0":  # downsample.0 is the 1x1 projection conv
        return f"{prefix}.shortcut.{m.group(8)}"
    return f"{prefix}.shortcut.norm.{m.group(8)}"


def _bn_counter(name: str) -> bool:
    return name.endswith("num_batches_tracked")


def _convert_resnet_part(
    names: Iterable[str], to_d2: Callable[[str], Optional[str]], src_prefix: str, head_reason: str
) -> List[_Entry]:
    """Entries for the names of one ResNet (given without ``src_prefix``)."""
    out = []
    for name in names:
        src = src_prefix + name
        if _bn_counter(name):
            out.append(_Entry(src, None, "backbone", f"{src_prefix}*.num_batches_tracked", "BatchNorm step counter"))
            continue
        if name.startswith("fc.") or name.startswith("linear."):
            out.append(_Entry(src, None, "other", f"{src_prefix}{name.split('.')[0]}.*", head_reason))
            continue
        dst = to_d2(name)
        if dst is None:
            out.append(_Entry(src, None, "other", f"{src_prefix}{name.split('.')[0]}.*", "not a ResNet parameter"))
        else:
            out.append(_Entry(src, dst, "backbone"))
    return out


def _d2_resnet_name(name: str) -> Optional[str]:
    return name if _D2_RESNET_KEY.match(name) else None


def _prefix_rule(name: str, rules: Sequence[Tuple[str, str]]) -> Optional[Tuple[str, str]]:
    """(group label, reason) of the first rule whose prefix starts ``name``."""
    for prefix, reason in rules:
        if name.startswith(prefix):
            return prefix + "*", reason
    return None


def _other(name: str, rules: Sequence[Tuple[str, str]], default_reason: str) -> _Entry:
    rule = _prefix_rule(name, rules)
    if rule:
        return _Entry(name, None, "other", rule[0], rule[1])
    top = name.split(".")[0]
    return _Entry(name, None, "other", top + (".*" if "." in name else ""), default_reason)


_QUEUE_RULE = ("queue", "negative queue")


def _convert_torchvision(sd: Mapping[str, Any]) -> List[_Entry]:
    return _convert_resnet_part(sd.keys(), _torchvision_to_d2, "", "ImageNet classifier")


def _convert_moco(sd: Mapping[str, Any]) -> List[_Entry]:
    rules = [("encoder_k.", "momentum (key) encoder"), _QUEUE_RULE]
    query = [k[len("encoder_q."):] for k in sd if k.startswith("encoder_q.")]
    out = _convert_resnet_part(query, _torchvision_to_d2, "encoder_q.", "MoCo projection head")
    out += [_other(k, rules, "not the query encoder") for k in sd if not k.startswith("encoder_q.")]
    return out


def _convert_detco(sd: Mapping[str, Any]) -> List[_Entry]:
    rules = [
        ("encoder_k.", "momentum (key) encoder"),
        ("global_heads_", "global contrastive heads"),
        ("local_heads_", "local contrastive heads"),
        _QUEUE_RULE,
    ]
    query = [k[len("encoder_q."):] for k in sd if k.startswith("encoder_q.")]
    out = _convert_resnet_part(query, _d2_resnet_name, "encoder_q.", "classifier")
    out += [_other(k, rules, "not the query encoder") for k in sd if not k.startswith("encoder_q.")]
    return out


_DRCL_KEEP = (
    ("backbone.fpn_", "fpn"),
    ("backbone.top_block.", "fpn"),
    ("proposal_generator.rpn_head.", "rpn"),
    ("roi_heads.box_head.", "box_head"),
)
_DRCL_DROP = (
    ("target.", "EMA target network"),
    ("hcl_projector.", "HCL projection head"),
    ("hcl_predictor.", "HCL prediction head"),
    ("lcl_projector.", "LCL projection head"),
    ("lcl_predictor.", "LCL prediction head"),
    ("decoder.", "appearance-reconstruction decoder"),
    ("roi_heads.box_predictor.", "class-specific box predictor (never transferred)"),
    ("proposal_generator.anchor_generator.", "anchors (rebuilt from the config)"),
    _QUEUE_RULE,
)


def _convert_drcl(sd: Mapping[str, Any], backbone_only: bool) -> List[_Entry]:
    out = []
    bottom_up = "backbone.bottom_up."
    out += _convert_resnet_part(
        [k[len(bottom_up):] for k in sd if k.startswith(bottom_up)], _d2_resnet_name, bottom_up, "classifier"
    )
    for name in sd:
        if name.startswith(bottom_up):
            continue
        module = next((m for p, m in _DRCL_KEEP if name.startswith(p)), None)
        if module is None:
            out.append(_other(name, _DRCL_DROP, "not part of the online backbone / FPN / RPN / box head"))
        elif _bn_counter(name):
            out.append(_Entry(name, None, module, "*.num_batches_tracked", "BatchNorm step counter"))
        elif backbone_only:
            prefix = next(p for p, _ in _DRCL_KEEP if name.startswith(p))
            out.append(_Entry(name, None, module, prefix + "*", "left out by --backbone-only"))
        else:
            out.append(_Entry(name, name, module))
    return out


def _resnet_layout(keys: Iterable[str]) -> Tuple[Optional[Tuple[int, ...]], bool]:
    """(blocks in res2..res5, bottleneck?) from any names that contain ``resN.i.``."""
    blocks: Dict[int, set] = {}
    bottleneck = False
    for k in keys:
        m = _RES_BLOCK_IN_KEY.search(k)
        if m:
            blocks.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
            bottleneck = bottleneck or ".conv3." in k[m.end() - 1:]
    if not blocks:
        return None, bottleneck
    return tuple(len(blocks.get(s, ())) for s in (2, 3, 4, 5)), bottleneck


# ----------------------------------------------------------------------------------------------
# Target model


def _model_key_module(key: str) -> str:
    if (
        key.startswith("backbone.bottom_up.")
        or re.match(r"backbone\.(stem|res[2-5])\.", key)
        or key.startswith("roi_heads.res5.")
    ):
        return "backbone"
    if key.startswith("backbone.fpn_") or key.startswith("backbone.top_block."):
        return "fpn"
    if key.startswith("proposal_generator."):
        return "rpn"
    if key.startswith("roi_heads.box_head."):
        return "box_head"
    return "other"


def _group_prefixes(keys: Iterable[str]) -> "OrderedDict[str, int]":
    groups: "OrderedDict[str, int]" = OrderedDict()
    for k in sorted(keys):
        parts = k.split(".")
        head = ".".join(parts[:2])
        if parts[0] == "backbone" and len(parts) > 1 and parts[1].startswith("fpn_"):
            head = "backbone.fpn_"
        p = head + "*" if head.endswith("_") else (head + ".*" if len(parts) > 2 else k)
        groups[p] = groups.get(p, 0) + 1
    return groups


def _group_unexpected(keys: Sequence[str]) -> "OrderedDict[str, int]":
    """Group names for messages; ResNet blocks collapse per stage (``res4.6..22.*``)."""
    blocks: Dict[str, List[int]] = {}
    counts: Dict[str, int] = {}
    rest = []
    for k in keys:
        m = re.match(r"^(res[2-5])\.(\d+)\.", k)
        if m:
            blocks.setdefault(m.group(1), []).append(int(m.group(2)))
            counts[m.group(1)] = counts.get(m.group(1), 0) + 1
        else:
            rest.append(k)
    groups: "OrderedDict[str, int]" = OrderedDict()
    for stage, idx in sorted(blocks.items()):
        lo, hi = min(idx), max(idx)
        groups[f"{stage}.{lo}..{hi}.*" if lo != hi else f"{stage}.{lo}.*"] = counts[stage]
    groups.update(_group_prefixes(rest))
    return groups


def _load_target_config(config_file: str, opts: Sequence[str]):
    from detectron2.config import get_cfg

    from drcl_d2.config import add_drcl_config

    path = config_file
    if not os.path.isfile(path):
        # Allow detectron2 model-zoo names such as COCO-Detection/faster_rcnn_R_50_FPN_1x.yaml.
        try:
            with warnings.catch_warnings():  # model_zoo imports the deprecated pkg_resources
                warnings.simplefilter("ignore")
                from detectron2 import model_zoo

                path = model_zoo.get_config_file(config_file)
        except Exception as e:  # noqa: BLE001
            raise ConversionError(
                f"--target-config {config_file}: no such file (nor a detectron2 model-zoo config)"
            ) from e
    cfg = get_cfg()
    add_drcl_config(cfg)
    try:
        cfg.merge_from_file(path)
        cfg.merge_from_list(list(opts))
    except Exception as e:  # noqa: BLE001
        raise ConversionError(f"--target-config {config_file}: {type(e).__name__}: {e}") from e
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    return cfg


def _build_target_model(cfg) -> torch.nn.Module:
    from detectron2.modeling import build_model

    try:
        model = build_model(cfg)
    except Exception as e:  # noqa: BLE001
        raise ConversionError(f"could not build the target model: {type(e).__name__}: {e}") from e
    return model.eval()


def _arch_of_model(model: torch.nn.Module) -> str:
    return "fpn" if hasattr(getattr(model, "backbone", None), "bottom_up") else "c4"


def _recording_checkpointer(model):
    """A DetectionCheckpointer that keeps the incompatible keys of its last load."""
    from detectron2.checkpoint import DetectionCheckpointer

    class RecordingCheckpointer(DetectionCheckpointer):
        incompatible = None

        def _load_model(self, checkpoint):
            self.incompatible = super()._load_model(checkpoint)
            return self.incompatible

    return RecordingCheckpointer(model, save_to_disk=False)


class _quiet_loggers:
    """Silence detectron2 / fvcore load warnings: the report says the same thing, once."""

    names = ("fvcore.common.checkpoint", "detectron2.checkpoint.c2_model_loading",
             "detectron2.checkpoint.detection_checkpoint", "detectron2.checkpoint")

    def __enter__(self):
        self.levels = [(logging.getLogger(n), logging.getLogger(n).level) for n in self.names]
        for lg, _ in self.levels:
            lg.setLevel(logging.CRITICAL)

    def __exit__(self, *exc):
        for lg, level in self.levels:
            lg.setLevel(level)


def _check_layout(report: ConversionReport, model: torch.nn.Module, cfg) -> None:
    """Refuse a checkpoint whose ResNet depth differs from the target's, before any loading."""
    model_blocks, _ = _resnet_layout(
        k for k in model.state_dict() if _model_key_module(k) == "backbone"
    )
    ckpt = report.blocks
    if not ckpt or not model_blocks:
        return
    # A C4 model keeps res5 in its RoI head, an FPN model in its backbone: both are counted.
    if ckpt == model_blocks:
        return
    target_depth = _RESNET_LAYOUTS.get((True, model_blocks))
    if cfg is not None and "resnet" in cfg.MODEL.BACKBONE.NAME:
        target_depth = cfg.MODEL.RESNETS.DEPTH
    stages = ", ".join(
        f"res{s} has {a} blocks in the checkpoint vs {b} in the target ("
        + (f"res{s}.{b}..{a - 1}.* would be unexpected keys" if a > b else f"res{s}.{a}..{b - 1}.* would stay missing")
        + ")"
        for s, a, b in zip((2, 3, 4, 5), ckpt, model_blocks) if a != b
    )
    src = f"ResNet-{report.depth}" if report.depth else "a ResNet"
    dst = f"ResNet-{target_depth}" if target_depth else "a ResNet"
    hint = f" (MODEL.RESNETS.DEPTH {target_depth})" if cfg is not None else ""
    fix = f"; use a ResNet-{report.depth} target (MODEL.RESNETS.DEPTH {report.depth})" if report.depth else ""
    raise ConversionError(
        f"depth mismatch: the checkpoint holds {src} but the target model is {dst}{hint}: "
        f"{stages}{fix}",
        report,
    )


def _verify(
    report: ConversionReport, path: str, arrays: Mapping[str, np.ndarray], model, suffix_matched: bool
) -> None:
    """Load ``path`` with DetectionCheckpointer into ``model`` and check every tensor landed.

    The destinations come from detectron2's own matching (align_and_update_state_dicts for a
    ``.pkl``, exact names for a ``.pth``); the values are compared after the real load.
    """
    from detectron2.checkpoint.c2_model_loading import align_and_update_state_dicts

    model_sd = model.state_dict()
    tensors = {k: torch.from_numpy(np.asarray(v)) for k, v in arrays.items()}
    problems: List[str] = []
    with _quiet_loggers():
        if suffix_matched:
            try:
                aligned = align_and_update_state_dicts(model_sd, dict(tensors), c2_conversion=False)
            except ValueError as e:
                raise ConversionError(
                    f"the output's names are ambiguous in the target model: {e}", report
                ) from e
            by_id = {id(t): k for k, t in tensors.items()}
            dest = {
                by_id[id(t)]: mk
                for mk, t in aligned.items()
                if mk in model_sd and id(t) in by_id and tuple(t.shape) == tuple(model_sd[mk].shape)
            }
        else:
            dest = {k: k for k, t in tensors.items() if k in model_sd and t.shape == model_sd[k].shape}

        checkpointer = _recording_checkpointer(model)
        try:
            checkpointer.load(path)
        except Exception as e:  # noqa: BLE001
            raise ConversionError(f"DetectionCheckpointer could not load the output: {e}", report) from e

    after = model.state_dict()
    for key, mk in sorted(dest.items()):
        expected = tensors[key].to(after[mk].dtype)
        if not torch.equal(after[mk].cpu(), expected):
            problems.append(f"{key} -> {mk}: the value in the model differs from the checkpoint")
    report.loaded = {k: v for k, v in dest.items()}

    # Names the target does not take: either a shape mismatch or no place at all.
    unexpected = []
    for key in sorted(set(tensors) - set(dest)):
        cands = [mk for mk in model_sd if mk == key or mk.endswith("." + key)]
        if cands:
            mk = cands[0]
            problems.append(
                f"{key}: shape {tuple(tensors[key].shape)} does not fit {mk} {tuple(model_sd[mk].shape)}"
            )
        else:
            unexpected.append(key)
    for label, count in _group_unexpected(unexpected).items():
        problems.append(f"{label}: no such parameter in the target model ({count} unexpected keys)")

    missing_keys = checkpointer.incompatible.missing_keys if checkpointer.incompatible else []
    report.missing = {m: [] for m in MODULES}
    for mk in missing_keys:
        if _bn_counter(mk):  # a step counter, not a weight
            continue
        report.missing[_model_key_module(mk)].append(mk)
    report.verified = True

    if not dest:
        problems.insert(0, "nothing was loaded into the target model")
    if problems:
        shown = "\n  ".join(problems[:12])
        more = f"\n  ... and {len(problems) - 12} more" if len(problems) > 12 else ""
        raise ConversionError(
            f"the output does not fit the target model ({len(problems)} problems):\n  {shown}{more}",
            report,
        )


def _torchvision_notes(report: ConversionReport, cfg) -> None:
    want = (
        "torchvision ResNets need MODEL.RESNETS.STRIDE_IN_1X1 False, INPUT.FORMAT RGB, "
        f"MODEL.PIXEL_MEAN {list(TORCHVISION_PIXEL_MEAN)}, MODEL.PIXEL_STD {list(TORCHVISION_PIXEL_STD)}"
    )
    if cfg is None:
        report.notes.append(want)
        return
    wrong = []
    if cfg.MODEL.RESNETS.STRIDE_IN_1X1:
        wrong.append("MODEL.RESNETS.STRIDE_IN_1X1 is True")
    if cfg.INPUT.FORMAT != "RGB":
        wrong.append(f"INPUT.FORMAT is {cfg.INPUT.FORMAT}")
    if not np.allclose(cfg.MODEL.PIXEL_MEAN, TORCHVISION_PIXEL_MEAN, atol=1e-2):
        wrong.append(f"MODEL.PIXEL_MEAN is {list(cfg.MODEL.PIXEL_MEAN)}")
    if not np.allclose(cfg.MODEL.PIXEL_STD, TORCHVISION_PIXEL_STD, atol=1e-2):
        wrong.append(f"MODEL.PIXEL_STD is {list(cfg.MODEL.PIXEL_STD)}")
    if wrong:
        report.notes.append(f"WARNING: the target config's {', '.join(wrong)}; {want}")


# ----------------------------------------------------------------------------------------------
# Writing


def _full_name(key: str, module: str, arch: str) -> str:
    """Full GeneralizedRCNN name of an output key for a .pth (exact-name) file."""
    if module != "backbone":
        return key
    if arch == "fpn":
        return "backbone.bottom_up." + key
    return ("roi_heads." if key.startswith("res5.") else "backbone.") + key


def _atomic_write(path: str, write: Callable[[io.BufferedWriter], None], check: Callable[[str], None]) -> None:
    """Write to a temporary file next to ``path``, run ``check`` on it, then os.replace.

    An existing ``path`` is replaced only when both writing and checking succeed. The temporary
    name keeps the output's extension, since detectron2 picks its reader by extension.
    """
    directory = os.path.dirname(os.path.abspath(path))
    root, ext = os.path.splitext(os.path.basename(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{root}.", suffix=f".tmp{ext}", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600
        check(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _to_numpy(v: Any) -> np.ndarray:
    if isinstance(v, np.ndarray):
        return v
    t = v.detach().cpu()
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16
        t = t.float()
    return t.numpy()


# ----------------------------------------------------------------------------------------------
# API


def convert_checkpoint(
    input_path: str,
    output_path: str,
    source: str = "auto",
    target_config: Optional[str] = None,
    opts: Sequence[str] = (),
    target_arch: Optional[str] = None,
    backbone_only: bool = False,
    target_model: Optional[torch.nn.Module] = None,
) -> ConversionReport:
    """Convert ``input_path`` into detectron2 weights at ``output_path`` and report what moved.

    Args:
        source: "auto" or one of :data:`SOURCES`.
        target_config: a detectron2 yaml (or model-zoo name); its model is built on CPU and the
            output is loaded into it and checked before it is written. ``opts`` override it.
        target_arch: "fpn" or "c4", the architecture a ``.pth`` output's full names are for
            (taken from the target when one is given).
        backbone_only: transfer only the ResNet of a 2DRCL checkpoint (e.g. for a C4 detector).
        target_model: an already built detectron2 model to check against instead of a config
            (it is loaded with the output).

    Raises:
        ConversionError: unreadable / unknown input, nothing to transfer, or an output that does
            not fit the target. An existing output file is then left as it was.
    """
    if source not in ("auto",) + SOURCES:
        raise ConversionError(f"unknown --source {source!r}; choose from auto, {', '.join(SOURCES)}")
    if target_arch not in (None, "fpn", "c4"):
        raise ConversionError(f"unknown --target-arch {target_arch!r}; choose fpn or c4")
    if opts and not target_config:
        raise ConversionError("--opts needs --target-config")
    ext = os.path.splitext(output_path)[1].lower()
    if ext not in (".pkl", ".pth"):
        raise ConversionError(
            f"OUTPUT must end in .pkl (detectron2 matches it by name suffix; fits FPN and C4) "
            f"or .pth (full names for one --target-arch), not {output_path!r}"
        )
    if target_arch and ext != ".pth":
        raise ConversionError(
            "--target-arch applies to a .pth OUTPUT only (a .pkl fits FPN and C4 detectors alike)"
        )
    if not os.path.isdir(os.path.dirname(os.path.abspath(output_path))):
        raise ConversionError(f"the output directory of {output_path} does not exist")
    if os.path.exists(output_path) and os.path.exists(input_path) and os.path.samefile(input_path, output_path):
        raise ConversionError("OUTPUT is the INPUT file: the input is never modified")

    report = ConversionReport(input_path=input_path, output_path=output_path, output_format=ext)
    obj = load_checkpoint_file(input_path)
    if source == "auto":
        report.source, report.detected_by = detect_source(obj)
    else:
        report.source, report.detected_by = source, "given with --source"
    _, sd = _find_state_dict(obj)
    if sd is None:
        raise ConversionError(f"--source {source}: no state dict in the checkpoint: {_describe(obj)}")
    sd, stripped = _strip_common_prefix(sd, "module.")

    if report.source == "torchvision":
        entries = _convert_torchvision(sd)
    elif report.source == "moco":
        entries = _convert_moco(sd)
    elif report.source == "detco":
        entries = _convert_detco(sd)
    else:
        entries = _convert_drcl(sd, backbone_only)

    arrays: Dict[str, np.ndarray] = {}
    modules: Dict[str, str] = {}
    for e in entries:
        value = sd[e.src]
        if e.dst is not None and not _is_array(value):
            e.dst, e.module, e.group, e.reason = None, "other", e.src, "not a tensor"
        if e.dst is None:
            report.dropped[e.module].append(stripped + e.src)
            label = stripped + e.group
            count, _ = report.dropped_groups.get(label, (0, e.reason))
            report.dropped_groups[label] = (count + 1, e.reason)
        else:
            arrays[e.dst] = _to_numpy(value)
            modules[e.dst] = e.module
            report.transferred[e.module].append(e.dst)

    backbone = report.transferred["backbone"]
    if "stem.conv1.weight" not in backbone or not any(k.startswith("res") for k in backbone):
        found = _preview(list(stripped + k for k in sd), 6)
        raise ConversionError(
            f"found no ResNet backbone to transfer as --source {report.source} "
            f"({len(sd)} tensors, e.g. {found}); nothing would transfer. {_KNOWN}",
            report if report.num_transferred else None,
        )
    blocks, bottleneck = _resnet_layout(backbone)
    report.blocks = blocks
    report.depth = _RESNET_LAYOUTS.get((bottleneck, blocks)) if blocks else None
    meta = obj.get("drcl_d2") if isinstance(obj, Mapping) else None
    if isinstance(meta, Mapping) and meta.get("depth") and report.depth and int(meta["depth"]) != report.depth:
        report.notes.append(f'the "drcl_d2" metadata says depth {meta["depth"]}, the weights are ResNet-{report.depth}')
    if blocks and 0 in blocks:
        report.notes.append(f"the ResNet is incomplete: res2..res5 blocks {blocks}")

    cfg = None
    model = target_model
    if target_config:
        cfg = _load_target_config(target_config, opts)
        report.target = target_config + (f" with {' '.join(opts)}" if opts else "")
    if report.source in ("torchvision", "moco"):
        _torchvision_notes(report, cfg)
    else:
        report.notes.append(
            "fine-tune with the pretraining config's MODEL.RESNETS.STRIDE_IN_1X1, INPUT.FORMAT and "
            "MODEL.PIXEL_MEAN / PIXEL_STD (those of torchvision when it started from torchvision R-50)"
        )
    if cfg is not None and model is None:
        model = _build_target_model(cfg)
    if model is not None:
        report.target = report.target or f"the given {type(model).__name__}"
        _check_layout(report, model, cfg)

    if ext == ".pth":
        arch = target_arch or (_arch_of_model(model) if model is not None else None)
        if arch is None:
            raise ConversionError(
                "a .pth output is loaded by exact names: give --target-arch fpn|c4 (or "
                "--target-config), or write a .pkl, which fits both",
                report,
            )
        if arch == "c4":
            extra = [k for k, m in modules.items() if m != "backbone"]
            if extra:
                raise ConversionError(
                    f"--target-arch c4: a C4 detector has no place for the {len(extra)} FPN / RPN / "
                    f"box-head tensors of this checkpoint (e.g. {extra[0]}); use --backbone-only",
                    report,
                )
        arrays = {_full_name(k, modules[k], arch): v for k, v in arrays.items()}
        report.transferred = {
            m: [_full_name(k, m, arch) for k in keys] for m, keys in report.transferred.items()
        }
        report.output_format = f"pth with full {arch.upper()} names"

        def write(f):
            state = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}
            torch.save({"model": state, "__author__": "drcl_d2"}, f)
    else:
        report.output_format = "pkl, matched by name suffix"

        def write(f):
            data = {"model": arrays, "__author__": "drcl_d2", "matching_heuristics": True}
            pickle.dump(data, f, protocol=pickle.HIGHEST_PROTOCOL)

    def check(tmp_path: str) -> None:
        if model is not None:
            _verify(report, tmp_path, arrays, model, suffix_matched=ext == ".pkl")

    try:
        _atomic_write(output_path, write, check)
    except OSError as e:
        raise ConversionError(f"could not write {output_path}: {e}", report) from e
    report.written = True
    return report


# ----------------------------------------------------------------------------------------------
# Command line

_DESCRIPTION = """\
Convert a pretraining checkpoint into weights that detectron2's DetectionCheckpointer loads into
Faster R-CNN / Mask R-CNN (FPN and C4, R-50 and R-101).

Sources (--source, detected by default from the file's "drcl_d2" metadata or its key names):
  drcl         2DRCL checkpoint of drcl_d2: transfers the online ResNet, FPN, RPN head and RoI box
               head; never the EMA target, projection/prediction heads, decoder, queues or the
               class-specific box predictor.
  detco        DetCo / MoCo v2 checkpoint of drcl_d2: transfers the query ResNet (encoder_q.*).
  moco         official MoCo / MoCo v2 checkpoint: transfers module.encoder_q.* without its fc head.
  torchvision  torchvision ResNet-50/101 state dict (bare or under "state_dict" / "model").

OUTPUT ending in .pkl holds {"model": {name: array}, "__author__": "drcl_d2",
"matching_heuristics": True}: detectron2 matches its names by suffix, so the ResNet is written with
short names (stem.*, res2.* ... res5.*) that fit both FPN (backbone.bottom_up.*) and C4
(backbone.res2-4, roi_heads.res5) detectors; FPN / RPN / box-head tensors keep their full names.
OUTPUT ending in .pth holds full names for one architecture (--target-arch) and loads by exact name.

The output is written atomically; an existing OUTPUT is replaced only on success and the INPUT is
only read. The report lists per module (backbone, fpn, rpn, box_head, other) the transferred,
dropped and (with --target-config) missing keys. Exit status 1 when the input is unknown or
unreadable, when nothing transfers, or when the output does not fit the target config (a depth
mismatch, a wrong shape, a key the model does not have).

With --target-config the transfer scale is measured after the conversion: the target detector with
OUTPUT loaded and the same detector freshly initialised (same seed, CPU, normalisation layers in
training mode as in the first fine-tuning iterations) run on --scale-images test-time-resized
images of the config's DATASETS.TEST[0] (else TRAIN[0]; or --scale-dataset). The table compares
the FPN output std and per-channel-mean spread per level, the box head's (fc7) L2 norm per
ground-truth box, the fresh box classifier's logits on those features and the RPN objectness
logits. Warnings (printed, exit status still 0): an FPN std ratio converted/fresh outside
[0.8, 1.2], an fc7 norm ratio above 4, a converted max |classifier logit| of 2 or more. The numbers
go to OUTPUT.scale.json. A dataset that cannot be loaded skips the measurement (with a message).
"""

_EPILOG = """\
examples:
  # 2DRCL checkpoint -> weights for Mask R-CNN R50-FPN, checked against the fine-tuning config
  drcl-convert output/pretrain_drcl/model_final.pth drcl_r50.pkl \\
      --target-config COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml

  # DetCo / MoCo v2 (drcl_d2) query backbone, for FPN or C4 detectors
  drcl-convert output/pretrain_detco/model_final.pth detco_r50.pkl

  # official MoCo v2 checkpoint, with the torchvision conventions in the target config
  drcl-convert moco_v2_800ep_pretrain.pth.tar moco_v2_r50.pkl --source moco \\
      --target-config COCO-Detection/faster_rcnn_R_50_C4_1x.yaml \\
      --opts MODEL.RESNETS.STRIDE_IN_1X1 False INPUT.FORMAT RGB \\
             MODEL.PIXEL_MEAN "[123.675, 116.28, 103.53]" MODEL.PIXEL_STD "[58.395, 57.12, 57.375]"

  # torchvision ResNet-101, full names for an FPN model
  drcl-convert resnet101-63fe2227.pth r101_torchvision.pth --target-arch fpn

then fine-tune with MODEL.WEIGHTS drcl_r50.pkl. With --target-config the transfer-scale table follows
the report and drcl_r50.pkl.scale.json holds its numbers; --scale-dataset lvis_v1_val picks the
images, --scale-images 0 skips it.

torchvision and MoCo weights come from a torchvision ResNet (stride in the 3x3 conv, RGB input,
torchvision normalisation): the fine-tuning config must set
  MODEL.RESNETS.STRIDE_IN_1X1 False   INPUT.FORMAT RGB
  MODEL.PIXEL_MEAN [123.675, 116.28, 103.53]   MODEL.PIXEL_STD [58.395, 57.12, 57.375]
(drcl_d2 pretraining configs that start from torchvision R-50 use the same settings).
--target-config accepts a yaml path or a detectron2 model-zoo name; the model is built on CPU with
MODEL.DEVICE cpu and MODEL.WEIGHTS "".
"""


def build_parser() -> argparse.ArgumentParser:
    """The drcl-convert argument parser."""
    p = argparse.ArgumentParser(
        prog="drcl-convert",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("input", metavar="INPUT", help="checkpoint to convert (only read)")
    p.add_argument("output", metavar="OUTPUT", help="weights to write: .pkl (recommended) or .pth")
    p.add_argument(
        "--source", choices=("auto",) + SOURCES, default="auto",
        help="checkpoint format (default: auto, detected and reported)",
    )
    p.add_argument(
        "--target-config", metavar="CONFIG.yaml",
        help="detectron2 config of the detector to fine-tune: build it on CPU, load OUTPUT into it "
        "and check every transferred tensor (OUTPUT is only written when this succeeds)",
    )
    p.add_argument(
        "--target-arch", choices=("fpn", "c4"),
        help="architecture of a .pth OUTPUT's full names (default: from --target-config)",
    )
    p.add_argument(
        "--backbone-only", action="store_true",
        help="transfer only the ResNet of a drcl checkpoint (e.g. for a C4 detector)",
    )
    p.add_argument(
        "--scale-images", type=int, default=4, metavar="N",
        help="with --target-config: images to measure the transfer scale on (default: 4; "
        "0 disables the measurement and OUTPUT.scale.json)",
    )
    p.add_argument(
        "--scale-dataset", metavar="NAME",
        help="with --target-config: registered dataset (or DATASETS.LVIS_CUSTOM name of the config) "
        "to measure the transfer scale on (default: the config's DATASETS.TEST[0], else TRAIN[0])",
    )
    p.add_argument(
        "--opts", nargs=argparse.REMAINDER, default=[], metavar="KEY VALUE",
        help="overrides for --target-config, as detectron2's KEY VALUE pairs (must come last)",
    )
    return p


def _json_safe(value: Any) -> Any:
    """``value`` with NaN / inf floats as None (strict JSON); the warnings name them."""
    if isinstance(value, float):
        return value if np.isfinite(value) else None
    if isinstance(value, Mapping):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _write_json_atomic(path: str, data: Any) -> None:
    import json

    def write(f):
        f.write(json.dumps(_json_safe(data), indent=2, allow_nan=False).encode() + b"\n")

    _atomic_write(path, write, lambda tmp: None)


def scale_json_path(output_path: str) -> str:
    """Where the command writes the transfer-scale numbers of ``output_path``."""
    return output_path + ".scale.json"


def _report_transfer_scale(args: argparse.Namespace) -> Optional[Dict[str, Any]]:
    """Measure, print and save the transfer scale of the written ``args.output``.

    Prints a message and returns None when it cannot be measured (the conversion stands); scale
    warnings go to the log and to stdout, never to the exit status.
    """
    from .scale import (
        FC7_NORM_RATIO_MAX,
        FPN_STD_RATIO_RANGE,
        MAX_ABS_CLS_LOGIT,
        DatasetUnavailableError,
        TransferScaleError,
        check_transfer_scale,
        format_scale_table,
        measure_transfer_scale,
    )

    logger = logging.getLogger(__name__)
    json_path = scale_json_path(args.output)

    def skipped(reason: str) -> None:
        print(f"\ntransfer scale: not measured: {reason}")
        if os.path.exists(json_path):  # it described the previous OUTPUT
            os.unlink(json_path)
            print(f"transfer scale: removed the outdated {json_path}")

    try:
        cfg = _load_target_config(args.target_config, args.opts or ())
        result = measure_transfer_scale(
            cfg, args.output, dataset_name=args.scale_dataset, num_images=args.scale_images
        )
    except DatasetUnavailableError as e:
        skipped(
            f"{e}. Give --scale-dataset NAME (a registered dataset or a DATASETS.LVIS_CUSTOM entry "
            "of the config, e.g. through --opts) or --scale-images 0"
        )
        return None
    except TransferScaleError as e:
        skipped(str(e))
        return None
    except Exception as e:  # noqa: BLE001 - OUTPUT is written and verified: report, don't fail
        logger.exception("transfer-scale measurement failed")
        skipped(f"the measurement failed: {type(e).__name__}: {e}")
        return None

    warnings_ = check_transfer_scale(result)
    result["goals"] = {
        "fpn_std_ratio_range": list(FPN_STD_RATIO_RANGE),
        "fc7_norm_ratio_max": FC7_NORM_RATIO_MAX,
        "max_abs_cls_logit_below": MAX_ABS_CLS_LOGIT,
    }
    result["warnings"] = warnings_
    print("\n" + format_scale_table(result))
    for w in warnings_:
        logger.warning("transfer scale: %s", w)
        print(f"WARNING: {w}")
    try:
        _write_json_atomic(json_path, result)
    except OSError as e:
        print(f"transfer scale: could not write {json_path}: {e}", file=sys.stderr)
    else:
        print(f"wrote {json_path}")
    return result


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry point; returns 0, or raises SystemExit(1) with the reason on stderr.

    With ``--target-config`` (and ``--scale-images`` > 0) a successful conversion is followed by
    the transfer-scale report; its warnings never change the exit status.
    """
    args = build_parser().parse_args(argv)
    usage_error = None
    if args.scale_images < 0:
        usage_error = f"--scale-images must be >= 0, not {args.scale_images}"
    elif args.scale_dataset and not args.target_config:
        usage_error = "--scale-dataset needs --target-config"
    if usage_error:
        print(f"drcl-convert: error: {usage_error}", file=sys.stderr)
        raise SystemExit(1)
    try:
        report = convert_checkpoint(
            args.input,
            args.output,
            source=args.source,
            target_config=args.target_config,
            opts=args.opts or (),
            target_arch=args.target_arch,
            backbone_only=args.backbone_only,
        )
    except ConversionError as e:
        if e.report is not None:
            print(e.report.format())
        print(f"drcl-convert: error: {e}", file=sys.stderr)
        if os.path.exists(args.output):
            print(f"drcl-convert: {args.output} was left unchanged", file=sys.stderr)
        raise SystemExit(1) from None
    print(report.format())
    if args.target_config and args.scale_images > 0:
        _report_transfer_scale(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
