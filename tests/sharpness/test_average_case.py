"""Average-case sharpness against (rho^2 / 2) sum_i A_ii c_i^2 and rescaling invariance."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sharpkit.sharpness import average_case_sharpness
from tests.sharpness._models import Quadratic, class_data, quad_loss, random_psd, relu_net, rescaled

X = torch.zeros(1, 1, dtype=torch.float64)


@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("noise,factor", [("gaussian", 1.0), ("uniform", 1.0 / 3.0)])
def test_quadratic_closed_form(adaptive, noise, factor) -> None:
    A = random_psd(5, seed=4)
    center = torch.tensor([1.0, -0.5, 2.0, 0.3, -1.5], dtype=torch.float64)
    rho = 0.2
    r = average_case_sharpness(
        Quadratic(A, center), quad_loss, X, rho, noise=noise, adaptive=adaptive,
        samples=2000, seed=0,
    )  # fmt: skip
    c = center.abs() if adaptive else torch.ones(5, dtype=torch.float64)
    exact = factor * 0.5 * rho**2 * float((torch.diagonal(A) * c**2).sum())
    # Monte Carlo: within 4 standard errors (a false failure has probability ~6e-5),
    # and the standard error itself is small relative to the value
    assert abs(r.value - exact) <= 4 * r.stderr
    assert r.stderr < 0.05 * exact
    assert r.cost.forward == 2001


def test_adaptive_invariant_to_relu_rescaling_plain_not() -> None:
    net, data = relu_net(), class_data()
    other = rescaled(net, 3.0)
    kw = dict(samples=16, seed=1)
    a1 = average_case_sharpness(net, nn.CrossEntropyLoss(), data, 0.1, adaptive=True, **kw)
    a2 = average_case_sharpness(other, nn.CrossEntropyLoss(), data, 0.1, adaptive=True, **kw)
    assert a1.value == pytest.approx(a2.value, rel=1e-9)
    p1 = average_case_sharpness(net, nn.CrossEntropyLoss(), data, 0.1, **kw)
    p2 = average_case_sharpness(other, nn.CrossEntropyLoss(), data, 0.1, **kw)
    assert abs(p1.value - p2.value) > 0.05 * max(abs(p1.value), abs(p2.value))


def test_multi_batch_equals_single_batch() -> None:
    net, (x, y) = relu_net(), class_data(n=60)
    one = average_case_sharpness(net, nn.CrossEntropyLoss(), (x, y), 0.1, samples=4, seed=3)
    parts = [(x[:25], y[:25]), (x[25:], y[25:])]
    two = average_case_sharpness(net, nn.CrossEntropyLoss(), parts, 0.1, samples=4, seed=3)
    assert two.value == pytest.approx(one.value, rel=1e-9)
    assert two.protocol.batches == 2


def test_bad_noise() -> None:
    with pytest.raises(ValueError, match="noise"):
        average_case_sharpness(relu_net(), nn.CrossEntropyLoss(), class_data(), 0.1, noise="x")
