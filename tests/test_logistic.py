"""The exact solver of linear heads: preconditioned L-BFGS, the C path, and its bfloat16 matmuls."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from hierclass.logistic import (
    BF16_MIN_MACS,
    Memory,
    Preconditioner,
    Problem,
    _Objective,
    bf16_matmul_available,
    fit_path,
    minimize,
    subspace_start,
)


def correlated_problem(n: int, d: int, k: int, seed: int = 0, n_hold: int = 0) -> Problem:
    """Classes in strongly correlated features (the case that makes plain L-BFGS slow), standardised."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) / d**0.5 + 2.0 * torch.randn(d, 1, generator=g) @ torch.randn(
        1, d, generator=g
    )
    means = torch.randn(k, d, generator=g) * 0.6
    target = torch.randint(0, k, (n + n_hold,), generator=g)
    x = (means[target] + torch.randn(n + n_hold, d, generator=g)) @ mix
    x = (x - x[:n].mean(0)) / x[:n].std(0)
    hold = {"hold_x": x[n:].contiguous(), "hold_target": target[n:]} if n_hold else {}
    return Problem("p", x[:n].contiguous(), target[:n], k, **hold)


def preconditioned(problem: Problem, fast: bool = False) -> tuple[Problem, Preconditioner]:
    """The problem and the preconditioner the engine builds for it, from its features."""
    return problem, Preconditioner.from_features(problem.x, fast=fast)


def test_preconditioner_is_the_inverse_of_its_covariance_model() -> None:
    problem = correlated_problem(3_000, 96, 5)
    pre = Preconditioner.from_features(problem.x, rank=16)
    cov = problem.x.T @ problem.x / problem.n
    top = torch.linalg.eigvalsh(cov).flip(0)[:16]
    torch.testing.assert_close(pre.eigenvalues, top, rtol=1e-3, atol=1e-4)  # the top of the spectrum
    assert pre.rest == pytest.approx(float(torch.trace(cov) - top.sum()) / 80, rel=1e-3)
    # applied to a flat vector: (a * Sigma~ + lam)^-1 on each class's weights, 1 / a on the biases,
    # Sigma~ the top eigenpairs plus the mean of the other eigenvalues
    lam, k, d = 0.01, 5, 96
    prior = torch.bincount(problem.target, minlength=k).float() / problem.n
    a = float((prior * (1 - prior)).mean())
    v = pre.vectors.double()
    model = v @ torch.diag(pre.eigenvalues.double()) @ v.T + pre.rest * (torch.eye(d) - v @ v.T)
    inverse = torch.linalg.inv(a * model + lam * torch.eye(d, dtype=torch.float64))
    vec = torch.randn(k * d + k)
    got = pre.for_problem(problem, lam)(vec)
    expected = (vec[: k * d].view(k, d).double() @ inverse).float()
    torch.testing.assert_close(got[: k * d].view(k, d), expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got[k * d :], vec[k * d :] / a)


def test_preconditioned_lbfgs_reaches_the_gradient_free_optimum() -> None:
    problem, pre = preconditioned(correlated_problem(2_000, 48, 6))
    objective = _Objective(problem, lam=1e-3, smoothing=0.0)
    theta, _, value, iterations = minimize(objective, torch.zeros(6 * 49), pre.for_problem(problem, 1e-3), 500, 1e-12)
    _, grad = objective(theta)
    assert grad.abs().max() < 1e-4 and iterations < 500
    # scipy's L-BFGS-B on the same objective finds the same minimum
    import numpy as np
    from scipy.optimize import minimize as scipy_minimize

    def fun(t: np.ndarray) -> tuple[float, np.ndarray]:
        v, g = objective(torch.from_numpy(t.astype(np.float32)))
        return v, g.double().numpy()

    ref = scipy_minimize(fun, np.zeros(6 * 49), jac=True, method="L-BFGS-B", options={"maxiter": 5000, "ftol": 1e-14})
    assert value <= ref.fun + 1e-6


def test_path_starts_at_c_start_and_walks_toward_the_better_side() -> None:
    problem, pre = preconditioned(correlated_problem(1_500, 24, 5, n_hold=600))
    seen: list[float] = []
    refined: list[float] = []
    result = fit_path(
        problem, [1e-3, 1e-2, 1e-1, 1.0], 0.01, pre, max_iter=200, tol=1e-6,
        log=lambda record, line: seen.append(record["c"]) if "refined" not in record else refined.append(record["c"]),
    )  # fmt: skip
    grid = [1e-3, 1e-2, 1e-1, 1.0]
    assert seen[:2] == [0.01, 0.1]  # from the value nearest c_start, first toward weaker C
    losses = {r["c"]: r["holdout_loss"] for r in result.records if "refined" not in r}
    assert losses[result.c] == min(losses.values())  # the holdout's cross-entropy picks C
    assert refined == [result.c]  # the kept fit, and it alone, is taken on to the full tolerance
    if result.c > 0.01:  # the weaker side improved: it walked up to one step past the best (or the grid's end)
        assert seen == sorted(seen) and seen[-1] == grid[min(grid.index(result.c) + 1, len(grid) - 1)]
    else:  # it turned to the stronger side: one step past the best there (or the grid's end)
        assert seen[2:] == [0.001] and result.c in (0.01, 0.001)


