"""BalanceTracker against values computed by hand, with several optimizers."""

from __future__ import annotations

import json
import math

import matplotlib
import pandas as pd
import pytest
import torch
from torch import nn

from sharpkit.balance import BalanceTracker, LoRALinear, find_pairs
from sharpkit.balance.tracker import COLUMNS
from sharpkit.optim import BAR, SAM

matplotlib.use("Agg")
F64 = torch.float64


def _net() -> nn.Module:
    g = torch.Generator().manual_seed(0)
    net = nn.Sequential(
        LoRALinear(4, 5, rank=2, generator=g), nn.Tanh(), LoRALinear(5, 2, rank=3, generator=g)
    )
    with torch.no_grad():
        for m in (net[0], net[2]):
            m.lora_B.normal_(0, 0.5, generator=g)
    return net.to(F64)


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(32, 4, generator=g, dtype=F64), torch.randn(32, 2, generator=g, dtype=F64)


def _by_hand(net: nn.Module) -> list[dict]:
    out = []
    for name, m in (("0", net[0]), ("2", net[2])):
        nx, ny = float((m.lora_B.detach() ** 2).sum()), float((m.lora_A.detach() ** 2).sum())
        gap = math.nan
        if m.lora_B.grad is not None:
            gap = float((m.lora_B.grad**2).sum() - (m.lora_A.grad**2).sum())
        out.append(
            {
                "pair": name,
                "balancedness": (nx - ny) / 2,
                "grad_gap": gap,
                "norm_x_sq": nx,
                "norm_y_sq": ny,
            }
        )
    return out


def _check(rows: list[dict], expected: list[dict]) -> None:
    assert len(rows) == len(expected)
    for r, e in zip(rows, expected):
        assert r["pair"] == e["pair"]
        for key in ("balancedness", "norm_x_sq", "norm_y_sq", "grad_gap"):
            if math.isnan(e[key]):
                assert math.isnan(r[key])
            else:
                assert r[key] == pytest.approx(e[key], rel=1e-12, abs=1e-14)
        assert r["abs_balancedness"] == abs(r["balancedness"])


def test_manual_record_matches_hand_computation() -> None:
    net = _net()
    tracker = BalanceTracker(net)
    tracker.record()  # no gradient yet: NaN gap
    _check(tracker.records, _by_hand(net))
    x, y = _data()
    nn.functional.mse_loss(net(x), y).backward()
    tracker.record(step=7)
    _check(tracker.records[2:], _by_hand(net))
    assert [r["step"] for r in tracker.records] == [0, 0, 7, 7]


@pytest.mark.parametrize("kind", ["sgd", "sam", "bar"])
def test_attach_records_after_every_step(kind: str) -> None:
    net = _net()
    x, y = _data()
    params = [p for p in net.parameters() if p.requires_grad]
    if kind == "sgd":
        opt = torch.optim.SGD(params, lr=0.1)
    elif kind == "sam":
        opt = SAM(params, torch.optim.SGD, rho=0.05, lr=0.1)
    else:
        opt = BAR(params, torch.optim.SGD, mu0=1.0, model=net, lr=0.1)
    tracker = BalanceTracker(find_pairs(net), every=2).attach(opt)
    expected = _by_hand(net)
    for t in range(1, 6):
        if kind == "sgd":
            opt.zero_grad()
            nn.functional.mse_loss(net(x), y).backward()
            opt.step()
        else:
            opt.step(lambda: nn.functional.mse_loss(net(x), y).backward())
        if t % 2 == 0:
            expected += _by_hand(net)  # B after the step, gap of the gradients it used
    tracker.detach()
    opt.step(lambda: nn.functional.mse_loss(net(x), y).backward())  # not recorded any more
    df = tracker.to_dataframe()
    assert list(df.columns) == list(COLUMNS)
    assert df["step"].tolist() == [0, 0, 2, 2, 4, 4]
    _check(tracker.records, expected)


def test_export_round_trip(tmp_path) -> None:
    net = _net()
    tracker = BalanceTracker(net)
    tracker.record()
    x, y = _data()
    nn.functional.mse_loss(net(x), y).backward()
    tracker.record()
    csv = pd.read_csv(tracker.to_csv(tmp_path / "b.csv"), dtype={"pair": str})
    df = tracker.to_dataframe()
    assert csv["pair"].tolist() == df["pair"].tolist() == ["0", "2", "0", "2"]
    pd.testing.assert_frame_equal(
        csv.drop(columns="pair"), df.drop(columns="pair"), check_exact=False, rtol=1e-12
    )
    blob = json.loads(tracker.to_json(tmp_path / "b.json").read_text())
    assert blob["columns"] == list(COLUMNS) and blob["pairs"] == ["0", "2"]
    assert blob["records"][0]["grad_gap"] == "nan"
    assert blob["records"][3]["balancedness"] == pytest.approx(tracker.records[3]["balancedness"])


def test_tracker_errors() -> None:
    with pytest.raises(ValueError, match="model_or_pairs"):
        BalanceTracker(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="every"):
        BalanceTracker(_net(), every=0)
    with pytest.raises(TypeError, match="optimizer"):
        BalanceTracker(_net()).attach("sgd")  # type: ignore[arg-type]


def test_plot_helpers() -> None:
    from sharpkit.balance.toys import NOPToy, simulate
    from sharpkit.plotting.balance import plot_balance, plot_toy_runs

    net = _net()
    tracker = BalanceTracker(net)
    tracker.record()
    tracker.record()
    ax = plot_balance(tracker)
    assert ax.get_yscale() == "log" and len(ax.get_lines()) >= 2  # one line per pair
    assert plot_balance(tracker.to_dataframe(), value="balancedness").get_yscale() == "linear"
    with pytest.raises(ValueError, match="value"):
        plot_balance(tracker, value="B")
    with pytest.raises(ValueError, match="data"):
        plot_balance([])
    run = simulate(
        NOPToy(1.0, generator=torch.Generator().manual_seed(0)), "sgd", steps=5, lr=0.01, runs=2
    )
    ax = plot_toy_runs({"SGD": run})
    line = ax.get_lines()[0]
    assert line.get_ydata()[0] == pytest.approx(0.56)
    import matplotlib.pyplot as plt

    plt.close("all")
