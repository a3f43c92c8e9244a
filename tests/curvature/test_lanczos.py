"""Lanczos eigenvalues against torch.linalg.eigvalsh on dense matrices and oracle Hessians."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from sharpkit.curvature import HessianOperator, eigenvalues
from sharpkit.testing import ORACLE_CASES, dense_hessian, oracle_cases

F64 = torch.float64
REL = 1e-6  # the accuracy requirement (relative to |lambda_max|)


def _matrix(eigs: torch.Tensor, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(len(eigs), len(eigs), generator=g, dtype=F64))
    a = q @ torch.diag(eigs.to(F64)) @ q.T
    return (a + a.T) / 2


def _check(A: torch.Tensor, res, which: str, k: int, tol: float = 1e-6) -> None:
    ref = torch.linalg.eigvalsh(A)
    want = {
        "largest": ref.flip(0)[:k],
        "smallest": ref[:k],
        "both": torch.cat([ref.flip(0)[:k], ref[:k]]),
    }[which]
    scale = ref.abs().max()
    assert res.converged
    torch.testing.assert_close(res.eigenvalues, want, atol=REL * scale, rtol=0)
    assert (res.residuals <= tol * res.eigenvalues.abs().max() * (1 + 1e-12)).all()
    if res.eigenvectors is not None:
        Y = res.eigenvectors
        true_res = torch.linalg.vector_norm(A @ Y - Y * res.eigenvalues, dim=0)
        # The reported residuals are the Lanczos estimates beta*|s_m|; with full
        # reorthogonalisation they equal the true ones up to rounding (~eps * ||A||).
        torch.testing.assert_close(true_res, res.residuals, atol=1e-10 * scale, rtol=1e-6)
        torch.testing.assert_close(Y.T @ Y, torch.eye(Y.shape[1], dtype=F64), atol=1e-8, rtol=0)


@pytest.mark.parametrize("which", ["largest", "smallest", "both"])
@pytest.mark.parametrize("seed", [0, 1])
def test_dense_random_spectrum(which: str, seed: int) -> None:
    g = torch.Generator().manual_seed(100 + seed)
    eigs = torch.randn(80, generator=g, dtype=F64) * torch.rand(80, generator=g, dtype=F64) * 5
    A = _matrix(eigs, seed)
    res = eigenvalues(A, k=4, which=which, seed=seed, return_eigenvectors=True)
    _check(A, res, which, 4)
    assert res.num_matvecs <= 80


def test_small_negative_eigenvalues_are_found() -> None:
    # A Hessian-like spectrum: a large positive bulk and a few tiny negative values,
    # 1e5 times smaller than lambda_max; plus positive values closer to zero than them.
    eigs = torch.cat(
        [
            torch.linspace(1.0, 100.0, 50, dtype=F64),
            torch.tensor([1e-4, 2e-4, 5e-5], dtype=F64),
            torch.tensor([-1e-3, -2e-3, -5e-4, -3e-3], dtype=F64),
        ]
    )
    A = _matrix(eigs, 3)
    want = torch.tensor([-3e-3, -2e-3, -1e-3], dtype=F64)
    res = eigenvalues(A, k=3, which="smallest", seed=0)
    # The default rule guarantees |theta - lambda| <= ||r|| <= tol * ||A|| = 1e-4 ...
    torch.testing.assert_close(res.eigenvalues, want, atol=1e-6 * 100, rtol=0)
    assert (res.eigenvalues < 0).all()  # ... and finds the negative ones, in order
    # A tighter residual tolerance makes them accurate relative to their own size.
    res = eigenvalues(A, k=3, which="smallest", seed=0, tol=1e-12, return_eigenvectors=True)
    torch.testing.assert_close(res.eigenvalues, want, atol=1e-6 * 1e-3, rtol=0)
    both = eigenvalues(A, k=2, which="both", seed=0, tol=1e-12)
    torch.testing.assert_close(
        both.eigenvalues,
        torch.tensor([100.0, 100 - 99 / 49, -3e-3, -2e-3], dtype=F64),
        atol=1e-9,
        rtol=0,
    )


def test_largest_stops_early_on_separated_spectrum() -> None:
    eigs = torch.cat([torch.tensor([50.0, 40.0, 30.0]), torch.linspace(-1, 1, 497)])
    A = _matrix(eigs, 4)
    res = eigenvalues(A, k=3, seed=0, return_eigenvectors=True)
    _check(A, res, "largest", 3)
    assert res.num_matvecs < 60  # well-separated outliers: far fewer steps than dim


def test_repeated_eigenvalue_found_after_breakdown() -> None:
    A = torch.diag(torch.tensor([5.0, 5.0, 3.0] + [1.0] * 17, dtype=F64))
    res = eigenvalues(A, k=2, seed=0)
    torch.testing.assert_close(res.eigenvalues, torch.tensor([5.0, 5.0], dtype=F64))
    assert res.protocol.extra["restarts"] >= 1


@pytest.mark.parametrize("name", ORACLE_CASES)
def test_oracle_hessians(name: str) -> None:
    case = oracle_cases((name,))[name]
    H = dense_hessian(case.model, case.loss_fn, case.data)
    op = HessianOperator(case.model, case.loss_fn, case.data, dtype=F64)
    k = min(3, op.dim // 2)
    res = eigenvalues(op, k=k, which="both", seed=0, return_eigenvectors=True)
    _check(H, res, "both", k)
    assert res.num_matvecs == op.num_matvecs
    assert res.protocol.examples == op.num_examples and res.protocol.estimator == "lanczos"


def test_float32_operator() -> None:
    case = oracle_cases(("mlp_tanh",))["mlp_tanh"]
    H = dense_hessian(case.model, case.loss_fn, case.data)
    op = HessianOperator(case.model, case.loss_fn, case.data)
    res = eigenvalues(op, k=2, seed=0, tol=1e-4)
    ref = torch.linalg.eigvalsh(H).flip(0)[:2]
    # float32 products carry ~1e-7 relative rounding; 1e-5 of lambda_max is ample.
    torch.testing.assert_close(res.eigenvalues, ref, atol=1e-5 * ref[0], rtol=0)


@pytest.mark.filterwarnings("ignore:eigenvalues. Lanczos did not reach tol")
def test_seed_reproducible_and_generator() -> None:
    A = _matrix(torch.linspace(-3, 7, 40))
    a = eigenvalues(A, k=2, seed=7, max_iter=12)
    b = eigenvalues(A, k=2, seed=torch.Generator().manual_seed(7), max_iter=12)
    assert torch.equal(a.eigenvalues, b.eigenvalues) and a.protocol.seed == b.protocol.seed == 7
    c = eigenvalues(A, k=2, seed=8, max_iter=12)
    assert not torch.equal(a.eigenvalues, c.eigenvalues)


def test_not_converged_warns_and_reports() -> None:
    A = _matrix(torch.linspace(0, 1, 200))  # no gap: 5 steps cannot converge
    with pytest.warns(RuntimeWarning, match="did not reach tol"):
        res = eigenvalues(A, k=1, seed=0, max_iter=5)
    assert not res.converged and res.num_matvecs == 5
    d = res.to_dict()
    json.dumps(d)
    assert d["converged"] is False and d["protocol"]["extra"]["steps"] == 5


def test_bad_input() -> None:
    A = torch.eye(5, dtype=F64)
    with pytest.raises(ValueError, match="k: asked for 6"):
        eigenvalues(A, k=6)
    with pytest.raises(ValueError, match="k: asked for 6"):
        eigenvalues(A, k=3, which="both")
    with pytest.raises(ValueError, match="k: expected a positive"):
        eigenvalues(A, k=0)
    with pytest.raises(ValueError, match="which"):
        eigenvalues(A, which="top")
    with pytest.raises(ValueError, match="tol"):
        eigenvalues(A, tol=0.0)
    with pytest.raises(ValueError, match="not symmetric"):
        eigenvalues(torch.triu(torch.ones(4, 4, dtype=F64)))
    with pytest.raises(ValueError, match="square"):
        eigenvalues(torch.ones(3, 4))
    with pytest.raises(TypeError, match="op:"):
        eigenvalues([[1.0]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert eigenvalues(A, k=5, seed=0).converged  # full basis: exact
