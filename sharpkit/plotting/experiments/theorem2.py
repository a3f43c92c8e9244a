"""Figure of the Theorem 2 experiment (sharpkit.experiments.theorem2)."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from .._save import save_figure

__all__ = ["plot"]


def plot(report, out_dir: str | Path) -> list[Path]:
    """Left: residual vs rho (every seed) with a slope-2 guide. Right: measured vs
    predicted rate of change of B at the largest rho (first seed)."""
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    for r in report.runs:
        ax1.loglog(r.series["rho"], r.series["residual"], "o-", ms=3, alpha=0.7)
    rho = np.array(report.runs[0].series["rho"])
    res = np.array(report.runs[0].series["residual"])
    ax1.loglog(rho, res[-1] * (rho / rho[-1]) ** 2, "k--", lw=0.8, label="slope 2")
    ax1.loglog(rho, res[-1] * (rho / rho[-1]), "k:", lw=0.8, label="slope 1")
    ax1.set(xlabel="rho", ylabel="mean |measured - predicted| dB/dt", title="residual A_t")
    ax1.legend()
    m = np.array(report.runs[0].series["measured_at_max_rho"])
    p = np.array(report.runs[0].series["predicted_at_max_rho"])
    ax2.plot(p, m, ".", ms=3, alpha=0.6)
    lim = [min(p.min(), m.min()), max(p.max(), m.max())]
    ax2.plot(lim, lim, "k--", lw=0.8, label="y = x")
    ax2.set(
        xlabel="predicted rho (|gx|^2-|gy|^2)/sqrt(|gx|^2+|gy|^2)",
        ylabel="measured dB/dt",
        title=f"rho = {rho[-1]:.2g}",
    )
    ax2.legend()
    fig.suptitle(f"Theorem 2 (NOP): {report.verdict.label}")
    return save_figure(fig, out_dir, "theorem2")
