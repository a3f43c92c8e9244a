"""The course's reference solutions against independent references.

Each solution in ``sharpkit.course.solutions`` is written from the definition in
plain torch; here it is compared with sharpkit's own implementation (the optimizers,
the metrics), a dense float64 computation or a closed form. ``check`` itself is
tested on right, wrong and missing answers.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from sharpkit.course import EXERCISES, check
from sharpkit.course import solutions as sol

F64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _spd(seed: int, d: int) -> torch.Tensor:
    g = _gen(seed)
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=F64))
    return Q @ torch.diag(torch.rand(d, generator=g, dtype=F64) * 3 + 0.1) @ Q.T


# --- 01 --------------------------------------------------------------------------


def test_sam_perturbation_is_sams_step() -> None:
    from sharpkit.optim import SAM

    A = _spd(0, 4)
    w = nn.Parameter(torch.randn(4, generator=_gen(1), dtype=F64))
    w0 = w.detach().clone()
    lr, rho = 0.1, 0.2
    opt = SAM([w], torch.optim.SGD, rho=rho, lr=lr)

    def closure():
        loss = 0.5 * w @ A @ w
        loss.backward()
        return loss

    opt.step(closure)
    (e,) = sol.sam_perturbation([A @ w0], rho)
    torch.testing.assert_close(w.detach(), w0 - lr * A @ (w0 + e), rtol=0, atol=1e-13)
    assert all(torch.equal(t, torch.zeros(3)) for t in sol.sam_perturbation([torch.zeros(3)], 1))


def test_asam_perturbation_is_asams_step() -> None:
    from sharpkit.optim import ASAM

    torch.manual_seed(0)
    lin = nn.Linear(3, 2).double()
    x = torch.randn(8, 3, generator=_gen(2), dtype=F64)
    y = torch.randn(8, 2, generator=_gen(3), dtype=F64)
    loss_of = lambda ps: ((torch.func.functional_call(lin, ps, (x,)) - y) ** 2).mean()  # noqa: E731
    w0 = {k: v.detach().clone() for k, v in lin.named_parameters()}
    ps = {k: v.clone().requires_grad_(True) for k, v in w0.items()}
    g = torch.autograd.grad(loss_of(ps), list(ps.values()))
    e = sol.asam_perturbation(list(w0.values()), g, rho=0.5, xi=0.01)
    shifted = {k: (v + d).requires_grad_(True) for (k, v), d in zip(w0.items(), e)}
    g_pert = torch.autograd.grad(loss_of(shifted), list(shifted.values()))
    opt = ASAM(lin.parameters(), torch.optim.SGD, rho=0.5, xi=0.01, lr=0.1)
    if "adaptive_bias" not in opt.param_groups[0]:  # T_w on weights only is issue 16's change
        pytest.skip("this ASAM scales biases by T_w too (before the weights-only default)")

    def closure():
        loss = ((lin(x) - y) ** 2).mean()
        loss.backward()
        return loss

    opt.step(closure)
    for (name, p), gp in zip(lin.named_parameters(), g_pert):
        torch.testing.assert_close(p.detach(), w0[name] - 0.1 * gp, rtol=0, atol=1e-13)


@pytest.mark.parametrize(("lam", "eta", "rho"), [(2.0, 0.3, 0.1), (1.0, 1.2, 0.05)])
def test_two_cycle_amplitude_is_where_sam_ends(lam: float, eta: float, rho: float) -> None:
    from sharpkit.optim import SAM

    w = nn.Parameter(torch.tensor([0.7], dtype=F64))
    opt = SAM([w], torch.optim.SGD, rho=rho, lr=eta)

    def closure():
        loss = 0.5 * lam * (w**2).sum()
        loss.backward()
        return loss

    for _ in range(300):
        opt.step(closure)
    assert abs(abs(float(w.detach())) - sol.two_cycle_amplitude(lam, eta, rho)) < 1e-10


# --- 02 --------------------------------------------------------------------------


def test_hvp_matches_dense_hessian() -> None:
    g = _gen(4)
    A, b = _spd(5, 5), torch.randn(5, generator=g, dtype=F64)
    loss = lambda x: 0.5 * x @ A @ x + torch.log1p(torch.exp(b @ x)) + (x**4).sum() / 12  # noqa: E731
    w, v = torch.randn(5, generator=g, dtype=F64), torch.randn(5, generator=g, dtype=F64)
    H = torch.func.hessian(loss)(w)
    torch.testing.assert_close(
        sol.hessian_vector_product(loss, w, v), H @ v, rtol=1e-12, atol=1e-12
    )


def test_hutchinson_is_unbiased_with_the_right_error() -> None:
    A = _spd(6, 10)
    est, err = zip(*(sol.hutchinson_trace(lambda z: A @ z, 10, 40, _gen(s)) for s in range(200)))
    est, err = torch.tensor(est), torch.tensor(err)
    exact_sd = math.sqrt(2 * (float((A**2).sum()) - float((A.diag() ** 2).sum())) / 40)
    assert abs(float(est.mean()) - float(A.trace())) < 4 * exact_sd / math.sqrt(200)
    assert 0.8 < float(est.std()) / exact_sd < 1.2  # spread over seeds = theory
    assert 0.8 < float(err.mean()) / exact_sd < 1.2  # reported stderr = theory


def test_lanczos_quadrature_integrates_polynomials() -> None:
    g = _gen(7)
    alpha, beta = torch.rand(6, generator=g, dtype=F64) * 4, torch.rand(5, generator=g, dtype=F64)
    T = torch.diag(alpha) + torch.diag(beta, 1) + torch.diag(beta, -1)
    nodes, weights = sol.lanczos_quadrature(alpha, beta)
    for k in range(8):  # e1^T T^k e1 = sum_j w_j theta_j^k
        exact = float(torch.linalg.matrix_power(T, k)[0, 0])
        assert abs(float((weights * nodes**k).sum()) - exact) < 1e-10 * max(1.0, abs(exact))


# --- 03 --------------------------------------------------------------------------


class _Quadratic(nn.Module):
    def __init__(self, A: torch.Tensor) -> None:
        super().__init__()
        self.theta = nn.Parameter(torch.zeros(len(A), dtype=F64))
        self.register_buffer("A", A)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * self.theta @ self.A @ self.theta + 0.0 * x.sum()


def test_quadratic_sharpness_matches_the_metrics() -> None:
    from sharpkit.sharpness import average_case_sharpness, worst_case_sharpness

    A, rho = _spd(8, 5), 0.2
    model, loss, x = _Quadratic(A), (lambda m, b: m(b)), torch.zeros(1, 1, dtype=F64)
    worst, avg = sol.quadratic_sharpness(A, rho)
    assert abs(worst_case_sharpness(model, loss, x, rho, steps=100).value - worst) < 1e-4 * worst
    res = average_case_sharpness(model, loss, x, rho, samples=4000)
    assert abs(res.value - avg) < 4 * res.stderr


def test_filter_normalize_matches_sharpkits_directions() -> None:
    from sharpkit.landscape import filter_normalized_direction

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(12, 4))
    direction = filter_normalized_direction(net, seed=0)
    for name, w in net.named_parameters():
        d = direction[name]
        # sharpkit's direction already has the weight's filter norms: normalising is idempotent
        torch.testing.assert_close(sol.filter_normalize(d, w.detach()), d)
    W = net[3].weight.detach()
    Z = torch.randn(W.shape, generator=_gen(9))
    D = sol.filter_normalize(Z, W)
    torch.testing.assert_close(D.norm(dim=1), W.norm(dim=1))
    torch.testing.assert_close(nn.functional.cosine_similarity(D, Z, dim=1), torch.ones(4))


# --- 04 --------------------------------------------------------------------------


def test_balancedness_matches_sharpkit() -> None:
    from sharpkit.balance import balancedness

    g = _gen(10)
    x, y = torch.randn(4, 2, generator=g), torch.randn(3, 2, generator=g)
    assert abs(sol.balancedness(x, y) - balancedness((x, y))) < 1e-6


def _one_sam_step_drift(rho: float, eta: float = 1e-9) -> tuple[float, float]:
    """(B_1 - B_0) / eta of one SAM step on 0.5 ||x y^T - M||^2, and Theorem 2's term."""
    from sharpkit.optim import SAM

    g = _gen(11)
    M = torch.randn(3, 4, generator=g, dtype=F64)
    x = nn.Parameter(torch.randn(3, 2, generator=g, dtype=F64))
    y = nn.Parameter(torch.randn(4, 2, generator=g, dtype=F64))
    G = (x @ y.T - M).detach()  # grad of the loss w.r.t. the product
    predicted = sol.nop_sam_drift(G, x.detach(), y.detach(), rho)
    b0 = sol.balancedness(x.detach(), y.detach())
    opt = SAM([x, y], torch.optim.SGD, rho=rho, lr=eta)

    def closure():
        loss = 0.5 * ((x @ y.T - M) ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return (sol.balancedness(x.detach(), y.detach()) - b0) / eta, predicted


def test_nop_drift_is_the_leading_term_of_a_sam_step() -> None:
    """The remainder of Theorem 2 is O(rho^2): 10x smaller rho, ~100x smaller error."""
    errors = []
    for rho in (1e-1, 1e-2):
        measured, predicted = _one_sam_step_drift(rho)
        errors.append(abs(measured - predicted))
    assert errors[1] < errors[0] / 30
    measured, predicted = _one_sam_step_drift(1e-3)
    assert abs(measured - predicted) < 1e-3 * abs(predicted)


@pytest.mark.parametrize("bigger", ["x", "y"])
def test_nbar_scale_is_bars_rescaling(bigger: str) -> None:
    from sharpkit.optim import BAR

    g = _gen(12)
    x = nn.Parameter(torch.randn(3, 2, generator=g, dtype=F64))
    y = nn.Parameter(torch.randn(4, 2, generator=g, dtype=F64))
    scale = (3.0, 0.2) if bigger == "x" else (0.2, 3.0)
    gx_t = scale[0] * torch.randn(3, 2, generator=g, dtype=F64)
    gy_t = scale[1] * torch.randn(4, 2, generator=g, dtype=F64)
    x0, y0 = x.detach().clone(), y.detach().clone()
    lr, a = 0.05, 0.5
    opt = BAR([x, y], torch.optim.SGD, variant="nbar", mu0=a, pairs=[(x, y)], lr=lr)

    def closure():  # a linear loss: the gradients are gx_t, gy_t
        loss = (x * gx_t).sum() + (y * gy_t).sum()
        loss.backward()
        return loss

    opt.step(closure)
    xs, ys = sol.nbar_scale(x0, y0, gx_t, gy_t, a, lr)
    torch.testing.assert_close(x.detach(), xs - lr * gx_t, rtol=0, atol=1e-13)
    torch.testing.assert_close(y.detach(), ys - lr * gy_t, rtol=0, atol=1e-13)


# --- 05 --------------------------------------------------------------------------


def _classifier(seed: int):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).to(F64)
    g = _gen(seed)
    return model, (
        torch.randn(22, 5, generator=g, dtype=F64),
        torch.randint(0, 3, (22,), generator=g),
    )


