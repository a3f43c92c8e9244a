"""Lanczos eigenvalues against torch.linalg.eigvalsh on dense matrices and oracle Hessians."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

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
    # converged: every explicit residual within tol * max|theta| <= tol * ||A||
    assert (res.residuals <= tol * scale * (1 + 1e-12)).all()
    if res.eigenvectors is not None:
        Y = res.eigenvectors
        true_res = torch.linalg.vector_norm(A @ Y - Y * res.eigenvalues, dim=0)
        # The reported residuals are the explicit ||A y - rho y||; with full
        # reorthogonalisation the Lanczos estimates beta*|s_m| agree with them up to
        # rounding (~eps * ||A||).
        torch.testing.assert_close(true_res, res.residuals, atol=1e-10 * scale, rtol=1e-6)
        torch.testing.assert_close(res.ritz_residuals, res.residuals, atol=1e-10 * scale, rtol=0)
        torch.testing.assert_close(res.ritz_values, res.eigenvalues, atol=1e-10 * scale, rtol=0)
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
    # 5 Lanczos steps, then one product for the explicit residual of the vector
    assert not res.converged and res.num_matvecs == 6
    d = res.to_dict()
    json.dumps(d)
    assert d["converged"] is False and d["protocol"]["extra"]["steps"] == 5
    assert d["residuals"][0] > 1e-6 and d["ritz_residuals"][0] > 1e-6


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


class _LowRankPlusDiagonal:
    """``H = diag(d) + U diag(lam) U^T`` in float32 at a size where round-off matters.

    Its products sum with torch's cascaded reductions, so each float32 product is
    accurate to ~1e-7 relative: what is tested is Lanczos' own arithmetic.
    """

    def __init__(self, dim: int, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.d = torch.rand(dim, generator=g)  # a bulk in [0, 1)
        u, _ = torch.linalg.qr(torch.randn(dim, 5, generator=g, dtype=F64))
        self.u = u.float()
        self.lam = torch.tensor([10.0, 9.0, 8.5, 8.0, 7.9])  # outliers above the bulk
        self.dim, self.dtype, self.device, self.num_matvecs = dim, torch.float32, "cpu", 0

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        self.num_matvecs += 1
        v = v.to(torch.float32)
        c = (self.u * v[:, None]).sum(0)
        return self.d * v + (self.u * (self.lam * c)).sum(1)

    def matvec64(self, v: torch.Tensor) -> torch.Tensor:
        u = self.u.double()
        return self.d.double() * v + u @ (self.lam.double() * (u.T @ v))


def _eigsh_top5(op: _LowRankPlusDiagonal) -> torch.Tensor:
    """scipy's eigsh (ARPACK, tol 1e-10) on the float32 products, descending."""
    import numpy as np
    from scipy.sparse.linalg import LinearOperator, eigsh

    lin = LinearOperator(
        (op.dim, op.dim),
        matvec=lambda v: op.matvec(torch.as_tensor(v).float()).double().numpy(),
        dtype=np.float64,
    )
    return torch.as_tensor(np.sort(eigsh(lin, k=5, which="LA", tol=1e-10)[0])[::-1].copy())


@pytest.mark.slow
def test_float32_at_scale_against_eigsh() -> None:
    # dim 5e5 in float32: a Lanczos whose inner products and reorthogonalisation run
    # in float32 returns Ritz values ~1e-5 (relative) off their own vectors' Rayleigh
    # quotients while its Ritz residuals claim ~1e-10.
    op = _LowRankPlusDiagonal(500_000)
    res = eigenvalues(op, k=5, tol=1e-6, seed=0, return_eigenvectors=True)
    assert res.num_matvecs == op.num_matvecs
    ref = _eigsh_top5(op)
    scale = float(ref[0])
    assert res.converged
    torch.testing.assert_close(res.eigenvalues, ref, atol=2e-7 * scale, rtol=0)
    torch.testing.assert_close(res.ritz_values, ref, atol=2e-7 * scale, rtol=0)
    # The reported residuals are the vectors' true ones (recomputed here in float64).
    y = res.eigenvectors.double()
    y = y / torch.linalg.vector_norm(y, dim=0)
    hy = torch.stack([op.matvec64(c) for c in y.T], dim=1)
    rho = (y * hy).sum(0)
    true_res = torch.linalg.vector_norm(hy - y * rho, dim=0)
    torch.testing.assert_close(res.eigenvalues, rho, atol=2e-7 * scale, rtol=0)
    torch.testing.assert_close(res.residuals, true_res, atol=2e-7 * scale, rtol=0)
    assert (res.residuals <= 1e-6 * res.ritz_values.abs().max()).all()


