"""Experiment 2: outlier injection on the NOP toy."""

from __future__ import annotations

import pytest
import torch

from sharpkit.experiments import EXPERIMENTS, Stat, run_experiment
from sharpkit.experiments.outlier_injection import OutlierNOPToy, decide


def test_outliers_scale_the_noise_with_the_given_frequency() -> None:
    gen = torch.Generator().manual_seed(0)
    toy = OutlierNOPToy(1.0, 0.3, 10.0, generator=gen)
    t = toy.sample_target((20000,)) - toy.A
    big = t.abs().amax(dim=(-1, -2)) > 8.0  # plain samples: |a N| < 6 almost surely
    assert abs(big.double().mean().item() - 0.3) < 0.02


def test_sam_responds_sgd_does_not_at_test_scale(tmp_path) -> None:
    report = run_experiment(EXPERIMENTS["outlier_injection"], scale="test", out_dir=tmp_path)
    s = report.runs[0].summary
    # Measured (seed 0): SAM's rate 0.094 without outliers, 0.266 at p = 0.3, k = 10;
    # SGD's at most 0.004. Asserted with wide margins:
    assert s["rate_sam@0.3,10"] > 1.5 * s["rate_sam@0,10"]
    assert max(abs(v) for k, v in s.items() if k.startswith("rate_sgd")) < 0.03
    assert any(p.endswith(".png") for p in report.figures)


def test_verdict_can_fail() -> None:
    def stats(top: float) -> dict[str, Stat]:
        out = {}
        for p in ("0", "0.3"):
            for k in ("1", "10"):
                v = top if (p, k) == ("0.3", "10") else 0.1
                out[f"rate_sam@{p},{k}"] = Stat(v, v - 0.01, v + 0.01, 3)
                out[f"rate_sgd@{p},{k}"] = Stat(0.0, -0.001, 0.001, 3)
        return out

    assert decide(stats(0.3)).holds is True
    assert decide(stats(0.1)).holds is False


def test_bad_config_is_refused() -> None:
    with pytest.raises(ValueError, match="fractions"):
        EXPERIMENTS["outlier_injection"].config("test", fractions=(0.0, 1.5))
    with pytest.raises(ValueError, match="strengths"):
        EXPERIMENTS["outlier_injection"].config("test", strengths=(0.5, 2.0))
