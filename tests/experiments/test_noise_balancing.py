"""Experiment 12: Corollary 1's floor and the a^2 growth of the balancing force."""

from __future__ import annotations

import pytest
import torch

from sharpkit.balance.toys import NOPToy, paper_init
from sharpkit.experiments import EXPERIMENTS, Stat, run_experiment
from sharpkit.experiments.noise_balancing import decide, force_closed_form


def test_closed_form_against_monte_carlo() -> None:
    """E[|g_y|^2 - |g_x|^2](a) - (a = 0) = a^2 (closed form), by plain Monte Carlo."""
    gen = torch.Generator().manual_seed(0)
    toy = NOPToy(noise=1.5, generator=gen)
    x, y = paper_init()
    gx0, gy0 = toy.grads(x, y, toy.A)
    f0 = float(gy0.pow(2).sum() - gx0.pow(2).sum())
    gx, gy = toy.grads(x, y, toy.sample_target((400_000,)))
    f = float((gy.pow(2).sum(-1) - gx.pow(2).sum(-1)).mean())
    want = 1.5**2 * float(force_closed_form(toy, x, y))
    assert f - f0 == pytest.approx(want, rel=0.02)


def test_floor_and_force_at_test_scale(tmp_path) -> None:
    report = run_experiment(EXPERIMENTS["noise_balancing"], scale="test", out_dir=tmp_path)
    s = report.runs[0].summary
    # measured (test scale, seed 0): shrink 0.10, plateau 0.92, floor ratio 1.03, SGD
    # share 0.41; slope 1.991, coefficient ratio 0.99
    assert s["shrink"] < 0.3
    assert 0.7 < s["floor_ratio"] < 1.4
    assert abs(s["force_slope"] - 2.0) < 0.1
    assert abs(s["force_coef_ratio"] - 1.0) < 0.05
    assert report.verdict.holds is True
    assert any(p.endswith(".png") for p in report.figures)


def _stats(**over: float) -> dict[str, Stat]:
    base = {
        "shrink": 0.13, "plateau": 1.05, "floor_above": 0.07, "floor_below": 0.07,
        "floor_ratio": 1.0, "sgd_below_share": 0.3, "force_slope": 2.0,
        "force_coef_ratio": 1.0, "force_at_0": -0.5,
    }  # fmt: skip
    base |= over
    return {k: Stat(v, v - 0.02 * abs(v), v + 0.02 * abs(v), 5) for k, v in base.items()}


def test_verdict_can_fail() -> None:
    assert decide(_stats()).holds is True
    assert decide(_stats(floor_ratio=0.1)).holds is False  # SAM drives |B| to zero from below
    assert decide(_stats(plateau=0.6)).holds is False  # still decaying
    assert decide(_stats(sgd_below_share=1.0)).holds is False  # the floor is step-size noise
    assert decide(_stats(force_slope=1.0)).holds is False
    assert decide(_stats(force_coef_ratio=0.5)).holds is False


def test_bad_config_is_refused() -> None:
    with pytest.raises(ValueError, match="noises"):
        EXPERIMENTS["noise_balancing"].config("test", noises=(0.5, 1.0))
    with pytest.raises(ValueError, match="steps"):
        EXPERIMENTS["noise_balancing"].config("test", steps=4)
