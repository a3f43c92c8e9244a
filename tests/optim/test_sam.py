"""SAM and ASAM against independent references (closed forms, a re-derivation)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from sharpkit.optim import ASAM, SAM, frozen_buffers

F64 = torch.float64


def _spd(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64))
    return q @ torch.diag(torch.linspace(0.5, 4.0, n, dtype=F64)) @ q.T


class Quadratic(nn.Module):
    """L(w) = 0.5 w^T A w."""

    def __init__(self, a: torch.Tensor, w0: torch.Tensor) -> None:
        super().__init__()
        self.a = a
        self.w = nn.Parameter(w0.clone())

    def forward(self) -> torch.Tensor:
        return 0.5 * self.w @ self.a @ self.w


def _quad_step(opt, model):
    def closure():
        loss = model()
        loss.backward()
        return loss

    return opt.step(closure)


# -- closed-form single steps --------------------------------------------------------


def test_sam_single_step_closed_form() -> None:
    a = _spd(5)
    w = torch.tensor([1.0, -2.0, 0.5, 3.0, -1.0], dtype=F64)
    rho, lr = 0.3, 0.1
    model = Quadratic(a, w)
    opt = SAM(model.parameters(), torch.optim.SGD, rho=rho, lr=lr)
    loss = _quad_step(opt, model)
    g = a @ w
    e = rho * g / torch.linalg.vector_norm(g)
    expected = w - lr * (a @ (w + e))
    torch.testing.assert_close(model.w.detach(), expected, rtol=0, atol=1e-14)
    torch.testing.assert_close(loss.detach(), 0.5 * w @ a @ w, rtol=0, atol=1e-14)


@pytest.mark.parametrize("xi", [0.01, 0.0])
def test_asam_single_step_closed_form(xi: float) -> None:
    a = _spd(5, seed=1)
    w = torch.tensor([1.0, -2.0, 0.5, 3.0, -0.1], dtype=F64)
    rho, lr = 0.5, 0.05
    model = Quadratic(a, w)
    # w is one vector: the authors' default would treat it as a bias (T = 1)
    opt = ASAM(model.parameters(), torch.optim.SGD, rho=rho, xi=xi, adaptive_bias=True, lr=lr)
    _quad_step(opt, model)
    g = a @ w
    t = w.abs() + xi
    e = rho * t**2 * g / torch.linalg.vector_norm(t * g)
    expected = w - lr * (a @ (w + e))
    torch.testing.assert_close(model.w.detach(), expected, rtol=0, atol=1e-14)


def test_sam_adaptive_matches_widely_used_form() -> None:
    """SAM(adaptive=True, xi=0, adaptive_bias=True) is e = rho w^2 g / ||w g||."""
    a = _spd(4, seed=2)
    w = torch.tensor([0.3, -1.0, 2.0, 0.7], dtype=F64)
    model = Quadratic(a, w)
    opt = SAM(
        model.parameters(),
        torch.optim.SGD,
        rho=2.0,
        adaptive=True,
        xi=0.0,
        adaptive_bias=True,
        lr=0.1,
    )
    _quad_step(opt, model)
    g = a @ w
    e = 2.0 * w**2 * g / torch.linalg.vector_norm(w * g)
    torch.testing.assert_close(model.w.detach(), w - 0.1 * (a @ (w + e)), rtol=0, atol=1e-14)


def _asam_reference_step(
    model: nn.Module, x, y, rho: float, xi: float, lr: float, every: bool = False
) -> None:
    """One ASAM step as the authors' code writes it: T_w on parameters whose name
    contains 'weight', T = 1 on the rest (``every``: T_w on all); e = rho T^2 g / ||T g||;
    SGD with the gradient at w + e."""
    loss = nn.functional.cross_entropy(model(x), y)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    names = [n for n, _ in model.named_parameters()]
    ts = [
        p.detach().abs() + xi if every or "weight" in n else torch.ones_like(p)
        for n, p in model.named_parameters()
    ]
    norm = torch.sqrt(sum(((t * g) ** 2).sum() for t, g in zip(ts, grads)))
    w0 = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        for p, t, g in zip(model.parameters(), ts, grads):
            p.add_(rho * t * t * g / norm)
    loss2 = nn.functional.cross_entropy(model(x), y)
    grads2 = torch.autograd.grad(loss2, list(model.parameters()))
    with torch.no_grad():
        for p, w, g in zip(model.parameters(), w0, grads2):
            p.copy_(w - lr * g)
    assert len(names) == 4


@pytest.mark.parametrize("cls", ["ASAM", "SAM-adaptive"])
def test_asam_default_is_the_authors_weights_only_form(cls: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).to(F64)
    with torch.no_grad():
        model[2].weight[0].zero_()  # exactly zero weights: perturbed only through xi
    ref = copy.deepcopy(model)
    x = torch.randn(12, 5, dtype=F64)
    y = torch.randint(0, 3, (12,))
    if cls == "ASAM":
        opt = ASAM(model.parameters(), torch.optim.SGD, rho=0.5, lr=0.1)
    else:
        opt = SAM(model.parameters(), torch.optim.SGD, rho=0.5, adaptive=True, lr=0.1)
    for _ in range(3):
        opt.step(lambda: nn.functional.cross_entropy(model(x), y).backward())
        _asam_reference_step(ref, x, y, rho=0.5, xi=0.01, lr=0.1)
    for a, b in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-13)
    # the zeroed row moved (xi = 0.01 > 0)
    assert not torch.equal(model[2].weight[0], torch.zeros(7, dtype=F64))


def test_asam_adaptive_bias_flag_is_the_all_parameter_form() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).to(F64)
    ref, weights_only = copy.deepcopy(model), copy.deepcopy(model)
    x = torch.randn(12, 5, dtype=F64)
    y = torch.randint(0, 3, (12,))
    opt = ASAM(model.parameters(), torch.optim.SGD, rho=0.5, lr=0.1, adaptive_bias=True)
    other = ASAM(weights_only.parameters(), torch.optim.SGD, rho=0.5, lr=0.1)
    for _ in range(3):
        opt.step(lambda: nn.functional.cross_entropy(model(x), y).backward())
        other.step(lambda: nn.functional.cross_entropy(weights_only(x), y).backward())
        _asam_reference_step(ref, x, y, rho=0.5, xi=0.01, lr=0.1, every=True)
    for a, b in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-13)
    assert not torch.equal(model[0].bias, weights_only[0].bias)


def test_group_rho_scales_its_part_with_a_global_norm() -> None:
    a = _spd(6, seed=3)
    w = torch.randn(6, dtype=F64, generator=torch.Generator().manual_seed(3))
    p1 = nn.Parameter(w[:3].clone())
    p2 = nn.Parameter(w[3:].clone())
    opt = SAM([{"params": [p1]}, {"params": [p2], "rho": 0.2}], torch.optim.SGD, rho=0.05, lr=0.1)

    def closure():
        v = torch.cat([p1, p2])
        loss = 0.5 * v @ a @ v
        loss.backward()
        return loss

    opt.step(closure)
    g = a @ w
    n = torch.linalg.vector_norm(g)
    e = torch.cat([0.05 * g[:3] / n, 0.2 * g[3:] / n])
    expected = w - 0.1 * (a @ (w + e))
    torch.testing.assert_close(torch.cat([p1, p2]).detach(), expected, rtol=0, atol=1e-14)


def test_group_rho_is_validated() -> None:
    p = nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match="rho"):
        SAM([{"params": [p], "rho": -1.0}], torch.optim.SGD, lr=0.1)
    opt = SAM([p], torch.optim.SGD, lr=0.1)
    with pytest.raises(ValueError, match="rho"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(1))], "rho": float("nan")})


def test_add_param_group_reaches_base_optimizer() -> None:
    p, q = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(3))
    opt = SAM([p], torch.optim.SGD, lr=0.1, momentum=0.9)
    opt.add_param_group({"params": [q], "rho": 0.1})
    assert opt.base_optimizer.param_groups[1]["momentum"] == 0.9
    assert opt.param_groups[1]["rho"] == 0.1


# -- a 20-step trajectory against a plain re-derivation -----------------------------


def _mlp_loss(params: list[torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    w1, b1, w2, b2 = params
    h = torch.tanh(x @ w1.T + b1)
    return nn.functional.cross_entropy(h @ w2.T + b2, y)


def test_twenty_step_trajectory_matches_rederivation() -> None:
    """SAM + SGD(momentum, weight decay), written out by hand from Foret et al. (2021), Algorithm 1."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).to(F64)
    rho, lr, mom, wd = 0.08, 0.2, 0.9, 1e-3
    opt = SAM(model.parameters(), torch.optim.SGD, rho=rho, lr=lr, momentum=mom, weight_decay=wd)
    w = [p.detach().clone() for p in model.parameters()]
    buf: list[torch.Tensor] | None = None
    gen = torch.Generator().manual_seed(1)
    for _ in range(20):
        x = torch.randn(16, 5, generator=gen, dtype=F64)
        y = torch.randint(0, 3, (16,), generator=gen)

        def closure(x=x, y=y):
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            return loss

        opt.step(closure)

        # the re-derivation
        wg = [t.clone().requires_grad_(True) for t in w]
        g = torch.autograd.grad(_mlp_loss(wg, x, y), wg)
        norm = math.sqrt(sum(float((t * t).sum()) for t in g))
        we = [(t + rho * gi / norm).requires_grad_(True) for t, gi in zip(w, g)]
        g2 = torch.autograd.grad(_mlp_loss(we, x, y), we)
        d = [gi + wd * t for gi, t in zip(g2, w)]
        buf = [di.clone() for di in d] if buf is None else [mom * b + di for b, di in zip(buf, d)]
        w = [t - lr * b for t, b in zip(w, buf)]

    for p, ref in zip(model.parameters(), w):
        torch.testing.assert_close(p.detach(), ref, rtol=0, atol=1e-10)


