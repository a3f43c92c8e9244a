"""Figure of the floor / a^2 experiment (sharpkit.experiments.noise_balancing)."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from .._save import save_figure

__all__ = ["plot"]


def plot(report, out_dir: str | Path) -> list[Path]:
    """Left: mean |B| against time for SAM from above and from a balanced start and SGD
    from the balanced start (every seed). Right: |F(a) - F(0)| against a (every seed)
    with the closed form a^2 (d sum s_i^2 x_i^2 - |s|^2 |y|^2) of the first seed."""
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    styles = (("sam_above", "SAM from B_0 = -0.56", "C0"),
              ("sam_below", "SAM from B_0 = 0", "C3"), ("sgd_below", "SGD from B_0 = 0", "C2"))  # fmt: skip
    for i, r in enumerate(report.runs):
        t = r.series["time"]
        for key, label, color in styles:
            ax1.plot(t, r.series[f"abs_B_{key}"], color=color, alpha=0.7, lw=1,
                     label=label if i == 0 else None)  # fmt: skip
    floor = report.stats["floor_above"].mean
    ax1.axhline(floor, color="k", ls="--", lw=0.8, label=f"floor from above ({floor:.3f})")
    ax1.set(xlabel="time (lr x steps)", ylabel="mean |B| over runs",
            title="Corollary 1: a floor, not zero")  # fmt: skip
    ax1.legend(fontsize=8)
    for i, r in enumerate(report.runs):
        a = np.array(r.series["noises"])
        ax2.loglog(a, np.abs(r.series["force_excess"]), "o", color="C0", alpha=0.6,
                   label="measured (Monte Carlo)" if i == 0 else None)  # fmt: skip
    a = np.array(report.runs[0].series["noises"])
    grid = np.logspace(np.log10(a.min()), np.log10(a.max()), 50)
    ax2.loglog(grid, abs(report.runs[0].series["force_closed_coef"]) * grid**2, "k--", lw=0.8,
               label="closed form, slope 2")  # fmt: skip
    ax2.set_xticks(a, [f"{v:g}" for v in a])
    ax2.xaxis.set_minor_formatter(plt.NullFormatter())
    ax2.set(xlabel="noise level a", ylabel="|E[|g_y|^2 - |g_x|^2](a) - (a = 0)|",
            title="balancing force grows like a^2")  # fmt: skip
    ax2.legend(fontsize=8)
    fig.suptitle(f"Floor and a^2 growth on the NOP toy: {report.verdict.label}", y=1.02)
    fig.tight_layout()
    return save_figure(fig, out_dir, "noise_balancing")
