"""Multinomial logistic regression solved exactly on in-memory features, along a path of L2 strengths.

Every linear head trained by L-BFGS is a set of independent softmax regressions
(:class:`Problem`): the flat head and the router are one each; the experts are one per branch
(its images, its leaves, plus an "other" class on every image with ``--expert-other``). Each
problem minimises

    sum_i w_i * CE_i / sum_i w_i  +  |W|^2 / (2 * C * n)

(the bias unpenalised), which has scikit-learn's ``LogisticRegression(C)`` optimum when the
weights are 1. :func:`fit_path` fits it at the values of ``c_grid`` its holdout asks for, each
warm-started from its neighbours' solutions, and keeps the C its holdout scores best.

What makes a fit cheap:

* :func:`minimize` is L-BFGS preconditioned by ``(a * Sigma + lam * I)^-1``, ``Sigma`` the
  covariance of the standardised features, kept as its top eigenpairs plus the mean of the
  rest (:class:`Preconditioner`, by subspace iteration on the features in memory). Backbone features are strongly
  correlated along a few dozen directions; on Fashion's features the preconditioner saves a
  third to 45% of a flat head's products against a scalar one.
* The logits are linear in the parameters: each iteration costs two products of the features,
  one for the search direction (trial steps along it then cost a log-softmax each) and one for
  the gradient where the step lands. The objective and its gradient are written out, no
  autograd graph.
* The path's first fit starts from the problem solved on the features' top principal directions
  (:func:`subspace_start`): iterations there cost a small product, and they do the part of the work
  that plain L-BFGS from zero spends its first iterations on.
* Each later fit of the C path starts where the secant through the two fits before it points (the
  solutions move smoothly with log C), from the last fit's logits, with its curvature pairs
  (:class:`Memory`) moved exactly to the new L2 strength.
* On a CPU with bfloat16 matrix units (AMX, AVX512-BF16) (:func:`use_bf16`), problems of about
  8M multiply-adds per product or more run their products in bfloat16. The gradient's product
  carries about 0.4% error per entry, which L-BFGS tolerates at the default ``tol`` (below
  ``tol`` 1e-5 everything stays float32). The kept fit (the chosen C's, continued to ``tol``)
  starts from exact logits and rounds its search directions to bfloat16, so their logits,
  accumulated in float32, are exact and the tracked logits stay those of the parameters. The
  path's scouting fits take the direction's product in plain bfloat16, about twice as fast:
  their tracked logits drift by 0.2-0.4% (root mean square) over a fit, which only changes how
  close a scout gets to its optimum: its holdout is scored from its weights.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

__all__ = ["PathResult", "Preconditioner", "Problem", "bf16_matmul_available", "fit_path", "use_bf16"]

# bfloat16 pays on products large enough to amortise converting the features (once per path, and
# the line's product converts them again): from about 8M multiply-adds.
BF16_MIN_MACS = 2**23
BF16_MIN_TOL = 1e-5  # below this tolerance the bfloat16 gradient's error would stop L-BFGS early
# L-BFGS stops when its last STALL_WINDOW iterations together improved the objective by less than
# STALL_WINDOW * tol of its value: one slow iteration alone (they happen) does not stop it.
STALL_WINDOW = 3
MEMORY_SIZE = 10  # L-BFGS keeps this many curvature pairs
# torch's log_softmax is one pass over the classes, twice as fast as logsumexp from about 16 of them
# and slower below, where it cannot fill the vector registers.
LOG_SOFTMAX_MIN_CLASSES = 16
# The preconditioner keeps this many of the covariance's top eigenpairs (the rest as their mean).
PRECONDITIONER_RANK = 64
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
    iterations of that fit, the products of the features the whole path took (``evaluations``), the
    training cross-entropy, whether it ran in bfloat16, and the path."""

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
    """The regularised loss of a :class:`Problem` at one L2 strength, and its gradient, on flat vectors.

    The parameters are ``[W.ravel(), b]`` (float32). The logits are linear in them, so along a
    search line ``theta + t * D`` they are ``Z + t * Z_D``: :func:`minimize` pays one product of
    the features for the line (:meth:`along`) and one for the gradient where it lands, and tries
    step lengths without touching the features. Given the features in bfloat16 (``xb``), the
    direction's weights are rounded to bfloat16 (:meth:`on_grid`), which makes ``Z_D``, a
    bfloat16 product with float32 accumulation, exact: the logits stay those of the parameters, to
    float32 rounding. Without ``exact`` (the C path's scouting fits), ``Z_D`` is a plain bfloat16
    product instead, rounded to bfloat16, and the tracked logits drift. The gradient's product runs
    in plain bfloat16 (its entries carry about 0.4% relative error), which the line search
    tolerates down to ``tol`` around 1e-5.
    """

    def __init__(self, problem: Problem, lam: float, smoothing: float, xb: Tensor | None = None, exact: bool = True):
        self.x, self.k, self.lam, self.smoothing = problem.x, problem.n_classes, lam, smoothing
        self.xb, self.fast, self.exact = xb, xb is not None, exact
        self.d = self.x.shape[1]
        n = problem.n
        w = problem.weight if problem.weight is not None else torch.ones(n, device=self.x.device)
        self.w = (w / w.sum()).unsqueeze(1)  # [n, 1], summing to 1
        self.picked = torch.arange(n, device=self.x.device) * self.k + problem.target  # target entries, flat
        self.evaluations = 0  # products of the features: one per gradient, one per search line

    def unpack(self, theta: Tensor) -> tuple[Tensor, Tensor]:
        return theta[: self.k * self.d].view(self.k, self.d), theta[self.k * self.d :]

    def weights(self, theta: Tensor) -> Tensor:
        """The weights' part of ``theta``, flat."""
        return theta[: self.k * self.d]

    def logits(self, theta: Tensor) -> Tensor:
        """``X W^T + b`` for any parameters: in bfloat16 mode one product against the weights' high and
        low parts (float32 output), as accurate as float32 on the bfloat16-rounded features."""
        self.evaluations += 1
        weight, bias = self.unpack(theta)
        if not self.fast:
            return torch.addmm(bias, self.x, weight.T)
        high, low = _split(weight)
        with _bf16_matmul(True):  # one product against both parts: the features are converted once
            both = self.x @ torch.cat([high, low]).T
        return both[:, : self.k].add_(both[:, self.k :]).add_(bias)

    def on_grid(self, direction: Tensor) -> Tensor:
        """``direction`` with its weights rounded to bfloat16 in bfloat16 mode (in place), so :meth:`along` is exact."""
        if self.fast:
            weight = direction[: self.k * self.d]
            weight.copy_(weight.to(torch.bfloat16))
        return direction

    def along(self, direction: Tensor) -> Tensor:
        """The logits' change per unit step along ``direction`` (on the grid of :meth:`on_grid`): exact, or
        in bfloat16 mode without ``exact`` a plain bfloat16 product, about twice as fast, rounded to bfloat16."""
        self.evaluations += 1
        weight, bias = self.unpack(direction)
        if self.fast and not self.exact:
            return (self.xb @ weight.to(torch.bfloat16).T).float().add_(bias)
        with _bf16_matmul(self.fast):
            z = self.x @ weight.T
        return z.add_(bias)

    def data_loss(self, z: Tensor) -> tuple[float, Tensor]:
        """The weighted mean cross-entropy of logits ``z``, and their log-probabilities ``[n, K]``."""
        s = self.smoothing
        if self.k >= LOG_SOFTMAX_MIN_CLASSES:
            log_p = torch.log_softmax(z, 1)
        else:
            log_p = z - torch.logsumexp(z, 1, keepdim=True)
        w = self.w[:, 0]
        loss = -float(torch.dot(log_p.view(-1)[self.picked], w))
        if s > 0:  # cross-entropy against (1 - s) * one-hot + s / K
            loss = (1 - s) * loss - s * float(torch.dot(log_p.mean(1), w))
        return loss, log_p

    def gradient(self, log_p: Tensor, theta: Tensor) -> Tensor:
        """The gradient at ``theta``, whose log-probabilities are ``log_p`` (turned into probabilities in place)."""
        self.evaluations += 1
        s = self.smoothing
        weight, _ = self.unpack(theta)
        g = log_p.exp_()  # the softmax
        g.view(-1)[self.picked] -= 1.0 - s
        if s > 0:
            g -= s / self.k
        g.mul_(self.w)
        grad_w = (g.T.to(torch.bfloat16) @ self.xb).float() if self.fast else g.T @ self.x
        grad_w.add_(weight, alpha=self.lam)
        return torch.cat([grad_w.reshape(-1), g.sum(0)])

    def penalty(self, theta: Tensor) -> float:
        weight, _ = self.unpack(theta)
        return 0.5 * self.lam * float((weight * weight).sum())

    def __call__(self, theta: Tensor) -> tuple[float, Tensor]:
        """The objective and its gradient at ``theta``."""
        z = self.logits(theta)
        loss, log_p = self.data_loss(z)
        return loss + self.penalty(theta), self.gradient(log_p, theta)


