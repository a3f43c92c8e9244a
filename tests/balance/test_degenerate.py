"""zero_factors / warn_zero_factors: fresh LoRA (lora_B = 0) makes scale-relative
measurements exactly flat, and sharpkit says so."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from sharpkit.balance import (
    FactorPair,
    ZeroFactorWarning,
    add_lora,
    warn_zero_factors,
    zero_factors,
)
from sharpkit.landscape import filter_normalized_direction


def _net() -> nn.Module:
    g = torch.Generator().manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2))
    return add_lora(net, ["0", "2"], rank=2, generator=g)


def test_fresh_lora_b_factors_are_found_by_name() -> None:
    net = _net()
    assert zero_factors(net) == ["0.lora_B", "2.lora_B"]
    with torch.no_grad():
        net[0].lora_B.fill_(0.5)
    assert zero_factors(net) == ["2.lora_B"]
    with torch.no_grad():
        net[2].lora_B[0, 0] = 1e-30  # one non-zero entry is enough
    assert zero_factors(net) == []
    # explicit pairs: names from the pair
    x, y = torch.zeros(3), torch.ones(3)
    assert zero_factors([FactorPair("op", x, y)]) == ["op.x"]
    assert zero_factors([(y, x)]) == ["pair0.y"]
    assert zero_factors(nn.Linear(2, 2)) == []  # no pair, nothing to say


def test_the_degeneracy_is_real_filter_normalised_landscape_is_flat() -> None:
    """The claim the warning makes: along a filter-normalised direction the
    adapter's loss is exactly constant while B = 0, and not once B != 0."""
    net = _net().double()
    x = torch.randn(16, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    def losses_along(d: dict[str, torch.Tensor]) -> list[float]:
        params = dict(net.named_parameters())
        w0 = {n: params[n].detach().clone() for n in d}
        out = []
        for t in (-1.0, -0.3, 0.0, 0.4, 1.0):
            with torch.no_grad():
                for n in d:
                    params[n].copy_(w0[n] + t * d[n])
                out.append(float(net(x).square().mean()))
        with torch.no_grad():
            for n in d:
                params[n].copy_(w0[n])
        return out

    with pytest.warns(ZeroFactorWarning, match="filter-normalised direction is degenerate"):
        d = filter_normalized_direction(net, seed=0)
    assert d["0.lora_B"].abs().sum() == 0 and d["0.lora_A"].abs().sum() > 0
    flat = losses_along(d)
    assert len(set(flat)) == 1  # exactly flat
    with torch.no_grad():
        for m in (net[0], net[2]):
            m.lora_B.normal_(std=0.5, generator=torch.Generator().manual_seed(2))
    assert zero_factors(net) == []
    assert len(set(losses_along(filter_normalized_direction(net, seed=0)))) == 5


def test_warning_names_the_factors_and_the_remedy() -> None:
    net = _net()
    with pytest.warns(ZeroFactorWarning, match="worst_case_adaptive is degenerate: 2 LoRA") as rec:
        names = warn_zero_factors(net, "worst_case_adaptive")
    assert names == ["0.lora_B", "2.lora_B"]
    msg = str(rec[0].message)
    assert "0.lora_B, 2.lora_B" in msg and "merge_and_unload" in msg
    with torch.no_grad():
        net[0].lora_B.fill_(1.0)
        net[2].lora_B.fill_(1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert warn_zero_factors(net, "worst_case_adaptive") == []
    with pytest.raises(ValueError, match="what:"):
        warn_zero_factors(net, "")


def test_peft_fresh_adapter() -> None:
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(
        n_layer=1, n_embd=8, n_head=2, vocab_size=16, n_positions=8, bos_token_id=0, eos_token_id=0
    )
    pm = peft.get_peft_model(
        transformers.GPT2LMHeadModel(cfg),
        peft.LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True),
    )
    assert zero_factors(pm) == [
        "base_model.model.transformer.h.0.attn.c_attn.lora_B.default.weight"
    ]


def test_the_degeneracy_is_real_adaptive_sharpness_is_zero() -> None:
    from sharpkit.sharpness import average_case_sharpness

    net = _net().double()
    g = torch.Generator().manual_seed(3)
    data = (torch.randn(32, 3, generator=g, dtype=torch.float64),
            torch.randn(32, 2, generator=g, dtype=torch.float64))  # fmt: skip
    with pytest.warns(ZeroFactorWarning, match="average_case_adaptive is degenerate"):
        fresh = average_case_sharpness(net, nn.MSELoss(), data, 0.5, adaptive=True, samples=4)
    assert fresh.value == 0.0  # c = |w| does not move B = 0; moving A leaves B A = 0
    plain = average_case_sharpness(net, nn.MSELoss(), data, 0.5, adaptive=False, samples=4)
    assert plain.value != 0.0
    with torch.no_grad():
        net[0].lora_B.normal_(generator=g)
        net[2].lora_B.normal_(generator=g)
    trained = average_case_sharpness(net, nn.MSELoss(), data, 0.5, adaptive=True, samples=4)
    assert trained.value != 0.0


def _peft_gpt2(trained: bool) -> nn.Module:
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        n_layer=1, n_embd=8, n_head=2, vocab_size=16, n_positions=8, bos_token_id=0, eos_token_id=0
    )
    pm = peft.get_peft_model(
        transformers.GPT2LMHeadModel(cfg),
        peft.LoraConfig(r=2, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True),
    )
    if trained:
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "lora_B" in n:
                    p.normal_(std=0.1, generator=torch.Generator().manual_seed(1))
    return pm.double()


