"""delta-SAM against independent references: SAM (uniform weights), a hand
computation on logistic regression, the probe estimator's known variance, and a
direct per-example loop for the per-instance target."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from sharpkit.optim import (
    SAM,
    DeltaSAM,
    ExampleStats,
    InverseNormWeights,
    UnguardednessSoftmax,
    UniformWeights,
)
from sharpkit.per_example import per_example_gradients
from tests.test_per_example import data, flat_grad, mlp, per_ex  # the shared small problem

F64 = torch.float64
MODES = ["exact", "probe", "forward-only"]


# -- tau -> infinity (uniform weights) is SAM -------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("how", ["tau=inf", "uniform"])
def test_uniform_weights_are_sam(mode: str, how: str) -> None:
    a, b = mlp(), mlp()
    batch = data(16)
    kw = {"lr": 0.1, "momentum": 0.9}
    extra = {"tau": math.inf} if how == "tau=inf" else {"weighting": UniformWeights()}
    opt = DeltaSAM(a.parameters(), torch.optim.SGD, rho=0.1, model=a, mode=mode, **extra, **kw)
    ref = SAM(b.parameters(), torch.optim.SGD, rho=0.1, **kw)

    def closure():
        loss = per_ex(b, batch).mean()
        loss.backward()
        return loss

    for _ in range(3):
        loss = opt.step(loss_fn=per_ex, batch=batch)
        assert loss.shape == () and opt.last_losses.shape == (16,)
        torch.testing.assert_close(loss, ref.step(closure).detach(), rtol=0, atol=1e-14)
        torch.testing.assert_close(opt.last_weights, torch.full((16,), 1 / 16, dtype=F64))
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-12)


# -- hand-computed weights on a tiny logistic regression ---------------------------------------


def test_hand_computed_weights_logistic_regression() -> None:
    """l_i = BCE(w.x_i + c, y_i), g_i = (sigmoid(w.x_i + c) - y_i) (x_i, 1), by hand."""
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 2.0]], dtype=F64)
    y = torch.tensor([1.0, 0.0, 1.0, 0.0], dtype=F64)
    w0, c0 = torch.tensor([0.5, -0.3], dtype=F64), 0.1
    rho, tau, lr = 0.2, 0.5, 0.3
    model = nn.Linear(2, 1).to(F64)
    with torch.no_grad():
        model.weight.copy_(w0[None])
        model.bias.fill_(c0)

    def loss_fn(m, b):
        xb, yb = b
        return nn.functional.binary_cross_entropy_with_logits(
            m(xb).squeeze(1), yb, reduction="none"
        )

    # by hand: residuals, per-example gradients over (w1, w2, c)
    xa = torch.cat([x, torch.ones(4, 1, dtype=F64)], 1)
    theta = torch.cat([w0, torch.tensor([c0], dtype=F64)])

    def residuals(t: torch.Tensor) -> torch.Tensor:
        return 1 / (1 + torch.exp(-(xa @ t))) - y

    gi = residuals(theta)[:, None] * xa  # (4, 3)
    g = gi.mean(0)
    cos = (gi @ g) / (gi.norm(dim=1) * g.norm())
    u = 1 - cos
    lam = torch.exp(u / tau) / torch.exp(u / tau).sum()
    g_lam = lam @ gi
    e = rho * g_lam / g_lam.norm()
    G = (residuals(theta + e)[:, None] * xa).mean(0)
    theta_new = theta - lr * G

    opt = DeltaSAM(model.parameters(), torch.optim.SGD, rho=rho, tau=tau, model=model, lr=lr)
    opt.step(loss_fn=loss_fn, batch=(x, y))
    torch.testing.assert_close(opt.last_stats.unguardedness, u, rtol=0, atol=1e-14)
    torch.testing.assert_close(opt.last_weights, lam, rtol=0, atol=1e-14)
    torch.testing.assert_close(model.weight.detach()[0], theta_new[:2], rtol=0, atol=1e-14)
    torch.testing.assert_close(model.bias.detach()[0], theta_new[2], rtol=0, atol=1e-14)


def test_custom_weighting_is_used() -> None:
    """All weight on example 0: e = rho g_0 / ||g_0||, re-derived with autograd."""
    a, ref = mlp(), mlp()
    x, y = data(8)
    rho, lr = 0.1, 0.5

    def first_only(stats: ExampleStats) -> torch.Tensor:
        out = torch.zeros_like(stats.losses)
        out[0] = 3.0  # normalised by DeltaSAM
        return out

    opt = DeltaSAM(a.parameters(), torch.optim.SGD, rho=rho, weighting=first_only, model=a, lr=lr)
    opt.step(loss_fn=per_ex, batch=(x, y))
    ps = list(ref.parameters())
    g0 = flat_grad(per_ex(ref, (x[:1], y[:1]))[0], ps)
    norm = torch.sqrt(sum((t**2).sum() for t in g0))
    with torch.no_grad():
        w = [p.clone() for p in ps]
        for p, t in zip(ps, g0):
            p.add_(rho * t / norm)
    G = flat_grad(per_ex(ref, (x, y)).mean(), ps)
    for p, w_, t in zip(a.parameters(), w, G):
        torch.testing.assert_close(p.detach(), w_ - lr * t, rtol=0, atol=1e-13)


def test_builtin_weightings() -> None:
    stats = ExampleStats(
        torch.zeros(3, dtype=F64),
        torch.tensor([4.0, 1.0, 0.0], dtype=F64),
        torch.tensor([0.5, -0.5, 1.0], dtype=F64),
        "exact",
    )
    u = torch.tensor([0.5, 1.5, 0.0], dtype=F64)
    torch.testing.assert_close(UnguardednessSoftmax(0.25)(stats), torch.softmax(u / 0.25, 0))
    torch.testing.assert_close(
        InverseNormWeights()(stats), torch.tensor([0.5, 1.0, 0.0], dtype=F64)
    )
    with pytest.raises(ValueError, match="tau"):
        UnguardednessSoftmax(float("nan"))


# -- the probe estimator converges at the rate its variance predicts -----------------------------


def test_probe_estimates_converge_with_known_variance() -> None:
    """Probe statistics against the exact ones, K = 64 and K = 4096.

    For z ~ N(0, I) the directional derivative a = g_i . z is N(0, ||g_i||^2), so
    a^2 / ||g_i||^2 is chi-squared with one degree of freedom (mean 1, variance 2,
    i.e. Var[(g.z)^2] = 2 ||g||^4) and the mean of K draws has relative standard
    deviation sqrt(2 / K). The tolerance is 5 of those (per example, two-sided:
    a false alarm has probability below 1e-5 over the 16 examples; the seed is
    fixed anyway). The finite-difference error (probe radius 1e-6, float64) is
    about 1e-7 relative, negligible against it. The forward-only alignment is the
    uncentred correlation of K pairs (a_ik, b_k); its standard deviation is at
    most about 1/sqrt(K), and the tolerance is 5/sqrt(K). In probe mode the
    alignment is the exact directional derivative along g over the probe norm, so
    its relative error is half the norm estimate's.
    """
    model = mlp()
    batch = data(16)
    losses, grads = per_example_gradients(model, per_ex, batch)
    sq = torch.stack([g.reshape(16, -1).pow(2).sum(1) for g in grads]).sum(0)
    gbar = [g.mean(0) for g in grads]
    dots = sum((g.reshape(16, -1) @ m.reshape(-1)) for g, m in zip(grads, gbar))
    cos = dots / (sq.sqrt() * torch.sqrt(sum((m**2).sum() for m in gbar)))
    rms = {}
    for K in (64, 4096):
        tol = 5 * math.sqrt(2 / K)
        for mode in ("forward-only", "probe"):
            m = copy.deepcopy(model)
            opt = DeltaSAM(m.parameters(), torch.optim.SGD, rho=0.05, model=m, mode=mode,
                           probes=K, probe_radius=1e-6, seed=3, lr=0.0)  # fmt: skip
            opt.step(loss_fn=per_ex, batch=batch)
            st = opt.last_stats
            rel = st.sq_norms / sq - 1
            assert rel.abs().max() < tol, (mode, K, rel.abs().max())
            if mode == "forward-only":
                rms[K] = rel.pow(2).mean().sqrt().item()
                assert (st.alignment - cos).abs().max() < 5 / math.sqrt(K)
            else:
                assert (st.alignment - cos).abs().max() < tol / 2 + 1e-6
            torch.testing.assert_close(st.losses, losses, rtol=0, atol=1e-14)
    assert rms[4096] < rms[64] / 3  # the error shrinks like 1/sqrt(K) (expected ratio 8)


@pytest.mark.parametrize("mode", ["forward-only", "probe"])
@pytest.mark.parametrize("K", [1, 512, "512-loop"])
def test_probes_replay_the_clean_forwards_dropout_masks(mode: str, K: int | str) -> None:
    """Dropout in training mode: the probe forwards must draw the clean forward's masks.

    Reference: the clean forward's losses from the same random state, and their
    exact per-example gradients (one backward each). With K = 512 the squared-norm
    estimate is within 5 sqrt(2 / K) relative, as in the test above; with K = 1 it
    is one chi-squared(1) draw times ||g_i||^2 (above 30 with probability 4e-8).
    With masks drawn afresh the estimates are of order (1 / s)^2, about 1e12 here.
    '512-loop' runs the probes one by one (the path taken when vmap fails).
    """
    loop = K == "512-loop"
    K = 512 if loop else int(K)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 10), nn.Tanh(), nn.Dropout(0.3), nn.Linear(10, 3)).to(F64)
    batch = data(16)
    params = list(model.parameters())
    state = torch.get_rng_state()
    losses = per_ex(model, batch)
    sq = torch.stack([
        sum(g.pow(2).sum() for g in torch.autograd.grad(losses[i], params, retain_graph=True))
        for i in range(16)
    ])  # fmt: skip
    torch.set_rng_state(state)
    opt = DeltaSAM(params, torch.optim.SGD, rho=0.05, model=model, mode=mode, probes=K,
                   probe_radius=1e-6, seed=3, lr=0.0)  # fmt: skip
    if loop:
        opt._probe_fallback = "forced by the test"
    opt.step(loss_fn=per_ex, batch=batch)
    st = opt.last_stats
    torch.testing.assert_close(st.losses, losses.detach(), rtol=0, atol=1e-14)
    ratio = st.sq_norms / sq
    if K == 1:
        assert ratio.max() < 30, ratio.max()
    else:
        assert (ratio - 1).abs().max() < 5 * math.sqrt(2 / K), ratio


# -- bad input ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_loss_shape_is_validated(mode: str) -> None:
    model = mlp()
    before = [p.clone() for p in model.parameters()]
    opt = DeltaSAM(model.parameters(), torch.optim.SGD, model=model, mode=mode, lr=0.1)

    def mean_loss(m, b):
        return per_ex(m, b).mean()

    with pytest.raises(ValueError, match="one loss per example"):
        opt.step(loss_fn=mean_loss, batch=data(8))
    for p, q in zip(model.parameters(), before):
        assert torch.equal(p, q)


def test_bad_weights_name_weighting() -> None:
    model = mlp()
    for bad in (lambda s: -torch.ones_like(s.losses), lambda s: torch.ones(3, dtype=F64)):
        opt = DeltaSAM(model.parameters(), torch.optim.SGD, weighting=bad, model=model, lr=0.1)
        with pytest.raises(ValueError, match="weighting"):
            opt.step(loss_fn=per_ex, batch=data(8))


def test_step_and_model_are_required() -> None:
    model = mlp()
    with pytest.raises(TypeError, match="model"):
        DeltaSAM(model.parameters(), torch.optim.SGD, model=None, lr=0.1)  # type: ignore[arg-type]
    opt = DeltaSAM(model.parameters(), torch.optim.SGD, model=model, lr=0.1)
    with pytest.raises(TypeError, match="loss_fn"):
        opt.step()
    with pytest.raises(TypeError, match="closure is not accepted"):
        opt.step(lambda: per_ex(model, data(8)).mean().backward())
    with pytest.raises(TypeError, match="step"):
        opt.first_step()
