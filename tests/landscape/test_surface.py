"""Surfaces against closed forms on a quadratic and a plain re-derivation; interpolation
with BatchNorm statistics."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from sharpkit.landscape import interpolate_checkpoints, loss_surface_1d, loss_surface_2d
from tests.sharpness._models import Quadratic, quad_loss, random_psd

X = torch.zeros(1, 1, dtype=torch.float64)


def test_quadratic_surfaces_closed_form() -> None:
    A = random_psd(4, seed=0)
    center = torch.tensor([1.0, 2.0, -1.0, 0.5], dtype=torch.float64)
    model = Quadratic(A, center)
    g = torch.Generator().manual_seed(1)
    d1 = torch.randn(4, generator=g, dtype=torch.float64)
    d2 = torch.randn(4, generator=g, dtype=torch.float64)
    s1 = loss_surface_1d(model, quad_loss, X, {"theta": d1}, steps=7, span=(-2.0, 2.0))
    assert s1.accuracy is None
    torch.testing.assert_close(s1.loss, 0.5 * s1.coords[0] ** 2 * float(d1 @ A @ d1))
    s2 = loss_surface_2d(model, quad_loss, X, [{"theta": d1}, {"theta": d2}], steps=(3, 5))
    xs, ys = s2.coords
    for i, a in enumerate(xs):
        for j, b in enumerate(ys):
            e = a * d1 + b * d2
            assert float(s2.loss[i, j]) == pytest.approx(
                0.5 * float(e @ A @ e), rel=1e-12, abs=1e-15
            )


def test_surface_matches_manual_perturbation_and_accuracy() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(50, 4, generator=g), torch.randint(0, 3, (50,), generator=g)
    d = {n: torch.randn(p.shape, generator=g) for n, p in net.named_parameters()}
    data = [(x[:30], y[:30]), (x[30:], y[30:])]
    s = loss_surface_1d(net, nn.CrossEntropyLoss(), data, d, steps=3, span=(-0.5, 0.5))
    for a, loss, acc in zip(s.coords[0].tolist(), s.loss, s.accuracy):
        ref = copy.deepcopy(net)
        with torch.no_grad():
            for n, p in ref.named_parameters():
                p.add_(a * d[n])
            out = ref(x)
        assert float(loss) == pytest.approx(float(nn.functional.cross_entropy(out, y)), rel=1e-5)
        assert float(acc) == pytest.approx(float((out.argmax(1) == y).float().mean()), abs=1e-6)


def test_bad_direction() -> None:
    net = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="direction"):
        loss_surface_1d(
            net, nn.MSELoss(), (torch.zeros(3, 2), torch.zeros(3, 2)), {"nope": torch.zeros(1)}
        )
    with pytest.raises(ValueError, match="steps"):
        loss_surface_1d(net, nn.MSELoss(), (torch.zeros(3, 2), torch.zeros(3, 2)), {}, steps=1)


def test_interpolation_includes_batchnorm_statistics() -> None:
    torch.manual_seed(0)

    def make() -> nn.Module:
        return nn.Sequential(nn.Linear(3, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 2))

    a, b = make(), make()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 3, generator=g), torch.randint(0, 2, (40,), generator=g)
    for net, shift in ((a, 0.0), (b, 2.0)):  # different running statistics
        net.train()
        with torch.no_grad():
            for _ in range(5):
                net(x + shift)
        net.eval()
    s = interpolate_checkpoints(
        a, a.state_dict(), b.state_dict(), nn.CrossEntropyLoss(), (x, y), steps=5
    )
    for t, loss in zip(s.coords[0].tolist(), s.loss):
        ref = make()
        ref.load_state_dict(
            {
                k: (1 - t) * va + t * b.state_dict()[k] if va.is_floating_point() else va
                for k, va in a.state_dict().items()
            }
        )
        ref.eval()
        with torch.no_grad():
            expected = float(nn.functional.cross_entropy(ref(x), y))
        assert float(loss) == pytest.approx(expected, rel=1e-5)
    assert a.training is False and float(s.loss[0]) != float(s.loss[-1])
    with pytest.raises(ValueError, match="state_b"):
        interpolate_checkpoints(
            a, a.state_dict(), {"x": torch.zeros(1)}, nn.CrossEntropyLoss(), (x, y)
        )
