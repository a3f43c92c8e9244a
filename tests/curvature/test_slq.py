"""Stochastic Lanczos quadrature: normalisation, exact moments, exact nodes, the plot helper."""

from __future__ import annotations

import json
import math

import matplotlib
import pytest
import torch

from sharpkit.curvature import HessianOperator, spectral_density
from sharpkit.plotting.curvature import plot_spectral_density
from sharpkit.testing import dense_hessian, oracle_cases

matplotlib.use("Agg")
F64 = torch.float64


def _matrix(eigs: torch.Tensor, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(len(eigs), len(eigs), generator=g, dtype=F64))
    a = q @ torch.diag(eigs.to(F64)) @ q.T
    return (a + a.T) / 2


def _run_moments(d, p: int) -> torch.Tensor:
    return (d.weights * torch.nan_to_num(d.nodes) ** p).sum(dim=1)


def test_integrates_to_one_and_weights_normalised() -> None:
    A = _matrix(
        torch.cat([torch.linspace(-1, 1, 90, dtype=F64), torch.tensor([8.0, 12.0], dtype=F64)])
    )
    d = spectral_density(A, runs=5, steps=30, num_points=2000, seed=0)
    assert float(torch.trapezoid(d.density, d.grid)) == pytest.approx(1.0, abs=1e-4)
    torch.testing.assert_close(d.weights.sum(dim=1), torch.ones(5, dtype=F64))
    assert d.num_matvecs == 5 * 30 and d.nodes.shape == (5, 30)


def test_moments_exact_on_diagonal() -> None:
    # Rademacher v: v^T D^p v / n = tr(D^p) / n exactly; Gauss quadrature with m >= 2
    # nodes reproduces moments 1..3 exactly.
    diag = torch.linspace(-2.0, 6.0, 50, dtype=F64)
    d = spectral_density(torch.diag(diag), runs=3, steps=10, seed=1)
    for p in (1, 2, 3):
        torch.testing.assert_close(
            _run_moments(d, p), torch.full((3,), float((diag**p).mean()), dtype=F64)
        )


def test_moments_match_trace_statistically() -> None:
    case = oracle_cases(("mlp_tanh",))["mlp_tanh"]
    H = dense_hessian(case.model, case.loss_fn, case.data)
    op = HessianOperator(case.model, case.loss_fn, case.data, dtype=F64)
    n = op.dim
    d = spectral_density(op, runs=40, steps=8, seed=2)
    for p, ref in ((1, torch.trace(H) / n), (2, (H**2).sum() / n)):
        m = _run_moments(d, p)
        se = float(m.std()) / math.sqrt(len(m))
        assert abs(float(m.mean()) - float(ref)) < 4 * se, p
    assert d.protocol.examples == 12 and d.protocol.estimator == "slq"


def test_full_steps_recover_the_spectrum() -> None:
    # with full reorthogonalisation, n steps on an n x n matrix give its eigenvalues
    eigs = torch.tensor([-1.0, 0.5, 2.0, 3.0, 7.0], dtype=F64)
    A = _matrix(eigs, 3)
    d = spectral_density(A, runs=2, steps=5, seed=0, reorthogonalize=True)
    for r in range(2):
        torch.testing.assert_close(d.nodes[r].sort().values, eigs, atol=1e-10, rtol=0)


def test_reproducible_and_json() -> None:
    A = _matrix(torch.linspace(0, 3, 20, dtype=F64))
    a = spectral_density(A, runs=2, steps=6, num_points=50, seed=4)
    b = spectral_density(A, runs=2, steps=6, num_points=50, seed=4)
    assert torch.equal(a.density, b.density)
    json.dumps(a.to_dict())


def test_plot_helper() -> None:
    d = spectral_density(torch.diag(torch.linspace(0, 3, 20, dtype=F64)), runs=2, steps=6, seed=0)
    ax = plot_spectral_density(d, label="diag")
    assert ax.get_yscale() == "log" and len(ax.lines) == 1
    ax2 = plot_spectral_density(d, log=False)
    assert ax2.get_yscale() == "linear"
    import matplotlib.pyplot as plt

    plt.close("all")