def test_a_problem_without_holdout_is_fitted_at_the_start_value_and_says_so() -> None:
    problem, pre = preconditioned(correlated_problem(400, 8, 3))
    result = fit_path(problem, [0.01, 0.1, 1.0], 0.1, pre, max_iter=100, tol=1e-6)
    assert result.c == 0.1 and [r["c"] for r in result.records] == [0.1, 0.1]  # scouted, then refined
    assert result.warnings == ["no holdout image to choose C on: C=0.1"]


@pytest.mark.skipif(not bf16_matmul_available(), reason="this CPU has no bfloat16 matrix units")
def test_bf16_objective_matches_float32_and_leaves_matmul_precision_as_it_was() -> None:
    n, d, k = 6_000, 256, 64
    assert n * d * k >= BF16_MIN_MACS  # the size the engine runs in bfloat16
    before = torch.backends.mkldnn.matmul.fp32_precision
    problem, pre = preconditioned(correlated_problem(n, d, k, n_hold=2_000), fast=True)
    exact, fast = (fit_path(problem, [0.01], 0.01, pre, max_iter=100, tol=2e-4, bf16=f) for f in (False, True))
    assert fast.bf16 and not exact.bf16
    assert torch.backends.mkldnn.matmul.fp32_precision == before
    # The logits of the split bfloat16 matmul agree with float32 to float32-like accuracy.
    theta = torch.cat([exact.weight.reshape(-1), exact.bias])
    ref, _ = _Objective(problem, 1e-3, 0.0)(theta)
    value, _ = _Objective(problem, 1e-3, 0.0, problem.x.to(torch.bfloat16))(theta)
    assert abs(value - ref) < 1e-4 * abs(ref)
    # Both fits reach the same optimum: same objective (in float32), same holdout predictions.
    lam = 1.0 / (0.01 * n)
    f32 = _Objective(problem, lam, 0.0)
    v_exact = f32(torch.cat([exact.weight.reshape(-1), exact.bias]))[0]
    v_fast = f32(torch.cat([fast.weight.reshape(-1), fast.bias]))[0]
    assert abs(v_fast - v_exact) < 2e-3 * v_exact
    agree = (problem.hold_x @ exact.weight.T + exact.bias).argmax(1) == (
        problem.hold_x @ fast.weight.T + fast.bias
    ).argmax(1)
    assert agree.float().mean() > 0.98


def test_a_problem_with_one_class_present_is_solved() -> None:
    problem = correlated_problem(300, 8, 3)
    problem = dataclasses.replace(problem, target=torch.zeros_like(problem.target))  # e.g. an expert's one stocked leaf
    problem, pre = preconditioned(problem)
    result = fit_path(problem, [0.1], 0.1, pre, max_iter=100, tol=1e-6)
    assert torch.isfinite(result.weight).all() and int(result.bias.argmax()) == 0


def test_a_fit_started_from_its_neighbours_memory_reaches_the_same_optimum_sooner() -> None:
    problem, pre = preconditioned(correlated_problem(2_000, 48, 6))
    lam_a, lam_b = 1e-2, 3e-3
    first = _Objective(problem, lam_a, 0.0)
    memory = Memory()
    theta_a, _, _, _ = minimize(first, torch.zeros(6 * 49), pre.for_problem(problem, lam_a), 500, 1e-5, memory)
    runs = {}
    for name, start in (("fresh", Memory()), ("carried", memory.at(lam_b - lam_a, 6 * 48))):
        objective = _Objective(problem, lam_b, 0.0)
        runs[name] = minimize(objective, theta_a.clone(), pre.for_problem(problem, lam_b), 500, 1e-5, start)
    assert runs["carried"][2] == pytest.approx(runs["fresh"][2], rel=1e-5)
    assert runs["carried"][3] < runs["fresh"][3]
    # the shifted pairs are the new objective's: y = H s for its quadratic term
    s, y, _ = memory.at(lam_b - lam_a, 6 * 48).pairs[-1]
    s0, y0, _ = memory.pairs[-1]
    torch.testing.assert_close(y[: 6 * 48] - y0[: 6 * 48], (lam_b - lam_a) * s0[: 6 * 48])
    torch.testing.assert_close(y[6 * 48 :], y0[6 * 48 :])