# -- convergence ------------------------------------------------------------------


def test_converges_on_convex_least_squares() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(200, 5, generator=gen, dtype=F64)
    w_true = torch.randn(5, generator=gen, dtype=F64)
    y = x @ w_true + 0.1 * torch.randn(200, generator=gen, dtype=F64)
    w_star = torch.linalg.lstsq(x, y.unsqueeze(1)).solution.squeeze(1)
    model = nn.Linear(5, 1, bias=False).to(F64)
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.01, lr=0.1)

    def closure():
        loss = 0.5 * ((model(x).squeeze(1) - y) ** 2).mean()
        loss.backward()
        return loss

    for _ in range(300):
        opt.step(closure)
    # SAM with a fixed radius settles within O(rho) of the minimiser (it ends in a
    # small cycle around it, Bartlett et al. 2023): distance <= rho is generous
    # for eta * lambda_max < 1 and far below the initial distance (~2).
    dist = torch.linalg.vector_norm(model.weight.detach().squeeze(0) - w_star)
    assert dist < 0.01


def test_trains_a_small_nonconvex_mlp() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 2, generator=gen)
    y = ((x[:, 0] * x[:, 1]) > 0).long()  # XOR-like quadrants: not linearly separable
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 32), nn.Tanh(), nn.Linear(32, 2))
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.5, momentum=0.9)

    def closure():
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    first = float(opt.step(closure).detach())
    for _ in range(300):
        last = float(opt.step(closure).detach())
    acc = (model(x).argmax(1) == y).float().mean().item()
    assert last < 0.3 * first
    assert acc > 0.95