class Preconditioner:
    """``(a * Sigma + lam * I)^-1`` for L-BFGS, with ``Sigma`` the covariance of the standardised features.

    ``Sigma`` is kept as its top :data:`PRECONDITIONER_RANK` eigenpairs plus the mean of the
    other eigenvalues: backbone features are strongly correlated along a few dozen directions,
    which make plain L-BFGS slow, while the rest of the spectrum is flat enough for L-BFGS's own
    curvature pairs. Applying it costs two thin products (``[K, d] x [d, rank]`` and back), little
    beside the features' products; L-BFGS applies it twice per iteration. ``a`` is the mean of
    ``p * (1 - p)`` over a problem's classes at their priors; L-BFGS rescales the whole at every
    iteration from its last curvature pair.
    """

    def __init__(self, eigenvalues: Tensor, vectors: Tensor, rest: float):
        self.eigenvalues = eigenvalues.clamp_min(0)
        self.vectors = vectors.contiguous()  # [d, rank], orthonormal columns
        self.rest = max(rest, 0.0)  # the mean of the other eigenvalues

    @classmethod
    @torch.inference_mode()
    def from_features(
        cls, x: Tensor, rank: int | None = None, max_rows: int = 4096, fast: bool = False
    ) -> Preconditioner:
        """From standardised features ``[n, d]``, an evenly spaced sample of at most ``max_rows`` of them.

        The top eigenpairs come from a few rounds of subspace iteration on the sample's covariance,
        applied as ``S^T (S B) / n`` without forming it (in bfloat16 with ``fast``), seeded, so the
        same features give the same result.
        """
        rank = min(PRECONDITIONER_RANK if rank is None else rank, x.shape[1])
        sample = x[:: max(1, math.ceil(len(x) / max_rows))]
        n, d = max(len(sample), 1), x.shape[1]
        dtype = torch.bfloat16 if fast else x.dtype
        rows = sample.to(dtype)

        def covariance_times(b: Tensor) -> Tensor:
            return (rows.T @ (rows @ b.to(dtype))).float() / n

        width = min(d, rank + 16)  # oversampled: the top ``rank`` converge in a few rounds
        basis = torch.randn(d, width, generator=torch.Generator().manual_seed(0)).to(x.device)
        for _ in range(4):
            basis = torch.linalg.qr(covariance_times(basis)).Q
        projected = (rows @ basis.to(dtype)).float()
        values, vectors = torch.linalg.eigh(projected.T @ projected / n)
        values, vectors = values.flip(0)[:rank], (basis @ vectors).flip(1)[:, :rank]
        rest = (float(torch.linalg.vector_norm(sample)) ** 2 / n - float(values.sum())) / max(d - rank, 1)
        return cls(values, vectors, rest)

    def for_problem(self, problem: Problem, lam: float) -> Callable[[Tensor], Tensor]:
        """The preconditioner of ``problem`` at L2 strength ``lam``, on flat parameter vectors ``[W.ravel(), b]``."""
        prior = torch.bincount(problem.target, minlength=problem.n_classes).float() / max(problem.n, 1)
        a = max(float((prior * (1 - prior)).mean()), 1.0 / max(problem.n, 1))  # > 0 with one class present
        k, d = problem.n_classes, self.vectors.shape[0]
        rest = 1.0 / (a * self.rest + lam)
        top = 1.0 / (a * self.eigenvalues + lam) - rest  # the top directions' own scale, on top of ``rest``
        vectors = self.vectors

        def apply(v: Tensor) -> Tensor:
            out = torch.empty_like(v)
            weight, out_weight = v[: k * d].view(k, d), out[: k * d].view(k, d)
            torch.mul(weight, rest, out=out_weight)
            out_weight.addmm_((weight @ vectors).mul_(top), vectors.T)
            torch.mul(v[k * d :], 1.0 / a, out=out[k * d :])
            return out

        return apply


