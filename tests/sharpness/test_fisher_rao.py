"""Fisher-Rao norm against a plain per-example autograd re-derivation and Liang et al.'s
(L + 1) <dl/df, f> identity for bias-free ReLU networks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sharpkit.sharpness import fisher_rao_norm
from tests.sharpness._models import class_data, relu_net, rescaled


def _reference(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    params = list(net.parameters())
    vals = []
    for i in range(x.shape[0]):
        loss = nn.functional.cross_entropy(net(x[i : i + 1]), y[i : i + 1])
        grads = torch.autograd.grad(loss, params)
        vals.append(sum((p * g).sum() for p, g in zip(params, grads)).detach() ** 2)
    return float(torch.stack(vals).mean().sqrt())


def test_matches_per_example_autograd() -> None:
    net, (x, y) = relu_net(), class_data(n=32)
    data = [(x[:20], y[:20]), (x[20:], y[20:])]
    r = fisher_rao_norm(net, nn.CrossEntropyLoss(), data)
    assert r.value == pytest.approx(_reference(net, x, y), rel=1e-10)
    assert r.cost.jvp == 2 and r.cost.gradient == 0


def test_relu_identity_and_rescaling_invariance() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Linear(5, 8, bias=False), nn.ReLU(), nn.Linear(8, 6, bias=False), nn.ReLU(),
        nn.Linear(6, 3, bias=False),
    ).double()  # fmt: skip
    x, y = class_data(n=40)
    f = net(x).detach().requires_grad_(True)
    dl_df = torch.autograd.grad(nn.functional.cross_entropy(f, y, reduction="sum"), f)[0]
    expected = float((((2 + 1) * (dl_df * f.detach()).sum(dim=1)) ** 2).mean().sqrt())
    r = fisher_rao_norm(net, nn.CrossEntropyLoss(), (x, y))
    assert r.value == pytest.approx(expected, rel=1e-10)
    other = rescaled(relu_net(1), 2.5)
    assert fisher_rao_norm(other, nn.CrossEntropyLoss(), (x, y)).value == pytest.approx(
        fisher_rao_norm(relu_net(1), nn.CrossEntropyLoss(), (x, y)).value, rel=1e-9
    )


def test_model_fisher_and_errors() -> None:
    net, data = relu_net(), class_data()
    r = fisher_rao_norm(net, nn.CrossEntropyLoss(), data, fisher="model", seed=0)
    assert r.value > 0 and r.protocol.seed == 0
    with pytest.raises(ValueError, match="fisher"):
        fisher_rao_norm(net, nn.MSELoss(), data, fisher="model")
    with pytest.raises(ValueError, match="per-example"):
        fisher_rao_norm(net, lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1]), data)
