"""Experiment 11: lambda_max = f''(x^T y)(|x|^2 + |y|^2) at OP minimisers."""

from __future__ import annotations

import pytest
import torch

from sharpkit.experiments import EXPERIMENTS, Stat, run_experiment
from sharpkit.experiments.op_sharpness import decide, op_lambda_max


def test_lambda_max_against_a_dense_hessian() -> None:
    """The engine's lambda_max against torch.autograd.functional.hessian (independent)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, generator=gen, dtype=torch.float64)
    y = torch.randn(4, generator=gen, dtype=torch.float64)
    for kind, f in (("square", lambda r: r**2), ("logcosh", lambda r: torch.log(torch.cosh(r)))):
        for c in (float(x @ y), float(x @ y) + 0.7):  # at a minimiser and off it
            H = torch.autograd.functional.hessian(
                lambda w, f=f, c=c: f((w[:4] * w[4:]).sum() - c), torch.cat([x, y])
            )
            want = float(torch.linalg.eigvalsh(H)[-1])
            assert op_lambda_max(kind, x, y, c) == pytest.approx(want, rel=1e-8)


def test_identity_at_test_scale(tmp_path) -> None:
    report = run_experiment(EXPERIMENTS["op_sharpness"], scale="test", out_dir=tmp_path)
    s = report.runs[0].summary
    for kind in ("square", "logcosh"):
        assert s[f"max_rel_error_{kind}"] < 1e-8  # measured ~3e-16
        assert s[f"min_bound_gap_{kind}"] > -1e-8
        assert abs(s[f"balanced_rel_gap_{kind}"]) < 1e-8
        # the control: off the minimisers the formula is wrong (measured 0.03-0.06
        # at offset 0.3 on small scale)
        assert s[f"offmin_rel_error_{kind}"] > 0.01
    assert report.verdict.holds is True
    assert any(p.endswith(".png") for p in report.figures)


def test_verdict_can_fail() -> None:
    good = {}
    for kind in ("square", "logcosh"):
        good |= {
            f"max_rel_error_{kind}": Stat(1e-15, 0, 2e-15, 3),
            f"min_bound_gap_{kind}": Stat(1e-3, 0, 2e-3, 3),
            f"balanced_rel_gap_{kind}": Stat(0.0, 0.0, 0.0, 3),
            f"offmin_rel_error_{kind}": Stat(0.1, 0.05, 0.15, 3),
        }
    assert decide(good).holds is True
    assert decide(good | {"max_rel_error_logcosh": Stat(0.01, 0, 0.02, 3)}).holds is False
    assert decide(good | {"min_bound_gap_square": Stat(-0.1, -0.2, 0, 3)}).holds is False
    assert decide(good | {"offmin_rel_error_square": Stat(1e-9, 0, 2e-9, 3)}).holds is False


def test_bad_config_is_refused() -> None:
    with pytest.raises(ValueError, match="target"):
        EXPERIMENTS["op_sharpness"].config("test", target=0.0)
    with pytest.raises(ValueError, match="scales"):
        EXPERIMENTS["op_sharpness"].config("test", scales=(2.0, 1.0))
    with pytest.raises(ValueError, match="kind"):
        op_lambda_max("cube", torch.ones(2), torch.ones(2), 1.0)
