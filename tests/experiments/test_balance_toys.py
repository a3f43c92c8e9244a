"""Experiment 1: balancedness on the paper's toys (Li, Zhang, He 2024)."""

from __future__ import annotations

import pytest

from sharpkit.experiments import EXPERIMENTS, Stat, run_experiment
from sharpkit.experiments.balance_toys import decide


def test_sgd_keeps_and_sam_shrinks_b_at_test_scale(tmp_path) -> None:
    report = run_experiment(EXPERIMENTS["balance_toys"], scale="test", out_dir=tmp_path)
    s = report.runs[0].summary
    # Measured (seed 0): SGD/normalised SGD within 0.12 of 1, SAM at a = 2 down to
    # 0.017 (NOP) and 3e-8 (OP); the asserted margins are several times wider.
    for kind in ("nop", "op"):
        assert abs(1 - s[f"ratio_{kind}_sgd@2"]) < 0.3
        assert abs(1 - s[f"ratio_{kind}_nsgd@2"]) < 0.3
        assert s[f"ratio_{kind}_sam@2"] < 0.2
        assert s[f"ratio_{kind}_sam@2"] < s[f"ratio_{kind}_sam@0.5"]
    # clean data: SAM on NOP need not balance (measured 0.955)
    assert s["ratio_nop_sam@0"] > 0.8
    # first-order drift: measured 2.03
    assert 1.5 < s["sgd_drift_ratio"] < 2.5
    assert report.verdict.holds is True
    assert any(p.endswith(".png") for p in report.figures)


def test_verdict_can_fail() -> None:
    def stats(sam_at_2: float) -> dict[str, Stat]:
        out = {}
        for k in ("nop", "op"):
            for a, sam in (("0", 0.9), ("2", sam_at_2)):
                out[f"ratio_{k}_sgd@{a}"] = Stat(1.0, 1.0, 1.0, 3)
                out[f"ratio_{k}_nsgd@{a}"] = Stat(1.0, 1.0, 1.0, 3)
                out[f"ratio_{k}_sam@{a}"] = Stat(sam, sam, sam, 3)
        out["sgd_drift_ratio"] = Stat(2.0, 2.0, 2.0, 3)
        return out

    assert decide(stats(0.1)).holds is True
    assert decide(stats(0.95)).holds is False  # SAM does not balance


def test_bad_config_is_refused() -> None:
    with pytest.raises(ValueError, match="noises"):
        EXPERIMENTS["balance_toys"].config("test", noises=(-1.0, 0.5))
    with pytest.raises(ValueError, match="lr"):
        EXPERIMENTS["balance_toys"].config("test", lr=0.0)
