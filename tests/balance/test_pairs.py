"""Factor pairs, balancedness and the gradient gap against hand computations."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sharpkit.balance import FactorPair, LoRALinear, balancedness, find_pairs, gradient_gap


def test_balancedness_and_gap_by_hand() -> None:
    x = torch.tensor([[1.0, 2.0], [0.0, 2.0]], requires_grad=True)  # ||x||^2 = 9
    y = torch.tensor([[1.0, 1.0]], requires_grad=True)  # ||y||^2 = 2
    pair = FactorPair("p", x, y)
    assert balancedness(pair) == 3.5
    with pytest.raises(ValueError, match="gradient"):
        gradient_gap(pair)
    (3.0 * x.sum() + 0.5 * y.sum()).backward()  # g_x = 3 (4 entries), g_y = 0.5 (2 entries)
    assert gradient_gap(pair) == pytest.approx(36.0 - 0.5, abs=1e-12)
    assert gradient_gap((x, y)) == gradient_gap(pair)


def test_factor_pair_validation() -> None:
    t = torch.zeros(2)
    with pytest.raises(TypeError, match="x"):
        FactorPair("p", [1.0], t)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="different"):
        FactorPair("p", t, t)
    with pytest.raises(TypeError, match="pair"):
        balancedness([t, t])  # type: ignore[arg-type]


def test_find_pairs_sharpkit_lora() -> None:
    g = torch.Generator().manual_seed(0)
    net = nn.Sequential(LoRALinear(4, 8, rank=2, generator=g), nn.ReLU(), nn.Linear(8, 2))
    pairs = find_pairs(net)
    assert [p.name for p in pairs] == ["0"]
    assert pairs[0].x is net[0].lora_B and pairs[0].y is net[0].lora_A
    net[0].lora_A.requires_grad_(False)
    assert find_pairs(net) == []
    assert len(find_pairs(net, trainable_only=False)) == 1
    assert find_pairs(nn.Linear(2, 2)) == []


class _Plain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.act = nn.Tanh()
        self.fc2 = nn.Linear(8, 3)
        self.emb = nn.Embedding(10, 6)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(self.emb(idx))))


def test_find_pairs_peft_lora() -> None:
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    model = peft.get_peft_model(
        _Plain(), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["fc1", "fc2", "emb"])
    )
    pairs = find_pairs(model)
    names = sorted(p.name for p in pairs)
    assert names == sorted(f"base_model.model.{m}.default" for m in ("fc1", "fc2", "emb")), names
    by_name = {p.name.split(".")[-2]: p for p in pairs}
    fc1 = model.base_model.model.fc1
    assert by_name["fc1"].x is fc1.lora_B["default"].weight
    assert by_name["fc1"].y is fc1.lora_A["default"].weight
    emb = model.base_model.model.emb
    assert by_name["emb"].x is emb.lora_embedding_B["default"]
    # the product x y is the layer's update: it has the base weight's shape
    for m, p in by_name.items():
        base = getattr(model.base_model.model, m).base_layer.weight
        prod = p.x @ p.y
        assert prod.shape == (base.shape if m != "emb" else base.T.shape)
    # the trainable set of the PEFT model is exactly the discovered factors
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(t) for p in pairs for t in (p.x, p.y)}