def _dot(a: Tensor, b: Tensor) -> float:
    return float(torch.dot(a, b))


class Memory:
    """L-BFGS's curvature pairs ``(s, y, 1 / s.y)``, the last ``size`` of them.

    The L2 term's Hessian is ``lam`` on the weights, the data term's does not depend on ``lam``,
    so a pair taken at one strength becomes a pair of another by adding ``(lam' - lam) * s`` to
    the weights' part of ``y`` (:meth:`at`). A fit along the C path starts with its neighbour's
    memory, not only its solution: its first step is already a quasi-Newton one.
    """

    def __init__(self, size: int | None = None):
        self.size = MEMORY_SIZE if size is None else size
        self.pairs: list[tuple[Tensor, Tensor, float]] = []

    def add(self, s: Tensor, y: Tensor) -> None:
        sy = _dot(s, y)
        if sy > 1e-12 * max(_dot(y, y), 1e-30):  # curvature along s: skip the pair otherwise
            self.pairs.append((s, y, 1.0 / sy))
            if len(self.pairs) > self.size:
                self.pairs.pop(0)

    def at(self, shift: float, n_weights: int) -> Memory:
        """These pairs for an objective whose L2 strength on the first ``n_weights`` entries is ``shift`` higher."""
        moved = Memory(self.size)
        for s, y, _ in self.pairs:
            y = y.clone()
            y[:n_weights].add_(s[:n_weights], alpha=shift)
            moved.add(s, y)
        return moved


