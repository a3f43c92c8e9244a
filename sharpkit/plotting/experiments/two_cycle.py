"""Figure of the 2-cycle experiment (sharpkit.experiments.two_cycle)."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from .._save import save_figure

__all__ = ["plot"]


def plot(report, out_dir: str | Path) -> list[Path]:
    """Left: w_t . v1 over the last steps (first seed) with the predicted +-amplitude.
    Right: measured against predicted amplitude, every seed and eta*lambda."""
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4.0), layout="constrained")
    run0 = report.runs[0]
    colors = plt.cm.viridis(np.linspace(0, 0.9, len(run0.series["eta_lambda"])))
    for c, eta_lam, proj in zip(colors, run0.series["eta_lambda"], run0.series["proj_tail"]):
        proj = proj[-20:]
        pred = run0.summary[f"predicted@{eta_lam:g}"]
        ax1.plot(proj, marker=".", color=c, label=f"eta*lambda1 = {eta_lam:g}")
        ax1.axhline(pred, color=c, ls="--", lw=0.8)
        ax1.axhline(-pred, color=c, ls="--", lw=0.8)
    ax1.set(xlabel="step (last 20)", ylabel="w . v1", title="iterate along the top eigenvector")
    # below the axes: the cycle fills the whole height of the panel
    ax1.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncols=4)
    meas, pred = [], []
    for r in report.runs:
        for eta_lam in r.series["eta_lambda"]:
            meas.append(r.summary[f"amplitude@{eta_lam:g}"])
            pred.append(r.summary[f"predicted@{eta_lam:g}"])
    ax2.loglog(pred, meas, "o", ms=5, alpha=0.7)
    lo, hi = min(pred) / 1.5, max(pred) * 1.5
    ax2.plot([lo, hi], [lo, hi], "k--", lw=0.8, label="y = x")
    ax2.set(
        xlabel="predicted  eta*lambda*rho / (2 - eta*lambda)",
        ylabel="measured amplitude",
        title=f"{len(report.runs)} seeds",
    )
    ax2.legend()
    fig.suptitle(f"SAM 2-cycle: {report.verdict.label}")
    return save_figure(fig, out_dir, "two_cycle")
