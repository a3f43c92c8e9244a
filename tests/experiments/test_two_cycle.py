"""Experiment 8: SAM's 2-cycle (Bartlett et al.)."""

from __future__ import annotations

import pytest

from sharpkit.experiments import EXPERIMENTS, Stat, run_experiment
from sharpkit.experiments.two_cycle import REL_TOL, decide


def test_two_cycle_claim_holds_at_test_scale(tmp_path) -> None:
    report = run_experiment(EXPERIMENTS["two_cycle"], scale="test", out_dir=tmp_path)
    # The 2-cycle is an exact fixed point of the 1-D dynamics, so every seed matches
    # the formula to rounding once the orthogonal part has decayed.
    assert report.verdict.holds is True
    for run in report.runs:
        assert run.summary["max_rel_error"] < 1e-9
        assert run.summary["min_flip_fraction"] == 1.0
    assert any(p.endswith(".png") for p in report.figures)


def test_verdict_can_fail() -> None:
    bad = {
        "max_rel_error": Stat(10 * REL_TOL, 0, 0, 1),
        "min_flip_fraction": Stat(1.0, 0, 0, 1),
        "max_rel_orthogonal": Stat(0.0, 0, 0, 1),
    }
    assert decide(bad).holds is False
    no_flip = {**bad, "max_rel_error": Stat(0.0, 0, 0, 1), "min_flip_fraction": Stat(0.5, 0, 0, 1)}
    assert decide(no_flip).holds is False


def test_bad_config_is_refused() -> None:
    with pytest.raises(ValueError, match="eta_lambdas"):
        EXPERIMENTS["two_cycle"].config("test", eta_lambdas=(2.5,))
    with pytest.raises(ValueError, match="tail"):
        EXPERIMENTS["two_cycle"].config("test", tail=10_000)
