"""Experiment 7: delta-SAM vs SAM against the per-instance target, with the oracle ceiling."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from sharpkit.experiments import EXPERIMENTS, Stat, run_experiment
from sharpkit.experiments.delta_sam_approx import (
    decide,
    oracle_perturbation,
    sphere_least_squares,
)
from sharpkit.per_example import per_example_gradients
from sharpkit.testing.dense import dense_hessian


@pytest.mark.slow
def test_cosines_at_test_scale(tmp_path) -> None:
    report = run_experiment(EXPERIMENTS["delta_sam_approx"], scale="test", out_dir=tmp_path)
    s = report.runs[0].summary
    for key, value in s.items():
        assert math.isfinite(value), key
        if "_cos_" in key:
            assert -1.0 <= value <= 1.0
    for arm in ("digits", "clusters"):
        for p in ("0", "0.4"):
            # the ceiling is the best single perturbation in the span to first order; at
            # rho = 0.05 it also wins exactly: measured 0.51 vs SAM 0.34 (digits, p = 0)
            assert s[f"{arm}_cos_oracle@{p}"] > s[f"{arm}_cos_sam@{p}"]
            assert s[f"{arm}_gap@{p}"] == pytest.approx(
                s[f"{arm}_cos_dsam@{p}"] - s[f"{arm}_cos_sam@{p}"]
            )
    # label noise makes the examples' worst cases disagree: SAM's cosine falls
    # (measured 0.34 -> 0.24 on digits at test scale)
    assert s["digits_cos_sam@0.4"] < s["digits_cos_sam@0"]
    # training learns: chance is 0.1
    assert min(s[f"acc_{m}@0"] for m in ("sgd", "sam", "dsam")) > 0.4
    assert any(p.endswith(".png") for p in report.figures)


def test_sphere_least_squares_is_the_global_minimiser() -> None:
    """Against a brute-force search over the circle (k = 2) and random points of the
    sphere (k = 5), including a hard case (target orthogonal to the smallest direction)."""
    gen = torch.Generator().manual_seed(0)
    for trial in range(6):
        K = torch.randn(7, 2, generator=gen, dtype=torch.float64)
        r = torch.randn(7, generator=gen, dtype=torch.float64) * (0.1 if trial % 2 else 10)
        z = sphere_least_squares(K, r, 0.7)
        assert float(z.norm()) == pytest.approx(0.7, rel=1e-9)
        theta = torch.linspace(0, 2 * math.pi, 200_001, dtype=torch.float64)
        circle = 0.7 * torch.stack([theta.cos(), theta.sin()], 1)
        best = float((circle @ K.T - r).norm(dim=1).min())
        assert float((K @ z - r).norm()) <= best + 1e-9
    K = torch.randn(9, 5, generator=gen, dtype=torch.float64)
    r = torch.randn(9, generator=gen, dtype=torch.float64)
    z = sphere_least_squares(K, r, 2.0)
    pts = torch.randn(20_000, 5, generator=gen, dtype=torch.float64)
    pts = 2.0 * pts / pts.norm(dim=1, keepdim=True)
    assert float((K @ z - r).norm()) <= float((pts @ K.T - r).norm(dim=1).min()) + 1e-12
    # hard case: K = diag(3, 1), r = (1, 0): small radius -> along e1; large -> fills e2
    K = torch.diag(torch.tensor([3.0, 1.0], dtype=torch.float64))
    r = torch.tensor([1.0, 0.0], dtype=torch.float64)
    z = sphere_least_squares(K, r, 1.0)  # unconstrained optimum (1/3, 0) is inside
    assert float(z[0]) == pytest.approx(3.0 / 8.0, rel=1e-6)  # mu = -1: z1 = 3/(9 - 1)
    assert float(z.norm()) == pytest.approx(1.0, rel=1e-9)


def test_oracle_beats_every_perturbation_in_the_span_to_first_order() -> None:
    """First-order residual |H e - t| (dense float64 Hessian, an independent reference) of
    the oracle against SAM's perturbation and random ones in the span of the g_i."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    x = torch.randn(6, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (6,))

    def per_ex(m, b):
        return nn.functional.cross_entropy(m(b[0]), b[1], reduction="none")

    rho = 0.05
    _, grads = per_example_gradients(model, per_ex, (x, y))
    G = torch.cat([g.reshape(6, -1) for g in grads], 1)
    H = dense_hessian(model, lambda m, b: per_ex(m, b).mean(), (x, y))
    t = torch.randn(G.shape[1], dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    sizes = [p.numel() for p in model.parameters()]
    target = [v.reshape(p.shape) for v, p in zip(torch.split(t, sizes), model.parameters())]
    e = torch.cat([v.reshape(-1) for v in oracle_perturbation(model, per_ex, (x, y), rho, grads, target)])  # fmt: skip
    assert float(e.norm()) == pytest.approx(rho, rel=1e-9)
    coef = torch.linalg.lstsq(G.T, e[:, None]).solution
    assert float((G.T @ coef - e[:, None]).norm()) < 1e-10  # e lies in the span
    best = float((H @ e - t).norm())
    sam = G.mean(0)
    assert best <= float((H @ (rho * sam / sam.norm()) - t).norm()) + 1e-12
    lam = torch.randn(500, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    d = lam @ G
    d = rho * d / d.norm(dim=1, keepdim=True)
    assert best <= float((d @ H.T - t).norm(dim=1).min()) + 1e-12


def _stats(gaps: dict[str, tuple]) -> dict[str, Stat]:
    out: dict[str, Stat] = {}
    for arm, (g0, g1) in gaps.items():
        for p, g in (("0", g0), ("0.4", g1)):
            out[f"{arm}_gap@{p}"] = Stat(*g, 5)
            out |= {f"{arm}_cos_{m}@{p}": Stat(0.5, 0.4, 0.6, 5) for m in ("sam", "dsam", "oracle")}
            out[f"{arm}_headroom@{p}"] = Stat(0.2, 0.1, 0.3, 5)
    return out


def test_verdict_per_arm_and_setting_dependence() -> None:
    up, down, flat = (0.05, 0.02, 0.08), (-0.05, -0.08, -0.02), (0.01, -0.02, 0.04)
    assert decide(_stats({"digits": (up, up), "clusters": (up, up)})).holds is True
    assert decide(_stats({"digits": (up, down), "clusters": (down, flat)})).holds is False
    assert decide(_stats({"digits": (up, flat), "clusters": (flat, flat)})).holds is None
    mixed = decide(_stats({"digits": (flat, down), "clusters": (up, up)}))
    assert mixed.holds is None
    assert mixed.statement.startswith("Setting-dependent")
    assert "not supported on digits" in mixed.statement


def test_bad_config_is_refused() -> None:
    with pytest.raises(ValueError, match="noises"):
        EXPERIMENTS["delta_sam_approx"].config("test", noises=(0.0, 1.5))
    with pytest.raises(ValueError, match="rho"):
        EXPERIMENTS["delta_sam_approx"].config("test", rho=0.0)
    with pytest.raises(ValueError, match="arms"):
        EXPERIMENTS["delta_sam_approx"].config("test", arms=("digits", "mnist"))
    with pytest.raises(ValueError, match="radius"):
        sphere_least_squares(torch.eye(2), torch.ones(2), 0.0)