def test_float32_below_its_precision_is_not_converged() -> None:
    # tol 1e-9 is below what float32 products resolve: the Lanczos estimates may fall
    # that low, the explicit residuals cannot, and the result says so.
    op = _LowRankPlusDiagonal(20_000)
    with pytest.warns(RuntimeWarning, match="do not resolve this tol"):
        res = eigenvalues(op, k=2, tol=1e-9, seed=0)
    assert not res.converged
    assert (res.ritz_residuals <= 1e-9 * res.ritz_values[0]).all()
    assert (res.residuals > 1e-9 * res.ritz_values[0]).any()
    # Its default tolerance (100 float32 epsilons) is met.
    assert eigenvalues(op, k=2, seed=0).converged


# ---------------------------------------------------------------- thick restart (max_basis)


@pytest.mark.parametrize("which", ["largest", "smallest", "both"])
@pytest.mark.parametrize("max_basis", [9, 12])
def test_thick_restart_matches_dense(which: str, max_basis: int) -> None:
    # 150 x 150, spectrum with a few separated values at both ends: a basis of 9 or
    # 12 vectors must restart several times and still give the dense answer, with
    # residuals that are the vectors' true ones and never more than max_basis rows.
    g = torch.Generator().manual_seed(3)
    bulk = torch.rand(142, generator=g, dtype=F64) * 4 - 2
    eigs = torch.cat([torch.tensor([9.0, 8.0, 7.2, 6.9, -6.0, -5.1, -4.7, -4.4], dtype=F64), bulk])
    A = _matrix(eigs, 3)
    res = eigenvalues(A, k=3, which=which, seed=0, max_basis=max_basis, return_eigenvectors=True)
    _check(A, res, which, 3)
    extra = res.protocol.extra
    assert extra["max_basis"] == max_basis and extra["thick_restarts"] >= 1


def test_thick_restart_keeps_the_basis_within_max_basis(monkeypatch) -> None:
    from sharpkit.curvature import lanczos

    made = []
    real = lanczos.StackedBasis

    class Recording(real):
        def close(self):
            made.append(self.allocated_rows)
            super().close()

    monkeypatch.setattr(lanczos, "StackedBasis", Recording)
    A = _matrix(torch.linspace(-1.0, 3.0, 300) ** 3, 1)
    res = eigenvalues(A, k=2, seed=0, max_basis=9)
    assert res.converged and res.protocol.extra["thick_restarts"] >= 1
    assert made == [9]  # rows allocated when the basis was released
    ref = torch.linalg.eigvalsh(A).flip(0)[:2]
    torch.testing.assert_close(res.eigenvalues, ref, atol=REL * ref[0], rtol=0)


def test_thick_restart_repeated_eigenvalue_after_breakdown() -> None:
    # A restart on an invariant subspace combined with a bounded basis.
    A = torch.diag(torch.tensor([5.0, 5.0, 3.0] + [1.0] * 37, dtype=F64))
    res = eigenvalues(A, k=2, seed=0, max_basis=6)
    torch.testing.assert_close(res.eigenvalues, torch.tensor([5.0, 5.0], dtype=F64))
    assert res.protocol.extra["restarts"] >= 1


