"""LoRALinear and add_lora against a plain re-derivation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sharpkit.balance import LoRALinear, add_lora


def test_forward_matches_dense_formula() -> None:
    g = torch.Generator().manual_seed(0)
    layer = LoRALinear(5, 4, rank=3, alpha=6.0, generator=g, dtype=torch.float64)
    with torch.no_grad():
        layer.lora_B.normal_(generator=g)
    x = torch.randn(7, 5, generator=g, dtype=torch.float64)
    w = layer.base.weight + (6.0 / 3) * layer.lora_B @ layer.lora_A
    expected = x @ w.T + layer.base.bias
    assert torch.allclose(layer(x), expected, rtol=0, atol=1e-12)
    assert torch.allclose(layer.delta_weight(), w - layer.base.weight, atol=1e-14)


def test_init_and_trainability() -> None:
    layer = LoRALinear(6, 2, generator=torch.Generator().manual_seed(0))
    assert layer.lora_A.shape == (8, 6) and layer.lora_B.shape == (2, 8)
    assert torch.count_nonzero(layer.lora_B) == 0 and torch.count_nonzero(layer.lora_A) > 0
    assert not layer.base.weight.requires_grad and not layer.base.bias.requires_grad
    a1 = LoRALinear(6, 2, generator=torch.Generator().manual_seed(3)).lora_A
    a2 = LoRALinear(6, 2, generator=torch.Generator().manual_seed(3)).lora_A
    assert torch.equal(a1, a2)  # seeded


def test_wraps_existing_base() -> None:
    base = nn.Linear(3, 2)
    layer = LoRALinear(3, 2, rank=1, base=base)
    assert layer.base is base and not base.weight.requires_grad
    with pytest.raises(ValueError, match="base"):
        LoRALinear(4, 2, base=nn.Linear(3, 2))
    with pytest.raises(TypeError, match="base"):
        LoRALinear(3, 2, base=nn.Conv1d(3, 2, 1))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kw", "exc", "word"),
    [
        ({"rank": 0}, ValueError, "rank"),
        ({"rank": 2.0}, TypeError, "rank"),
        ({"alpha": float("nan")}, ValueError, "alpha"),
        ({"in_features": -1}, ValueError, "in_features"),
    ],
)
def test_bad_arguments(kw, exc, word) -> None:
    args = {"in_features": 3, "out_features": 2, **kw}
    with pytest.raises(exc, match=word):
        LoRALinear(**args)


def test_add_lora_replaces_and_freezes() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Sequential(nn.Linear(8, 8)), nn.Linear(8, 2))
    x = torch.randn(3, 4)
    before = net(x)
    add_lora(net, ["0", "2.0"], rank=2, alpha=4.0, generator=torch.Generator().manual_seed(1))
    assert isinstance(net[0], LoRALinear) and isinstance(net[2][0], LoRALinear)
    assert isinstance(net[3], nn.Linear) and not isinstance(net[3], LoRALinear)
    trainable = sorted(n for n, p in net.named_parameters() if p.requires_grad)
    assert trainable == ["0.lora_A", "0.lora_B", "2.0.lora_A", "2.0.lora_B"]
    assert torch.equal(net(x), before)  # B = 0 at init


def test_add_lora_errors() -> None:
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU())
    with pytest.raises(ValueError, match="target_modules"):
        add_lora(net, ["fc"])
    with pytest.raises(TypeError, match="target_modules"):
        add_lora(net, ["1"])
