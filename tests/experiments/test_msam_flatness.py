"""Experiment 6: mSAM vs SAM, flatness at equal training loss and accuracy (Behdin et al. 2023)."""

from __future__ import annotations

import pytest

from sharpkit.experiments import EXPERIMENTS, Stat, run_experiment
from sharpkit.experiments.msam_flatness import decide


def test_msam_run_measures_at_equal_training_loss_at_test_scale(tmp_path) -> None:
    report = run_experiment(EXPERIMENTS["msam_flatness"], scale="test", out_dir=tmp_path)
    s = report.runs[0].summary
    methods = report.runs[0].series["methods"]
    # every method is measured at a checkpoint at or below the common level, and the
    # level is the highest final loss (reached by every method)
    assert s["loss_level"] == max(s[f"final_loss_{m}"] for m in methods)
    for m in methods:
        assert s[f"loss_at_{m}"] <= s["loss_level"]
        assert s[f"lambda_max_{m}"] > 0
    assert s["spearman_lambda"] in (-1.0, 1.0)  # two methods without SGD: a sign
    assert any(p.endswith(".png") for p in report.figures)


def _stats(lam, tr, sam_sgd, msam_sam):
    mk = lambda v: Stat(*v, 5)  # noqa: E731
    one = Stat(1.0, 1.0, 1.0, 5)
    return {
        "spearman_lambda": mk(lam), "spearman_trace": mk(tr), "loss_level": one,
        "acc_sam_minus_sgd": mk(sam_sgd), "acc_msam_minus_sam": mk(msam_sam),
        "lambda_max_sam": one, "trace_sam": one, "acc_sam": one,
    }  # fmt: skip


def test_verdict_has_two_parts_judged_on_their_own() -> None:
    neg, pos, zero = (-0.9, -1.0, -0.8), (0.5, 0.2, 0.8), (0.0, -0.2, 0.2)
    helps, gain = (0.02, 0.01, 0.03), (0.01, 0.005, 0.015)
    v = decide(_stats(neg, neg, helps, gain))
    assert v.holds is True and v.parts == {"flatness": True, "accuracy": True}
    v = decide(_stats(pos, neg, helps, gain))
    assert v.parts == {"flatness": False, "accuracy": True} and v.holds is False
    assert v.label == "flatness: not supported; accuracy: supported"
    # SAM does not help: the accuracy claim cannot be judged
    v = decide(_stats(neg, neg, zero, gain))
    assert v.parts == {"flatness": True, "accuracy": None} and v.holds is None
    v = decide(_stats(zero, neg, helps, (-0.02, -0.03, -0.01)))
    assert v.parts == {"flatness": None, "accuracy": False}


def test_bad_config_is_refused() -> None:
    with pytest.raises(ValueError, match="micro_batches"):
        EXPERIMENTS["msam_flatness"].config("test", micro_batches=(1,))
    with pytest.raises(ValueError, match="micro_batches"):
        EXPERIMENTS["msam_flatness"].config("test", micro_batches=(128,))
    with pytest.raises(ValueError, match="label_noise"):
        EXPERIMENTS["msam_flatness"].config("test", label_noise=1.0)
