"""Defaults and choices the command line needs before anything heavy is imported.

Typer reads option types and defaults when the CLI is built, so what they need lives here,
free of torch and timm; :mod:`hierclass.features` and :mod:`hierclass.models.backbone`
re-export them.
"""

from __future__ import annotations

from enum import Enum

LITE0_MODEL = "tf_efficientnet_lite0"  # TF "same" padding; the plain efficientnet_lite0 pads differently
DEFAULT_BACKBONE = LITE0_MODEL
DEFAULT_PRETRAINED = "efficientnet-lite0"  # the one ImageNet checkpoint installable offline


class Engine(str, Enum):
    """What runs the backbone: ONNX Runtime (fast on CPU) or eager torch."""

    onnx = "onnx"
    torch = "torch"
