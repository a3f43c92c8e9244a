"""Experiment 4: per-layer balancing with many LoRA layers (Theorem 5)."""

from __future__ import annotations

import pytest

from sharpkit.experiments import Stat
from sharpkit.experiments.many_layers import EXPERIMENT, SLOW_RATIO, decide, run


def test_sam_slows_with_depth_nbar_does_not_at_test_scale() -> None:
    # Test scale (D in {1, 4}); seeds 0-3 measured ratio_sam@4 = 0.47-0.52
    # (theory for equal layers: 1/sqrt(4) = 0.5) and ratio_nbar@4 = 1.000 +- 0.0005,
    # a spread of 0.05 between seeds. Every assertion keeps a margin of at least
    # 0.2 (four times that spread) from the measured values.
    for seed in (0, 1):
        result = run(EXPERIMENT.config("test", seed=seed))
        s = result.summary
        assert s["ratio_sam@1"] == pytest.approx(1.0)
        assert s["rate_sam@1"] > 0  # SAM balances faster than SGD at D = 1
        assert s["rate_nbar@1"] > 0
        assert s["ratio_sam@4"] < SLOW_RATIO  # 0.52 / 0.49 measured
        assert s["ratio_nbar@4"] > s["ratio_sam@4"] + 0.25  # gap 0.48 / 0.51 measured


def test_verdict_can_fail_and_be_inconclusive() -> None:
    def st(mean: float, lo: float, hi: float) -> Stat:
        return Stat(mean, lo, hi, 3)

    assert decide(
        {"ratio_sam_dmax": st(0.4, 0.35, 0.45), "ratio_nbar_dmax": st(1.0, 0.9, 1.1)}
    ).holds
    # SAM does not slow down
    no_slow = {"ratio_sam_dmax": st(0.95, 0.9, 1.0), "ratio_nbar_dmax": st(1.0, 0.9, 1.1)}
    assert decide(no_slow).holds is False
    # nBAR slows down as well
    both = {"ratio_sam_dmax": st(0.4, 0.35, 0.45), "ratio_nbar_dmax": st(0.4, 0.3, 0.5)}
    assert decide(both).holds is False
    # interval straddles the threshold
    unsure = {"ratio_sam_dmax": st(0.7, 0.5, 0.9), "ratio_nbar_dmax": st(1.0, 0.9, 1.1)}
    assert decide(unsure).holds is None


def test_bad_config_is_refused() -> None:
    with pytest.raises(ValueError, match="depths"):
        EXPERIMENT.config("test", depths=(2, 4))
    with pytest.raises(ValueError, match="depths"):
        EXPERIMENT.config("test", depths=(1, 0))
    with pytest.raises(ValueError, match="rho"):
        EXPERIMENT.config("test", rho=-0.1)
    with pytest.raises(ValueError, match="rank"):
        EXPERIMENT.config("test", rank=100)
