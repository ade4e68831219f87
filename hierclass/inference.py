"""Combined-probability inference: router x experts, the flat baseline, fusion, products.

Every classifier here has the same small scikit-learn-like interface over frozen backbone
features (numpy float16/float32 ``[N, dim]`` arrays, memmaps included):

* ``classes_``: the category_ids in taxonomy leaf order (the columns of ``predict_proba``);
* ``predict_proba(features) -> [N, n_leaves]`` float32, rows sum to 1;
* ``predict(features) -> [N]`` category_ids; ``predict_topk(features, k)``;
* ``from_run(run_dir, taxonomy)`` loads the heads of a training run
  (``RUN_DIR/router``, ``RUN_DIR/experts``, ``RUN_DIR/flat``).

Features are fed to the heads in fixed-size batches and every sample's output depends on
that sample only, so results never depend on batch size or on which other samples are
passed along.

The hierarchical model combines P(leaf) = P(branch) x P(leaf | branch): over every branch
(``combine="soft"``), over the ``k`` most probable branches renormalised (``"topk"``, which
runs only the chosen experts), or over the most probable branch only (``"hard"``). Level-1
and level-2 probabilities are sums over leaves (:func:`level_proba`).

Experts trained with an "other" class (``ExpertHeads(other=True)``, ``train-experts
--expert-other``) are combined as ``P(leaf) ∝ P_router(b(leaf)) x P_expert_b(leaf)``, where
``P_expert_b`` is the expert's softmax over its leaves and its other class, the other mass dropped
(not renormalised over the leaves), and each row then normalised over all leaves: an expert that
the router picked by mistake and that says "not mine" hands the mass to the other branches.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from scipy.optimize import minimize_scalar
from torch import nn

from hierclass.errors import CheckpointError
from hierclass.featurestore import float32_rows
from hierclass.models.heads import segment_log_softmax
from hierclass.taxonomy import Taxonomy

Combine = Literal["soft", "topk", "hard"]
Aggregation = Literal["mean", "logmean", "max"]
COMBINES: tuple[str, ...] = ("soft", "topk", "hard")
AGGREGATIONS: tuple[str, ...] = ("mean", "logmean", "max")
TINY = 1e-30  # floor for log(P): top-k / hard routing gives exact zeros


# ---------------------------------------------------------------------------- helpers
def _as_features(features: np.ndarray, name: str = "features") -> np.ndarray:
    if not hasattr(features, "shape") or len(features.shape) != 2:
        shape = getattr(features, "shape", type(features).__name__)
        raise ValueError(f"{name} must be a 2-D array [n_samples, dim], got shape {shape}")
    return features


def _batches(n: int, batch_size: int) -> Iterator[slice]:
    for start in range(0, n, batch_size):
        yield slice(start, min(start + batch_size, n))


def _tensor(features: np.ndarray, rows: slice | np.ndarray) -> torch.Tensor:
    return torch.from_numpy(float32_rows(features, rows))


def level_proba(proba: np.ndarray, taxonomy: Taxonomy, level: int) -> np.ndarray:
    """Probabilities of the level-1 or level-2 nodes, as sums of their leaves' probabilities.

    Args:
        proba: ``[N, n_leaves]`` leaf probabilities.
        taxonomy: gives each leaf's ancestors.
        level: 1 (branches, ``[N, n_level1]``), 2 (``[N, n_level2]``) or 3 (the leaves themselves).
    """
    if level == 3:
        return proba
    if level not in (1, 2):
        raise ValueError(f"level must be 1, 2 or 3, got {level!r}")
    parent = taxonomy.leaf_level1 if level == 1 else taxonomy.leaf_level2
    n = taxonomy.n_level1 if level == 1 else taxonomy.n_level2
    # Leaves of one node are contiguous (the taxonomy's order), so a reduceat over starts works.
    starts = np.flatnonzero(np.r_[True, parent[1:] != parent[:-1]])
    out = np.add.reduceat(np.asarray(proba), starts, axis=1)
    assert out.shape[1] == n, "leaves of a node must be contiguous"
    return out


def topk(proba: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` most probable columns of each row, most probable first (indices, probabilities)."""
    k = min(k, proba.shape[1])
    part = (
        np.argpartition(-proba, k - 1, axis=1)[:, :k]
        if k < proba.shape[1]
        else np.tile(np.arange(proba.shape[1]), (len(proba), 1))
    )
    p = np.take_along_axis(proba, part, axis=1)
    order = np.lexsort((part, -p), axis=1)  # ties: the lower column first, as argmax
    return np.take_along_axis(part, order, axis=1), np.take_along_axis(p, order, axis=1)


