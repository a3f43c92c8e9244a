"""Experiment 4: per-layer balancing with many LoRA layers (Theorem 5)."""

from __future__ import annotations

import pytest

from sharpkit.experiments import Stat
from sharpkit.experiments.many_layers import EXPERIMENT, decide, run


def test_sam_slows_with_depth_nbar_does_not_at_test_scale() -> None:
    # Test scale (D in {1, 4}, a teacher to learn); seeds 0-2 measured ratio_sam@4 =
    # 0.71, 0.64, 0.52 and ratio_nbar@4 = 0.95, 0.94, 0.90: nBAR above SAM by 0.25,
    # 0.30, 0.38. Asserted: SAM below 0.85 and above Theorem 5's 1/D = 0.25, nBAR
    # above SAM by 0.12 (half the smallest gap).
    for seed in (0, 1):
        result = run(EXPERIMENT.config("test", seed=seed))
        s = result.summary
        assert s["ratio_sam@1"] == pytest.approx(1.0)
        assert s["rate_sam@1"] > 0  # SAM balances faster than SGD at D = 1
        assert s["rate_nbar@1"] > 0
        assert 0.25 < s["ratio_sam@4"] < 0.85
        assert s["ratio_nbar@4"] > s["ratio_sam@4"] + 0.12


def test_verdict_can_fail_and_be_inconclusive() -> None:
    def st(mean: float, lo: float, hi: float) -> dict[str, Stat]:
        return Stat(mean, lo, hi, 3)

    def stats(sam, nbar, d_max=8.0):
        return {
            "ratio_sam_dmax": st(*sam),
            "ratio_nbar_dmax": st(*nbar),
            "d_max": st(d_max, d_max, d_max),
        }

    good_nbar = (1.0, 0.9, 1.1)
    assert decide(stats((0.4, 0.35, 0.45), good_nbar)).holds is True
    # SAM does not slow down
    assert decide(stats((0.95, 0.9, 1.0), good_nbar)).holds is False
    # SAM slows down more than Theorem 5 allows (below 1/D)
    assert decide(stats((0.05, 0.02, 0.08), good_nbar)).holds is False
    # nBAR slows down as well
    assert decide(stats((0.4, 0.35, 0.45), (0.4, 0.3, 0.5))).holds is False
    # intervals straddle a threshold
    assert decide(stats((0.7, 0.5, 0.9), good_nbar)).holds is None
    assert decide(stats((0.4, 0.35, 0.45), (0.8, 0.6, 0.9))).holds is None
    assert decide(stats((0.15, 0.1, 0.2), good_nbar)).holds is None  # 1/8 inside the CI


def test_bad_config_is_refused() -> None:
    with pytest.raises(ValueError, match="depths"):
        EXPERIMENT.config("test", depths=(2, 4))
    with pytest.raises(ValueError, match="depths"):
        EXPERIMENT.config("test", depths=(1, 0))
    with pytest.raises(ValueError, match="rho"):
        EXPERIMENT.config("test", rho=-0.1)
    with pytest.raises(ValueError, match="rank"):
        EXPERIMENT.config("test", rank=100)
