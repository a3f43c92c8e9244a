"""The per-example analysis tools against direct loops (one autograd pass per example)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from sharpkit.per_example import (
    examples_coupled,
    per_example_gradients,
    per_example_losses_at,
    per_instance_target,
    perturbation_cosine,
    perturbed_gradient,
)

F64 = torch.float64


def mlp(seed: int = 0, norm: type[nn.Module] | None = None) -> nn.Module:
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Linear(5, 10)]
    if norm is not None:
        layers.append(norm(10))
    layers += [nn.Tanh(), nn.Linear(10, 3)]
    return nn.Sequential(*layers).to(F64)


def data(n: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=g, dtype=F64), torch.randint(0, 3, (n,), generator=g)


def per_ex(model, batch):
    x, y = batch
    return nn.functional.cross_entropy(model(x), y, reduction="none")


def flat_grad(loss: torch.Tensor, params: list[torch.Tensor]) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, params))


# -- the per-instance target against a direct loop -------------------------------------------------


def direct_per_instance(model: nn.Module, batch, rho: float, coupled: bool) -> list[torch.Tensor]:
    """(1/n) sum_i grad l_i(w + rho g_i / ||g_i||), one autograd pass per example on a copy.

    Independent examples evaluate l_i on example i alone; coupled ones (BatchNorm in
    training) take the i-th loss of the whole batch."""
    x, y = batch
    n = len(y)
    total = [torch.zeros_like(p) for p in model.parameters()]
    for i in range(n):
        m = copy.deepcopy(model)
        ps = list(m.parameters())
        sub = (x, y) if coupled else (x[i : i + 1], y[i : i + 1])
        k = i if coupled else 0
        gi = flat_grad(per_ex(m, sub)[k], ps)
        norm = torch.sqrt(sum((t**2).sum() for t in gi))
        with torch.no_grad():
            for p, t in zip(ps, gi):
                p.add_(rho * t / norm)
        gp = flat_grad(per_ex(m, sub)[k], ps)
        for acc, t in zip(total, gp):
            acc.add_(t / n)
    return total


def test_per_instance_target_against_a_direct_loop() -> None:
    model = mlp()
    batch = data(7)
    ref = direct_per_instance(model, batch, 0.3, coupled=False)
    for coupled in (False, True):  # both formulations agree for independent examples
        got = per_instance_target(model, per_ex, batch, 0.3, coupled=coupled)
        for a, b in zip(got, ref):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-13)


def test_per_instance_target_with_batchnorm_leaves_the_module_alone() -> None:
    model = mlp(norm=nn.BatchNorm1d)
    batch = data(6)
    buffers = [b.clone() for b in model.buffers()]
    ref = direct_per_instance(model, batch, 0.2, coupled=True)
    got = per_instance_target(model, per_ex, batch, 0.2)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-13)
    for b, c in zip(model.buffers(), buffers):
        assert torch.equal(b, c)


def test_per_example_gradients_jacobian_matches_loop_with_batchnorm() -> None:
    model = mlp(norm=nn.BatchNorm1d)
    batch = data(6)
    _, grads = per_example_gradients(copy.deepcopy(model), per_ex, batch)
    for i in range(6):
        m = copy.deepcopy(model)
        gi = flat_grad(per_ex(m, batch)[i], list(m.parameters()))
        for row, t in zip(grads, gi):
            torch.testing.assert_close(row[i], t, rtol=0, atol=1e-13)


def test_cosine_helper_and_sam_reference_point() -> None:
    """SAM's G from perturbed_gradient equals a re-derivation; its cosine is in [-1, 1]."""
    model = mlp()
    batch = data(8)
    ps = list(model.parameters())
    g = flat_grad(per_ex(model, batch).mean(), ps)
    G = perturbed_gradient(model, per_ex, batch, g, 0.1)
    norm = torch.sqrt(sum((t**2).sum() for t in g))
    m = copy.deepcopy(model)
    with torch.no_grad():
        for p, t in zip(m.parameters(), g):
            p.add_(0.1 * t / norm)
    G_ref = flat_grad(per_ex(m, batch).mean(), list(m.parameters()))
    for a, b in zip(G, G_ref):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-14)
    c = perturbation_cosine(G, per_instance_target(model, per_ex, batch, 0.1), g)
    assert -1.0 <= c <= 1.0
    with pytest.raises(ValueError, match="G"):
        perturbation_cosine(g, g, g)


def test_per_example_losses_at_matches_copies_and_leaves_the_module() -> None:
    model = mlp(norm=nn.BatchNorm1d)
    batch = data(6)
    params = list(model.parameters())
    g = torch.Generator().manual_seed(3)
    stacked = [
        p.detach() + 0.1 * torch.randn((3, *p.shape), generator=g, dtype=F64) for p in params
    ]
    before = [b.clone() for b in model.buffers()]
    for vectorise in (True, False):
        got = per_example_losses_at(model, per_ex, batch, stacked, vectorise=vectorise)
        assert got.shape == (3, 6)
        for s in range(3):
            m = copy.deepcopy(model)
            with torch.no_grad():
                for p, t in zip(m.parameters(), stacked):
                    p.copy_(t[s])
                ref = per_ex(m, batch)
            torch.testing.assert_close(got[s], ref, rtol=0, atol=1e-13)
    assert all(torch.equal(a, b) for a, b in zip(model.buffers(), before))
    assert examples_coupled(model) and not examples_coupled(mlp())
    with pytest.raises(ValueError, match="stacked"):
        per_example_losses_at(model, per_ex, batch, stacked[:1])
