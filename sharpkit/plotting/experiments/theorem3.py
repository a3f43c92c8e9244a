"""Figure of the Theorem 3 / m-sharpness experiment (sharpkit.experiments.theorem3)."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from .._save import save_figure

__all__ = ["plot"]


def plot(report, out_dir: str | Path) -> list[Path]:
    """Left: residual against rho per m (first seed) with slope-1 and slope-2 guides.
    Middle: measured against predicted rate at rho_ref (first seed, every m).
    Right: mSAM's balancing rate over SAM's against m (mean, 95% CI over seeds, and
    the first-order prediction)."""
    run0 = report.runs[0].series
    rho, micro = np.array(run0["rho"]), run0["micro"]
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(14, 4))
    for i, m in enumerate(micro):
        ax1.loglog(rho, run0[f"residual_m{m}"], "o-", ms=3, color=f"C{i}", label=f"m = {m}")
    res = np.array(run0[f"residual_m{micro[0]}"])
    ax1.loglog(rho, res[-1] * (rho / rho[-1]) ** 2, "k--", lw=0.8, label="slope 2")
    ax1.loglog(rho, res[-1] * (rho / rho[-1]), "k:", lw=0.8, label="slope 1")
    ax1.set(xlabel="rho", ylabel="mean |measured - predicted| dB/dt", title="residual (seed 0)")
    ax1.legend(fontsize=8)
    lo, hi = np.inf, -np.inf
    for i, m in enumerate(micro):
        p, q = np.array(run0[f"predicted_ref_m{m}"]), np.array(run0[f"measured_ref_m{m}"])
        ax2.plot(p, q, ".", ms=3, alpha=0.6, color=f"C{i}", label=f"m = {m}")
        lo, hi = min(lo, p.min(), q.min()), max(hi, p.max(), q.max())
    ax2.plot([lo, hi], [lo, hi], "k--", lw=0.8, label="y = x")
    ref = report.runs[0].config["rho_ref"]
    ax2.set(xlabel="predicted -2 rho mean|f'_j| B / sqrt(|x|^2+|y|^2)", ylabel="measured dB/dt",
            title=f"rho = {ref:g} (seed 0)")  # fmt: skip
    ax2.legend(fontsize=8)
    ms = [m for m in micro if m > 1]
    st = [report.stats[f"force_ratio_m{m}"] for m in ms]
    yerr = (
        [[s.mean - s.ci_low for s in st], [s.ci_high - s.mean for s in st]]
        if all(s.has_ci for s in st) else None
    )  # fmt: skip
    ax3.errorbar(ms, [s.mean for s in st], yerr=yerr, fmt="o-", capsize=3, label="measured")
    ax3.plot(ms, [report.stats[f"jensen_ratio_m{m}"].mean for m in ms], "k^--", ms=4,
             label="first order: mean|f'_j| / |f'|")  # fmt: skip
    ax3.axhline(1.0, color="grey", lw=0.8)
    ax3.set_xscale("log", base=2)
    ax3.set(xlabel="micro-batches m", ylabel="balancing rate, mSAM / SAM",
            title="m-sharpness strengthens balancing")  # fmt: skip
    ax3.legend(fontsize=8)
    fig.suptitle(f"Theorem 3 (OP) and m-sharpness: {report.verdict.label}", y=1.02)
    fig.tight_layout()
    return save_figure(fig, out_dir, "theorem3")