def minimize(
    objective: _Objective,
    theta: Tensor,
    precondition: Callable[[Tensor], Tensor],
    max_iter: int,
    tol: float,
    memory: Memory | None = None,
    z: Tensor | None = None,
) -> tuple[Tensor, Tensor, float, int]:
    """Preconditioned L-BFGS with an Armijo backtracking line search, on a convex smooth objective.

    The two-loop recursion starts from ``gamma * precondition(q)``, ``gamma`` rescaling the
    preconditioner by the last curvature pair (Shanno's scaling), so that the unit step is
    usually taken at once. Each iteration costs two products of the features: the logits'
    change along the direction, after which every trial step costs one log-softmax, and the
    gradient where the step lands. Stops when the last :data:`STALL_WINDOW` iterations improved
    the objective by less than ``tol`` times its value on average, after ``max_iter``
    iterations, or when the line search cannot improve.

    ``z``, when given, are the logits of ``theta``.

    Returns:
        ``(solution, its logits, objective there, iterations)``.
    """
    z = objective.logits(theta) if z is None else z
    loss, log_p = objective.data_loss(z)
    value, grad = loss + objective.penalty(theta), objective.gradient(log_p, theta)
    lam = objective.lam
    history = [value]
    memory = Memory() if memory is None else memory
    pairs = memory.pairs
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
        direction = objective.on_grid(r.neg_())
        slope = _dot(grad, direction)
        if slope >= 0:  # not a descent direction: forget the curvature pairs, step along -gradient
            pairs.clear()
            direction = objective.on_grid(-precondition(grad))
            slope = _dot(grad, direction)
        z_step = objective.along(direction)
        w, dw = objective.weights(theta), objective.weights(direction)  # the penalty along the line: a quadratic
        ww, wd, dd = _dot(w, w), _dot(w, dw), _dot(dw, dw)
        step = 1.0
        for _ in range(30):
            candidate_z = torch.add(z, z_step, alpha=step)
            loss, log_p = objective.data_loss(candidate_z)
            new_value = loss + 0.5 * lam * (ww + 2 * step * wd + step * step * dd)
            if new_value <= value + 1e-4 * step * slope:
                break
            step *= 0.5
        else:
            break  # no decrease along the direction: at the solution to float precision
        del z_step  # the old logits and the line's are freed before the gradient's buffers come
        z = candidate_z
        candidate = theta + step * direction
        new_grad = objective.gradient(log_p, candidate)
        memory.add(candidate - theta, new_grad - grad)
        theta, value, grad = candidate, new_value, new_grad
        history.append(value)
        if len(history) > STALL_WINDOW and history[-1 - STALL_WINDOW] - value <= STALL_WINDOW * tol * abs(value):
            break
    return theta, z, value, iterations