def _fit_beta(groups: list[tuple[np.ndarray, np.ndarray]], bounds: tuple[float, float]) -> float:
    """The temperature minimising the mean NLL over groups ``(logits [n, c], label column [n])``."""
    n = sum(len(y) for _, y in groups)
    if n == 0:
        raise ValueError("no labelled samples to fit a temperature on")

    def nll(beta: float) -> float:
        total = 0.0
        for logits, y in groups:
            z = beta * logits
            m = z.max(axis=1, keepdims=True)
            lse = m[:, 0] + np.log(np.exp(z - m).sum(axis=1))
            total += float((lse - z[np.arange(len(y)), y]).sum(dtype=np.float64))
        return total / n

    # The NLL is convex in beta = 1/T, so a bounded scalar search finds the optimum.
    res = minimize_scalar(nll, bounds=(1.0 / bounds[1], 1.0 / bounds[0]), method="bounded", options={"xatol": 1e-4})
    return float(1.0 / res.x)


def fit_temperature(
    logits: np.ndarray,
    labels: np.ndarray,
    branch_start: np.ndarray | None = None,
    bounds: tuple[float, float] = (0.05, 20.0),
) -> float:
    """The temperature T minimising the NLL of ``softmax(logits / T)`` on labelled data.

    Args:
        logits: ``[N, C]`` raw head outputs on validation data.
        labels: ``[N]`` the true column of each row.
        branch_start: for packed experts, the segment offsets: the softmax is then taken
            within the segment that holds each row's label (P(leaf | its true branch)).
        bounds: the range of temperatures searched.

    Returns:
        T > 0; divide the logits by it before the softmax.
    """
    logits = np.asarray(logits)
    labels = np.asarray(labels, dtype=np.int64)
    if len(logits) != len(labels) or len(labels) == 0:
        raise ValueError(f"logits and labels need the same non-zero length, got {len(logits)} and {len(labels)}")
    if branch_start is None:
        return _fit_beta([(logits, labels)], bounds)
    seg = np.searchsorted(branch_start, labels, side="right") - 1
    groups = []
    for b in np.unique(seg):
        rows, start = np.flatnonzero(seg == b), int(branch_start[b])
        groups.append((logits[rows, start : int(branch_start[b + 1])], labels[rows] - start))
    return _fit_beta(groups, bounds)


def _calibration_rows(n: int, max_samples: int | None) -> np.ndarray:
    """A deterministic, evenly spread subset of at most ``max_samples`` rows (all when None)."""
    if max_samples is None or n <= max_samples:
        return np.arange(n)
    return np.linspace(0, n - 1, max_samples).round().astype(np.int64)


def _check_kind(meta: dict, expected: str, path: Path) -> None:
    kind = meta.get("kind", (meta.get("head") or {}).get("kind"))
    if kind != expected:
        raise CheckpointError(f"{path}: holds a {kind!r} head where a {expected!r} head was expected; check --run")


def _load_head(run_dir: str | Path, kind: str, taxonomy: Taxonomy) -> tuple[nn.Module, dict]:
    from hierclass.checkpoint import load_model  # imported when used

    path = Path(run_dir) / kind
    module, meta = load_model(path, taxonomy)
    _check_kind(meta, kind, path)
    return module, meta


