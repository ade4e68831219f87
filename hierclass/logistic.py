"""Multinomial logistic regression solved exactly on in-memory features, along a path of L2 strengths.

Every linear head trained by L-BFGS is a set of independent softmax regressions
(:class:`Problem`): the flat head and the router are one each; the experts are one per branch
(its images, its leaves, plus an "other" class on every image with ``--expert-other``). Each
problem minimises

    sum_i w_i * CE_i / sum_i w_i  +  |W|^2 / (2 * C * n)

(the bias unpenalised), which has scikit-learn's ``LogisticRegression(C)`` optimum when the
weights are 1. :func:`fit_path` fits it at the values of ``c_grid`` its holdout asks for, each
warm-started from its neighbour's solution, and keeps the C its holdout scores best.

Three things make a fit cheap:

* :func:`minimize` is L-BFGS preconditioned by ``(a * Sigma + lam * I)^-1``, ``Sigma`` the
  covariance of the standardised features. The problems are solved on the features' principal
  axes (:class:`Preconditioner`: one eigendecomposition per feature folder, kept there), where
  that preconditioner is diagonal. Backbone features are strongly correlated; the
  preconditioner undoes that, and the fits take about half the iterations of unpreconditioned
  L-BFGS-B (scipy's, which scikit-learn uses).
* The objective and its gradient are written out (one matmul each way, no autograd graph).
* On a CPU with bfloat16 matrix units (AMX, AVX512-BF16) (:func:`use_bf16`), problems of 16
  classes or more run their matmuls in bfloat16: the logits from one bfloat16 product against
  the weights' high and low parts (float32 output), as accurate as float32 on the
  bfloat16-rounded features; the gradient's product in plain bfloat16 (about 0.4% error per
  entry, which L-BFGS tolerates at the default ``tol``; below ``tol`` 1e-5 everything stays float32).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from hierclass.atomic import atomic_open

if TYPE_CHECKING:
    from hierclass.featurestore import FeatureStore

__all__ = ["PathResult", "Preconditioner", "Problem", "bf16_matmul_available", "fit_path", "use_bf16"]

# bfloat16 pays where the float32 matmul costs more than converting the features twice: from
# about 16 classes on, and only on matmuls large enough to amortise the conversions' overhead.
BF16_MIN_CLASSES = 16
BF16_MIN_MACS = 2**26
BF16_MIN_TOL = 1e-5  # below this tolerance the bfloat16 gradient's error would stop L-BFGS early
# L-BFGS stops when its last STALL_WINDOW iterations together improved the objective by less than
# STALL_WINDOW * tol of its value: one slow iteration alone (they happen) does not stop it.
STALL_WINDOW = 3
AXES_FILE = "principal_axes.npz"  # a feature store's principal axes, shared by the heads trained on it
# The C path's fits stop at this times tol: enough to rank C on the holdout; the kept fit then goes on to tol.
SCOUT_TOL_FACTOR = 3.0


@dataclass
class Problem:
    """One softmax regression: standardised features, targets in ``0..n_classes-1``, optional weights.

    ``hold_x`` / ``hold_target`` (may be empty) choose C; ``name`` labels its log lines.
    """

    name: str
    x: Tensor
    target: Tensor
    n_classes: int
    weight: Tensor | None = None
    hold_x: Tensor | None = None
    hold_target: Tensor | None = None

    @property
    def n(self) -> int:
        return len(self.target)

    @property
    def has_holdout(self) -> bool:
        return self.hold_target is not None and len(self.hold_target) > 0


@dataclass
class PathResult:
    """What :func:`fit_path` chose for one problem: C, its weights ``[K, d]`` and bias ``[K]``, the L-BFGS
    iterations of that fit and the evaluations of the whole path, the training cross-entropy, whether it
    ran in bfloat16, and the path."""

    c: float
    weight: Tensor
    bias: Tensor
    iterations: int
    evaluations: int
    train_loss: float
    bf16: bool
    records: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def bf16_matmul_available() -> bool:
    """Whether this CPU multiplies bfloat16 matrices in hardware (AMX or AVX512-BF16)."""
    cpu = getattr(torch, "cpu", None)
    try:
        return bool(cpu._is_amx_tile_supported() or cpu._is_avx512_bf16_supported())
    except AttributeError:  # an older torch without the probes: stay in float32
        return False


def use_bf16(wanted: bool, device: str | torch.device, tol: float) -> bool:
    """Whether L-BFGS may use bfloat16 products: asked for, on a CPU that has the units, ``tol`` not too tight."""
    return wanted and torch.device(device).type == "cpu" and tol >= BF16_MIN_TOL and bf16_matmul_available()


@contextmanager
def _bf16_matmul(enabled: bool) -> Iterator[None]:
    """float32 matmuls with bfloat16 inputs (float32 accumulation and output) inside the block."""
    mkldnn = getattr(torch.backends.mkldnn, "matmul", None)
    if not enabled or mkldnn is None:
        yield
        return
    before = mkldnn.fp32_precision
    mkldnn.fp32_precision = "bf16"
    try:
        yield
    finally:
        mkldnn.fp32_precision = before


def _split(a: Tensor) -> tuple[Tensor, Tensor]:
    """``a`` as a bfloat16-exact high part plus the remainder (which the matmul rounds to bfloat16)."""
    high = a.to(torch.bfloat16).float()
    return high, a - high


class _Objective:
    """The regularised loss of a :class:`Problem` at one L2 strength, and its gradient, on a flat vector.

    The parameters are ``[W.ravel(), b]`` (float32). Given the problem's features in bfloat16
    (``xb``), the logits come from one bfloat16 product against the weights' high and low parts
    (float32 output): as accurate as float32 on the bfloat16-rounded features. The gradient's
    product then runs in plain bfloat16 (its entries carry about 0.4% relative error), which the
    line search tolerates down to ``tol`` around 1e-5.
    """

    def __init__(self, problem: Problem, lam: float, smoothing: float, xb: Tensor | None = None):
        self.x, self.k, self.lam, self.smoothing = problem.x, problem.n_classes, lam, smoothing
        self.xb, self.fast = xb, xb is not None
        self.d = self.x.shape[1]
        n = problem.n
        w = problem.weight if problem.weight is not None else torch.ones(n, device=self.x.device)
        self.w = (w / w.sum()).unsqueeze(1)  # [n, 1], summing to 1
        self.rows = torch.arange(n, device=self.x.device)
        self.target = problem.target
        self.evaluations = 0

    def unpack(self, theta: Tensor) -> tuple[Tensor, Tensor]:
        return theta[: self.k * self.d].view(self.k, self.d), theta[self.k * self.d :]

    def logits(self, weight: Tensor, bias: Tensor) -> Tensor:
        if not self.fast:
            return torch.addmm(bias, self.x, weight.T)
        high, low = _split(weight)
        with _bf16_matmul(True):  # one product against both parts: the features are converted once
            both = self.x @ torch.cat([high, low]).T
        return both[:, : self.k].add_(both[:, self.k :]).add_(bias)

    def __call__(self, theta: Tensor) -> tuple[float, Tensor]:
        self.evaluations += 1
        weight, bias = self.unpack(theta)
        s = self.smoothing
        z = self.logits(weight, bias)
        lse = torch.logsumexp(z, 1, keepdim=True)
        nll = lse[:, 0] - z[self.rows, self.target]
        if s > 0:  # cross-entropy against (1 - s) * one-hot + s / K
            nll = (1 - s) * nll + s * (lse[:, 0] - z.mean(1))
        g = z.sub_(lse).exp_()  # the softmax, in place of the logits
        g[self.rows, self.target] -= 1.0 - s
        if s > 0:
            g -= s / self.k
        g.mul_(self.w)
        grad_w = (g.T.to(torch.bfloat16) @ self.xb).float() if self.fast else g.T @ self.x
        grad_w.add_(weight, alpha=self.lam)
        value = float((nll * self.w[:, 0]).sum()) + 0.5 * self.lam * float((weight * weight).sum())
        return value, torch.cat([grad_w.reshape(-1), g.sum(0)])


class Preconditioner:
    """The features' principal axes, in which ``(a * Sigma + lam * I)^-1`` is a diagonal preconditioner.

    ``Sigma`` is the covariance of the standardised features (a sample of them). Problems
    are solved on the features rotated onto its eigenvectors (:meth:`rotate`: one matmul per
    head); the rotation keeps ``|W|^2``, so the objective is unchanged, and the preconditioner,
    approximately Newton's step along the correlated directions that make plain L-BFGS slow,
    costs one elementwise product. ``a`` is the mean of ``p * (1 - p)`` over a problem's classes at
    their priors; L-BFGS rescales the whole at every iteration from its last curvature pair.
    :meth:`unrotate` brings the solved weights back to the features' own axes.
    """

    def __init__(self, eigenvalues: Tensor, vectors: Tensor, fast: bool):
        self.eigenvalues = eigenvalues.clamp_min(0)
        self.vectors = vectors.contiguous()
        self.fast = fast

    @classmethod
    def from_features(cls, x: Tensor, fast: bool) -> Preconditioner:
        """From standardised features ``[n, d]`` (all of them: pass a sample of a large set)."""
        eigenvalues, vectors = torch.linalg.eigh((x.T @ x) / max(len(x), 1))
        return cls(eigenvalues, vectors, fast)

    @classmethod
    def from_store(cls, store: FeatureStore, fast: bool, max_rows: int = 10_000) -> Preconditioner:
        """From at most ``max_rows`` of a store's valid images (a fixed sample), standardised.

        Every head trained on the store shares these axes, so they are kept beside its features
        (``principal_axes.npz``, with a hash of the sample that finds it stale) and computed once.
        A store that cannot be written to gets them computed each time.
        """
        rows = np.flatnonzero(store.valid)
        if len(rows) > max_rows:
            rows = np.sort(np.random.default_rng(0).choice(rows, size=max_rows, replace=False))
        sample = np.asarray(store.features()[rows], dtype=np.float32)
        key = hashlib.blake2b(sample.tobytes(), digest_size=16).hexdigest()
        path = Path(store.root) / AXES_FILE
        with contextlib.suppress(OSError, KeyError, ValueError), np.load(path) as cached:
            if str(cached["key"]) == key:
                return cls(torch.from_numpy(cached["eigenvalues"]), torch.from_numpy(cached["vectors"]), fast)
        x = torch.from_numpy(sample)
        done = cls.from_features((x - x.mean(0)) / x.std(0).clamp_min(1e-6), fast)
        with contextlib.suppress(OSError), atomic_open(path, "wb") as f:
            np.savez(f, key=key, eigenvalues=done.eigenvalues.numpy(), vectors=done.vectors.numpy())
        return done

    def to(self, device: str | torch.device) -> Preconditioner:
        """The same axes on ``device`` (where the features are)."""
        return Preconditioner(self.eigenvalues.to(device), self.vectors.to(device), self.fast)

    @torch.no_grad()
    def rotate(self, x: Tensor, chunk: int = 65_536) -> Tensor:
        """Features ``[n, d]`` put on the principal axes, in place, a chunk of rows at a time (``|x|`` is kept).

        With ``fast``, in bfloat16 matmuls: the rotated features then differ from the exact ones by
        about 0.2%, once, as the bfloat16 objective's features do anyway.
        """
        with _bf16_matmul(self.fast):
            for start in range(0, len(x), chunk):
                x[start : start + chunk] = x[start : start + chunk] @ self.vectors
        return x

    def unrotate(self, weight: Tensor) -> Tensor:
        """Weights ``[k, d]`` solved on rotated features, for the original ones."""
        return weight @ self.vectors.T

    def for_problem(self, problem: Problem, lam: float) -> Callable[[Tensor], Tensor]:
        """The preconditioner of ``problem`` (on rotated features) at L2 strength ``lam``, on flat parameter vectors."""
        prior = torch.bincount(problem.target, minlength=problem.n_classes).float() / max(problem.n, 1)
        a = max(float((prior * (1 - prior)).mean()), 1.0 / max(problem.n, 1))  # > 0 with one class present
        k = problem.n_classes
        per_feature = (1.0 / (a * self.eigenvalues + lam)).repeat(k)
        scale = torch.cat([per_feature, torch.full((k,), 1.0 / a, device=per_feature.device)])
        return lambda v: v * scale


def _dot(a: Tensor, b: Tensor) -> float:
    return float(torch.dot(a, b))


def minimize(
    fun: Callable[[Tensor], tuple[float, Tensor]],
    theta: Tensor,
    precondition: Callable[[Tensor], Tensor],
    max_iter: int,
    tol: float,
    memory: int = 10,
) -> tuple[Tensor, float, int]:
    """Preconditioned L-BFGS with an Armijo backtracking line search, on a convex smooth ``fun``.

    The two-loop recursion starts from ``gamma * precondition(q)``, ``gamma`` rescaling the
    preconditioner by the last curvature pair (Shanno's scaling), so that the unit step is
    usually taken at once. Stops when the last :data:`STALL_WINDOW` iterations improved the
    objective by less than ``tol`` times its value on average, after ``max_iter`` iterations,
    or when the line search cannot improve.

    Returns:
        ``(solution, objective there, iterations)``.
    """
    value, grad = fun(theta)
    history = [value]
    pairs: list[tuple[Tensor, Tensor, float]] = []
    iterations = 0
    while iterations < max_iter:
        iterations += 1
        q = grad.clone()
        alphas = []
        for s, y, rho in reversed(pairs):
            alpha = rho * _dot(s, q)
            alphas.append(alpha)
            q.sub_(y, alpha=alpha)
        r = precondition(q)
        if pairs:
            s, y, _ = pairs[-1]
            r.mul_(_dot(s, y) / max(_dot(y, precondition(y)), 1e-30))
        for (s, y, rho), alpha in zip(pairs, reversed(alphas), strict=True):
            r.add_(s, alpha=alpha - rho * _dot(y, r))
        direction = r.neg_()
        slope = _dot(grad, direction)
        if slope >= 0:  # not a descent direction: forget the curvature pairs, step along -gradient
            pairs.clear()
            direction, slope = -precondition(grad), -_dot(grad, precondition(grad))
        step = 1.0
        for _ in range(30):
            candidate = theta + step * direction
            new_value, new_grad = fun(candidate)
            if new_value <= value + 1e-4 * step * slope:
                break
            step *= 0.5
        else:
            break  # no decrease along the direction: at the solution to float precision
        s, y = candidate - theta, new_grad - grad
        sy = _dot(s, y)
        if sy > 1e-12 * max(_dot(y, y), 1e-30):
            pairs.append((s, y, 1.0 / sy))
            if len(pairs) > memory:
                pairs.pop(0)
        theta, value, grad = candidate, new_value, new_grad
        history.append(value)
        if len(history) > STALL_WINDOW and history[-1 - STALL_WINDOW] - value <= STALL_WINDOW * tol * abs(value):
            break
    return theta, value, iterations


def _holdout_scores(problem: Problem, weight: Tensor, bias: Tensor) -> tuple[float, float]:
    """Accuracy and mean cross-entropy of ``(weight, bias)`` on the problem's holdout."""
    assert problem.hold_x is not None and problem.hold_target is not None
    z = torch.addmm(bias, problem.hold_x, weight.T)
    acc = float((z.argmax(1) == problem.hold_target).float().mean())
    return acc, float(torch.nn.functional.cross_entropy(z, problem.hold_target))


def path_order(grid: list[float], start: float) -> int:
    """Index of the grid value nearest ``start`` (in log scale): where the path begins."""
    return min(range(len(grid)), key=lambda i: abs(math.log(grid[i]) - math.log(start)))


def fit_path(
    problem: Problem,
    grid: list[float],
    start: float,
    preconditioner: Preconditioner,
    *,
    max_iter: int,
    tol: float,
    smoothing: float = 0.0,
    bf16: bool = False,
    log: Callable[[dict[str, Any], str], None] | None = None,
) -> PathResult:
    """Fit ``problem`` at the C values of ``grid`` its holdout asks for, and keep the best.

    The path begins at the grid value nearest ``start``, fitted from zero. It then moves to
    weaker L2 strengths (larger C) while the holdout's cross-entropy improves; if the first
    such step does not improve, it moves to stronger ones instead. Every fit starts from its
    neighbour's solution. These scouting fits stop at ``SCOUT_TOL_FACTOR * tol``; the kept one
    then continues to ``tol``. A problem without holdout images is fitted at that first value only.
    With ``bf16`` (see :func:`use_bf16`), a problem large enough for it runs its products in bfloat16.
    """
    grid = sorted(grid)
    warnings = []
    if len(grid) > 1 and not problem.has_holdout:
        grid = [grid[path_order(grid, start)]]
        warnings.append(f"no holdout image to choose C on: C={grid[0]:g}")
    k, d = problem.n_classes, problem.x.shape[1]
    fast = bf16 and k >= BF16_MIN_CLASSES and problem.n * d * k >= BF16_MIN_MACS
    xb = problem.x.to(torch.bfloat16) if fast else None  # once, for every fit of the path
    solutions: dict[int, tuple[Tensor, tuple[float, float] | None, int, float]] = {}
    records: list[dict[str, Any]] = []
    evaluations = 0

    def fit(i: int, theta: Tensor, refine: bool = False) -> tuple[float, float] | None:
        nonlocal evaluations
        t0 = time.perf_counter()
        lam = 1.0 / (grid[i] * max(problem.n, 1))
        objective = _Objective(problem, lam, smoothing, xb)
        fit_tol = tol if refine else tol * SCOUT_TOL_FACTOR
        theta, value, iterations = minimize(
            objective, theta, preconditioner.for_problem(problem, lam), max_iter, fit_tol
        )
        evaluations += objective.evaluations
        weight, bias = objective.unpack(theta)
        scores = _holdout_scores(problem, weight, bias) if problem.has_holdout else None
        data_loss = value - 0.5 * lam * float((weight * weight).sum())
        solutions[i] = (theta, scores, iterations, data_loss)
        seconds = time.perf_counter() - t0
        record = {"c": grid[i], "objective": value, "iterations": iterations, "evaluations": objective.evaluations}
        if refine:
            record["refined"] = True
        label = f"C={grid[i]:g}" + (" refined" if refine else "")
        line = f"{label}  objective {value:.4f}  {iterations} iterations  {seconds:.2f} s"
        if scores is not None:
            record |= {"holdout_acc": scores[0], "holdout_loss": scores[1]}
            line += f"  holdout acc {scores[0]:.4f}  loss {scores[1]:.4f}"
        records.append({**record, "seconds": seconds})
        if log is not None:
            log(records[-1], line)
        return scores

    def better(a: tuple[float, float] | None, b: tuple[float, float] | None) -> bool:
        # The holdout's cross-entropy, not its accuracy: on a few hundred images, accuracies of
        # neighbouring C tie or differ by one or two images, and the choice would follow that noise.
        return a is not None and b is not None and a[1] < b[1]

    first = path_order(grid, start)
    best = fit(first, torch.zeros(k * d + k, device=problem.x.device))
    chosen = first
    for direction in (1, -1):
        i = first + direction
        while 0 <= i < len(grid):
            scores = fit(i, solutions[i - direction][0])
            if not better(scores, best):
                break
            best, chosen = scores, i
            i += direction
        if chosen != first:  # the weaker side improved: the stronger side is past the peak
            break

    fit(chosen, solutions[chosen][0], refine=True)  # the kept fit, to the full tolerance
    theta, _, iterations, train_loss = solutions[chosen]
    weight, bias = theta[: k * d].view(k, d).clone(), theta[k * d :].clone()
    if len(grid) > 1 and chosen == len(grid) - 1:
        warnings.append(f"the weakest L2 strength tried (C={grid[-1]:g}) scored best: add larger values to c_grid")
    if len(grid) > 1 and chosen == 0:
        warnings.append(f"the strongest L2 strength tried (C={grid[0]:g}) scored best: add smaller values to c_grid")
    if iterations >= max_iter:
        warnings.append(f"L-BFGS stopped at max_iter={max_iter} before converging: raise max_iter")
    return PathResult(grid[chosen], weight, bias, iterations, evaluations, train_loss, fast, records, warnings)