def subspace_start(
    problem: Problem, preconditioner: Preconditioner, lam: float, smoothing: float, max_iter: int, tol: float
) -> tuple[Tensor, Tensor, int]:
    """A start for the path's first fit: the problem solved on the features' top principal directions only.

    Its weights are restricted to the span of ``preconditioner.vectors``, where the features are
    ``X V`` (``[n, rank]``) and their covariance is diagonal, so its L-BFGS iterations cost little
    beside the full problem's. Lifted back (``W = W_V V^T``, the same logits), it holds the part of
    the solution that plain L-BFGS from zero spends its first iterations on. On Fashion's backbone
    features the flat head's first fit then took 10 iterations instead of 21 (2.8k images) and 21
    instead of 30 (28k images), and its whole C path 76 products instead of 98 (2.8k images).

    Returns:
        ``(theta, its logits, the subspace fit's iterations)``.
    """
    vectors = preconditioner.vectors
    k, rank = problem.n_classes, vectors.shape[1]
    inner = Problem(problem.name, problem.x @ vectors, problem.target, k, problem.weight)
    diagonal = Preconditioner(preconditioner.eigenvalues, torch.eye(rank, device=vectors.device), 0.0)
    theta = torch.zeros(k * rank + k, device=vectors.device)
    objective = _Objective(inner, lam, smoothing)
    theta, z, _, iterations = minimize(objective, theta, diagonal.for_problem(inner, lam), max_iter, tol)
    weight, bias = objective.unpack(theta)
    return torch.cat([(weight @ vectors.T).reshape(-1), bias]), z, iterations


def _holdout_scores(problem: Problem, weight: Tensor, bias: Tensor) -> tuple[float, float]:
    """Accuracy and mean cross-entropy of ``(weight, bias)`` on the problem's holdout."""
    assert problem.hold_x is not None and problem.hold_target is not None
    z = torch.addmm(bias, problem.hold_x, weight.T)
    acc = float((z.argmax(1) == problem.hold_target).float().mean())
    return acc, float(torch.nn.functional.cross_entropy(z, problem.hold_target))


def path_order(grid: list[float], start: float) -> int:
    """Index of the grid value nearest ``start`` (in log scale): where the path begins."""
    return min(range(len(grid)), key=lambda i: abs(math.log(grid[i]) - math.log(start)))


