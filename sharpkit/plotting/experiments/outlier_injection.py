"""Figure of the outlier-injection experiment (sharpkit.experiments.outlier_injection)."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import seaborn as sns

from .._save import save_figure

__all__ = ["plot"]


def plot(report, out_dir: str | Path) -> list[Path]:
    """Heat maps of the balancing rate (mean over seeds) over the outlier fraction p and
    strength k, for SAM and for SGD on the same colour scale."""
    ps = report.runs[0].series["fractions"]
    ks = report.runs[0].series["strengths"]
    grids = {
        m: np.array([[report.stats[f"rate_{m}@{p:g},{k:g}"].mean for k in ks] for p in ps])
        for m in ("sam", "sgd")
    }
    vmax = max(float(np.abs(g).max()) for g in grids.values())
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, (m, title) in zip(axes, (("sam", "SAM"), ("sgd", "SGD"))):
        sns.heatmap(
            grids[m], ax=ax, annot=True, fmt=".3f", cmap="viridis", vmin=0.0, vmax=vmax,
            xticklabels=[f"{k:g}" for k in ks], yticklabels=[f"{p:g}" for p in ps],
            cbar_kws={"label": "log(|B_0| / |B_T|) per unit time"},
        )  # fmt: skip
        ax.set(xlabel="outlier strength k", ylabel="outlier fraction p", title=title)
    fig.suptitle(f"Outlier injection on the NOP toy: {report.verdict.label}")
    fig.tight_layout()
    return save_figure(fig, out_dir, "outlier_injection")
