"""Checkpoint tools: conversion of pretraining checkpoints into detectron2 detector weights.

``drcl-convert`` / ``python -m drcl_d2.checkpoint`` run :func:`convert.main`.
"""
from .convert import ConversionError, ConversionReport, convert_checkpoint, detect_source

__all__ = ["ConversionError", "ConversionReport", "convert_checkpoint", "detect_source"]
