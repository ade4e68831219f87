"""The one training loop for the router, the experts and the flat head.

The three heads differ only by their :class:`Task`: which samples they learn from, their
targets and how the model's output becomes log-probabilities over the admissible classes.
Everything else (minibatches, AdamW with warm-up and cosine decay, label smoothing, class
balancing, validation, early stopping, logging, checkpointing and resuming) is shared in
:func:`train_head`, and one loop (:func:`train_one_epoch`) serves the three kinds of input:
pooled vectors and trunk maps streamed from a float16 feature store (:class:`Split`), and
images decoded and augmented as they go (:class:`~hierclass.data.training.ImageSplit`), where
the model is a whole CNN (:class:`~hierclass.models.finetune.ImageClassifier`). Under torchrun
the same loop runs in every process, through DistributedDataParallel (:mod:`hierclass.distributed`).

* router: every labelled image, target = its level-1 branch.
* flat: every labelled image, target = its leaf.
* experts: images of branches with more than one leaf (a single-leaf branch has nothing to
  learn), target = the leaf's branch-local index; each image only runs and updates its own
  branch's expert (:meth:`~hierclass.models.heads.ExpertHeads.routed_logits`). With
  ``branch=...`` only that branch's images are used and only its expert is replaced in the
  existing packed checkpoint.
* experts with ``expert_other``: every labelled image (single-leaf branches' too) trains every
  expert; expert ``b``'s target is the image's branch-local leaf if the image is in ``b``, else
  ``b``'s extra "other" class. The loss of an image is the sum over experts of each expert's
  cross-entropy over its leaves and its other class (label smoothing spread over those), so at
  inference an expert that was routed to by mistake can say "not mine" (see
  :class:`~hierclass.inference.HierarchicalClassifier`). With ``branch=...`` only that expert's
  term is computed, on every labelled image. Class balancing weights each image by its leaf's
  count, as without other ("other" is not a class of its own for balancing); validation accuracy
  stays the accuracy within the true branch, over the images of branches with more than one leaf
  (of ``branch`` only, when given), and the validation loss is the training loss without smoothing.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from hierclass.checkpoint import backbone_config, class_order, feature_config, load_model, read_meta, save_model
from hierclass.config import TrainConfig
from hierclass.data.splits import holdout_mask
from hierclass.data.training import ImageRows, ImageSplit, shard
from hierclass.distributed import Dist
from hierclass.errors import CheckpointError, ConfigError, HierclassError
from hierclass.featurestore import FeatureStore, FeatureStoreError, float32_rows
from hierclass.logistic import PathResult, Preconditioner, Problem, fit_path, use_bf16
from hierclass.models.heads import ExpertHeads, FlatHead, RouterHead
from hierclass.taxonomy import Taxonomy

KINDS = ("router", "experts", "flat")

__all__ = ["KINDS", "Task", "TrainConfig", "train_head"]


# ---------------------------------------------------------------------------- tasks
@dataclass(frozen=True)
class Task:
    """What one head learns: its samples, targets and admissible classes.

    Attributes:
        kind: ``"router"``, ``"experts"`` or ``"flat"``.
        taxonomy: the class indices.
        branch: experts only: train this branch's expert alone.
        other: experts only: every expert also learns an "other" class from every other branch's samples.
    """

    kind: str
    taxonomy: Taxonomy
    branch: int | None = None
    other: bool = False

    @property
    def expert_other(self) -> bool:
        """Experts with an other class (the loss and sample set differ; see the module doc)."""
        return self.kind == "experts" and self.other

    @property
    def n_classes(self) -> int:
        """The number of global classes (columns of the head)."""
        return self.taxonomy.n_level1 if self.kind == "router" else self.taxonomy.n_leaves

    def sample_mask(self, leaf: np.ndarray) -> np.ndarray:
        """Which images (by leaf index, -1 = unlabelled) this head learns from."""
        labelled = leaf >= 0
        if self.kind != "experts" or self.other:
            return labelled
        branch = self.taxonomy.leaf_level1[np.where(labelled, leaf, 0)]
        keep = labelled & (self.taxonomy.branch_sizes[branch] > 1)
        return keep & (branch == self.branch) if self.branch is not None else keep

    def targets(self, leaf: np.ndarray) -> np.ndarray:
        """The global class of each labelled image: its branch (router) or its leaf (experts, flat)."""
        return self.taxonomy.leaf_level1[leaf] if self.kind == "router" else np.asarray(leaf)

    def build_model(self, dim: int, config: TrainConfig, store_meta: dict[str, Any] | None = None) -> nn.Module:
        """A freshly initialised model for this task: a head on pooled features, a CNN top on trunk maps
        (its stages starting from the backbone's pretrained weights)."""
        spec = top_spec(store_meta or {})
        if spec is not None:
            from hierclass.models.tops import build_top_model

            pretrained = str((store_meta or {}).get("pretrained", "none"))
            return build_top_model(self.kind, self.taxonomy, spec, pretrained, config.dropout, config.bn)
        if self.kind == "router":
            return RouterHead(dim, self.taxonomy.n_level1, hidden=config.hidden, dropout=config.dropout)
        if self.kind == "flat":
            return FlatHead(dim, self.taxonomy.n_leaves, hidden=config.hidden, dropout=config.dropout)
        return ExpertHeads(dim, self.taxonomy, hidden=config.hidden, dropout=config.dropout, other=self.other)

    def _index(self, name: str, device: torch.device) -> Tensor:
        """A taxonomy index array (``leaf_level1``, ``leaf_local``, ``branch_sizes``) as a tensor on ``device``."""
        return torch.tensor(getattr(self.taxonomy, name), device=device)  # a copy: the arrays are read-only

    def log_probs(self, model: nn.Module, x: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        """Log-probabilities over each sample's admissible classes and the target column in them.

        Router and flat: a softmax over all classes. Experts: each sample's own branch only
        (branch-local columns; ``-inf`` past the branch's size), so the loss of an image
        touches its own expert only. Only ``model(x)`` and, for experts, ``model(x, branch)``
        are called, so a wrapper such as DistributedDataParallel works unchanged.
        """
        if self.kind != "experts":
            return F.log_softmax(model(x), dim=1), target
        leaf_branch = self._index("leaf_level1", target.device)[target]
        return F.log_softmax(model(x, leaf_branch), dim=1), self._index("leaf_local", target.device)[target]

    def loss(
        self, model: nn.Module, x: Tensor, target: Tensor, smoothing: float = 0.0, weight: Tensor | None = None
    ) -> Tensor:
        """The training loss of a batch (``target``: global classes; ``weight``: per-sample weights)."""
        if not self.expert_other:
            log_probs, local = self.log_probs(model, x, target)
            return smoothed_nll(log_probs, local, smoothing, weight)
        if self.branch is not None:
            # One expert's term: its leaves + other on every sample (other experts untouched).
            b = self.branch
            in_b = model.leaf_branch[target] == b
            column = torch.where(in_b, model.leaf_local[target], model.branch_sizes[b])
            log_probs = F.log_softmax(model.branch_logits(x, b, include_other=True), dim=1)
            return smoothed_nll(log_probs, column, smoothing, weight)
        leaf_lp, other_lp = model.log_probs_with_other(x)  # [N, n_leaves], [N, n_level1]
        true_branch = model.leaf_branch[target].unsqueeze(1)
        # Each expert's target: "other", except the true branch's expert, whose target is the leaf.
        nll = -(other_lp.sum(1) - other_lp.gather(1, true_branch).squeeze(1) + leaf_lp.gather(1, target[:, None])[:, 0])
        if smoothing > 0:
            per_branch = other_lp + other_lp.new_zeros(other_lp.shape).index_add(1, model.leaf_branch, leaf_lp)
            spread = -(per_branch / (model.sizes + 1)).sum(1)  # each expert's mean over its leaves + other
            nll = (1 - smoothing) * nll + smoothing * spread
        return nll.mean() if weight is None else (nll * weight).sum() / weight.sum()

    def soft_loss(self, model: nn.Module, x: Tensor, soft: Tensor) -> Tensor:
        """Cross-entropy against soft targets ``[N, n_classes]`` (mixup / cutmix; router and flat only)."""
        if self.kind == "experts":
            raise HierclassError("mixup and cutmix mix images of different branches; experts cannot learn from them")
        return -(soft * F.log_softmax(model(x).float(), dim=1)).sum(1).mean()

    @torch.no_grad()
    def correct(self, model: nn.Module, x: Tensor, target: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Per sample: whether the head is right, whether the sample is scored, and its group.

        Router and flat: the argmax over all classes, every sample scored, one group (0). Experts:
        the leaf chosen within the true branch, grouped by that branch; with ``expert_other`` a
        single-leaf branch's samples are not scored (its own leaf is always right), and with
        ``branch`` only that branch's samples are.
        """
        if self.kind != "experts":
            log_probs, local = self.log_probs(model, x, target)
            right = log_probs.argmax(1) == local
            return right, torch.ones_like(right), torch.zeros_like(target)
        branch = self._index("leaf_level1", target.device)[target]
        scored = self._index("branch_sizes", target.device)[branch] > 1
        if self.branch is not None:
            scored &= branch == self.branch
        pred = model(x, branch).argmax(1)
        return pred == self._index("leaf_local", target.device)[target], scored, branch

    @property
    def n_groups(self) -> int:
        """How many independent problems the head holds: one per expert, else one."""
        return self.taxonomy.n_level1 if self.kind == "experts" else 1


def top_spec(store_meta: dict[str, Any]) -> dict[str, Any] | None:
    """What a CNN top needs from a store of trunk maps (None for pooled features)."""
    if not store_meta.get("top_stages"):
        return None
    return {k: store_meta[k] for k in ("backbone", "top_stages", "map_shape", "num_features")}


def smoothed_nll(log_probs: Tensor, target: Tensor, smoothing: float = 0.0, weight: Tensor | None = None) -> Tensor:
    """Cross-entropy with label smoothing over the admissible (finite) classes, optionally sample-weighted.

    Args:
        log_probs: ``[N, C]``; ``-inf`` marks classes a sample cannot have (an expert's padding).
        target: ``[N]`` column of the true class.
        smoothing: the probability mass spread uniformly over each sample's admissible classes.
        weight: ``[N]`` per-sample weights (the loss is their weighted mean).
    """
    nll = -log_probs.gather(1, target.unsqueeze(1)).squeeze(1)
    if smoothing > 0:
        finite = torch.isfinite(log_probs)
        spread = -torch.where(finite, log_probs, 0.0).sum(1) / finite.sum(1)
        nll = (1 - smoothing) * nll + smoothing * spread
    if weight is None:
        return nll.mean()
    return (nll * weight).sum() / weight.sum()


# ---------------------------------------------------------------------------- data
@dataclass
class Split:
    """The rows of a feature store one head trains or validates on."""

    store: FeatureStore
    rows: np.ndarray  # store row indices, sorted
    target: np.ndarray  # global class per row (aligned with ``rows``)
    flip: np.random.Generator | None = None  # training: read half the rows from the flipped view

    def __len__(self) -> int:
        return len(self.rows)

    def batch(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Features (float32) and targets of the given positions, read in ascending row order.

        With ``flip`` set, each row comes from the stored horizontally flipped view with probability 1/2.
        """
        positions = np.sort(positions)  # sequential memmap reads; order inside a batch does not matter
        rows = self.rows[positions]
        feats = float32_rows(self.store.features(), rows)
        if self.flip is not None:
            flipped = self.flip.random(len(rows)) < 0.5
            if flipped.any():
                feats[flipped] = float32_rows(self.store.features("hflip"), rows[flipped])
        return feats, self.target[positions]

    def positions(
        self, epoch: int, rng: np.random.Generator, sample_p: np.ndarray | None, dist: Dist, seed: int
    ) -> np.ndarray:
        """This rank's positions for an epoch, in training order: a permutation drawn from ``rng`` (or a
        class-weighted draw with ``sample_p``), every ``world``-th entry of it under torchrun."""
        n = len(self)
        order = rng.choice(n, size=n, p=sample_p) if sample_p is not None else rng.permutation(n)
        return shard(order, dist)

    def batches(
        self,
        positions: np.ndarray,
        batch_size: int,
        device: torch.device,
        channels_last: bool = False,
        epoch: int | None = None,
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """``(features, targets)`` on ``device`` for consecutive ``batch_size`` slices of ``positions``
        (``channels_last`` and ``epoch`` concern images; stored features ignore them)."""
        for start in range(0, len(positions), batch_size):
            feats, target = self.batch(positions[start : start + batch_size])
            yield torch.from_numpy(feats).to(device), torch.from_numpy(target).to(device)

    def all(self, device: str) -> tuple[Tensor, Tensor]:
        """Every row's features (float32) and targets as tensors on ``device`` (the full-batch solver)."""
        feats = np.empty((len(self), self.store.dim), dtype=np.float32)
        chunk = 65_536  # bounds the float16 read buffer
        for start in range(0, len(self), chunk):
            feats[start : start + chunk] = self.batch(np.arange(start, min(start + chunk, len(self))))[0]
        return torch.from_numpy(feats).to(device), torch.from_numpy(self.target).to(device)


Data = Split | ImageSplit  # what the loop trains on: stored feature rows, or images decoded as it goes


def _split(store: FeatureStore | ImageRows, task: Task, rows_mask: np.ndarray | None = None) -> Data:
    leaf = np.asarray(store.leaf)
    keep = store.valid & task.sample_mask(leaf)
    if rows_mask is not None:
        keep &= rows_mask
    rows = np.flatnonzero(keep)
    target = task.targets(leaf[rows]).astype(np.int64)
    return ImageSplit(store, rows, target) if isinstance(store, ImageRows) else Split(store, rows, target)


def feature_stats(data: Split, max_rows: int = 100_000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std of the features of ``data`` (float32 ``[dim]`` each), from at most ``max_rows`` rows.

    A random sample of rows keeps this one cheap pass at any scale; 100k rows pin each
    feature's mean and std to well under 1% of its std.
    """
    n = len(data)
    positions = np.arange(n)
    if n > max_rows:
        positions = np.sort(np.random.default_rng(seed).choice(n, size=max_rows, replace=False))
    total = np.zeros(data.store.dim)
    total_sq = np.zeros(data.store.dim)
    for start in range(0, len(positions), 16_384):
        feats = data.batch(positions[start : start + 16_384])[0].astype(np.float64)
        total += feats.sum(0)
        total_sq += np.square(feats).sum(0)
    mean = total / len(positions)
    var = np.maximum(total_sq / len(positions) - np.square(mean), 0.0)
    return mean.astype(np.float32), np.sqrt(var).astype(np.float32)


def _check_stores(train: FeatureStore, val: FeatureStore | None, taxonomy: Taxonomy) -> None:
    train.check_taxonomy(taxonomy.fingerprint)
    if val is None:
        return
    val.check_taxonomy(taxonomy.fingerprint)
    a, b = backbone_config(train.meta), backbone_config(val.meta)
    if a != b or train.dim != val.dim:
        diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k)) or ["dim"]
        raise FeatureStoreError(
            f"{val.root}: validation features come from another backbone than {train.root} "
            f"(differ in {', '.join(diff)}); extract both with the same backbone and preprocessing"
        )


def class_weights(target: np.ndarray, n_classes: int, power: float) -> np.ndarray:
    """Per-class weights ``count ** -power`` scaled so the average training image weighs 1 (unseen classes: 0)."""
    counts = np.bincount(target, minlength=n_classes).astype(np.float64)
    w = np.zeros(n_classes)
    seen = counts > 0
    w[seen] = counts[seen] ** -power
    return w * counts.sum() / (w * counts).sum()


# ---------------------------------------------------------------------------- scoring
@dataclass
class Scores:
    """A head's loss and accuracy on a split, with the accuracy of each group (expert) apart."""

    loss: float  # mean unsmoothed loss over the split
    correct: np.ndarray  # [n_groups] right among the scored samples
    scored: np.ndarray  # [n_groups] scored samples

    @property
    def acc(self) -> float:
        """Accuracy over every scored sample (1.0 when none is scored)."""
        n = int(self.scored.sum())
        return float(self.correct.sum()) / n if n else 1.0


@torch.no_grad()
def score(model: nn.Module, task: Task, data: Data, config: TrainConfig, dist: Dist | None = None) -> Scores:
    """The loss (plain cross-entropy over admissible classes) and accuracy of ``model`` on ``data``.

    For experts, accuracy is within the true branch: how often the right expert picks the right leaf.
    Under torchrun each rank scores every ``world``-th sample and the sums are added up across ranks.
    """
    dist = dist or Dist()
    model.eval()
    device = torch.device(config.device)
    loss_sum, seen = 0.0, 0
    correct = np.zeros(task.n_groups, dtype=np.int64)
    scored = np.zeros(task.n_groups, dtype=np.int64)
    positions = np.arange(len(data))[dist.rank :: dist.world]
    batch_size = config.eval_batch_size if isinstance(data, Split) else config.batch_size or 128
    with _autocast(config):
        for x, t in data.batches(positions, batch_size, device, _channels_last(config)):
            if len(t) == 0:
                continue
            loss_sum += float(task.loss(model, x, t)) * len(t)
            seen += len(t)
            right, counted, group = task.correct(model, x, t)
            correct += np.bincount(group[right & counted].cpu().numpy(), minlength=task.n_groups)
            scored += np.bincount(group[counted].cpu().numpy(), minlength=task.n_groups)
    if dist.active:
        total = dist.all_sum([loss_sum, seen, *correct.tolist(), *scored.tolist()])
        loss_sum, seen = float(total[0]), int(total[1])
        correct = total[2 : 2 + task.n_groups].numpy().astype(np.int64)
        scored = total[2 + task.n_groups :].numpy().astype(np.int64)
    return Scores(loss_sum / max(1, seen), correct, scored)


def _better(a: Scores, b: Scores | None) -> bool:
    return b is None or (a.acc, -a.loss) > (b.acc, -b.loss)


# ---------------------------------------------------------------------------- solvers
def resolve_solver(config: TrainConfig, n_rows: int, dim: int, tops: bool = False, n_classes: int = 0) -> str:
    """The solver ``config.solver`` means for a training set of ``n_rows`` x ``dim`` features (``tops``: trunk maps).

    ``auto`` picks L-BFGS for a linear head when both its float32 features and its largest
    problem's logits (``n_rows`` x ``n_classes``) fit in ``config.lbfgs_memory_mb``.
    """
    if config.solver == "lbfgs" and (config.hidden is not None or tops):
        what = "CNN tops" if tops else "hidden"
        raise ConfigError(f"--solver lbfgs solves linear heads only; use --solver adamw (or auto) with {what}")
    if tops:
        return "adamw"
    if config.solver != "auto":
        return config.solver
    fits = n_rows * max(dim, n_classes) * 4 <= config.lbfgs_memory_mb * 2**20
    return "lbfgs" if config.hidden is None and fits else "adamw"


def auto_epochs(config: TrainConfig, n_train: int, tops: bool = False) -> tuple[int, int]:
    """``(epochs, patience)``: as configured, or enough passes for ``min_steps`` steps (10 to 300 for heads
    on pooled features, 3 to 30 for CNN tops, whose steps cost far more)."""
    steps_per_epoch = math.ceil(n_train / (config.batch_size or 512))
    low, high = (3, 30) if tops else (10, 300)
    epochs = config.epochs or min(high, max(low, math.ceil(config.min_steps / steps_per_epoch)))
    patience = config.patience if config.patience is not None else max(3, epochs // 10)
    return epochs, patience


class _Log:
    """One record per epoch (AdamW) or per C (L-BFGS) to ``log.jsonl`` and, when asked, a line on the console."""

    def __init__(self, path: Path, what: str, echo: Callable[[str], None] | None, common: dict[str, Any]):
        self.path, self.what, self.echo, self.common = path, what, echo, common

    def __call__(self, record: dict[str, Any], line: str) -> None:
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps({**record, **self.common}) + "\n")
        self.say(f"{self.what}: {line}")

    def say(self, line: str) -> None:
        if self.echo is not None:
            self.echo(line)


def _lbfgs_problems(
    task: Task, x: Tensor, t: Tensor, hold: tuple[Tensor, Tensor] | None, weights: Tensor | None
) -> list[tuple[int | None, Problem]]:
    """The independent softmax regressions of a linear head, each with its holdout rows.

    Router and flat: one, over all classes. Experts: one per branch (``None`` for the others),
    on its own images over its leaves; with ``--expert-other``, on every image over its leaves
    plus "other". ``x`` and ``t`` are sorted by class, so a branch's images are one slice of them.
    """

    def problem(name: str, rows: Any, target: Tensor, k: int, hold_rows: Any, hold_target: Any) -> Problem:
        return Problem(
            name,
            x[rows],
            target,
            k,
            weight=weights[t[rows]] if weights is not None else None,
            hold_x=hold[0][hold_rows] if hold is not None else None,
            hold_target=hold_target,
        )

    if task.kind != "experts":
        everything = slice(None)
        return [(None, problem(task.kind, everything, t, task.n_classes, everything, hold[1] if hold else None))]
    tax = task.taxonomy
    leaf_branch, leaf_local = task._index("leaf_level1", t.device), task._index("leaf_local", t.device)
    branch_of, hold_branch = leaf_branch[t], leaf_branch[hold[1]] if hold is not None else None
    out: list[tuple[int | None, Problem]] = []
    for b in range(tax.n_level1) if task.branch is None else [task.branch]:
        size, name = int(tax.branch_sizes[b]), tax.level1_names[b]
        if task.other:
            target = torch.where(branch_of == b, leaf_local[t], size)
            hold_target = None if hold is None else torch.where(hold_branch == b, leaf_local[hold[1]], size)
            out.append((b, problem(name, slice(None), target, size + 1, slice(None), hold_target)))
            continue
        rows = torch.nonzero(branch_of == b).flatten()
        if size < 2 or len(rows) == 0:
            continue
        span = slice(int(rows[0]), int(rows[-1]) + 1)  # sorted by class: one contiguous slice
        hold_rows = torch.nonzero(hold_branch == b).flatten() if hold is not None else None
        hold_target = leaf_local[hold[1][hold_rows]] if hold is not None else None
        out.append((b, problem(name, span, leaf_local[t[span]], size, hold_rows, hold_target)))
    return out


@torch.no_grad()
def _set_linear(model: nn.Module, branch: int | None, weight: Tensor, bias: Tensor) -> None:
    """Write one problem's solution into the head: the whole linear layer, or one expert's rows (and other)."""
    if branch is None:
        linear = model.net[-1]
        linear.weight.copy_(weight)
        linear.bias.copy_(bias)
        return
    size = model.branch_sizes[branch]  # the problem's classes: the branch's leaves, then its other class
    solved = {"linear.weight": weight[:size], "linear.bias": bias[:size]}
    solved |= {"other_linear.weight": weight[size], "other_linear.bias": bias[size]} if model.other else {}
    for name, (param, index) in model.branch_parameters(branch).items():
        param[index] = solved[name]


def fit_lbfgs(
    model: nn.Module,
    task: Task,
    fit: Split,
    hold: Split | None,
    config: TrainConfig,
    weights: Tensor | None,
    log: _Log,
) -> dict[str, Any]:
    """Solve a linear head exactly: each of its softmax regressions along its own path of L2 strengths.

    Each regression (the head itself, or one expert) minimises its weighted mean cross-entropy
    plus ``|W|^2 / (2 * C * n)``, biases unpenalised: scikit-learn's LogisticRegression(C). Its
    holdout picks its C (:func:`hierclass.logistic.fit_path`).
    """
    device = config.device
    x, t = fit.all(device)
    with torch.no_grad():
        x.sub_(model.norm.mean).div_(model.norm.std)  # standardised once, in place: no second copy
        order = torch.argsort(t, stable=True)  # grouped by class, so by branch: each expert's images are a slice
        x, t = x[order], t[order]
        held = None
        if hold is not None:
            hx, ht = hold.all(device)
            held = (hx.sub_(model.norm.mean).div_(model.norm.std), ht)
    if config.c is not None:
        grid = [config.c]
    elif hold is None:
        grid = [1.0]
        log.say("no holdout to choose C on: C=1")
    else:
        grid = sorted(config.c_grid)
    bf16 = use_bf16(config.bf16, device, config.tol)
    preconditioner = Preconditioner.from_features(x, fast=bf16)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()  # experts left untrained (a single leaf, no images) give every leaf the same score
    model.eval()
    chosen: dict[str, PathResult] = {}
    sizes: dict[str, int] = {}
    warnings: list[str] = []
    for branch, problem in _lbfgs_problems(task, x, t, held, weights):
        prefix = "" if branch is None else f"expert {problem.name!r}: "

        def say(record: dict[str, Any], line: str, name: str = problem.name, prefix: str = prefix) -> None:
            log({"solver": "lbfgs", **({"expert": name} if prefix else {}), **record}, prefix + line)

        result = fit_path(
            problem, grid, config.c_start, preconditioner, max_iter=config.max_iter, tol=config.tol,
            smoothing=config.smoothing, bf16=bf16, log=say,
        )  # fmt: skip
        _set_linear(model, branch, result.weight, result.bias)
        chosen[problem.name], sizes[problem.name] = result, problem.n
        warnings += [prefix + w for w in result.warnings]
    if not chosen:
        raise HierclassError(f"no {task.kind} problem has labelled images to learn from")
    by_c: dict[float, int] = {}
    for name, r in chosen.items():
        by_c[r.c] = by_c.get(r.c, 0) + sizes[name]
    info: dict[str, Any] = {
        "solver": "lbfgs",
        "c": max(by_c, key=by_c.__getitem__),  # experts: the C chosen for the most training images
        "iterations": sum(r.iterations for r in chosen.values()),
        "evaluations": sum(r.evaluations for r in chosen.values()),
        "train_loss": sum(r.train_loss * sizes[name] for name, r in chosen.items()) / sum(sizes.values()),
        "bf16": any(r.bf16 for r in chosen.values()),
    }
    if task.kind == "experts":
        info["c_per_branch"] = {name: r.c for name, r in chosen.items()}
    info["warnings"] = warnings
    return info


def lr_at(step: int, total: int, config: TrainConfig) -> float:
    """Learning rate at an optimiser step: linear warm-up, then cosine decay to ``lr * min_lr_ratio``."""
    warm = int(config.warmup * total)
    if step < warm:
        return config.lr * (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    floor = config.lr * config.min_lr_ratio
    return floor + (config.lr - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def param_groups(model: nn.Module, config: TrainConfig) -> list[dict[str, Any]]:
    """The optimiser's parameter groups, each with its ``lr_scale``: a CNN top's pretrained stages train at
    ``top_lr_ratio`` of the learning rate, new layers (classifiers, heads) at the full rate."""
    pretrained = list(getattr(model, "pretrained_parameters", lambda: iter(()))())
    mine = {id(p) for p in pretrained}
    new = [p for p in model.parameters() if id(p) not in mine]
    groups = [{"params": new, "lr_scale": 1.0}]
    if pretrained:
        groups.append({"params": pretrained, "lr_scale": config.top_lr_ratio})
    return groups


def _adamw(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW, with the fused kernel where this torch and device have it (~6x the default on CPU for a
    5,270 x 1,280 head: 0.03 s against 0.2 s a step)."""
    groups = param_groups(model, config)
    try:
        return torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)


@dataclass
class Loop:
    """What one training step needs beyond the model, the data and the optimiser.

    Attributes:
        dist: this process's place in a torchrun job (one process by default).
        ddp: the DistributedDataParallel wrapper the forward pass goes through (None: the model itself).
        scaler: fp16's gradient scaler (None: bf16 or float32 need none).
        ema: an exponential moving average of the weights, updated after each step (timm's ``ModelEmaV3``).
        mixup: timm's ``Mixup`` (router and flat from images): mixed images, soft targets.
        checkpoint: called with ``(epoch, batches done, step, epoch's generator state, (loss sum, samples))``
            every ``config.checkpoint_every`` steps, to save the state mid-epoch.
        partial: ``(loss sum, samples)`` of the batches done before a mid-epoch resume.
    """

    dist: Dist = field(default_factory=Dist)
    ddp: nn.Module | None = None
    scaler: Any = None
    ema: Any = None
    mixup: Any = None
    checkpoint: Callable[..., None] | None = None
    partial: tuple[float, int] = (0.0, 0)


def _autocast(config: TrainConfig) -> Any:
    """Mixed precision for the block when asked (CUDA only; the config is checked before training)."""
    if config.amp == "off":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16 if config.amp == "bf16" else torch.float16)


def _channels_last(config: TrainConfig) -> bool:
    return config.channels_last if config.channels_last is not None else config.device.startswith("cuda")


def train_one_epoch(
    model: nn.Module,
    task: Task,
    data: Data,
    optimizer: torch.optim.Optimizer,
    config: TrainConfig,
    rng: np.random.Generator,
    step: int,
    total_steps: int,
    weights: Tensor | None,
    sample_p: np.ndarray | None,
    desc: str = "train",
    *,
    epoch: int = 1,
    skip: int = 0,
    loop: Loop | None = None,
) -> tuple[float, int]:
    """One pass of minibatches in a fresh random order; returns (mean loss over every rank, next step).

    The same loop trains heads on pooled features, CNN tops on trunk maps and whole CNNs on images:
    ``data`` gives this rank's order and its batches, the model is called through ``task``.

    Args:
        skip: batches of this epoch already done (a resume from a mid-epoch checkpoint): the epoch's order
            is drawn again and its first ``skip`` batches are not read.
        loop: distribution, mixed precision, EMA, mixup and mid-epoch checkpoints (default: none of them).
    """
    loop = loop or Loop()
    model.train()
    device = torch.device(config.device)
    epoch_rng = copy.deepcopy(rng.bit_generator.state)
    positions = data.positions(epoch, rng, sample_p, loop.dist, config.seed)
    forward = loop.ddp if loop.ddp is not None else model
    bs = config.batch_size
    n_batches = math.ceil(len(positions) / bs)
    total, seen = loop.partial if skip else (0.0, 0)
    bar = tqdm(total=n_batches, initial=skip, desc=desc, unit="batch", leave=False, disable=_no_bar(config))
    batches = data.batches(positions[skip * bs :], bs, device, _channels_last(config), epoch=epoch)
    for i, (x, t) in enumerate(batches, start=skip):
        if len(t) == 0 and not loop.dist.active:  # every image of the batch failed to decode
            continue
        lr = lr_at(step, total_steps, config)
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        with _autocast(config):
            if loop.mixup is not None and len(t) % 2 == 0:
                x, soft = loop.mixup(x, t)
                loss = task.soft_loss(forward, x, soft)
            else:
                loss = task.loss(forward, x, t, config.smoothing, weights[t] if weights is not None else None)
        optimizer.zero_grad(set_to_none=True)
        if loop.scaler is not None:
            loop.scaler.scale(loss).backward()
            if config.grad_clip:
                loop.scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            loop.scaler.step(optimizer)
            loop.scaler.update()
        else:
            loss.backward()
            if config.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
        if loop.ema is not None:
            loop.ema.update(model)
        step += 1
        total += loss.item() * len(t)
        seen += len(t)
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{lr:.2e}", refresh=False)
        every = config.checkpoint_every
        if loop.checkpoint is not None and every and step % every == 0 and i + 1 < n_batches:
            loop.checkpoint(epoch, i + 1, step, epoch_rng, (total, seen))
    bar.close()
    if loop.dist.active:
        total, seen = (float(v) for v in loop.dist.all_sum([total, seen]))
    return total / max(1, seen), step


RESUME_FILE = "resume.pt"  # the AdamW state at the last checkpoint, removed when training ends


def _resume_key(task: Task, fit: Data, config: TrainConfig, dist: Dist | None = None) -> str:
    """What a saved training state must match to be continued: the task, the training rows, the config and
    the number of processes."""
    import hashlib

    # device: under torchrun each rank runs on cuda:LOCAL_RANK, and every rank must accept rank 0's state
    ignored = ("progress", "eval_batch_size", "workers", "checkpoint_every", "device")
    digest = hashlib.sha256()
    settings = {k: v for k, v in config.to_dict().items() if k not in ignored}
    world = (dist or Dist()).world
    digest.update(json.dumps([task.kind, task.branch, task.other, settings, world], sort_keys=True).encode())
    digest.update(np.ascontiguousarray(fit.rows).tobytes())
    digest.update(str(_data_root(fit).resolve()).encode())
    return digest.hexdigest()[:16]


def _data_root(data: Data) -> Path:
    return data.store.root if isinstance(data, Split) else data.images.root


def _save_resume(path: Path, state: dict[str, Any]) -> None:
    from hierclass.atomic import atomic_path

    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def _load_resume(path: Path | None, key: str) -> dict[str, Any] | None:
    """The state saved by an interrupted training with the same ``key``, else None (a stale file is ignored)."""
    if path is None or not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)  # tensors and plain values only
    except Exception:  # noqa: BLE001 (a damaged state file is restarted from scratch, not an error)
        return None
    return state if isinstance(state, dict) and state.get("key") == key else None


def _python_rng_states() -> dict[str, Any]:
    """Python's and numpy's global generators (RandAugment and mixup draw from them), as plain values."""
    import random

    np_state = np.random.get_state(legacy=False)
    np_state["state"]["key"] = np_state["state"]["key"].tolist()
    return {"random": random.getstate(), "numpy": np_state}


def _set_python_rng_states(states: dict[str, Any]) -> None:
    import random

    version, internal, gauss = states["random"]
    random.setstate((version, tuple(internal), gauss))
    np_state = dict(states["numpy"])
    np_state["state"] = {**np_state["state"], "key": np.asarray(np_state["state"]["key"], dtype=np.uint32)}
    np.random.set_state(np_state)


def _ddp(model: nn.Module, task: Task, dist: Dist, device: torch.device) -> nn.Module | None:
    """The model wrapped in DistributedDataParallel under torchrun (None in one process). Built again when
    the trainable parameters change (the frozen warm-up ends): DDP fixes them when it is built."""
    if not dist.active:
        return None
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(
        model,
        device_ids=[device.index] if device.type == "cuda" else None,
        find_unused_parameters=task.kind == "experts",  # a batch only runs the experts of its samples' branches
    )


def _set_phase(model: nn.Module, epoch: int, config: TrainConfig) -> bool:
    """Freeze the backbone during the first ``warmup_frozen_epochs`` epochs; whether the phase changed."""
    if not hasattr(model, "freeze_backbone"):
        return False
    frozen = epoch <= config.warmup_frozen_epochs
    if model.backbone_frozen == frozen:
        return False
    model.freeze_backbone(frozen)
    return True


def fit_adamw(
    model: nn.Module,
    task: Task,
    fit: Data,
    hold: Data | None,
    config: TrainConfig,
    weights: Tensor | None,
    sample_p: np.ndarray | None,
    log: _Log,
    resume: Path | None = None,
    dist: Dist | None = None,
) -> dict[str, Any]:
    """Minibatch AdamW with warm-up and cosine decay; keeps the epoch with the best holdout accuracy.

    With ``resume`` (a file path), the whole training state (model, best model, optimizer, gradient
    scaler, EMA, step, epoch and batch within it, random generators) is saved there after every epoch
    and every ``config.checkpoint_every`` steps, atomically and by rank 0 only; a training killed
    midway and started again with the same task, data and config continues from its last checkpoint
    and ends with the same weights as one that was never interrupted (each image's augmentation is
    seeded by the epoch and its place in it: :class:`~hierclass.data.training.ImageSplit`). The file is
    removed when training ends.

    A model with a backbone to freeze (:class:`~hierclass.models.finetune.ImageClassifier`) trains its
    head alone for ``config.warmup_frozen_epochs`` epochs, then its backbone too, at ``top_lr_ratio``
    of the learning rate (its parameter group). With ``config.ema_decay`` the average weights are the
    ones scored and kept.
    """
    dist = dist or Dist()
    device = torch.device(config.device)
    epochs, patience = auto_epochs(config, len(fit), tops=hasattr(model, "pretrained_parameters"))
    optimizer = _adamw(model, config)
    rng = np.random.default_rng(config.seed)
    per_rank = math.ceil(len(fit) / dist.world)
    total_steps = math.ceil(per_rank / config.batch_size) * epochs
    loop = Loop(dist=dist, scaler=torch.amp.GradScaler("cuda") if config.amp == "fp16" else None)
    if config.ema_decay is not None:
        from timm.utils import ModelEmaV3

        loop.ema = ModelEmaV3(model, decay=config.ema_decay)
    if config.mixup > 0 or config.cutmix > 0:
        from timm.data import Mixup

        loop.mixup = Mixup(
            mixup_alpha=config.mixup,
            cutmix_alpha=config.cutmix,
            label_smoothing=config.smoothing,
            num_classes=task.n_classes,
        )
    step, since_best, epochs_run, first, skip = 0, 0, 0, 1, 0
    best: Scores | None = None
    best_epoch, best_state, best_loss = 0, None, float("nan")
    key = _resume_key(task, fit, config, dist)

    def snapshot(
        done: int, batch: int, at_step: int, epoch_rng: dict[str, Any] | None, partial: tuple[float, int]
    ) -> None:
        """Save the state after ``batch`` batches of epoch ``done + 1`` (0: at the end of epoch ``done``)."""
        if resume is None or not dist.main:
            return
        _save_resume(
            resume,
            {
                "key": key,
                "epoch": done,
                "batch": batch,
                "partial": list(partial),
                "epoch_rng": epoch_rng,
                "step": at_step,
                "since_best": since_best,
                "best_epoch": best_epoch,
                "best_loss": best_loss,
                "best_scores": None if best is None else (best.loss, best.correct.tolist(), best.scored.tolist()),
                "model": model.state_dict(),
                "best_state": best_state,
                "optimizer": optimizer.state_dict(),
                "scaler": loop.scaler.state_dict() if loop.scaler is not None else None,
                "ema": loop.ema.module.state_dict() if loop.ema is not None else None,
                "rng": rng.bit_generator.state,
                "flip_rng": fit.flip.bit_generator.state if fit.flip is not None else None,
                "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                "python_rng": _python_rng_states(),
            },
        )

    def mid_epoch(epoch: int, batch: int, at_step: int, epoch_rng: dict[str, Any], partial: tuple[float, int]) -> None:
        snapshot(epoch - 1, batch, at_step, epoch_rng, partial)

    loop.checkpoint = mid_epoch
    state = _load_resume(resume, key)
    if state is not None:
        _set_phase(model, state["epoch"] + 1, config)  # the optimizer state holds the parameters that train
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if loop.scaler is not None and state.get("scaler") is not None:
            loop.scaler.load_state_dict(state["scaler"])
        if loop.ema is not None and state.get("ema") is not None:
            loop.ema.module.load_state_dict(state["ema"])
        skip = int(state.get("batch", 0))
        rng.bit_generator.state = state["epoch_rng"] if skip else state["rng"]
        if fit.flip is not None and state.get("flip_rng") is not None:
            fit.flip.bit_generator.state = state["flip_rng"]
        torch.set_rng_state(state["torch_rng"])
        if state.get("cuda_rng") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        if state.get("python_rng") is not None:
            _set_python_rng_states(state["python_rng"])
        loop.partial = tuple(state.get("partial") or (0.0, 0))  # type: ignore[assignment]
        step, since_best, epochs_run = state["step"], state["since_best"], state["epoch"]
        best_epoch, best_state, best_loss = state["best_epoch"], state["best_state"], state["best_loss"]
        first = epochs_run + 1
        if state.get("best_scores") is not None:
            loss, correct, scored = state["best_scores"]
            best = Scores(loss, np.asarray(correct), np.asarray(scored))
        within = f", batch {skip}" if skip else ""
        log.say(f"resuming from epoch {state['epoch']}/{epochs}{within} ({resume})")
    for epoch in range(first, epochs + 1):
        if patience and since_best >= patience:
            break
        if _set_phase(model, epoch, config) or (loop.ddp is None and dist.active):
            loop.ddp = _ddp(model, task, dist, device)
        t0 = time.perf_counter()
        train_loss, step = train_one_epoch(
            model, task, fit, optimizer, config, rng, step, total_steps, weights, sample_p, f"{log.what} {epoch}",
            epoch=epoch, skip=skip, loop=loop,
        )  # fmt: skip
        skip = 0
        train_seconds = time.perf_counter() - t0
        kept = loop.ema.module if loop.ema is not None else model
        scores = score(kept, task, hold, config, dist) if hold is not None else None
        epochs_run = epoch
        lr = lr_at(step - 1, total_steps, config)
        record = {"solver": "adamw", "epoch": epoch, "train_loss": train_loss, "lr": lr}
        line = f"epoch {epoch}/{epochs}  train loss {train_loss:.4f}"
        if getattr(model, "backbone_frozen", False):
            record["backbone_frozen"] = True
            line += "  (backbone frozen)"
        if scores is not None:
            record |= {"holdout_acc": scores.acc, "holdout_loss": scores.loss}
            line += f"  holdout acc {scores.acc:.4f}"
        seconds = time.perf_counter() - t0
        record |= {"seconds": round(seconds, 3), "train_seconds": round(train_seconds, 3)}
        if dist.main:
            log(record, f"{line}  lr {lr:.2e}  {seconds:.1f} s")
        if scores is None or _better(scores, best):
            best, best_epoch, since_best, best_loss = scores, epoch, 0, train_loss
            best_state = {k: v.detach().clone() for k, v in kept.state_dict().items()}
        else:
            since_best += 1
        if epoch < epochs:
            snapshot(epoch, 0, step, None, (0.0, 0))
    assert best_state is not None
    model.load_state_dict(best_state)
    warnings = []
    if best_epoch == epochs and hold is not None and epochs > 1:
        warnings.append(f"still improving at the last epoch ({epochs}): raise the budget (epochs or min_steps)")
    return {
        "solver": "adamw",
        "best_epoch": best_epoch,
        "epochs": epochs,
        "epochs_run": epochs_run,
        "stopped_early": epochs_run < epochs,
        "patience": patience,
        "train_loss": best_loss,
        "warnings": warnings,
    }


def _no_bar(config: TrainConfig) -> bool | None:
    return None if config.progress is None else not config.progress


def _device(name: str) -> str:
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise HierclassError(f"device {name!r} asked for, but torch sees no CUDA GPU; use --device cpu")
    if not (name == "cpu" or name.startswith("cuda")):
        raise HierclassError(f"device {name!r} is not supported; use cpu or cuda")
    return name


# ---------------------------------------------------------------------------- train_head
def train_head(
    kind: str,
    train_store: FeatureStore | ImageRows,
    val_store: FeatureStore | ImageRows | None,
    taxonomy: Taxonomy,
    config: TrainConfig,
    out_dir: str | Path,
    branch: str | None = None,
    *,
    overwrite: bool = False,
    echo: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Train one head and save it as a checkpoint in ``out_dir``.

    Everything the training chooses (the L2 strength, the epoch to keep) is chosen on a
    holdout of the training products (:func:`hierclass.data.splits.holdout_mask` with
    ``config.holdout`` and ``config.seed``); ``val_store`` is only scored, once, at the end.

    Given images (:class:`~hierclass.data.training.ImageRows`) instead of features, the whole CNN is
    fine-tuned (:class:`~hierclass.models.finetune.ImageClassifier`: ``config.backbone`` with its
    ``config.pretrained`` weights, all of it or its last ``config.top_stages`` stages, then the head)
    by the same loop, and saved as two halves: ``out_dir/backbone.safetensors`` and a head checkpoint
    on the features of that backbone, so evaluation and prediction read it as any other run.

    Under torchrun (``WORLD_SIZE`` > 1) every rank runs this function: they join the process group,
    train with DistributedDataParallel on their share of each epoch, and rank 0 alone writes.

    Args:
        kind: ``"router"``, ``"experts"`` or ``"flat"``.
        train_store: the training features, or images.
        val_store: features (or images, when training from images) to report the trained head's
            accuracy on (None: none).
        taxonomy: the class indices; the features must be labelled with it.
        config: how to train.
        out_dir: the head's checkpoint directory, e.g. ``RUN_DIR/router``; ``log.jsonl`` there
            gets one line per epoch (AdamW) or per L2 strength tried (L-BFGS).
        branch: experts only: retrain this level-1 branch's expert alone and copy it into the
            packed checkpoint already in ``out_dir``.
        overwrite: replace a head already in ``out_dir`` (otherwise refused).
        echo: where the per-epoch lines and warnings go (None: nowhere; they are in log.jsonl).

    Returns:
        The final metrics: solver, holdout_acc / holdout_loss (the chosen model on the holdout),
        val_acc / val_loss (on ``val_store``, when given), train_loss, fit_seconds (training and its
        choices) and seconds (with the scoring above), n_train, n_holdout,
        n_val, the solver's choices (c, iterations; or best_epoch, epochs_run, stopped_early) and
        warnings.

    Raises:
        FeatureStoreError: features of another taxonomy, or train/val from different backbones.
        CheckpointError: ``branch`` given but ``out_dir`` holds no compatible experts checkpoint.
        HierclassError: ``out_dir`` already holds a head and ``overwrite`` is False; an option that does
            not apply to this data.
        ValueError: a bad kind or config value.
    """
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r}; expected one of {KINDS}")
    config.validate()
    if branch is not None and kind != "experts":
        raise ValueError(f"branch={branch!r} only applies to kind='experts', not {kind!r}")
    images = isinstance(train_store, ImageRows)
    config = _check_image_options(config, images, kind, branch)
    _device(config.device)
    from hierclass.distributed import from_env

    dist, device = from_env(config.device)
    config = dataclasses.replace(config, device=device)
    if not dist.main:
        echo = None
    out_dir = Path(out_dir)
    if images:
        _check_images(train_store, val_store)
    else:
        _check_stores(train_store, val_store, taxonomy)
    tops = not images and top_spec(train_store.meta) is not None
    if config.batch_size is None:
        config = dataclasses.replace(config, batch_size=64 if images else 128 if tops else 512)
    if tops and kind == "experts" and config.expert_other:
        raise HierclassError("--expert-other applies to heads on pooled features; CNN expert tops have no other class")
    if dist.active and kind == "experts" and config.expert_other:
        raise HierclassError("--expert-other does not train under torchrun; run it in one process")
    b = taxonomy.branch_index(branch) if branch is not None else None
    task = Task(kind, taxonomy, b, other=kind == "experts" and config.expert_other)
    if b is not None and taxonomy.branch_sizes[b] < 2 and not task.other:
        raise HierclassError(f"branch {branch!r} has a single leaf: its expert has nothing to learn")
    if b is None and (out_dir / "meta.json").is_file() and not overwrite:
        have = read_meta(out_dir).get("kind", "trained")
        raise HierclassError(
            f"{out_dir}: already holds a {have} head; pass --overwrite to replace it, or train into another run folder"
        )

    held = holdout_mask(train_store.product_id, train_store.leaf, config.holdout, config.seed)
    fit, hold = _split(train_store, task, ~held), _split(train_store, task, held)
    what = f"{kind}" + (f" branch {branch!r}" if branch else "")
    if len(fit) == 0:
        raise FeatureStoreError(
            f"{train_store.root}: no labelled training images for the {what} head; check the labels"
        )
    report = _split(val_store, task) if val_store is not None else None

    torch.manual_seed(config.seed)
    if images:  # timm's augmentations (and mixup) also draw from Python's and numpy's global generators
        import random

        random.seed(config.seed)
        np.random.seed(config.seed)
    packed: nn.Module | None = None
    backbone_meta: dict[str, Any] | None = None
    if images:
        model, backbone_meta = _image_model(task, config)
        _attach_pipelines(config, backbone_meta["data_config"], fit, hold, report)
    elif b is not None:
        packed, base_meta = _existing_experts(out_dir, taxonomy, train_store, config)
        model = copy.deepcopy(packed)  # keeps the packed experts' feature statistics
        if tops:
            fresh: nn.Module = _fresh_tops(task, train_store, config, out_dir)
        else:
            fresh = ExpertHeads(
                train_store.dim, taxonomy, packed.hidden, packed.dropout, packed.activation, packed.other
            )
        model.copy_branch_(fresh, b)
    elif tops:
        model = _fresh_tops(task, train_store, config, out_dir)
    else:
        model = task.build_model(train_store.dim, config)
        if config.standardize:
            mean, std = feature_stats(fit, seed=config.seed)
            model.norm.set_(torch.from_numpy(mean), torch.from_numpy(std))
    if tops and config.flip and "hflip" in train_store.meta.get("views", []):
        fit.flip = np.random.default_rng(config.seed + 1)
    model.to(device)
    if images and _channels_last(config):
        model.to(memory_format=torch.channels_last)
    widest = task.n_classes if kind != "experts" else int(taxonomy.branch_sizes.max()) + int(task.other)
    solver = "adamw" if images else resolve_solver(config, len(fit), train_store.dim, tops, widest)
    if dist.active and solver == "lbfgs":
        raise HierclassError("under torchrun heads train with AdamW; pass --solver adamw (L-BFGS runs in one process)")

    weights = sample_p = None
    if config.class_balance != "none":
        per_class = class_weights(fit.target, task.n_classes, config.balance_power)
        if config.class_balance == "loss" or solver == "lbfgs":  # a full batch has no sampler: weight the loss
            weights = torch.tensor(per_class, dtype=torch.float32, device=device)
        else:
            p = per_class[fit.target]
            sample_p = p / p.sum()

    started = time.perf_counter()
    run = datetime.now(timezone.utc).isoformat(timespec="seconds")
    out_dir.mkdir(parents=True, exist_ok=True)
    if b is None and overwrite and dist.main:
        (out_dir / "log.jsonl").unlink(missing_ok=True)  # the log describes the head in the folder
    log = _Log(out_dir / "log.jsonl", what, echo, {"branch": branch, "run": run})
    n_hold = len(hold)
    if n_hold == 0:
        log.say(f"no product of the training set could be held out (--holdout {config.holdout}): nothing is tuned")
    hold_or_none = hold if n_hold else None
    resume: Path | None = None
    if solver == "lbfgs":
        info = fit_lbfgs(model, task, fit, hold_or_none, config, weights, log)
    else:
        resume = out_dir / (RESUME_FILE if b is None else f"resume-{b}.pt")
        info = fit_adamw(model, task, fit, hold_or_none, config, weights, sample_p, log, resume, dist)
    for warning in info["warnings"]:
        log.say(f"warning: {warning}")

    final: dict[str, Any] = {"kind": kind, "branch": branch, **info}
    final["fit_seconds"] = round(time.perf_counter() - started, 3)  # training and its choices, no reporting
    if hold_or_none is not None:
        s = score(model, task, hold, config, dist)
        final |= {"holdout_acc": s.acc, "holdout_loss": s.loss}
    if report is not None and len(report):
        s = score(model, task, report, config, dist)
        final |= {"val_acc": s.acc, "val_loss": s.loss}
    if "train_loss" not in final:
        final["train_loss"] = score(model, task, fit, config).loss
    model.to("cpu")
    final |= {
        "seconds": round(time.perf_counter() - started, 3),
        "n_train": len(fit),
        "n_holdout": n_hold,
        "n_val": len(report) if report is not None else 0,
        "holdout_source": f"{config.holdout:g} of the products of {train_store.root} (seed {config.seed})",
        "val_source": str(val_store.root) if val_store is not None else None,
    }
    if dist.active:
        final["world_size"] = dist.world
    training = {
        **config.to_dict(),
        "solver_used": solver,
        "label_smoothing_used": config.smoothing,
        "flip_used": fit.flip is not None or (images and config.augment and config.flip),
        "holdout": {"fraction": config.holdout, "seed": config.seed},
        **({"from_images": str(train_store.root)} if images else {}),
    }
    if not dist.main:
        dist.barrier()  # rank 0 writes the checkpoint
        return final
    if images:
        assert backbone_meta is not None
        features = _save_backbone(out_dir, model, backbone_meta, train_store, taxonomy)
        meta = {
            "kind": kind,
            "taxonomy": {"fingerprint": taxonomy.fingerprint, "source": taxonomy.source},
            "class_order": class_order(kind, taxonomy),
            "features": features,
            "training": training,
            "metrics": final,
        }
        save_model(out_dir, model.head, meta)
    elif packed is not None:
        packed.copy_branch_(model, b)
        retrained = {**base_meta.get("branch_retrains", {}), branch: {"training": training, "metrics": final}}
        save_model(out_dir, packed, {**_strip_saved(base_meta), "branch_retrains": retrained})
    else:
        meta = {
            "kind": kind,
            "taxonomy": {"fingerprint": taxonomy.fingerprint, "source": taxonomy.source},
            "class_order": class_order(kind, taxonomy),
            "features": feature_config(train_store.meta),
            "training": training,
            "metrics": final,
        }
        save_model(out_dir, model, meta)
    if resume is not None:
        resume.unlink(missing_ok=True)  # the saved head is the result; nothing is left to resume
    dist.barrier()
    return final


# ---------------------------------------------------------------------------- fine-tuning from images
IMAGE_ONLY = (
    "backbone", "pretrained", "image_size", "top_stages", "warmup_frozen_epochs", "rand_augment", "mixup", "cutmix",
    "ema_decay",
)  # fmt: skip


def _check_image_options(config: TrainConfig, images: bool, kind: str, branch: str | None) -> TrainConfig:
    """Refuse options that do not apply to this data; fill the fine-tuning defaults."""
    defaults = TrainConfig()
    if not images:
        given = [k for k in IMAGE_ONLY if getattr(config, k) != getattr(defaults, k)]
        if given:
            flags = ", ".join("--" + k.replace("_", "-") for k in given)
            raise HierclassError(
                f"{flags} apply to training from images; --train is a feature folder (its backbone is fixed "
                "there): pass a dump or catalogue to --train, or drop them"
            )
        if config.amp != "off":
            raise HierclassError("--amp applies to training from images; drop it for a feature folder")
        return config
    if config.solver == "lbfgs":
        raise ConfigError("--solver lbfgs solves linear heads on features; from images the CNN trains with AdamW")
    if branch is not None:
        raise HierclassError("--branch retrains one expert on features; from images train all experts at once")
    if kind == "experts" and config.expert_other:
        raise HierclassError("--expert-other applies to heads on pooled features; drop it when training from images")
    if kind == "experts" and (config.mixup or config.cutmix):
        raise HierclassError("--mixup and --cutmix mix images of different branches; use them with router or flat")
    if config.amp != "off" and not config.device.startswith("cuda"):
        raise HierclassError(f"--amp {config.amp} needs a CUDA GPU; add --device cuda, or use --amp off on the CPU")
    from hierclass.defaults import DEFAULT_BACKBONE, DEFAULT_PRETRAINED

    return dataclasses.replace(
        config,
        backbone=config.backbone or DEFAULT_BACKBONE,
        pretrained=config.pretrained or DEFAULT_PRETRAINED,
        label_smoothing=0.1 if config.label_smoothing is None else config.label_smoothing,
    )


def _check_images(train: ImageRows, val: Any) -> None:
    if val is not None and not isinstance(val, ImageRows):
        raise HierclassError(
            f"{val.root}: --val is a feature folder but --train is images ({train.root}); "
            "give --val as a dump or catalogue too"
        )


def _image_model(task: Task, config: TrainConfig) -> tuple[nn.Module, dict[str, Any]]:
    """A fresh :class:`ImageClassifier` for ``task`` and what its features are (backbone, weights, preprocessing)."""
    from hierclass.data import PREPROCESS
    from hierclass.features import _data_config
    from hierclass.models.backbone import create_backbone, pooled_dim
    from hierclass.models.finetune import ImageClassifier

    assert config.backbone is not None and config.pretrained is not None
    backbone = create_backbone(config.backbone, config.pretrained)
    head = task.build_model(pooled_dim(backbone), dataclasses.replace(config, standardize=False))
    model = ImageClassifier(backbone, head, config.top_stages, config.bn)
    meta = {
        "backbone": config.backbone,
        "data_config": _data_config(backbone, config.image_size, None),
        "preprocess": PREPROCESS,
        "engine": "onnx",
        "dim": pooled_dim(backbone),
        "fine_tuned_from": str(config.pretrained),
    }
    return model, meta


def _attach_pipelines(
    config: TrainConfig, data_config: dict[str, Any], fit: Data, hold: Data, report: Data | None
) -> None:
    """Training images get timm's training transforms; the holdout and validation images the evaluation ones."""
    from hierclass.data.datasets import resolve_transform
    from hierclass.data.training import Pipeline, train_transform

    fit.pipeline = Pipeline(
        train_transform(data_config, augment=config.augment, flip=config.flip, rand_augment=config.rand_augment),
        config.workers,
        config.seed,
    )
    evaluation = Pipeline(resolve_transform(data_config), config.workers, config.seed)
    for split in (hold, report):
        if split is not None:
            split.pipeline = evaluation


def _save_backbone(
    out_dir: Path, model: nn.Module, meta: dict[str, Any], images: ImageRows, taxonomy: Taxonomy
) -> dict[str, Any]:
    """Write the fine-tuned backbone (atomically) and return the features meta of a head on its output."""
    from safetensors.torch import save_file

    from hierclass.atomic import atomic_path
    from hierclass.models.backbone import FINE_TUNED_FILE, source_fingerprint

    path = (out_dir / FINE_TUNED_FILE).resolve()
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.backbone.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt", "backbone": meta["backbone"]})
    return {
        **{k: v for k, v in meta.items() if k != "fine_tuned_from"},
        "pretrained": str(path),
        "pretrained_sha256": source_fingerprint(str(path)),
        "fine_tuned_from": meta["fine_tuned_from"],
        "taxonomy_fingerprint": taxonomy.fingerprint,
        "image_source": str(images.root),
    }


def _fresh_tops(task: Task, store: FeatureStore, config: TrainConfig, out_dir: Path) -> nn.Module:
    """A new CNN top for ``task``: from the pretrained stages, or, for experts with ``init_from="flat"``,
    from the run's trained flat top (``out_dir``'s sibling ``flat``)."""
    model = task.build_model(store.dim, config, store.meta)
    if task.kind == "experts" and config.init_from == "flat":
        flat_dir = out_dir.parent / "flat"
        if not (flat_dir / "meta.json").is_file():
            raise CheckpointError(f"{flat_dir}: no flat top to start the experts from; train-flat first on these maps")
        flat, meta = load_model(flat_dir, task.taxonomy)
        if not hasattr(flat, "top") or backbone_config(meta.get("features", {})) != backbone_config(store.meta):
            raise CheckpointError(
                f"{flat_dir}: the flat model was not trained on these maps ({store.root}); "
                "train-flat on the same features first, or use --init-from pretrained"
            )
        model.init_from_flat_(flat)
    return model


def _strip_saved(meta: dict[str, Any]) -> dict[str, Any]:
    return {
        k: v for k, v in meta.items() if k not in ("head", "hierclass_version", "checkpoint_version", "weights_sha256")
    }


def _existing_experts(
    out_dir: Path, taxonomy: Taxonomy, store: FeatureStore, config: TrainConfig
) -> tuple[ExpertHeads, dict[str, Any]]:
    """The packed experts checkpoint a single-branch retraining updates, checked against the new run."""
    if not (out_dir / "meta.json").is_file():
        raise CheckpointError(
            f"{out_dir}: no experts checkpoint to update; train all experts first (train-experts without --branch)"
        )
    if read_meta(out_dir).get("kind") != "experts":
        raise CheckpointError(f"{out_dir}: holds a {read_meta(out_dir).get('kind')} head, not experts")
    model, meta = load_model(out_dir, taxonomy)
    if model.hidden != config.hidden:
        raise CheckpointError(
            f"{out_dir}: the packed experts have hidden={model.hidden}, this run asks hidden={config.hidden}; "
            "use the same --hidden, or retrain all experts"
        )
    if model.other != config.expert_other:
        have, ask = ("with", "without") if model.other else ("without", "with")
        raise CheckpointError(
            f"{out_dir}: the packed experts were trained {have} an other class, this run asks {ask}; "
            f"{'add' if model.other else 'drop'} --expert-other, or retrain all experts"
        )
    saved, now = backbone_config(meta.get("features", {})), backbone_config(store.meta)
    if saved != now or model.dim != store.dim:
        raise CheckpointError(
            f"{out_dir}: the experts were trained on features of another backbone than {store.root}; "
            "use features extracted the same way, or retrain all experts"
        )
    return model, meta