def test_bad_input() -> None:
    A = torch.eye(3, dtype=F64)
    for kwargs, name in (
        ({"runs": 0}, "runs"),
        ({"steps": 0}, "steps"),
        ({"num_points": 1}, "num_points"),
        ({"sigma": -1.0}, "sigma"),
    ):
        with pytest.raises(ValueError, match=name):
            spectral_density(A, **kwargs)


@pytest.mark.parametrize("reorthogonalize", [True, False])
def test_quadrature_moments_exact_with_float32_products(reorthogonalize: bool) -> None:
    # Gauss quadrature from m Lanczos steps reproduces v^T A^p v / n for p < 2m. With
    # float32 products the first moments of every run match the dense float64 powers
    # to float32 accuracy, with full reorthogonalisation (float64 bookkeeping) and
    # with the plain float32 recurrence (its float64-accumulated inner products).
    g = torch.Generator().manual_seed(0)
    n = 600
    eigs = torch.cat(
        [torch.rand(n - 3, generator=g, dtype=F64), torch.tensor([5.0, 8.0, 9.0], dtype=F64)]
    )
    A = _matrix(eigs, 4)
    d = spectral_density(A.float(), runs=2, steps=25, seed=3, reorthogonalize=reorthogonalize)
    gen = torch.Generator().manual_seed(3)
    for r in range(2):
        v = (torch.randint(0, 2, (n,), generator=gen).to(F64) * 2 - 1).float().double()
        av, scale = v.clone(), float(v @ v)
        for p in range(1, 8):
            av = A @ av
            quad = float((d.weights[r] * d.nodes[r] ** p).sum())
            exact = float(v @ av) / scale
            assert quad == pytest.approx(exact, rel=2e-5), (r, p)


@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_without_reorthogonalisation_the_quadrature_holds_where_orthogonality_is_lost(
    dtype: torch.dtype,
) -> None:
    """80 steps on a 200 x 200 matrix with outliers: the outliers' Ritz values converge
    early, so the plain recurrence (the default) loses orthogonality and grows ghost
    copies of them. The ghosts share the weight, so low moments (exact for degree
    < 2m) and the smoothed density match full reorthogonalisation and the true
    spectrum, in float64 and with the float32 recurrence."""
    eigs = torch.cat(
        [torch.linspace(0.0, 1.0, 196, dtype=F64), torch.tensor([5.0, 6.0, 8.0, 10.0], dtype=F64)]
    )
    A = _matrix(eigs, seed=3).to(dtype)
    kw = {"runs": 6, "steps": 80, "num_points": 600, "sigma": 0.15, "seed": 1}
    full = spectral_density(A, **kw, reorthogonalize=True)
    plain = spectral_density(A, **kw)
    assert plain.protocol.extra["reorthogonalize"] is False and plain.num_matvecs == 6 * 80
    # orthogonality was really lost: a node repeats (a ghost) within rounding of another
    nodes = torch.sort(plain.nodes[0]).values
    ghost = 1e-8 if dtype == F64 else 1e-5
    assert bool((nodes.diff() < ghost * nodes.abs().max()).any())
    rtol = 1e-9 if dtype == F64 else 1e-5
    for p in range(1, 7):  # the same start vectors: the runs' moments agree
        torch.testing.assert_close(
            _run_moments(plain, p), _run_moments(full, p), rtol=rtol, atol=1e-12
        )

    # the smoothed density against the exact one (the eigenvalues, smoothed alike)
    def l1_to_exact(d) -> float:
        exact = torch.exp(-0.5 * ((d.grid[:, None] - eigs[None, :]) / 0.15) ** 2).mean(1)
        exact = exact / (0.15 * math.sqrt(2 * math.pi))
        return float(torch.trapezoid((d.density - exact).abs(), d.grid))

    l1_plain, l1_full = l1_to_exact(plain), l1_to_exact(full)
    assert l1_plain < 1.05 * l1_full + 1e-5 and l1_full < 0.3  # 6 random vectors' noise


def test_reorthogonalize_is_checked() -> None:
    with pytest.raises(TypeError, match="reorthogonalize"):
        spectral_density(torch.eye(3, dtype=F64), steps=2, reorthogonalize="no")