def _zero_factor_warnings(fn) -> tuple[object, list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fn()
    return out, [str(w.message) for w in caught if issubclass(w.category, ZeroFactorWarning)]


@pytest.mark.parametrize("trained", [False, True], ids=["fresh", "trained"])
def test_consumers_warn_once_on_a_fresh_peft_adapter_and_not_on_a_trained_one(trained) -> None:
    """filter_normalized_direction and the adaptive metrics of measure_sharpness call
    warn_zero_factors: one warning each for a fresh adapter (whose adaptive sharpness
    is then exactly 0), none once B != 0."""
    from sharpkit.hf import hf_loss
    from sharpkit.sharpness import measure_sharpness

    model = _peft_gpt2(trained)
    ids = torch.randint(0, 16, (4, 6), generator=torch.Generator().manual_seed(2))
    batch = {"input_ids": ids, "labels": ids}

    d, msgs = _zero_factor_warnings(lambda: filter_normalized_direction(model, seed=0))
    assert set(d) == {n for n, p in model.named_parameters() if p.requires_grad}
    metrics = ["worst_case_adaptive", "average_case_adaptive", "worst_case"]
    options = {"worst_case_adaptive": {"steps": 3}, "average_case_adaptive": {"samples": 3},
               "worst_case": {"steps": 3}}  # fmt: skip
    rep, metric_msgs = _zero_factor_warnings(
        lambda: measure_sharpness(model, hf_loss, [batch], metrics, options=options)
    )
    values = {m: rep.metrics[m].value for m in metrics}
    if trained:
        assert msgs == [] and metric_msgs == []
        assert values["worst_case_adaptive"] > 0 and values["average_case_adaptive"] != 0
    else:
        assert len(msgs) == 1 and msgs[0].startswith("filter-normalised direction is degenerate")
        assert [m.split(" is degenerate")[0] for m in metric_msgs] == metrics[:2]
        assert all("lora_B.default.weight" in m and "merge_and_unload" in m for m in metric_msgs)
        assert values["worst_case_adaptive"] == 0.0 and values["average_case_adaptive"] == 0.0
    assert values["worst_case"] > 0  # the plain metric sees the adapter either way