@pytest.mark.parametrize("m", [1, 4])
def test_msam_gradient_is_msams_update(m: int) -> None:
    from sharpkit.optim import MSAM

    model, batch = _classifier(13)
    ce = nn.CrossEntropyLoss()
    w0 = [p.detach().clone() for p in model.parameters()]
    G = sol.msam_gradient(model, lambda mdl, b: ce(mdl(b[0]), b[1]), batch, 0.05, m)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), w0)), "weights restored"
    opt = MSAM(model.parameters(), torch.optim.SGD, rho=0.05, micro_batches=m, model=model, lr=1.0)
    opt.step(loss_fn=ce, batch=batch)
    for p, p0, g in zip(model.parameters(), w0, G):
        torch.testing.assert_close(p.detach(), p0 - g, rtol=1e-10, atol=1e-12)


def test_unguardedness_matches_delta_sam() -> None:
    from sharpkit.optim import DeltaSAM

    model, batch = _classifier(14)

    def per_example(mdl, b):
        return nn.functional.cross_entropy(mdl(b[0]), b[1], reduction="none")

    params = list(model.parameters())
    rows = []
    for i in range(len(batch[1])):  # per-example gradients by a plain loop
        gi = torch.autograd.grad(
            per_example(model, (batch[0][i : i + 1], batch[1][i : i + 1]))[0], params
        )
        rows.append(torch.cat([t.flatten() for t in gi]))
    u = sol.unguardedness(torch.stack(rows))
    opt = DeltaSAM(params, torch.optim.SGD, rho=0.05, model=model, mode="exact", lr=0.0)
    opt.step(loss_fn=per_example, batch=batch)
    torch.testing.assert_close(u, opt.last_stats.unguardedness.to(F64), rtol=1e-8, atol=1e-10)


# --- check() ------------------------------------------------------------------------


@pytest.mark.parametrize("exercise", sorted(EXERCISES))
def test_check_accepts_the_solution(exercise: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert check(exercise, EXERCISES[exercise].solution)
    assert "correct" in capsys.readouterr().out


def test_check_reports_wrong_missing_and_crashing_answers(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert not check("04.1", lambda x, y: float((x**2).sum() - (y**2).sum()))  # forgot the 1/2
    assert "largest difference" in capsys.readouterr().out
    assert not check("04.1", None)
    assert "not attempted" in capsys.readouterr().out
    assert not check("04.1", lambda x, y: 1 / 0)
    assert "ZeroDivisionError" in capsys.readouterr().out
    assert not check("05.2", lambda G: 1 - G.sum(1))  # wrong shape-compatible answer
    with pytest.raises(KeyError, match="exercise"):
        check("99.9", None)