@pytest.mark.parametrize("fast", [False, True])
def test_the_line_search_keeps_the_logits_of_the_parameters(fast: bool) -> None:
    if fast and not bf16_matmul_available():
        pytest.skip("this CPU has no bfloat16 matrix units")
    # minimize updates the logits along each line (Z + t * Z_D) instead of recomputing them:
    # after 60 iterations they still belong to the parameters it returns
    problem, pre = preconditioned(correlated_problem(3_000, 64, 20))
    xb = problem.x.to(torch.bfloat16) if fast else None
    objective = _Objective(problem, 1e-3, 0.0, xb)
    theta, _, value, iterations = minimize(objective, torch.zeros(20 * 65), pre.for_problem(problem, 1e-3), 60, 0.0)
    assert iterations > 20
    exact, _ = _Objective(problem, 1e-3, 0.0, xb)(theta)
    assert value == pytest.approx(exact, rel=1e-6)


@pytest.mark.parametrize("bf16", [False, True])
def test_the_paths_carried_logits_stay_those_of_its_parameters(bf16: bool) -> None:
    # Each fit of the path starts from its neighbour's logits, moved along the secant; the
    # training cross-entropy it reports comes from those tracked logits.
    if bf16 and not bf16_matmul_available():
        pytest.skip("this CPU has no bfloat16 matrix units")
    problem, pre = preconditioned(correlated_problem(3_000, 64, 48, n_hold=1_000), fast=bf16)
    result = fit_path(problem, [0.001, 0.003, 0.01, 0.03, 0.1], 0.001, pre, max_iter=100, tol=2e-4, bf16=bf16)
    assert len(result.records) >= 4 and result.bf16 == bf16  # a path with secant starts, then the refined fit
    z = torch.addmm(result.bias, problem.x.to(torch.bfloat16).float() if bf16 else problem.x, result.weight.T)
    exact = float(torch.nn.functional.cross_entropy(z, problem.target))
    assert result.train_loss == pytest.approx(exact, rel=1e-5)


@pytest.mark.skipif(not bf16_matmul_available(), reason="this CPU has no bfloat16 matrix units")
def test_a_scouts_line_product_is_the_bfloat16_rounding_of_the_product_on_bfloat16_features() -> None:
    problem, _ = preconditioned(correlated_problem(2_000, 256, 32))
    xb = problem.x.to(torch.bfloat16)
    exact, scout = (_Objective(problem, 1e-3, 0.0, xb, exact=e) for e in (True, False))
    direction = exact.on_grid(torch.randn(32 * 257, generator=torch.Generator().manual_seed(1)))
    product = xb.double() @ direction[: 32 * 256].view(32, 256).double().T
    bias = direction[32 * 256 :].double()
    rough = scout.along(direction).double() - bias  # the bias is added after the rounding
    assert float((rough - product).abs().max()) > 1e-3  # not float32's product ...
    half_ulp = 2**-8 * product.abs() * 1.001 + 1e-6
    assert bool(((rough - product).abs() <= half_ulp).all())  # ... but within bfloat16's half ulp of it
    # the kept fit's line product is float32's (on the features or on their bfloat16 rounding: the library's choice)
    z = exact.along(direction).double() - bias
    on_features = problem.x.double() @ direction[: 32 * 256].view(32, 256).double().T
    assert min(float((z - product).abs().max()), float((z - on_features).abs().max())) < 1e-3


def test_the_subspace_start_solves_the_problem_on_the_top_principal_directions() -> None:
    problem = correlated_problem(3_000, 96, 10, n_hold=500)
    pre = Preconditioner.from_features(problem.x, rank=16)
    lam = 1e-3
    theta, z, iterations = subspace_start(problem, pre, lam, 0.0, max_iter=500, tol=1e-10)
    assert 0 < iterations < 500
    objective = _Objective(problem, lam, 0.0)
    weight, bias = objective.unpack(theta)
    torch.testing.assert_close(z, torch.addmm(bias, problem.x, weight.T), rtol=1e-4, atol=1e-4)  # its logits
    assert weight.norm() > 0 and (weight - weight @ pre.vectors @ pre.vectors.T).norm() < 1e-4 * weight.norm()
    # the optimum restricted to that span: the full gradient has no component along it
    _, grad = objective(theta)
    grad_w, grad_b = objective.unpack(grad)
    along, across = (grad_w @ pre.vectors).norm(), (grad_w - grad_w @ pre.vectors @ pre.vectors.T).norm()
    assert along < 0.01 * across and grad_b.norm() < 0.01 * across  # the other directions are left to the full fit
    # the path's first fit starts there and reaches the optimum a fit from zero reaches
    result = fit_path(problem, [0.3], 0.3, pre, max_iter=500, tol=1e-9)
    assert result.records[0]["subspace_iterations"] > 0
    scratch = _Objective(problem, 1.0 / (0.3 * problem.n), 0.0)
    _, _, best, _ = minimize(scratch, torch.zeros(10 * 97), pre.for_problem(problem, scratch.lam), 500, 1e-12)
    assert result.records[-1]["objective"] == pytest.approx(best, rel=1e-5)
