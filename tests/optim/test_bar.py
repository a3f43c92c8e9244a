"""BAR (Li, Zhang, He, NeurIPS 2024, Algorithms 2 and 3) against a plain re-derivation.

The references are written out by hand: with base SGD (no momentum) and learning
rate eta, one BAR step on a pair is ``x <- (1 + s a eta) x - eta g_x``,
``y <- (1 - s a eta) y - eta g_y`` with the sign ``s`` of the paper's rule and
the gradients taken at the unscaled weights.
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from torch import nn

from sharpkit.balance import FactorPair, LoRALinear, find_pairs
from sharpkit.balance.rules import bar_coefficient, bar_signs
from sharpkit.optim import BAR

F64 = torch.float64


def _linear_problem(
    xs: list[list[float]], ys: list[list[float]], gxs: list[list[float]], gys: list[list[float]]
):
    """Pairs of parameters and a linear loss whose gradients are exactly gx, gy."""
    params = []
    for v in (*xs, *ys):
        params.append(nn.Parameter(torch.tensor(v, dtype=F64)))
    n = len(xs)
    pairs = [FactorPair(f"p{i}", params[i], params[n + i]) for i in range(n)]
    coefs = [torch.tensor(v, dtype=F64) for v in (*gxs, *gys)]

    def closure() -> torch.Tensor:
        loss = sum((c * p).sum() for c, p in zip(coefs, params))
        loss.backward()
        return loss

    return params, pairs, coefs, closure


def _expected(x, g, c) -> torch.Tensor:
    return (1.0 + c) * x - 0.1 * g


# pair 0 / pair 1 take opposite branches in the same step
CASES = {
    # nBAR compares gradient norms: ||g_x0|| = 5 > ||g_y0|| = 1; ||g_x1|| = 1 < ||g_y1|| = 2
    "nbar": ([[3.0, 4.0], [1.0]], [[0.5, 0.5], [2.0, 0.0]], [[3.0, 4.0], [1.0]], [[1.0, 0.0], [0.0, 2.0]], [1.0, -1.0]),
    # oBAR compares factor norms: ||x0|| = 5 > ||y0||; ||x1|| = 1 < ||y1|| = 2
    "obar": ([[3.0, 4.0], [1.0]], [[0.5, 0.5], [2.0, 0.0]], [[0.1, 0.0], [1.0]], [[1.0, 0.0], [0.0, 2.0]], [-1.0, 1.0]),
}  # fmt: skip


@pytest.mark.parametrize("variant", ["nbar", "obar"])
def test_scaling_rule_both_branches(variant: str) -> None:
    xs, ys, gxs, gys, signs = CASES[variant]
    params, pairs, coefs, closure = _linear_problem(xs, ys, gxs, gys)
    before = [p.detach().clone() for p in params]
    mu0, lr = 0.3, 0.1
    opt = BAR(params, torch.optim.SGD, variant=variant, mu0=mu0, pairs=pairs, lr=lr)
    opt.step(closure)
    c = mu0 * lr
    for i, s in enumerate(signs):
        x0, y0 = before[i], before[2 + i]
        assert torch.allclose(pairs[i].x, _expected(x0, coefs[i], s * c), rtol=0, atol=1e-15)
        assert torch.allclose(pairs[i].y, _expected(y0, coefs[2 + i], -s * c), rtol=0, atol=1e-15)


@pytest.mark.parametrize(("variant", "sign"), [("nbar", 1.0), ("obar", -1.0)])
def test_ties_take_the_first_branch(variant: str, sign: float) -> None:
    # ||g_x|| = ||g_y|| and ||x|| = ||y||: the paper's ">=" picks the first branch
    params, pairs, coefs, closure = _linear_problem(
        [[3.0, 4.0]], [[0.0, 5.0]], [[1.0, 0.0]], [[0.0, -1.0]]
    )
    before = [p.detach().clone() for p in params]
    opt = BAR(params, torch.optim.SGD, variant=variant, mu0=0.5, pairs=pairs, lr=0.1)
    opt.step(closure)
    assert torch.allclose(pairs[0].x, _expected(before[0], coefs[0], sign * 0.05), atol=1e-15)
    assert torch.allclose(pairs[0].y, _expected(before[1], coefs[1], -sign * 0.05), atol=1e-15)


def test_zero_or_missing_gradient_pairs_are_left_alone() -> None:
    params, pairs, coefs, _ = _linear_problem(
        [[3.0, 4.0], [1.0], [2.0]], [[0.5, 0.5], [2.0, 0.0], [1.0]],
        [[3.0, 4.0], [0.0], [1.0]], [[1.0, 0.0], [0.0, 0.0], [1.0]],
    )  # fmt: skip
    # pair 2 gets no gradient at all: drop its factors from the loss
    coefs[2] = coefs[5] = None  # type: ignore[call-overload]

    def partial() -> torch.Tensor:
        loss = sum((c * p).sum() for c, p in zip(coefs, params) if c is not None)
        loss.backward()
        return loss

    before = [p.detach().clone() for p in params]
    opt = BAR(params, torch.optim.SGD, variant="nbar", mu0=0.3, pairs=pairs, lr=0.1)
    opt.step(partial)
    assert torch.allclose(params[0], _expected(before[0], coefs[0], 0.03), atol=1e-15)
    assert torch.equal(params[1], before[1]) and torch.equal(params[4], before[4])  # zero grad
    assert torch.equal(params[2], before[2]) and torch.equal(params[5], before[5])  # no grad


def test_eta_is_the_scheduled_lr_and_groups_use_their_own() -> None:
    params, pairs, coefs, closure = _linear_problem(
        [[3.0, 4.0]], [[0.5, 0.5]], [[3.0, 4.0]], [[1.0, 0.0]]
    )
    groups = [{"params": [params[0]], "lr": 0.1, "mu0": 0.2}, {"params": [params[1]], "lr": 0.05}]
    opt = BAR(groups, torch.optim.SGD, mu0=0.4, pairs=pairs, lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    opt.step(closure)
    sched.step()  # lrs now 0.05 and 0.025
    x, y = params[0].detach().clone(), params[1].detach().clone()
    opt.step(closure)
    # ||g_x|| > ||g_y||: x grows with its group's (mu0, lr), y shrinks with its own
    assert torch.allclose(params[0], (1 + 0.2 * 0.05) * x - 0.05 * coefs[0], atol=1e-15)
    assert torch.allclose(params[1], (1 - 0.4 * 0.025) * y - 0.025 * coefs[1], atol=1e-15)


@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine"])
def test_schedule_values(schedule: str) -> None:
    total = 8
    expected = {
        "constant": [0.6] * 10,
        "linear": [0.6 * (1 - min(t, total) / total) for t in range(10)],
        "cosine": [0.6 * 0.5 * (1 + math.cos(math.pi * min(t, total) / total)) for t in range(10)],
    }[schedule]
    assert [bar_coefficient(0.6, schedule, t, total) for t in range(10)] == pytest.approx(
        expected, abs=1e-15
    )
    # and the optimizer applies a_t of its own step counter: recover it from the update
    params, pairs, coefs, closure = _linear_problem(
        [[3.0, 4.0]], [[0.5, 0.5]], [[3.0, 4.0]], [[1.0, 0.0]]
    )
    opt = BAR(
        params, torch.optim.SGD, mu0=0.6, schedule=schedule, total_steps=total, pairs=pairs, lr=0.1
    )
    seen = []
    for _ in range(10):
        x = params[0].detach().clone()
        assert opt.coefficient() == pytest.approx(expected[opt.bar_step], abs=1e-15)
        opt.step(closure)
        a = float(((params[0].detach() + 0.1 * coefs[0]) / x - 1)[0]) / 0.1
        seen.append(a)
    assert seen == pytest.approx(expected, abs=1e-12)
    assert opt.state_dict()["bar"] == {"step": 10}
    with pytest.raises(ValueError, match="total_steps"):
        BAR(params, torch.optim.SGD, schedule="linear", pairs=pairs, lr=0.1)


def _lora_net(seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    net = nn.Sequential(
        LoRALinear(5, 6, rank=2, generator=g), nn.Tanh(), LoRALinear(6, 2, rank=2, generator=g)
    )
    with torch.no_grad():
        for m in (net[0], net[2]):
            m.lora_B.normal_(0, 0.5, generator=g)
    return net.to(F64)


def _batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(16, 5, generator=g, dtype=F64), torch.randn(16, 2, generator=g, dtype=F64)


@pytest.mark.parametrize("variant", ["nbar", "obar"])
def test_mu0_zero_is_the_base_optimizer_bit_for_bit(variant: str) -> None:
    net, ref = _lora_net(), _lora_net()
    x, y = _batch()
    opt = BAR(net.parameters(), torch.optim.AdamW, variant=variant, mu0=0.0, model=net, lr=0.01)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=0.01)
    for _ in range(4):
        for m, o in ((net, opt), (ref, ref_opt)):  # closure-less loop for both
            o.zero_grad()
            nn.functional.mse_loss(m(x), y).backward()
            o.step()
    for a, b in zip(net.parameters(), ref.parameters()):
        assert torch.equal(a, b)


def test_closure_and_closure_less_agree_and_match_reference() -> None:
    # discovered LoRA pairs, momentum SGD: BAR == (scale by the rule) + torch SGD step
    net_a, net_b, ref = _lora_net(), _lora_net(), _lora_net()
    x, y = _batch()
    kw = {"lr": 0.05, "momentum": 0.9}
    opt_a = BAR(net_a.parameters(), torch.optim.SGD, mu0=0.5, model=net_a, **kw)
    opt_b = BAR(net_b.parameters(), torch.optim.SGD, mu0=0.5, model=net_b, **kw)
    ref_opt = torch.optim.SGD(ref.parameters(), **kw)
    for _ in range(3):
        opt_a.step(lambda: nn.functional.mse_loss(net_a(x), y).backward())
        opt_b.zero_grad()
        nn.functional.mse_loss(net_b(x), y).backward()
        opt_b.step()
        ref_opt.zero_grad()
        nn.functional.mse_loss(ref(x), y).backward()
        with torch.no_grad():
            for pair in find_pairs(ref):
                s = 1.0 if pair.x.grad.norm() >= pair.y.grad.norm() else -1.0
                pair.x.mul_(1 + s * 0.5 * 0.05)
                pair.y.mul_(1 - s * 0.5 * 0.05)
        ref_opt.step()
    for a, b, r in zip(net_a.parameters(), net_b.parameters(), ref.parameters()):
        assert torch.equal(a, b)
        assert torch.allclose(a, r, rtol=0, atol=1e-15)


def test_no_pairs_raises_or_warns_and_degrades() -> None:
    net = nn.Sequential(nn.Linear(5, 2)).to(F64)
    with pytest.raises(ValueError, match="pairs: no factor pair"):
        BAR(net.parameters(), torch.optim.SGD, model=net, lr=0.1)
    with pytest.raises(ValueError, match="pairs"):
        BAR(net.parameters(), torch.optim.SGD, lr=0.1)
    with pytest.warns(UserWarning, match="base optimizer"):
        opt = BAR(net.parameters(), torch.optim.SGD, model=net, on_missing="warn", lr=0.1)
    ref = copy.deepcopy(net)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    x, y = torch.randn(8, 5, dtype=F64), torch.randn(8, 2, dtype=F64)
    for m, o in ((net, opt), (ref, ref_opt)):
        o.zero_grad()
        nn.functional.mse_loss(m(x), y).backward()
        o.step()
    assert all(torch.equal(a, b) for a, b in zip(net.parameters(), ref.parameters()))


def test_explicit_pair_must_be_optimized() -> None:
    a, b, c = (nn.Parameter(torch.ones(2)) for _ in range(3))
    with pytest.raises(ValueError, match="not among params"):
        BAR([a, b], torch.optim.SGD, pairs=[(a, c)], lr=0.1)
    with pytest.raises(ValueError, match="two pairs"):
        BAR([a, b, c], torch.optim.SGD, pairs=[(a, b), (b, c)], lr=0.1)


def test_closure_less_step_needs_gradients_and_skips_nonfinite() -> None:
    net = _lora_net()
    opt = BAR(net.parameters(), torch.optim.SGD, mu0=0.5, model=net, lr=0.1, momentum=0.9)
    with pytest.raises(TypeError, match="closure"):
        opt.step()
    w = [p.detach().clone() for p in net.parameters()]
    x, y = _batch()
    (nn.functional.mse_loss(net(x), y) * float("inf")).backward()
    with pytest.warns(RuntimeWarning, match="non-finite"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(net.parameters(), w))
    assert opt.bar_step == 0 and not opt.state_dict()["state"]  # no momentum buffer either


class _ExplodingSGD(torch.optim.SGD):
    """Takes its step (weights and momentum change), then raises."""

    def step(self, closure=None):  # type: ignore[override]
        super().step(closure)
        raise KeyError("boom in the base step")


def test_exceptions_leave_the_weights() -> None:
    net = _lora_net()
    x, y = _batch()
    opt = BAR(net.parameters(), torch.optim.SGD, mu0=0.5, model=net, lr=0.1)
    w = [p.detach().clone() for p in net.parameters()]

    def failing():
        nn.functional.mse_loss(net(x), y).backward()
        raise KeyError("boom in the closure")

    with pytest.raises(KeyError, match="closure"):
        opt.step(failing)
    assert all(torch.equal(a, b) for a, b in zip(net.parameters(), w))

    # mu0 * lr = 0.999: factors 1.999 and 0.001, far from exactly invertible
    opt = BAR(net.parameters(), _ExplodingSGD, mu0=9.99, model=net, lr=0.1, momentum=0.9)
    opt.base_optimizer.step = torch.optim.SGD.step.__get__(opt.base_optimizer)  # one good step
    opt.step(lambda: nn.functional.mse_loss(net(x), y).backward())
    del opt.base_optimizer.step
    w = [p.detach().clone() for p in net.parameters()]
    state = {k: v["momentum_buffer"].clone() for k, v in opt.state.items()}
    with pytest.raises(KeyError, match="base step"):
        opt.step(lambda: nn.functional.mse_loss(net(x), y).backward())
    # restored from the transaction's copy: exactly, weights and momentum alike
    assert all(torch.equal(a, b) for a, b in zip(net.parameters(), w))
    assert all(torch.equal(opt.state[k]["momentum_buffer"], v) for k, v in state.items())
    assert opt.bar_step == 1


def test_grad_scaler_matches_unscaled_and_skips_inf() -> None:
    net, ref = _lora_net().float(), _lora_net().float()
    x, y = (t.float() for t in _batch())
    opt = BAR(net.parameters(), torch.optim.SGD, mu0=0.5, model=net, lr=0.05)
    ref_opt = BAR(ref.parameters(), torch.optim.SGD, mu0=0.5, model=ref, lr=0.05)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    for _ in range(3):
        opt.zero_grad()
        scaler.scale(nn.functional.mse_loss(net(x), y)).backward()
        scaler.step(opt)
        scaler.update()
        ref_opt.step(lambda: nn.functional.mse_loss(ref(x), y).backward())
    # a power-of-two scale is undone exactly: same steps bit for bit
    assert all(torch.equal(a, b) for a, b in zip(net.parameters(), ref.parameters()))
    w = [p.detach().clone() for p in net.parameters()]
    opt.zero_grad()
    scaler.scale(nn.functional.mse_loss(net(x), y) * float("inf")).backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # the scaler decides, no warning
        scaler.step(opt)
    scaler.update()
    assert all(torch.equal(a, b) for a, b in zip(net.parameters(), w))


def test_peft_model_pairs_are_scaled() -> None:
    peft = pytest.importorskip("peft")

    class Plain(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(5, 6), nn.Linear(6, 2)

        def forward(self, t: torch.Tensor) -> torch.Tensor:
            return self.fc2(torch.tanh(self.fc1(t)))

    torch.manual_seed(0)
    model = peft.get_peft_model(
        Plain(), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["fc1", "fc2"])
    )
    model = model.double()
    opt = BAR(model.parameters(), torch.optim.SGD, mu0=0.5, model=model, lr=0.1)
    assert len(opt.pairs) == 2
    x, y = _batch()
    pairs = find_pairs(model)
    before = [(p.x.detach().clone(), p.y.detach().clone()) for p in pairs]
    opt.step(lambda: nn.functional.mse_loss(model(x), y).backward())
    for p, (x0, y0) in zip(pairs, before):
        s = 1.0 if p.x.grad.norm() >= p.y.grad.norm() else -1.0
        assert torch.allclose(p.x, (1 + s * 0.05) * x0 - 0.1 * p.x.grad, atol=1e-15)
        assert torch.allclose(p.y, (1 - s * 0.05) * y0 - 0.1 * p.y.grad, atol=1e-15)


@pytest.mark.parametrize(("toy_name", "variant"), [("nop", "nbar"), ("op", "obar")])
def test_optimizer_matches_closed_form_toy_simulation(toy_name: str, variant: str) -> None:
    # BAR driven by autograd on the paper's toy == sharpkit.balance.toys.simulate, which
    # re-derives the same step from closed-form gradients (same noise draws).
    from sharpkit.balance.toys import NOPToy, OPToy, paper_init, simulate

    cls = NOPToy if toy_name == "nop" else OPToy
    kw = {"mu0": 2.0, "schedule": "linear"}
    run = simulate(
        cls(1.0, generator=torch.Generator().manual_seed(0)), variant, steps=60, lr=0.01, **kw
    )
    toy = cls(1.0, generator=torch.Generator().manual_seed(0))
    x0, y0 = paper_init()
    x, y = nn.Parameter(x0.clone()), nn.Parameter(y0.clone())
    opt = BAR(
        [x, y], torch.optim.SGD, variant=variant, total_steps=60, pairs=[(x, y)], lr=0.01, **kw
    )
    for _ in range(60):
        target = toy.sample_target((1,))[0]
        opt.step(lambda target=target: toy.loss_at(x, y, target).backward())
    assert torch.allclose(x.detach(), run.x[0], rtol=0, atol=1e-12)
    assert torch.allclose(y.detach(), run.y[0], rtol=0, atol=1e-12)
    assert abs(run.balancedness[-1, 0]) < 0.5 * abs(run.balancedness[0, 0])  # it did balance


@pytest.mark.parametrize("variant", ["nbar", "obar"])
def test_the_sign_rule_is_the_same_on_tensors_and_on_host_floats(variant: str) -> None:
    g = torch.Generator().manual_seed(0)
    first = torch.randint(0, 4, (64,), generator=g).float()  # many ties
    second = torch.randint(0, 4, (64,), generator=g).float()
    on_tensors = bar_signs(variant, first, second)
    on_host = bar_signs(variant, first.tolist(), second.tolist())
    assert on_tensors.tolist() == on_host
    tie = first == second
    assert (on_tensors[tie] == (1.0 if variant == "nbar" else -1.0)).all()  # ties: first branch
    with pytest.raises(ValueError, match="variant"):
        bar_signs("sam", [1.0], [2.0])
