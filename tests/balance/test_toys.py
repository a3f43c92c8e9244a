"""The paper's toys: closed-form gradients, conservation under gradient flow and
the balancing effect of SAM (Li, Zhang, He, NeurIPS 2024)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.integrate import solve_ivp

from sharpkit.balance.toys import NOPToy, OPToy, paper_init, simulate

F64 = torch.float64


@pytest.mark.parametrize("toy_cls", [NOPToy, OPToy])
def test_closed_form_grads_match_autograd(toy_cls) -> None:
    toy = toy_cls(noise=0.7, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 3, generator=g, dtype=F64, requires_grad=True)  # 4 runs at once
    y = torch.randn(4, 3, generator=g, dtype=F64, requires_grad=True)
    target = toy.sample_target((4,))
    toy.loss_at(x, y, target).sum().backward()
    gx, gy = toy.grads(x.detach(), y.detach(), target)
    assert torch.allclose(gx, x.grad, atol=1e-13) and torch.allclose(gy, y.grad, atol=1e-13)


def test_expected_loss_is_noise_free_loss_plus_constant() -> None:
    # E[0.5 ||x y^T - A - a N||^2] = loss(x, y) + 0.5 a^2 sum(s^2) * dim (N = diag(s) U)
    toy = NOPToy(noise=0.5, generator=torch.Generator().manual_seed(0))
    x0, y0 = paper_init()
    n = 200_000
    samples = toy.sample_loss(x0.expand(n, 3), y0.expand(n, 3))
    const = 0.5 * 0.25 * float((toy.noise_scales**2).sum()) * 3
    se = float(samples.std()) / n**0.5
    assert abs(float(samples.mean()) - (float(toy.loss(x0, y0)) + const)) < 4 * se


def test_paper_init_values() -> None:
    x0, y0 = paper_init()
    assert x0.tolist() == [0.2, -0.1, 0.3]
    assert torch.equal(y0, -3 * x0)
    assert 0.5 * float(x0 @ x0 - y0 @ y0) == pytest.approx(-0.56, abs=1e-15)


def _nop_flow(target: np.ndarray):
    def rhs(_t: float, w: np.ndarray) -> np.ndarray:
        x, y = w[:2], w[2:]
        r = np.outer(x, y) - target
        return -np.concatenate([r @ y, r.T @ x])

    return rhs


def test_gradient_flow_conserves_balancedness_2x2_nop() -> None:
    # dB/dt = <x, -g_x> - <y, -g_y> = -(y^T R^T x - x^T R y) = 0 exactly: an accurate
    # ODE solution keeps B to the integrator's tolerance while x and y move a lot.
    target = np.array([[0.5, 0.1], [-0.2, 0.3]])
    w0 = np.array([0.2, -0.1, -0.6, 0.3])
    sol = solve_ivp(_nop_flow(target), (0, 20), w0, rtol=1e-12, atol=1e-14, dense_output=True)
    ws = sol.sol(np.linspace(0, 20, 50))
    b = 0.5 * ((ws[:2] ** 2).sum(0) - (ws[2:] ** 2).sum(0))
    assert np.abs(ws - w0[:, None]).max() > 0.1  # the factors did move
    assert np.abs(b - b[0]).max() < 1e-9


def test_gradient_descent_drift_shrinks_with_eta() -> None:
    # One GD step changes B by exactly (eta^2 / 2)(||g_x||^2 - ||g_y||^2) (expand the
    # squares; the first-order term is the conserved one). Over a fixed time T the
    # drift is therefore bounded by (eta T / 2) max|gap|: halving eta halves it.
    target = torch.tensor([[0.5, 0.1], [-0.2, 0.3]], dtype=F64)
    toy = NOPToy(noise=0.0, dim=2)
    toy.A = target
    x0, y0 = torch.tensor([0.2, -0.1], dtype=F64), torch.tensor([-0.6, 0.3], dtype=F64)
    horizon = 5.0
    drifts = []
    for eta in (0.04, 0.02, 0.01):
        steps = round(horizon / eta)
        run = simulate(toy, "sgd", steps=steps, lr=eta, x0=x0, y0=y0)
        b = run.balancedness[:, 0]
        # per-step identity, recomputed independently from the closed-form gradients
        x, y = x0.clone(), y0.clone()
        max_gap = 0.0
        for t in range(steps):
            gx, gy = toy.grads(x, y, target)
            gap = float(gx @ gx - gy @ gy)
            max_gap = max(max_gap, abs(gap))
            assert b[t + 1] - b[t] == pytest.approx(0.5 * eta**2 * gap, abs=1e-15)
            x, y = x - eta * gx, y - eta * gy
        drift = abs(b[-1] - b[0])
        assert drift <= 0.5 * eta * horizon * max_gap
        drifts.append(drift)
    assert drifts[0] > 1e-6  # a measurable drift at the largest eta ...
    assert drifts[1] == pytest.approx(drifts[0] / 2, rel=0.1)  # ... first order in eta
    assert drifts[2] == pytest.approx(drifts[1] / 2, rel=0.1)


def test_sam_balances_noisy_nop_and_sgd_does_not() -> None:
    # Paper App. A.4 setting (x0, y0 = -3 x0, rho = 0.1, noise a = 1) on a shorter
    # horizon with a larger eta: t = eta * steps = 10, against the paper's 10.
    # 8 independent runs, fixed seed. SAM's |B| falls from 0.56 to ~0.07 (mean),
    # SGD's stays within 0.03 of its start (drift O(eta)).
    kw = {"steps": 5000, "lr": 2e-3, "runs": 8, "record_every": 500}
    sam = simulate(NOPToy(1.0, generator=torch.Generator().manual_seed(0)), "sam", rho=0.1, **kw)
    sgd = simulate(NOPToy(1.0, generator=torch.Generator().manual_seed(0)), "sgd", **kw)
    b_sam = np.abs(sam.balancedness).mean(1)
    b_sgd = np.abs(sgd.balancedness).mean(1)
    assert b_sam[0] == b_sgd[0] == pytest.approx(0.56)
    assert b_sam[-1] < 0.25 * b_sam[0]
    assert np.all(np.abs(sam.balancedness[-1]) < 0.5 * 0.56)  # every run balanced
    assert abs(b_sgd[-1] - b_sgd[0]) < 0.05 * b_sgd[0]


def test_simulate_validation() -> None:
    toy = NOPToy()
    with pytest.raises(ValueError, match="method"):
        simulate(toy, "adam", steps=1, lr=0.1)
    with pytest.raises(ValueError, match="steps"):
        simulate(toy, "sgd", steps=0, lr=0.1)
    with pytest.raises(ValueError, match="lr"):
        simulate(toy, "sgd", steps=1, lr=-1.0)
    with pytest.raises(TypeError, match="toy"):
        simulate("nop", "sgd", steps=1, lr=0.1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="noise"):
        NOPToy(noise=-1.0)
    with pytest.raises(ValueError, match="dim"):
        OPToy(dim=0)