# -- the manual two-phase form ---------------------------------------------------


def test_two_phase_equals_closure_step() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 2)).to(F64)
    twin = copy.deepcopy(model)
    x = torch.randn(10, 4, dtype=F64)
    y = torch.randint(0, 2, (10,))
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9, model=model)
    opt2 = SAM(twin.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9, model=twin)
    for _ in range(3):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.first_step(zero_grad=True)
        assert opt.perturbed
        nn.functional.cross_entropy(model(x), y).backward()
        opt.second_step(zero_grad=True)

        def closure():
            loss = nn.functional.cross_entropy(twin(x), y)
            loss.backward()
            return loss

        opt2.step(closure)
    for a, b in zip(model.state_dict().values(), twin.state_dict().values()):
        assert torch.equal(a, b)


def test_two_phase_misuse_is_refused() -> None:
    model = nn.Linear(2, 1)
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    with pytest.raises(RuntimeError, match="no parameter has a gradient"):
        opt.first_step()
    model(torch.ones(1, 2)).sum().backward()
    with pytest.raises(RuntimeError, match="without a preceding first_step"):
        opt.second_step()
    opt.first_step()
    with pytest.raises(RuntimeError, match="twice"):
        opt.first_step()
    with pytest.raises(RuntimeError, match="perturbed"):
        opt.load_state_dict(opt.state_dict())
    opt.second_step()


