"""Hutchinson / Hutch++ / tr(H^2): exactness, unbiasedness and interval coverage on dense matrices."""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch

from sharpkit.curvature import HessianOperator, frobenius_norm_sq, trace
from sharpkit.testing import dense_hessian, oracle_cases

F64 = torch.float64


def _matrix(eigs: torch.Tensor, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(len(eigs), len(eigs), generator=g, dtype=F64))
    a = q @ torch.diag(eigs.to(F64)) @ q.T
    return (a + a.T) / 2


def test_diagonal_is_exact() -> None:
    # z^T D z = tr(D) and ||D z||^2 = ||D||_F^2 for every Rademacher z.
    d = torch.linspace(-2.0, 5.0, 17, dtype=F64)
    D = torch.diag(d)
    r = trace(D, num_samples=12, seed=0)
    assert r.estimate == pytest.approx(float(d.sum()), abs=1e-12) and r.stderr < 1e-12
    f = frobenius_norm_sq(D, num_samples=12, seed=0)
    assert f.estimate == pytest.approx(float((d**2).sum()), abs=1e-12)


@pytest.mark.parametrize("method", ["hutchinson", "hutch++"])
def test_unbiased_and_ci_coverage(method: str) -> None:
    g = torch.Generator().manual_seed(1)
    A = _matrix(torch.randn(40, generator=g, dtype=F64) + 0.5, 1)
    true = float(torch.trace(A))
    reps = 300
    est, covered = [], 0
    for rep in range(reps):
        r = trace(A, method=method, num_samples=20, seed=rep)
        est.append(r.estimate)
        covered += r.ci[0] <= true <= r.ci[1]
    est_t = torch.tensor(est, dtype=F64)
    se = float(est_t.std()) / math.sqrt(reps)
    # Unbiasedness: the mean of 300 independent estimates lies within 4 standard errors.
    assert abs(float(est_t.mean()) - true) < 4 * se
    # Coverage of the nominal 95% t-interval: 300 Bernoulli(0.95) trials have standard
    # deviation 0.0126; accept [0.90, 0.99] (about -4 / +3 sd). The samples are quadratic
    # forms, not Gaussian, so the interval is approximate; a broken stderr (e.g. the
    # std of the sum instead of the mean) would cover ~100% or ~30% and fail.
    assert 0.90 <= covered / reps <= 0.99


def test_hutchpp_beats_hutchinson_on_decaying_spectrum() -> None:
    eigs = 1.0 / torch.arange(1, 121, dtype=F64) ** 2
    A = _matrix(eigs, 2)
    true = float(eigs.sum())
    err = {"hutchinson": [], "hutch++": []}
    for rep in range(60):
        for method in err:
            err[method].append(
                (trace(A, method=method, num_samples=30, seed=rep).estimate - true) ** 2
            )
    mse = {m: sum(v) / len(v) for m, v in err.items()}
    # Meyer et al.: with a fast-decaying spectrum the sketch captures most of the trace;
    # at equal matvec budget the MSE drops by far more than 4x (measured ~1000x here).
    assert mse["hutch++"] < mse["hutchinson"] / 4


def test_frobenius_unbiased() -> None:
    A = _matrix(torch.linspace(-3, 4, 30, dtype=F64), 5)
    true = float((A**2).sum())
    est = torch.tensor([frobenius_norm_sq(A, num_samples=10, seed=s).estimate for s in range(200)])
    assert abs(float(est.mean()) - true) < 4 * float(est.std()) / math.sqrt(200)


def test_rtol_stops_early_with_narrow_interval() -> None:
    A = _matrix(torch.linspace(1, 5, 60, dtype=F64), 6)
    r = trace(A, num_samples=2000, rtol=0.01, seed=0)
    assert 10 <= r.num_samples < 2000 and r.num_matvecs == r.num_samples
    assert (r.ci[1] - r.ci[0]) / 2 <= 0.01 * abs(r.estimate)
    full = trace(A, num_samples=40, seed=0)
    assert full.num_samples == 40


def test_hessian_operator_trace_and_protocol() -> None:
    case = oracle_cases(("cnn",))["cnn"]
    H = dense_hessian(case.model, case.loss_fn, case.data)
    op = HessianOperator(case.model, case.loss_fn, case.data, dtype=F64)
    r = trace(op, method="hutch++", num_samples=op.dim * 3, seed=0)
    # a budget of 3 dim: the sketch spans the whole space and the estimate is exact
    assert r.estimate == pytest.approx(float(torch.trace(H)), abs=1e-9)
    d = r.to_dict()
    json.dumps(d)
    assert d["protocol"]["estimator"] == "hutch++" and d["protocol"]["seed"] == 0
    assert d["num_matvecs"] == r.protocol.matvecs == op.num_matvecs


