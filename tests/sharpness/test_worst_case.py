"""Worst-case sharpness against closed forms on quadratics, projection properties and
ReLU-rescaling invariance."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from sharpkit.sharpness import epsilon_sharpness, project, worst_case_sharpness
from tests.sharpness._models import (
    Quadratic,
    class_data,
    quad_loss,
    random_psd,
    relu_net,
    rescaled,
)

X = torch.zeros(1, 1, dtype=torch.float64)  # the quadratics ignore the data


def test_p2_plain_is_half_rho_sq_lambda_max() -> None:
    A = random_psd(6, seed=1)
    center = torch.linspace(-1.0, 1.0, 6, dtype=torch.float64)
    rho = 0.3
    r = worst_case_sharpness(Quadratic(A, center), quad_loss, X, rho, steps=100, seed=0)
    exact = 0.5 * rho**2 * float(torch.linalg.eigvalsh(A)[-1])
    # PGD returns an evaluated feasible point: never above the maximum
    assert r.value <= exact * (1 + 1e-12)
    assert r.value == pytest.approx(exact, rel=1e-6)
    assert r.details["perturbation_norm"] == pytest.approx(rho, rel=1e-9)


def test_p2_adaptive_is_half_rho_sq_lambda_max_of_CAC() -> None:
    A = random_psd(6, seed=2)
    center = torch.tensor([0.5, -2.0, 1.0, 0.1, 3.0, -1.0], dtype=torch.float64)
    rho = 0.1
    r = worst_case_sharpness(
        Quadratic(A, center), quad_loss, X, rho, adaptive=True, steps=100, seed=0
    )
    C = torch.diag(center.abs())
    exact = 0.5 * rho**2 * float(torch.linalg.eigvalsh(C @ A @ C)[-1])
    assert r.value <= exact * (1 + 1e-12)
    assert r.value == pytest.approx(exact, rel=1e-6)


def test_pinf_matches_vertex_enumeration() -> None:
    # a convex quadratic attains its box maximum at a vertex: enumerate all 2^6
    A = random_psd(6, seed=3)
    center = torch.zeros(6, dtype=torch.float64)
    rho = 0.2
    r = worst_case_sharpness(
        Quadratic(A, center), quad_loss, X, rho, p="inf", steps=40, restarts=4, seed=0
    )
    best = max(
        0.5 * float(torch.tensor(s, dtype=torch.float64) @ A @ torch.tensor(s, dtype=torch.float64))
        for s in itertools.product((-rho, rho), repeat=6)
    )
    assert r.value <= best * (1 + 1e-12)
    assert r.value == pytest.approx(best, rel=1e-9)
    assert r.details["perturbation_norm"] == pytest.approx(rho)


def test_cost_is_steps_times_restarts_per_batch_plus_halvings() -> None:
    net = relu_net()
    data = [class_data(seed=s, n=16) for s in range(3)]
    r = worst_case_sharpness(net, nn.CrossEntropyLoss(), data, 0.05, steps=10, restarts=2)
    assert r.cost.forward == 0 and r.cost.hvp == 0
    # each halving re-evaluates the gradient at the best point: at most 4 marks for 10 steps
    assert 3 * 2 * 10 <= r.cost.gradient <= 3 * 2 * (10 + 4)
    assert len(r.details["per_batch"]) == 3


def test_m_sharpness_splits_batches() -> None:
    net = relu_net()
    data = class_data(n=64)
    r = worst_case_sharpness(net, nn.CrossEntropyLoss(), data, 0.05, m=16, steps=5)
    assert r.details["m"] == 16 and len(r.details["per_batch"]) == 4
    assert r.protocol.batches == 4 and r.protocol.examples == 64
    # smaller m can only fit each batch better: the per-batch maxima dominate a shared one
    full = worst_case_sharpness(net, nn.CrossEntropyLoss(), data, 0.05, steps=5)
    assert len(full.details["per_batch"]) == 1
    assert r.value > 0 and full.value > 0


def test_caller_model_untouched() -> None:
    net = relu_net()
    net.train()
    before = [p.detach().clone() for p in net.parameters()]
    worst_case_sharpness(net, nn.CrossEntropyLoss(), class_data(), 0.1, steps=3)
    assert net.training
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))


@pytest.mark.parametrize("p", [2, "inf"])
def test_adaptive_is_invariant_to_relu_rescaling_plain_is_not(p) -> None:
    net, data = relu_net(), class_data()
    other = rescaled(net, 3.0)
    assert torch.allclose(net(data[0]), other(data[0]))
    kw = dict(p=p, steps=8, seed=0)
    a1 = worst_case_sharpness(net, nn.CrossEntropyLoss(), data, 0.05, adaptive=True, **kw)
    a2 = worst_case_sharpness(other, nn.CrossEntropyLoss(), data, 0.05, adaptive=True, **kw)
    assert a1.value == pytest.approx(a2.value, rel=1e-9)
    p1 = worst_case_sharpness(net, nn.CrossEntropyLoss(), data, 0.05, **kw)
    p2 = worst_case_sharpness(other, nn.CrossEntropyLoss(), data, 0.05, **kw)
    assert abs(p1.value - p2.value) > 0.05 * max(p1.value, p2.value)


def test_epsilon_sharpness_closed_form_on_diagonal_quadratic() -> None:
    # box |d_i| <= eps (|w_i| + 1); diagonal A: every vertex gives 0.5 sum A_ii b_i^2
    diag = torch.tensor([1.0, 2.0, 0.5, 3.0], dtype=torch.float64)
    center = torch.tensor([1.0, -2.0, 0.0, 0.5], dtype=torch.float64)
    eps = 0.01
    r = epsilon_sharpness(Quadratic(torch.diag(diag), center), quad_loss, X, eps, steps=10)
    box = eps * (center.abs() + 1)
    exact = 100 * 0.5 * float((diag * box**2).sum()) / (1 + 0.0)
    assert r.value == pytest.approx(exact, rel=1e-9)


def test_bad_arguments() -> None:
    net, data = relu_net(), class_data()
    with pytest.raises(ValueError, match="rho"):
        worst_case_sharpness(net, nn.CrossEntropyLoss(), data, -1.0)
    with pytest.raises(ValueError, match="p"):
        worst_case_sharpness(net, nn.CrossEntropyLoss(), data, 0.1, p=1)
    with pytest.raises(ValueError, match="steps"):
        worst_case_sharpness(net, nn.CrossEntropyLoss(), data, 0.1, steps=0)
    with pytest.raises(ValueError, match="m"):
        worst_case_sharpness(net, nn.CrossEntropyLoss(), data, 0.1, m=0)


vectors = st.lists(st.floats(min_value=-10, max_value=10, allow_nan=False), min_size=1, max_size=8)


@settings(max_examples=60, deadline=None)
@given(vectors, st.floats(min_value=0.01, max_value=5.0), st.sampled_from([2, math.inf]))
def test_projection_properties(values, rho, p) -> None:
    x = [torch.tensor(values, dtype=torch.float64)]
    y = project(x, rho, p)
    norm = float(y[0].norm()) if p == 2 else float(y[0].abs().max())
    assert norm <= rho * (1 + 1e-12)
    # idempotent, and identity inside the ball
    assert torch.allclose(project(y, rho, p)[0], y[0])
    inside = float(x[0].norm()) if p == 2 else float(x[0].abs().max())
    if inside <= rho:
        assert torch.equal(y[0], x[0])
    # the projection is the closest feasible point: compare with feasible candidates
    g = torch.Generator().manual_seed(len(values))
    for _ in range(20):
        z = project([torch.randn(len(values), generator=g, dtype=torch.float64) * rho], rho, p)
        assert float((x[0] - y[0]).norm()) <= float((x[0] - z[0]).norm()) + 1e-12


def test_train_mode_dropout_compares_losses_under_the_same_masks() -> None:
    """Dropout in training mode: every evaluation replays the random state the metric
    was started in, so at a small radius the sharpness is its first-order value
    rho ||g|| for the gradient g of the loss under those masks (reference: one plain
    autograd evaluation from the same state). With fresh masks per evaluation the
    difference L(w + d) - L(w) is mask noise, 0.08 here: over 1000x the signal."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Dropout(0.3), nn.Linear(16, 3))
    model = model.double()
    g = torch.Generator().manual_seed(1)
    batch = (
        torch.randn(32, 5, generator=g, dtype=torch.float64),
        torch.randint(0, 3, (32,), generator=g),
    )
    rho = 1e-4
    state = torch.get_rng_state()
    res = worst_case_sharpness(model, nn.CrossEntropyLoss(), batch, rho, mode="train", seed=0)
    torch.set_rng_state(state)
    loss = nn.functional.cross_entropy(model(batch[0]), batch[1])
    grads = torch.autograd.grad(loss, list(model.parameters()))
    gnorm = math.sqrt(sum(float((t**2).sum()) for t in grads))
    assert res.details["base_loss"] == pytest.approx(loss.item(), abs=1e-12)
    assert res.value == pytest.approx(rho * gnorm, rel=1e-2)