@torch.inference_mode()  # no autograd bookkeeping on its thousands of small ops: 3-8% faster
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

    The path begins at the grid value nearest ``start``, fitted from :func:`subspace_start`. It then
    moves to weaker L2 strengths (larger C) while the holdout's cross-entropy improves; if the first
    such step does not improve, it moves to stronger ones instead. Every fit starts from its
    neighbour's solution and L-BFGS memory (:class:`Memory`), moved along the secant through the
    two fits before it when there are two. These scouting fits stop at
    ``SCOUT_TOL_FACTOR * tol``; the kept one then continues to ``tol``. A problem without
    holdout images is fitted at that first value only.
    With ``bf16`` (see :func:`use_bf16`), a problem large enough for it runs its products in bfloat16.
    """
    grid = sorted(grid)
    warnings = []
    if len(grid) > 1 and not problem.has_holdout:
        grid = [grid[path_order(grid, start)]]
        warnings.append(f"no holdout image to choose C on: C={grid[0]:g}")
    k, d = problem.n_classes, problem.x.shape[1]
    fast = bf16 and problem.n * d * k >= BF16_MIN_MACS
    xb = problem.x.to(torch.bfloat16) if fast else None  # once, for every fit of the path
    solutions: dict[int, tuple[Tensor, tuple[float, float] | None, int, float]] = {}
    records: list[dict[str, Any]] = []
    evaluations = 0
    memories: dict[int, tuple[float, Memory]] = {}  # the L-BFGS memory of the fits a later one may start from
    last: tuple[int, Tensor] | None = None  # the last fit and its logits

    def fit(
        i: int, source: int | None = None, behind: int | None = None, refine: bool = False
    ) -> tuple[float, float] | None:
        """Fit C = grid[i] from :func:`subspace_start` (from zero when the preconditioner spans every
        feature), or from the solution ``source`` (with its memory), moved along the path's secant from
        ``behind`` to ``source`` when given."""
        nonlocal evaluations, last
        t0 = time.perf_counter()
        lam = 1.0 / (grid[i] * max(problem.n, 1))
        objective = _Objective(problem, lam, smoothing, xb, exact=refine)
        memory, z, inner_iterations = Memory(), None, None
        fit_tol = tol if refine else tol * SCOUT_TOL_FACTOR
        if source is None and preconditioner.vectors.shape[1] < d:
            theta, z, inner_iterations = subspace_start(problem, preconditioner, lam, smoothing, max_iter, fit_tol)
        elif source is None:
            theta = torch.zeros(k * d + k, device=problem.x.device)
            z = torch.zeros(problem.n, k, device=problem.x.device)
        else:
            theta = solutions[source][0]
            source_lam, source_memory = memories[source]
            memory = source_memory.at(lam - source_lam, k * d)
            # the source's logits, not kept beside the new ones; in bfloat16 mode a scout's have drifted,
            # and the kept fit starts from exact ones
            if last is not None and last[0] == source and not (fast and refine):
                z, last = last[1], None
        if behind is not None:  # the solutions move smoothly with log C: start where the secant points
            ratio = math.log(grid[i] / grid[source]) / math.log(grid[source] / grid[behind])
            step = objective.on_grid(ratio * (theta - solutions[behind][0]))
            theta = theta + step
            z = None if z is None else z + objective.along(step)
        theta, z, value, iterations = minimize(
            objective, theta, preconditioner.for_problem(problem, lam), max_iter, fit_tol, memory, z
        )
        last = (i, z)
        memories[i] = (lam, memory)
        evaluations += objective.evaluations
        weight, bias = objective.unpack(theta)
        scores = _holdout_scores(problem, weight, bias) if problem.has_holdout else None
        data_loss = value - objective.penalty(theta)
        solutions[i] = (theta, scores, iterations, data_loss)
        seconds = time.perf_counter() - t0
        record = {"c": grid[i], "objective": value, "iterations": iterations, "evaluations": objective.evaluations}
        if refine:
            record["refined"] = True
        if inner_iterations is not None:
            record["subspace_iterations"] = inner_iterations
        label = f"C={grid[i]:g}" + (" refined" if refine else "")
        after = "" if inner_iterations is None else f" after {inner_iterations} on the top principal directions"
        line = f"{label}  objective {value:.4f}  {iterations} iterations{after}  {seconds:.2f} s"
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
    best = fit(first)
    chosen = first
    for direction in (1, -1):
        i = first + direction
        while 0 <= i < len(grid):
            behind = i - 2 * direction
            scores = fit(i, source=i - direction, behind=behind if behind in solutions else None)
            for j in set(memories) - {i, chosen}:  # later fits start from the last one or the best one
                del memories[j]
            if not better(scores, best):
                break
            best, chosen = scores, i
            i += direction
        if chosen != first:  # the weaker side improved: the stronger side is past the peak
            break

    fit(chosen, source=chosen, refine=True)  # the kept fit, to the full tolerance
    theta, _, iterations, train_loss = solutions[chosen]
    weight, bias = theta[: k * d].view(k, d).clone(), theta[k * d :].clone()
    if len(grid) > 1 and chosen == len(grid) - 1:
        warnings.append(f"the weakest L2 strength tried (C={grid[-1]:g}) scored best: add larger values to c_grid")
    if len(grid) > 1 and chosen == 0:
        warnings.append(f"the strongest L2 strength tried (C={grid[0]:g}) scored best: add smaller values to c_grid")
    if iterations >= max_iter:
        warnings.append(f"L-BFGS stopped at max_iter={max_iter} before converging: raise max_iter")
    return PathResult(grid[chosen], weight, bias, iterations, evaluations, train_loss, fast, records, warnings)
