"""Experiment 10: Theorem 3 (OP rate) and m-sharpness of Li, Zhang, He (NeurIPS 2024)."""

from __future__ import annotations

import pytest
import torch

from sharpkit.balance import balancedness
from sharpkit.balance.toys import OPToy, paper_init
from sharpkit.experiments import EXPERIMENTS, Stat, run_experiment
from sharpkit.experiments.theorem3 import decide, msam_rate
from sharpkit.optim import MSAM


@pytest.mark.parametrize("m", [1, 2, 4])
def test_measured_rate_matches_sharpkit_msam_step(m: int) -> None:
    """The closed-form mSAM step changes B exactly as sharpkit's MSAM does (m = 1: SAM)."""
    toy = OPToy(noise=1.0, generator=torch.Generator().manual_seed(0))
    x0, y0 = paper_init()
    targets = toy.sample_target((1, 8))
    rho, lr = 0.05, 0.01

    class Pair(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.x, self.y = torch.nn.Parameter(x0.clone()), torch.nn.Parameter(y0.clone())

        def forward(self) -> tuple[torch.Tensor, torch.Tensor]:
            return self.x, self.y

    model = Pair()
    opt = MSAM(model.parameters(), torch.optim.SGD, rho=rho, micro_batches=m, model=model, lr=lr)

    def loss_fn(mod, t):  # mod is the module or MSAM's functional view of it
        return toy.loss_at(*mod(), t).mean()

    b0 = balancedness((model.x, model.y))
    opt.step(loss_fn=loss_fn, batch=targets[0])
    x1, y1 = model.x.detach(), model.y.detach()
    Gx, Gy = (x0 - x1) / lr, (y0 - y1) / lr  # the averaged perturbed gradient
    second = 0.5 * lr**2 * float(Gx.pow(2).sum() - Gy.pow(2).sum())
    rate = (balancedness((x1, y1)) - b0 - second) / lr
    measured, _ = msam_rate(toy, x0[None], y0[None], targets, m, rho, lr)
    assert rate == pytest.approx(float(measured[0]), rel=1e-9)
    # the first-order term explains it at a small radius: residual O(rho^2 |B|)
    m_small, p_small = msam_rate(toy, x0[None], y0[None], targets, m, 1e-3, lr)
    assert abs(float(m_small - p_small)) < 0.02 * abs(float(p_small))


def test_rate_and_force_ratio_at_test_scale(tmp_path) -> None:
    report = run_experiment(EXPERIMENTS["theorem3"], scale="test", out_dir=tmp_path)
    # The residual is a Taylor remainder: small scale measured slope 2.000 for every m
    # and relative residuals 1.4e-3 to 3.9e-3 at rho = 1e-3.
    for run in report.runs:
        s = run.summary
        for m in (1, 2, 8):
            assert abs(s[f"slope_m{m}"] - 2.0) < 0.05
            assert s[f"rel_residual_m{m}"] < 5e-3
        # measured at small scale: 1.21 (m = 2) and 1.98 (m = 8)
        assert 1.0 < s["force_ratio_m2"] < s["force_ratio_m8"]
        # the first-order ratio is Jensen's mean |f'_j| / |f'| >= 1
        assert s["jensen_ratio_m8"] >= s["jensen_ratio_m2"] >= 1.0
    assert report.verdict.holds is True
    assert any(p.endswith(".png") for p in report.figures)


def _stats(slope: float, ratios: tuple[float, float]) -> dict[str, Stat]:
    out = {}
    for m in (1, 2, 4):
        out[f"slope_m{m}"] = Stat(slope, slope - 0.01, slope + 0.01, 3)
        out[f"rel_residual_m{m}"] = Stat(1e-3, 0.0, 2e-3, 3)
    for m, r in zip((2, 4), ratios):
        out[f"force_ratio_m{m}"] = Stat(r, r - 0.05, r + 0.05, 3)
        out[f"jensen_ratio_m{m}"] = Stat(r, r, r, 3)
    return out


def test_verdict_can_fail() -> None:
    assert decide(_stats(2.0, (1.2, 1.5))).holds is True
    assert decide(_stats(1.0, (1.2, 1.5))).holds is False  # first-order error
    assert decide(_stats(2.0, (1.02, 1.5))).holds is False  # CI touches 1
    assert decide(_stats(2.0, (1.5, 1.2))).holds is False  # weakens with m


def test_bad_config_is_refused() -> None:
    with pytest.raises(ValueError, match="micro"):
        EXPERIMENTS["theorem3"].config("test", micro=(1, 3))  # 3 does not divide 8
    with pytest.raises(ValueError, match="micro"):
        EXPERIMENTS["theorem3"].config("test", micro=(2, 4))  # no SAM baseline
    with pytest.raises(ValueError, match="noise"):
        EXPERIMENTS["theorem3"].config("test", noise=0.0)