def test_default_basis_follows_the_memory_budget(monkeypatch) -> None:
    # With little memory available the default basis is small (restarts happen);
    # with plenty it holds every step (no restart). Same answer either way.
    from sharpkit.curvature import lanczos

    A = _matrix(torch.linspace(-1.0, 3.0, 300) ** 3, 2)
    ref = torch.linalg.eigvalsh(A).flip(0)[:2]
    monkeypatch.setattr(lanczos, "available_memory", lambda device: 300 * 8 * 4 * 12)
    small = eigenvalues(A, k=2, seed=0)
    assert small.protocol.extra["max_basis"] == 12 and small.protocol.extra["thick_restarts"] >= 1
    monkeypatch.setattr(lanczos, "available_memory", lambda device: 1 << 40)
    big = eigenvalues(A, k=2, seed=0)
    assert big.protocol.extra["thick_restarts"] == 0
    for r in (small, big):
        assert r.converged
        torch.testing.assert_close(r.eigenvalues, ref, atol=REL * ref[0], rtol=0)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        *[({"max_basis": bad}, ValueError, "max_basis") for bad in (0, 4, 2.5, True, "10")],
        ({"basis_storage": Path("/nonexistent-sharpkit-dir")}, ValueError, "not an existing"),
        ({"basis_storage": "no-such-device"}, ValueError, "pathlib.Path"),
        ({"basis_storage": "meta"}, ValueError, "CPU or CUDA"),
        ({"basis_storage": 3}, TypeError, "basis_storage"),
    ],
)
def test_bad_basis_options_are_refused_before_any_compute(kwargs, error, match) -> None:
    gen = torch.Generator().manual_seed(0)
    state = gen.get_state()
    op_calls = []

    class Op:
        dim, dtype, device, num_matvecs = 50, F64, torch.device("cpu"), 0

        def matvec(self, v):
            op_calls.append(1)
            return v

    with pytest.raises(error, match=match):
        eigenvalues(Op(), k=2, seed=gen, **kwargs)
    assert not op_calls and torch.equal(gen.get_state(), state)


def test_stacked_basis_rotate_and_capacity(monkeypatch) -> None:
    from sharpkit.curvature import lanczos

    monkeypatch.setattr(lanczos, "_CHUNK_COLUMNS", 7)
    monkeypatch.setattr(lanczos, "_BLOCK_ROWS", 4)
    g = torch.Generator().manual_seed(1)
    q, _ = torch.linalg.qr(torch.randn(30, 10, generator=g, dtype=F64))
    basis = lanczos.StackedBasis(30, F64, torch.device("cpu"), capacity=10)
    for row in q.T:
        basis.append(row)
    assert basis.allocated_rows == 10  # blocks of 4, 4 and 2 rows
    with pytest.raises(RuntimeError, match="full"):
        basis.append(q[:, 0])
    s, _ = torch.linalg.qr(torch.randn(10, 10, generator=g, dtype=F64))
    basis.rotate(s[:, :6])
    assert len(basis) == 6
    got = torch.stack([basis.row(i) for i in range(6)])
    torch.testing.assert_close(got, (q @ s[:, :6]).T, atol=1e-13, rtol=0)
    # rows beyond the kept ones are reused, and products see only the kept rows
    basis.append(q[:, 0])
    assert len(basis) == 7 and basis.allocated_rows == 10
    w = torch.randn(30, generator=g, dtype=F64)
    Q = torch.stack([basis.row(i) for i in range(7)])
    torch.testing.assert_close(basis.coefficients(w), Q @ w, atol=1e-12, rtol=0)


@pytest.mark.slow
def test_float32_at_scale_with_a_small_basis_against_eigsh() -> None:
    # The at-scale float32 case with a basis of 8 vectors (thick restarts): the same
    # accuracy against eigsh, and residuals that are the vectors' own.
    op = _LowRankPlusDiagonal(200_000)
    res = eigenvalues(op, k=5, tol=1e-5, seed=0, max_basis=8, return_eigenvectors=True)
    assert res.protocol.extra["thick_restarts"] >= 1 and res.converged
    ref = _eigsh_top5(op)
    scale = float(ref[0])
    torch.testing.assert_close(res.eigenvalues, ref, atol=2e-6 * scale, rtol=0)
    y = res.eigenvectors.double()
    y = y / torch.linalg.vector_norm(y, dim=0)
    hy = torch.stack([op.matvec64(c) for c in y.T], dim=1)
    true_res = torch.linalg.vector_norm(hy - y * (y * hy).sum(0), dim=0)
    torch.testing.assert_close(res.residuals, true_res, atol=2e-7 * scale, rtol=0)
