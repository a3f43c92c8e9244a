"""Experiment 9: full-batch SAM vs 1-SAM (Wen, Ma, Li, ICLR 2023)."""

from __future__ import annotations

import pytest

from sharpkit.experiments import EXPERIMENTS, Stat, run_experiment
from sharpkit.experiments.wen_sharpness import decide


def test_one_sam_cuts_the_trace_more_at_test_scale(tmp_path) -> None:
    report = run_experiment(EXPERIMENTS["wen_sharpness"], scale="test", out_dir=tmp_path)
    # Seeds 0-2 measured tr_gap = 0.069, 0.095, 0.026 (1-SAM's extra trace reduction
    # over full SAM); the mean must stay above 0.01, a third of the smallest seed's.
    assert report.stats["tr_gap"].mean > 0.01
    for run in report.runs:  # every method ends on the zero-loss manifold
        for m in ("gd", "sam_full", "sam1"):
            assert run.summary[f"loss_{m}"] < 0.02
    assert any(p.endswith(".png") for p in report.figures)


def _stats(tr_gap, lam_full, lam_gap):
    mk = lambda v: Stat(v[0], v[1], v[2], 5)  # noqa: E731
    cuts = {k: mk((0.1, 0.05, 0.15)) for k in ("tr_cut_one", "tr_cut_full", "lam_cut_one")}
    return {**cuts, "tr_gap": mk(tr_gap), "lam_cut_full": mk(lam_full), "lam_gap": mk(lam_gap)}


def test_verdict_parts() -> None:
    assert decide(_stats((0.1, 0.05, 0.15), (0.1, 0.05, 0.15), (0.02, 0.0, 0.04))).holds is True
    assert decide(_stats((0.1, 0.05, 0.15), (0.1, 0.05, 0.15), (-0.1, -0.2, -0.01))).holds is False
    assert decide(_stats((-0.1, -0.2, -0.05), (0.1, 0.05, 0.15), (0.02, 0.0, 0.04))).holds is False
    assert decide(_stats((0.1, -0.05, 0.15), (0.1, 0.05, 0.15), (0.02, 0.0, 0.04))).holds is None


def test_bad_config_is_refused() -> None:
    with pytest.raises(ValueError, match="n:"):
        EXPERIMENTS["wen_sharpness"].config("test", n=30)
    with pytest.raises(ValueError, match="rho"):
        EXPERIMENTS["wen_sharpness"].config("test", rho=-1.0)