# ---------------------------------------------------------------------------- classifiers
class _Classifier:
    """What every classifier shares: classes_, batching, predict / predict_topk."""

    taxonomy: Taxonomy
    batch_size: int
    meta: dict

    @property
    def classes_(self) -> np.ndarray:
        """The category_ids of the ``predict_proba`` columns (taxonomy leaf order)."""
        return self.taxonomy.leaf_ids

    def _proba_batch(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        """Leaf probabilities ``[N, n_leaves]`` (float32, rows sum to 1), columns as ``classes_``."""
        features = _as_features(features)
        out = np.empty((features.shape[0], self.taxonomy.n_leaves), dtype=np.float32)
        for rows in _batches(len(out), self.batch_size):
            p = self._proba_batch(_tensor(features, rows))
            out[rows] = (p / p.sum(dim=1, keepdim=True)).numpy()
        return out

    def predict(self, features: np.ndarray) -> np.ndarray:
        """The most probable category_id of each sample."""
        return self.classes_[self.predict_proba(features).argmax(axis=1)]

    def predict_topk(self, features: np.ndarray, k: int = 5) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` most probable category_ids of each sample and their probabilities, best first."""
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        idx, p = topk(self.predict_proba(features), k)
        return self.classes_[idx], p


class FlatClassifier(_Classifier):
    """The flat baseline: one softmax over all leaves.

    Args:
        flat: a module mapping features ``[N, dim]`` to logits ``[N, n_leaves]`` in taxonomy order.
        taxonomy: the taxonomy the head was trained with.
        temperature: divides the logits (calibration; see :meth:`calibrate`).
        batch_size: rows per forward pass.
    """

    def __init__(self, flat: nn.Module, taxonomy: Taxonomy, temperature: float = 1.0, batch_size: int = 4096) -> None:
        self.flat = flat.eval()
        self.taxonomy = taxonomy
        self.temperature = temperature
        self.batch_size = batch_size
        self.meta: dict = {}

    @classmethod
    def from_run(cls, run_dir: str | Path, taxonomy: Taxonomy, **kwargs) -> FlatClassifier:
        """Load ``RUN_DIR/flat``."""
        module, meta = _load_head(run_dir, "flat", taxonomy)
        clf = cls(module, taxonomy, **kwargs)
        clf.meta = {"flat": meta}
        return clf

    def _proba_batch(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.flat(x).float() / self.temperature, dim=1)

    @torch.no_grad()
    def logits(self, features: np.ndarray) -> np.ndarray:
        """Raw flat logits ``[N, n_leaves]``."""
        features = _as_features(features)
        return np.concatenate(
            [self.flat(_tensor(features, r)).float().numpy() for r in _batches(len(features), self.batch_size)]
            or [np.empty((0, self.taxonomy.n_leaves), np.float32)]
        )

    def calibrate(self, features: np.ndarray, leaf: np.ndarray, max_samples: int | None = 20_000) -> FlatClassifier:
        """Fit :attr:`temperature` on labelled (validation) features.

        Args:
            features: ``[N, dim]`` validation features.
            leaf: their leaf indices (-1: unlabelled, skipped).
            max_samples: fit on an evenly spread subset of this many rows (the full
                ``[N, n_leaves]`` logits are held in memory); None: all.
        """
        features = _as_features(features)
        known = np.flatnonzero(np.asarray(leaf) >= 0)
        rows = known[_calibration_rows(len(known), max_samples)]
        self.temperature = fit_temperature(self.logits(features[rows]), np.asarray(leaf)[rows])
        return self


class HierarchicalClassifier(_Classifier):
    """The two-stage model: P(leaf) = P(branch) x P(leaf | branch).

    Args:
        router: features -> logits ``[N, n_level1]``.
        experts: packed experts: ``forward(x) -> [N, n_leaves]`` (branch b's logits in its
            segment) and ``branch_logits(x, b) -> [N, size_b]``.
        taxonomy: the taxonomy both were trained with.
        combine: ``"soft"`` (every branch), ``"topk"`` (the ``k`` most probable branches,
            renormalised; only their experts run) or ``"hard"`` (the most probable branch).
        k: branches kept by ``"topk"``.
        router_temperature, expert_temperature: divide the logits (see :meth:`calibrate`).
        batch_size: rows per forward pass.

    Experts with an other class (``experts.other``) are combined as the module doc says, for every
    ``combine``: each chosen branch's leaves get ``P_router(b) x P_expert_b(leaf)`` (the expert's
    softmax over its leaves and its other class), and the row is normalised over all leaves. With
    ``"hard"`` this is the chosen expert renormalised over its leaves, as without other.
    """

    def __init__(
        self,
        router: nn.Module,
        experts: nn.Module,
        taxonomy: Taxonomy,
        combine: Combine = "soft",
        k: int = 3,
        router_temperature: float = 1.0,
        expert_temperature: float = 1.0,
        batch_size: int = 4096,
    ) -> None:
        if combine not in COMBINES:
            raise ValueError(f"combine must be one of {COMBINES}, got {combine!r}")
        if combine == "topk" and k < 1:
            raise ValueError(f"k must be >= 1 for combine='topk', got {k}")
        self.router = router.eval()
        self.experts = experts.eval()
        self.taxonomy = taxonomy
        self.combine = combine
        self.k = k
        self.router_temperature = router_temperature
        self.expert_temperature = expert_temperature
        self.batch_size = batch_size
        self.meta: dict = {}

    @classmethod
    def from_run(cls, run_dir: str | Path, taxonomy: Taxonomy, **kwargs) -> HierarchicalClassifier:
        """Load ``RUN_DIR/router`` and ``RUN_DIR/experts``."""
        router, router_meta = _load_head(run_dir, "router", taxonomy)
        experts, experts_meta = _load_head(run_dir, "experts", taxonomy)
        clf = cls(router, experts, taxonomy, **kwargs)
        clf.meta = {"router": router_meta, "experts": experts_meta}
        return clf

    # -- pieces
    def _router_proba(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.router(x).float() / self.router_temperature, dim=1)

    def _branch_proba(self, x: torch.Tensor, branch: int) -> torch.Tensor:
        return torch.softmax(self.experts.branch_logits(x, branch).float() / self.expert_temperature, dim=1)

    @property
    def expert_other(self) -> bool:
        """Whether the experts have an "other" class (combined as the class doc says)."""
        return bool(getattr(self.experts, "other", False))

    def _proba_batch(self, x: torch.Tensor) -> torch.Tensor:
        if self.expert_other:
            return self._proba_batch_other(x)
        router = self._router_proba(x)
        if self.combine == "soft":
            cond = segment_log_softmax(self.experts(x).float() / self.expert_temperature, self.taxonomy).exp()
            return cond * router[:, torch.tensor(self.taxonomy.leaf_level1)]
        k = 1 if self.combine == "hard" else min(self.k, self.taxonomy.n_level1)
        weight, chosen = torch.topk(router, k, dim=1)  # row by row: independent of the batch
        weight = weight / weight.sum(dim=1, keepdim=True)
        out = torch.zeros(len(x), self.taxonomy.n_leaves)
        start = self.taxonomy.branch_start
        # Group the samples by chosen branch so each expert runs once per batch, on its rows only.
        for b in torch.unique(chosen).tolist():
            rows, slot = torch.nonzero(chosen == b, as_tuple=True)
            out[rows, start[b] : start[b + 1]] = weight[rows, slot, None] * self._branch_proba(x[rows], b)
        return out

    def _proba_batch_other(self, x: torch.Tensor) -> torch.Tensor:
        """Router x experts-with-other, in log space (no underflow to an all-zero row), rows summing to 1."""
        log_router = torch.log_softmax(self.router(x).float() / self.router_temperature, dim=1)
        if self.combine == "soft":
            log_leaf, _ = self.experts.log_probs_with_other(x.float(), self.expert_temperature)
            score = log_router[:, torch.tensor(self.taxonomy.leaf_level1)] + log_leaf.float()
            return torch.softmax(score, dim=1)
        k = 1 if self.combine == "hard" else min(self.k, self.taxonomy.n_level1)
        weight, chosen = torch.topk(log_router, k, dim=1)  # row by row: independent of the batch
        score = torch.full((len(x), self.taxonomy.n_leaves), -torch.inf)
        start = self.taxonomy.branch_start
        for b in torch.unique(chosen).tolist():
            rows, slot = torch.nonzero(chosen == b, as_tuple=True)
            z = self.experts.branch_logits(x[rows], b, include_other=True).float() / self.expert_temperature
            score[rows, start[b] : start[b + 1]] = weight[rows, slot, None] + torch.log_softmax(z, dim=1)[:, :-1]
        return torch.softmax(score, dim=1)

    @torch.no_grad()
    def router_proba(self, features: np.ndarray) -> np.ndarray:
        """P(branch) ``[N, n_level1]`` from the router alone."""
        features = _as_features(features)
        out = np.empty((len(features), self.taxonomy.n_level1), dtype=np.float32)
        for rows in _batches(len(out), self.batch_size):
            out[rows] = self._router_proba(_tensor(features, rows)).numpy()
        return out

    @torch.no_grad()
    def proba_given_branch(self, features: np.ndarray, branch: np.ndarray) -> np.ndarray:
        """P(leaf | branch) ``[N, n_leaves]`` for one given branch per sample (zero elsewhere).

        With the true branch this is the oracle-routed model: how good the experts are alone.
        Experts with an other class are renormalised over the branch's leaves here (the other mass
        dropped), which leaves their argmax unchanged.
        """
        features = _as_features(features)
        branch = np.asarray(branch, dtype=np.int64)
        if branch.shape != (len(features),):
            raise ValueError(f"branch must have one entry per sample ({len(features)}), got shape {branch.shape}")
        out = np.zeros((len(features), self.taxonomy.n_leaves), dtype=np.float32)
        start = self.taxonomy.branch_start
        for rows in _batches(len(out), self.batch_size):
            x, br = _tensor(features, rows), branch[rows]
            for b in np.unique(br):
                sel = np.flatnonzero(br == b)
                out[rows.start + sel, start[b] : start[b + 1]] = self._branch_proba(x[sel], int(b)).numpy()
        return out

    @torch.no_grad()
    def calibrate(
        self, features: np.ndarray, leaf: np.ndarray, max_samples: int | None = 100_000
    ) -> HierarchicalClassifier:
        """Fit the router and the expert temperatures on labelled (validation) features.

        The router's is fitted on P(true branch); the experts' on P(true leaf | true branch),
        running each sample's true-branch expert only (memory O(N x branch size)). Experts with an
        other class are fitted on P(true leaf) of the true branch's expert over its leaves and its
        other class (single-leaf branches included: leaf vs other); the samples of other branches,
        whose target for an expert would be "other", are not used.

        Args:
            features: ``[N, dim]`` validation features.
            leaf: their leaf indices (-1: unlabelled, skipped).
            max_samples: fit on an evenly spread subset of this many rows; None: all.
        """
        features = _as_features(features)
        leaf = np.asarray(leaf, dtype=np.int64)
        known = np.flatnonzero(leaf >= 0)
        rows_all = known[_calibration_rows(len(known), max_samples)]
        tax = self.taxonomy
        router_logits = []
        other = {"include_other": True} if self.expert_other else {}  # the other logit is the last column
        expert_groups: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {}
        for batch in _batches(len(rows_all), self.batch_size):
            rows = rows_all[batch]
            x, y = _tensor(features, rows), leaf[rows]
            router_logits.append(self.router(x).float().numpy())
            branch = tax.leaf_level1[y]
            for b in np.unique(branch):
                if tax.branch_sizes[b] < 2 and not self.expert_other:
                    continue  # a single-leaf branch's expert is always right: nothing to calibrate
                sel = np.flatnonzero(branch == b)
                z = self.experts.branch_logits(x[sel], int(b), **other).float().numpy()
                expert_groups.setdefault(int(b), []).append((z, tax.leaf_local[y[sel]]))
        self.router_temperature = fit_temperature(np.concatenate(router_logits), tax.leaf_level1[leaf[rows_all]])
        groups = [
            (np.concatenate([z for z, _ in g]), np.concatenate([t for _, t in g])) for g in expert_groups.values()
        ]
        if groups:
            self.expert_temperature = _fit_beta(groups, (0.05, 20.0))
        return self


class FusedClassifier(_Classifier):
    """Geometric fusion of the flat and the hierarchical model: ``P ∝ P_flat^a · P_hier^(1-a)``.

    Args:
        flat: the flat classifier.
        hierarchical: the two-stage classifier (same taxonomy).
        alpha: the weight ``a`` of the flat model, in [0, 1] (see :meth:`fit_alpha`).
    """

    def __init__(self, flat: FlatClassifier, hierarchical: HierarchicalClassifier, alpha: float = 0.5) -> None:
        if flat.taxonomy != hierarchical.taxonomy:
            raise ValueError("flat and hierarchical must use the same taxonomy")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        self.flat = flat
        self.hierarchical = hierarchical
        self.alpha = alpha
        self.taxonomy = flat.taxonomy
        self.batch_size = min(flat.batch_size, hierarchical.batch_size)
        self.meta = {**flat.meta, **hierarchical.meta}

    @classmethod
    def from_run(cls, run_dir: str | Path, taxonomy: Taxonomy, alpha: float = 0.5, **kwargs) -> FusedClassifier:
        """Load the flat and the hierarchical heads of a run; ``kwargs`` go to the hierarchical one."""
        return cls(
            FlatClassifier.from_run(run_dir, taxonomy),
            HierarchicalClassifier.from_run(run_dir, taxonomy, **kwargs),
            alpha,
        )

    def _log_parts(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return (
            torch.log(self.flat._proba_batch(x).clamp_min(TINY)),
            torch.log(self.hierarchical._proba_batch(x).clamp_min(TINY)),
        )

    def _proba_batch(self, x: torch.Tensor) -> torch.Tensor:
        log_flat, log_hier = self._log_parts(x)
        return torch.softmax(self.alpha * log_flat + (1.0 - self.alpha) * log_hier, dim=1)

    @torch.no_grad()
    def fit_alpha(
        self,
        features: np.ndarray,
        leaf: np.ndarray,
        grid: np.ndarray | None = None,
        objective: Literal["nll", "accuracy"] = "nll",
        max_samples: int | None = 100_000,
    ) -> FusedClassifier:
        """Choose :attr:`alpha` on labelled (validation) features from a grid (default 0, 0.05, ..., 1).

        Args:
            features: ``[N, dim]`` validation features.
            leaf: their leaf indices (-1: unlabelled, skipped).
            grid: the alphas tried.
            objective: ``"nll"`` minimises the negative log-likelihood; ``"accuracy"``
                maximises leaf top-1 accuracy (ties: the smallest such alpha).
            max_samples: use an evenly spread subset of this many rows; None: all.
        """
        if objective not in ("nll", "accuracy"):
            raise ValueError(f"objective must be 'nll' or 'accuracy', got {objective!r}")
        features = _as_features(features)
        leaf = np.asarray(leaf, dtype=np.int64)
        known = np.flatnonzero(leaf >= 0)
        rows_all = known[_calibration_rows(len(known), max_samples)]
        if len(rows_all) == 0:
            raise ValueError("no labelled samples to fit alpha on")
        grid = np.linspace(0.0, 1.0, 21) if grid is None else np.asarray(grid, dtype=np.float64)
        score = np.zeros(len(grid))
        for batch in _batches(len(rows_all), self.batch_size):
            rows = rows_all[batch]
            log_flat, log_hier = self._log_parts(_tensor(features, rows))
            y = torch.from_numpy(leaf[rows])
            for i, a in enumerate(grid):
                logp = torch.log_softmax(a * log_flat + (1.0 - a) * log_hier, dim=1)
                if objective == "nll":
                    score[i] += float(-logp[torch.arange(len(y)), y].sum())
                else:
                    score[i] -= float((logp.argmax(dim=1) == y).sum())
        self.alpha = float(grid[int(np.argmin(score))])
        return self


class EnsembleClassifier(_Classifier):
    """The mean of several models' leaf probabilities; each member reads its own features.

    Members may use different backbones or cuts: member ``i`` reads ``features[i]``, the rows of
    :class:`FeatureStores` member ``i`` (the same images in the same order).

    Args:
        members: classifiers of one taxonomy.
    """

    def __init__(self, members: list[Classifier]) -> None:
        if len(members) < 2:
            raise ValueError(f"an ensemble needs at least 2 members, got {len(members)}")
        if any(m.taxonomy.fingerprint != members[0].taxonomy.fingerprint for m in members):
            raise ValueError("the members of an ensemble must share one taxonomy")
        self.members = list(members)
        self.taxonomy = members[0].taxonomy
        self.batch_size = min(m.batch_size for m in members)
        self.meta: dict = {}

    def predict_proba(self, features: Sequence[np.ndarray]) -> np.ndarray:  # type: ignore[override]
        """The members' mean probabilities ``[N, n_leaves]``; ``features[i]`` feeds member ``i``."""
        if len(features) != len(self.members):
            raise ValueError(f"{len(features)} feature arrays for {len(self.members)} members")
        out = self.members[0].predict_proba(features[0])
        for member, x in zip(self.members[1:], features[1:], strict=True):
            out += member.predict_proba(x)
        return out / np.float32(len(self.members))


class _StackedFeatures:
    """Row selection over several feature arrays at once: ``stacked[rows]`` is one array per member."""

    def __init__(self, arrays: list[np.ndarray]) -> None:
        self.arrays = arrays

    def __getitem__(self, rows) -> tuple[np.ndarray, ...]:
        return tuple(a[rows] for a in self.arrays)

    def __len__(self) -> int:
        return len(self.arrays[0])


class FeatureStores:
    """Several feature stores of the same images, read together by an :class:`EnsembleClassifier`.

    It offers what :func:`predict_store` and the report read of one store (rows, labels,
    products, validity, views); ``features(view)[rows]`` gives one array per member.

    Raises:
        ValueError: the stores do not list the same images in the same order.
    """

    def __init__(self, stores: list) -> None:
        first = stores[0]
        for other in stores[1:]:
            if not (
                np.array_equal(other.product_id, first.product_id)
                and np.array_equal(other.product_row, first.product_row)
                and np.array_equal(other.image_number, first.image_number)
            ):
                raise ValueError(
                    f"{other.root} and {first.root} hold different images; extract every member's features "
                    "from the same source"
                )
        self.stores = list(stores)
        self.root = first.root
        self.product_id, self.image_number, self.leaf = first.product_id, first.image_number, first.leaf
        self.product_row = first.product_row
        self.valid = np.logical_and.reduce([s.valid for s in stores])
        views = [v for v in first.meta.get("views", ["orig"]) if all(v in s.meta.get("views", []) for s in stores)]
        self.meta = {**first.meta, "views": views, "members": [str(s.root) for s in stores]}

    @property
    def n_images(self) -> int:
        return len(self.product_id)

    def features(self, view: str = "orig") -> _StackedFeatures:
        return _StackedFeatures([s.features(view) for s in self.stores])


Classifier = FlatClassifier | HierarchicalClassifier | FusedClassifier | EnsembleClassifier


def settings_of(clf: Classifier) -> dict[str, Any]:
    """How a classifier is configured, for the report."""
    if isinstance(clf, HierarchicalClassifier):
        return {
            "type": "hierarchical",
            "combine": clf.combine,
            "k": clf.k if clf.combine == "topk" else None,
            "router_temperature": clf.router_temperature,
            "expert_temperature": clf.expert_temperature,
        }
    if isinstance(clf, FusedClassifier):
        return {
            "type": "fused",
            "alpha": clf.alpha,
            "flat": settings_of(clf.flat),
            "hierarchical": settings_of(clf.hierarchical),
        }
    if isinstance(clf, FlatClassifier):
        return {"type": "flat", "temperature": clf.temperature}
    if isinstance(clf, EnsembleClassifier):
        return {"type": "ensemble", "members": [settings_of(m) for m in clf.members]}
    return {"type": type(clf).__name__}


# ---------------------------------------------------------------------------- products
def aggregate(proba: np.ndarray, product_id: np.ndarray, how: Aggregation = "mean") -> tuple[np.ndarray, np.ndarray]:
    """Combine the images of each product into one probability row.

    Args:
        proba: ``[N, C]`` per-image probabilities.
        product_id: ``[N]`` the product of each image (any order): any integer key, e.g. a
            store's ``product_row`` (ids can repeat across the products of a dump).
        how: ``"mean"`` of probabilities, ``"logmean"`` (mean of log-probabilities, i.e. a
            normalised geometric mean) or ``"max"`` (column-wise max, renormalised).

    Returns:
        ``(product_ids, P_product)``: the distinct keys in increasing order and one
        row per product, summing to 1.
    """
    if how not in AGGREGATIONS:
        raise ValueError(f"how must be one of {AGGREGATIONS}, got {how!r}")
    product_id = np.asarray(product_id)
    if len(product_id) != len(proba):
        raise ValueError(f"product_id has {len(product_id)} entries for {len(proba)} probability rows")
    order = np.argsort(product_id, kind="stable")
    ids_sorted = product_id[order]
    starts = np.flatnonzero(np.r_[True, ids_sorted[1:] != ids_sorted[:-1]]) if len(order) else np.array([], int)
    counts = np.diff(np.r_[starts, len(order)])
    p = np.asarray(proba)[order]  # float32 stays float32: a chunk of images x 5,270 leaves is large
    if len(order) == 0:
        return ids_sorted, p
    if how == "mean":
        out = np.add.reduceat(p, starts, axis=0) / counts[:, None].astype(p.dtype)
    elif how == "logmean":
        logp = np.add.reduceat(np.log(np.maximum(p, TINY)), starts, axis=0) / counts[:, None].astype(p.dtype)
        out = np.exp(logp - logp.max(axis=1, keepdims=True))
    else:
        out = np.maximum.reduceat(p, starts, axis=0)
    out /= out.sum(axis=1, keepdims=True)
    return ids_sorted[starts], out


# ---------------------------------------------------------------------------- compact predictions
@dataclass
class Predictions:
    """What metrics and CSVs need from ``[N, n_leaves]`` probabilities, kept small (O(N k)).

    Attributes:
        ids: image rows or product ids (the ``_id`` a submission writes; a dump may repeat one).
        leaf: the true leaf index of each sample (-1: unknown).
        topk_leaf, topk_prob: ``[N, k]`` the most probable leaves, best first, and their probabilities.
        level1_prob, level2_prob: the probability of the top-1 leaf's level-1 and level-2
            ancestors (sums over their leaves; used for abstention).
        extra: model-specific per-sample arrays (e.g. ``router``, ``oracle`` leaf indices).
        seconds: time spent computing the probabilities.
        product_row: of product predictions, each product's row in its source (what tells apart
            two products sharing an id); None for image predictions.
    """

    ids: np.ndarray
    leaf: np.ndarray
    topk_leaf: np.ndarray
    topk_prob: np.ndarray
    level1_prob: np.ndarray
    level2_prob: np.ndarray
    extra: dict[str, np.ndarray] = field(default_factory=dict)
    seconds: float = 0.0
    product_row: np.ndarray | None = None

    @classmethod
    def from_proba(
        cls, proba: np.ndarray, taxonomy: Taxonomy, ids: np.ndarray, leaf: np.ndarray | None = None, k: int = 5
    ) -> Predictions:
        idx, p = topk(proba, k)
        top = idx[:, 0]
        l1 = level_proba(proba, taxonomy, 1)[np.arange(len(top)), taxonomy.leaf_level1[top]]
        l2 = level_proba(proba, taxonomy, 2)[np.arange(len(top)), taxonomy.leaf_level2[top]]
        leaf = np.full(len(ids), -1, np.int64) if leaf is None else np.asarray(leaf, dtype=np.int64)
        return cls(np.asarray(ids), leaf, idx, p.astype(np.float32), l1.astype(np.float32), l2.astype(np.float32))

    @property
    def pred(self) -> np.ndarray:
        """The top-1 leaf index of each sample."""
        return self.topk_leaf[:, 0]

    @property
    def confidence(self) -> np.ndarray:
        """The top-1 leaf probability of each sample."""
        return self.topk_prob[:, 0]

    def __len__(self) -> int:
        return len(self.ids)

    @classmethod
    def concat(cls, parts: list[Predictions]) -> Predictions:
        first = parts[0]
        return cls(
            np.concatenate([p.ids for p in parts]),
            np.concatenate([p.leaf for p in parts]),
            np.concatenate([p.topk_leaf for p in parts]),
            np.concatenate([p.topk_prob for p in parts]),
            np.concatenate([p.level1_prob for p in parts]),
            np.concatenate([p.level2_prob for p in parts]),
            {key: np.concatenate([p.extra[key] for p in parts]) for key in first.extra},
            sum(p.seconds for p in parts),
            None if first.product_row is None else np.concatenate([p.product_row for p in parts]),
        )


def product_chunks(product: np.ndarray, rows: np.ndarray, chunk_images: int) -> Iterator[np.ndarray]:
    """Split ``rows`` into chunks of about ``chunk_images`` that never split a product, each grouped by
    product (``product``: one key per image, e.g. a store's ``product_row``), products in increasing key order."""
    order = rows[np.argsort(product[rows], kind="stable")]
    key = product[order]
    bounds = np.r_[np.flatnonzero(np.r_[True, key[1:] != key[:-1]]), len(order)]  # product starts, then the end
    start = 0
    while start < len(order):
        # the last product boundary within chunk_images, or the end of the first product if it is larger
        stop = bounds[np.searchsorted(bounds, start + chunk_images, side="right") - 1]
        if stop <= start:
            stop = bounds[np.searchsorted(bounds, start, side="right")]
        yield order[start:stop]
        start = stop


def predict_store(
    clf: Classifier,
    store,
    *,
    how: Aggregation = "mean",
    tta: bool = False,
    k: int = 5,
    chunk_images: int = 8192,
    oracle: bool = False,
    progress: Callable[[int], None] | None = None,
) -> tuple[Predictions, Predictions]:
    """Predict every valid image of a feature store and every product, in bounded memory.

    Images are processed product by product in chunks of about ``chunk_images`` rows, so a
    product's images are always aggregated together and memory stays O(chunk x n_leaves).
    Products are the store's ``product_row``s: two products of a dump that share an ``_id``
    are predicted (and scored) apart.

    Args:
        clf: any classifier of this module.
        store: a :class:`~hierclass.featurestore.FeatureStore`.
        how: product aggregation (see :func:`aggregate`).
        tta: average each image's probabilities with its horizontally flipped view's (the
            store must have the ``"hflip"`` view).
        k: top leaves kept per sample.
        oracle: for a :class:`HierarchicalClassifier`, also record the router's branch
            (``extra["router"]``) and the experts' leaf given the true branch (``extra["oracle"]``).
        progress: called with the number of images done after each chunk.

    Returns:
        ``(images, products)``: image-level predictions (``ids`` are store rows) and
        product-level ones, in ``product_row`` order (``ids`` are product ids, ``product_row`` the
        products' rows, ``leaf`` the first image's label).
    """
    views = ["orig", "hflip"] if tta else ["orig"]
    features = {v: store.features(v) for v in views}
    tax = clf.taxonomy
    hier = clf if isinstance(clf, HierarchicalClassifier) else None
    rows_all = np.flatnonzero(store.valid)
    clf.predict_proba(features["orig"][rows_all[:64]])  # warm-up, so the timing is of steady-state inference
    image_parts, product_parts = [], []
    for rows in product_chunks(store.product_row, rows_all, chunk_images):
        leaf, product = store.leaf[rows], store.product_row[rows]
        t0 = time.perf_counter()
        proba = sum(clf.predict_proba(features[v][rows]) for v in views) / len(views)
        seconds = time.perf_counter() - t0
        product_rows, pproba = aggregate(proba, product, how)
        first = np.r_[0, np.flatnonzero(product[1:] != product[:-1]) + 1]  # rows are grouped by product
        img = Predictions.from_proba(proba, tax, rows, leaf, k)
        prod = Predictions.from_proba(pproba, tax, store.product_id[rows[first]], leaf[first], k)
        prod.product_row = product_rows
        img.seconds = seconds
        if oracle and hier is not None:
            router = sum(hier.router_proba(features[v][rows]) for v in views) / len(views)
            given = np.where(leaf >= 0, tax.leaf_level1[np.maximum(leaf, 0)], 0)
            cond = sum(hier.proba_given_branch(features[v][rows], given) for v in views) / len(views)
            img.extra = {"router": router.argmax(1), "oracle": np.where(leaf >= 0, cond.argmax(1), -1)}
            prod.extra = {
                "router": aggregate(router, product, how)[1].argmax(1),
                "oracle": np.where(leaf[first] >= 0, aggregate(cond, product, how)[1].argmax(1), -1),
            }
        image_parts.append(img)
        product_parts.append(prod)
        if progress is not None:
            progress(len(rows))
    if not image_parts:
        raise ValueError(f"{getattr(store, 'root', 'the store')}: no valid images to predict")
    return Predictions.concat(image_parts), Predictions.concat(product_parts)
