"""PAC-Bayes flatness: bisection against closed forms on quadratics."""

from __future__ import annotations

import math

import pytest
import torch
from scipy.optimize import brentq
from torch import nn

from sharpkit.sharpness import pac_bayes_flatness
from sharpkit.sharpness.pac_bayes import MAGNITUDE_EPS
from tests.sharpness._models import Quadratic, class_data, quad_loss, random_psd, relu_net

X = torch.zeros(1, 1, dtype=torch.float64)


def _noise(seed: int, samples: int, n: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, generator=g, dtype=torch.float64) for _ in range(samples)]


@pytest.mark.parametrize("magnitude_aware", [False, True])
def test_loss_target_matches_closed_form(magnitude_aware) -> None:
    # with the same draws z, the mean increase is exactly
    #   plain: sigma^2 K,  K = mean_s z_s^T A z_s / 2
    #   magnitude-aware: mean_s 0.5 (s_s)^T A (s_s),  s_i = z_i sqrt(sigma^2 w_i^2 + eps^2),
    #   whose root in sigma is found independently by Brent's method
    A = random_psd(4, seed=5)
    center = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.float64)
    delta, samples = 0.01, 4
    r = pac_bayes_flatness(
        Quadratic(A, center), quad_loss, X, target="loss", max_drop=delta,
        magnitude_aware=magnitude_aware, samples=samples, rtol=1e-6, seed=7,
    )  # fmt: skip
    zs = _noise(7, samples, 4)
    if not magnitude_aware:
        K = sum(0.5 * float(z @ A @ z) for z in zs) / samples
        exact = math.sqrt(delta / K)
    else:

        def increase(sigma: float) -> float:
            scale = torch.sqrt(sigma**2 * center**2 + MAGNITUDE_EPS**2)
            return sum(0.5 * float((z * scale) @ A @ (z * scale)) for z in zs) / samples

        exact = brentq(lambda s: increase(s) - delta, 1e-8, 10.0, xtol=1e-14)
    assert r.details["converged"]
    assert r.details["sigma"] <= exact <= r.details["sigma_upper"]
    assert r.details["sigma"] == pytest.approx(exact, rel=2e-6)
    assert r.value == pytest.approx(1 / r.details["sigma"] ** 2)


def test_accuracy_target_on_a_net() -> None:
    net, data = relu_net(), class_data(n=128)
    r = pac_bayes_flatness(net, nn.CrossEntropyLoss(), data, samples=4, seed=0)
    assert r.details["converged"]
    evals = dict(r.details["evaluations"])
    assert evals[r.details["sigma"]] <= 0.1 < evals[r.details["sigma_upper"]]
    assert r.cost.forward == 1 + 4 * len(evals)


def test_bad_target() -> None:
    with pytest.raises(ValueError, match="target"):
        pac_bayes_flatness(relu_net(), nn.CrossEntropyLoss(), class_data(), target="x")