def test_closure_without_backward_is_a_clear_error() -> None:
    model = nn.Linear(2, 1)
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    with pytest.raises(RuntimeError, match="backward"):
        opt.step(lambda: model(torch.ones(1, 2)).sum())


def test_model_argument_is_checked() -> None:
    with pytest.raises(TypeError, match="model"):
        SAM(nn.Linear(2, 1).parameters(), torch.optim.SGD, lr=0.1, model="net")  # type: ignore[arg-type]


def test_frozen_buffers_restores_on_exception() -> None:
    bn = nn.BatchNorm1d(3)
    with pytest.raises(ValueError), frozen_buffers(bn):
        bn(torch.randn(8, 3) + 3.0)
        raise ValueError("inside")
    assert torch.equal(bn.running_mean, torch.zeros(3))
    assert int(bn.num_batches_tracked) == 0


# -- mixed precision ---------------------------------------------------------------


def _amp_setup(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    x = torch.randn(32, 8)
    y = torch.randint(0, 4, (32,))
    return model, x, y


def _amp_step(model, opt, scaler, x, y, dtype):
    with torch.autocast("cpu", dtype=dtype):
        loss = nn.functional.cross_entropy(model(x), y)
    scaler.scale(loss).backward()
    opt.first_step(zero_grad=True)
    with torch.autocast("cpu", dtype=dtype):
        loss2 = nn.functional.cross_entropy(model(x), y)
    scaler.scale(loss2).backward()
    scaler.step(opt)
    scaler.update()
    opt.zero_grad()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_grad_scaler_pattern_matches_unscaled(dtype: torch.dtype) -> None:
    """With power-of-two scaling the unscaled gradients equal the unscaled run's."""
    model, x, y = _amp_setup()
    twin = copy.deepcopy(model)
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    opt2 = SAM(twin.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    off = torch.amp.GradScaler("cpu", enabled=False)
    for _ in range(3):
        _amp_step(model, opt, scaler, x, y, dtype)
        _amp_step(twin, opt2, off, x, y, dtype)
    assert not opt.perturbed
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_grad_scaler_skips_inf_and_restores_weights() -> None:
    model, x, y = _amp_setup(1)
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    _amp_step(model, opt, scaler, x, y, torch.float16)  # a normal step first
    w = [p.detach().clone() for p in model.parameters()]
    scale = scaler.get_scale()

    # the second pass overflows: its gradients are inf, so the scaler skips the update
    with torch.autocast("cpu", dtype=torch.float16):
        loss = nn.functional.cross_entropy(model(x), y)
    scaler.scale(loss).backward()
    opt.first_step(zero_grad=True)
    with torch.autocast("cpu", dtype=torch.float16):
        loss2 = nn.functional.cross_entropy(model(x), y) * float("inf")
    scaler.scale(loss2).backward()
    scaler.step(opt)
    scaler.update()

    assert not opt.perturbed
    for a, b in zip(model.parameters(), w):
        assert torch.equal(a, b)  # restored to w, not left at w + e, and not updated
    assert scaler.get_scale() < scale


def test_bf16_autocast_closure_step_trains() -> None:
    model, x, y = _amp_setup(2)
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.2)

    def closure():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    first = float(opt.step(closure).detach())
    for _ in range(30):
        last = float(opt.step(closure).detach())
    assert last < first
    assert all(p.dtype == torch.float32 for p in model.parameters())