def test_bad_input() -> None:
    A = torch.eye(4, dtype=F64)
    with pytest.raises(ValueError, match="method"):
        trace(A, method="exact")
    with pytest.raises(ValueError, match="num_samples"):
        trace(A, num_samples=1)
    with pytest.raises(ValueError, match="num_samples: hutch\\+\\+"):
        trace(A, method="hutch++", num_samples=3)
    with pytest.raises(ValueError, match="rtol"):
        trace(A, rtol=-1.0)
    with pytest.raises(ValueError, match="confidence"):
        frobenius_norm_sq(A, confidence=95)
    with pytest.raises(TypeError, match="seed"):
        trace(A, seed=1.5)


def _hutchinson_need(A: torch.Tensor, rtol: float, z: float = 1.96) -> float:
    """Exact probes for a half-width of rtol * |tr|: Var(z^T A z) = 2 (||A||_F^2 - sum A_ii^2)."""
    var = 2 * (float((A**2).sum()) - float((torch.diagonal(A) ** 2).sum()))
    return (z * math.sqrt(var) / (rtol * abs(float(torch.trace(A))))) ** 2


def test_unreachable_precision_stops_after_the_first_probes() -> None:
    A = _matrix(torch.linspace(-1, 2, 50, dtype=F64), 7)
    need = _hutchinson_need(A, 0.005)
    assert need > 10 * 300  # the case: far out of a 300-product budget
    with pytest.warns(RuntimeWarning, match="rtol=0.005 needs about .* the cap is 300"):
        r = trace(A, num_samples=300, rtol=0.005, seed=0)
    assert r.num_matvecs == 10 and r.reached is False and r.rtol == 0.005
    # the projection from 10 probes is within a factor 3 of the exact need
    assert need / 3 < r.matvecs_needed < 3 * need
    d = r.to_dict()
    json.dumps(d)
    assert d["reached"] is False and d["protocol"]["extra"]["matvecs_needed"] == r.matvecs_needed
    with pytest.warns(RuntimeWarning, match="running on to the cap"):
        w = trace(A, num_samples=300, rtol=0.005, seed=0, if_unreachable="warn")
    assert w.num_matvecs == 300 and w.reached is False
    with pytest.warns(RuntimeWarning, match="tr\\(H\\^2\\): rtol"):
        f = frobenius_norm_sq(A, num_samples=100, rtol=1e-4, seed=0)
    assert f.reached is False and f.num_samples == 10


def test_hutchpp_budget_counts_its_sketch() -> None:
    A = _matrix(torch.linspace(-1, 2, 50, dtype=F64), 7)
    with pytest.warns(RuntimeWarning, match="the cap is 60"):
        r = trace(A, method="hutch++", num_samples=60, rtol=1e-4, seed=0)
    # a sketch of 20 (40 products) then the 10 probes that tell
    assert r.num_matvecs == 50 and r.reached is False and r.matvecs_needed > 60


def test_reachable_precision_is_not_refused_and_covers() -> None:
    # A budget of twice the exact need: the optimistic rule must (almost) never refuse,
    # and the stopped intervals must still cover the trace about 95% of the time.
    A = _matrix(torch.linspace(-1, 3, 40, dtype=F64), 8)
    rtol = 0.05
    need = _hutchinson_need(A, rtol)
    assert 40 < need < 400
    true = float(torch.trace(A))
    refused = covered = 0
    projected = []
    reps = 200
    for s in range(reps):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            r = trace(A, num_samples=int(2 * need), rtol=rtol, seed=s)
        refused += any("needs about" in str(c.message) for c in caught)
        covered += r.ci[0] <= true <= r.ci[1]
        projected.append(r.matvecs_needed)
        if r.reached:
            assert (r.ci[1] - r.ci[0]) / 2 <= rtol * abs(r.estimate)
    assert refused <= 0.05 * reps
    assert covered >= 0.88 * reps  # sequential stopping costs a little coverage
    med = float(torch.tensor(projected).median())
    assert need / 2 < med < 2 * need  # the projection is consistent with the exact need
