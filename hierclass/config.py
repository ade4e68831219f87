"""How to train a head: :class:`TrainConfig`, and reading it from a TOML file.

This module imports neither torch nor numpy, so the command line can build a config before
any heavy import.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from hierclass.errors import HierclassError

SOLVERS = ("auto", "lbfgs", "adamw")
CLASS_BALANCE = ("none", "loss", "sampler")
BN_MODES = ("train", "frozen")
INIT_FROM = ("pretrained", "flat")
AMP_MODES = ("off", "bf16", "fp16")


def _opt(default: Any, help: str) -> Any:
    """A field with its help text, which is also the command line's help for its option."""
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    """How to train a head. The defaults converge on a 2,000-image catalogue and on a 12M-image one.

    Linear heads (``hidden=None``) are convex problems: with ``solver="auto"`` they are solved
    exactly by full-batch L-BFGS whenever their training features (and logits) fit in ``lbfgs_memory_mb``,
    with the L2 strength chosen on a holdout carved from the training set. Larger sets and MLP
    heads train with minibatch AdamW, budgeted in optimiser steps. Either way the features are
    standardised with the training set's mean and std, which the head stores and applies at
    inference; the ``--val`` features are only reported, never used to choose anything.
    """

    solver: str = _opt("auto", "auto (L-BFGS for linear heads that fit in memory, else AdamW), lbfgs or adamw.")
    holdout: float = _opt(0.1, "Share of the training products held out to choose the L2 strength or epoch.")
    seed: int = _opt(0, "Random seed: the same seed, data and config give the same weights (on CPU) and holdout.")
    standardize: bool = _opt(True, "Learn on (x - mean) / std of the training features; the head keeps both.")
    # L-BFGS (linear heads): minimise C * sum(cross-entropy) + 0.5 * |W|^2, as scikit-learn's LogisticRegression.
    c: float | None = _opt(
        None, "Inverse L2 strength (scikit-learn's C); default: the best of --c-grid on the holdout."
    )
    c_grid: tuple[float, ...] = _opt(
        (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0),
        "C values the path may try (see --c-start); the holdout picks one.",
    )
    c_start: float = _opt(
        0.003, "C the path starts at; it moves to weaker C while the holdout improves, else to stronger C."
    )
    max_iter: int = _opt(100, "L-BFGS iterations per C (each C starts from its neighbour's solution).")
    tol: float = _opt(
        2e-4, "L-BFGS stops when its last 3 iterations improved the objective by less than 3 x this x its value."
    )
    bf16: bool = _opt(True, "L-BFGS on CPUs with bfloat16 units: their matmuls in bfloat16, float32 accuracy kept.")
    lbfgs_memory_mb: int = _opt(
        4096, "solver auto uses L-BFGS when the float32 training features, and their logits, each fit in this."
    )
    # AdamW (MLP heads, and linear heads too large for L-BFGS).
    epochs: int | None = _opt(None, "AdamW passes over the training images; default: enough for --min-steps (10-300).")
    min_steps: int = _opt(3000, "Optimiser steps the default epochs aim for on small catalogues.")
    batch_size: int | None = _opt(None, "Images per AdamW step; default: 512 on pooled features, 128 on trunk maps.")
    lr: float = _opt(1e-3, "Peak AdamW learning rate, reached after warm-up, then cosine decay.")
    weight_decay: float = _opt(1e-4, "AdamW decoupled weight decay.")
    warmup: float = _opt(0.05, "Fraction of the AdamW steps with a linear warm-up from 0.")
    min_lr_ratio: float = _opt(0.01, "The cosine schedule ends at lr * min_lr_ratio.")
    patience: int | None = _opt(
        None,
        "AdamW epochs without a better holdout accuracy before stopping (0: never); "
        "default: a tenth of the epochs, at least 3.",
    )
    label_smoothing: float | None = _opt(None, "Label smoothing; default: 0 for linear heads, 0.1 for MLP heads.")
    class_balance: str = _opt("none", "none, loss (class-weighted loss) or sampler (class-weighted sampling).")
    balance_power: float = _opt(0.5, "Class weight = count ** -power: 0.5 mild, 1.0 fully balanced.")
    hidden: int | None = _opt(None, "Hidden width of an MLP head; default: a linear head.")
    dropout: float = _opt(0.0, "Dropout in the head (AdamW only).")
    device: str = _opt("cpu", "cpu, or cuda when available.")
    eval_batch_size: int = _opt(4096, "Images per evaluation forward pass.")
    progress: bool | None = _opt(None, "Progress bars; default: only when stderr is a terminal.")
    # Experts only: every expert also learns an "other" class from the other branches' samples, so routing
    # mistakes can be recovered at inference; costs about a flat head per step.
    expert_other: bool = _opt(False, "Every expert also learns an 'other' class from the other branches' images.")
    # CNN tops (features extracted with --top-stages N): the models own the backbone's last N stages.
    top_lr_ratio: float = _opt(
        0.1, "CNN tops and fine-tuning: learning rate of the pretrained layers, as a fraction of --lr."
    )
    bn: str = _opt("train", "CNN tops and fine-tuning: batch norm statistics train, or stay frozen at the backbone's.")
    flip: bool = _opt(True, "CNN tops: train on the stored flipped view of half the images (stores made with --hflip).")
    init_from: str = _opt("pretrained", "CNN expert tops start from the pretrained stages, or from the run's flat top.")
    # Any AdamW training (pooled features, trunk maps or images).
    grad_clip: float | None = _opt(None, "Clip the gradients' global L2 norm to this; default: no clipping.")
    checkpoint_every: int = _opt(0, "Also save the resume state every this many steps (0: after each epoch only).")
    # Fine-tuning from images (--train names a dump, CSV catalogue or folder instead of a feature folder).
    backbone: str | None = _opt(None, "Images: the timm model to fine-tune; default: extract-features' default.")
    pretrained: str | None = _opt(
        None, "Images: its weights (hub, none, efficientnet-lite0, a checkpoint file or a run's RUN/flat folder)."
    )
    image_size: int | None = _opt(None, "Images: square input size instead of the model's (e.g. 180).")
    top_stages: int | None = _opt(None, "Images: train its last N stages only, the rest frozen; default: all.")
    warmup_frozen_epochs: int = _opt(0, "Images: first epochs train the new classifier alone, backbone frozen.")
    augment: bool = _opt(True, "Images: timm's random resized crop (and flip); off: the evaluation preprocessing.")
    rand_augment: str | None = _opt(None, "Images: a timm RandAugment policy, e.g. rand-m9-mstd0.5; default: none.")
    mixup: float = _opt(0.0, "Images: mixup alpha (0: off; router and flat only).")
    cutmix: float = _opt(0.0, "Images: cutmix alpha (0: off; router and flat only).")
    ema_decay: float | None = _opt(None, "Images: keep an EMA of the weights with this decay (e.g. 0.999) and save it.")
    amp: str = _opt("off", "Images on CUDA: mixed precision off, bf16, or fp16 (with a gradient scaler).")
    channels_last: bool | None = _opt(None, "Images: channels-last memory format; default: on CUDA only.")
    workers: int = _opt(2, "Images: DataLoader processes decoding and augmenting images.")

    def validate(self) -> None:
        """Raise ValueError naming the bad field, its value and what was expected."""
        checks = [
            ("solver", self.solver in SOLVERS, f"one of {SOLVERS}"),
            ("holdout", 0 < self.holdout < 1, "in (0, 1)"),
            ("c", self.c is None or self.c > 0, "None or > 0"),
            ("c_grid", len(self.c_grid) > 0 and all(c > 0 for c in self.c_grid), "positive values"),
            ("c_start", self.c_start > 0, "> 0"),
            ("max_iter", self.max_iter >= 1, ">= 1"),
            ("tol", self.tol >= 0, ">= 0"),
            ("lbfgs_memory_mb", self.lbfgs_memory_mb >= 0, ">= 0"),
            ("epochs", self.epochs is None or self.epochs >= 1, "None or >= 1"),
            ("min_steps", self.min_steps >= 1, ">= 1"),
            ("batch_size", self.batch_size is None or self.batch_size >= 1, "None or >= 1"),
            ("lr", self.lr > 0, "> 0"),
            ("weight_decay", self.weight_decay >= 0, ">= 0"),
            ("warmup", 0 <= self.warmup < 1, "in [0, 1)"),
            ("min_lr_ratio", 0 <= self.min_lr_ratio <= 1, "in [0, 1]"),
            ("patience", self.patience is None or self.patience >= 0, "None or >= 0"),
            ("label_smoothing", self.label_smoothing is None or 0 <= self.label_smoothing < 1, "None or in [0, 1)"),
            ("class_balance", self.class_balance in CLASS_BALANCE, f"one of {CLASS_BALANCE}"),
            ("hidden", self.hidden is None or self.hidden >= 1, "None or >= 1"),
            ("dropout", 0 <= self.dropout < 1, "in [0, 1)"),
            ("top_lr_ratio", 0 <= self.top_lr_ratio <= 1, "in [0, 1]"),
            ("bn", self.bn in BN_MODES, f"one of {BN_MODES}"),
            ("init_from", self.init_from in INIT_FROM, f"one of {INIT_FROM}"),
            ("grad_clip", self.grad_clip is None or self.grad_clip > 0, "None or > 0"),
            ("checkpoint_every", self.checkpoint_every >= 0, ">= 0"),
            ("image_size", self.image_size is None or self.image_size >= 16, "None or >= 16"),
            ("top_stages", self.top_stages is None or self.top_stages >= 1, "None or >= 1"),
            ("warmup_frozen_epochs", self.warmup_frozen_epochs >= 0, ">= 0"),
            ("mixup", self.mixup >= 0, ">= 0"),
            ("cutmix", self.cutmix >= 0, ">= 0"),
            ("ema_decay", self.ema_decay is None or 0 < self.ema_decay < 1, "None or in (0, 1)"),
            ("amp", self.amp in AMP_MODES, f"one of {AMP_MODES}"),
            ("workers", self.workers >= 0, ">= 0"),
        ]
        for name, ok, expected in checks:
            if not ok:
                raise ValueError(f"TrainConfig.{name}={getattr(self, name)!r}; expected {expected}")

    @property
    def smoothing(self) -> float:
        """The label smoothing in effect: as given, else 0 for linear heads and 0.1 for MLP heads."""
        if self.label_smoothing is not None:
            return self.label_smoothing
        return 0.0 if self.hidden is None else 0.1

    def to_dict(self) -> dict[str, Any]:
        """The config as plain JSON values (what a run records)."""
        out = dataclasses.asdict(self)
        out["c_grid"] = list(self.c_grid)
        return out


def train_config_fields() -> dict[str, dataclasses.Field[Any]]:
    """The settable fields of :class:`TrainConfig`, by name."""
    return {f.name: f for f in fields(TrainConfig)}


def read_train_config(path: str | Path) -> dict[str, Any]:
    """Read training options from a TOML (or JSON) file: ``key = value`` lines named as TrainConfig's fields.

    A ``[train]`` table is used when present, so one file can hold other sections too.

    Raises:
        HierclassError: an unreadable file, a syntax error, or an unknown option (named, with the known ones).
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise HierclassError(f"{path}: cannot read the config file ({e.strerror or e})") from None
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import tomllib

            data = tomllib.loads(text)
    except (ValueError, json.JSONDecodeError) as e:
        raise HierclassError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'TOML'}: {e}") from None
    if not isinstance(data, dict):
        raise HierclassError(f"{path}: expected a table of options, got {type(data).__name__}")
    data = data.get("train", data)
    known = train_config_fields()
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise HierclassError(
            f"{path}: unknown training option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
        )
    if "c_grid" in data:
        data["c_grid"] = tuple(data["c_grid"])
    return dict(data)
