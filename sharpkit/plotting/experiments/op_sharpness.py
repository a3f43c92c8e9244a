"""Figure of the OP sharpness identity experiment (sharpkit.experiments.op_sharpness)."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from .._save import save_figure

__all__ = ["plot"]


def plot(report, out_dir: str | Path) -> list[Path]:
    """Per loss: lambda_max (Lanczos) at every random minimiser of every seed against
    |B|, with the lower bound 2 f'' sqrt(B^2 + c^2) and the balanced minimiser."""
    kinds = ("square", "logcosh")
    curvature = {"square": 2.0, "logcosh": 1.0}
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    c = report.runs[0].series["target"]
    for ax, kind in zip(axes, kinds):
        b = np.concatenate([r.series[f"abs_B_{kind}"] for r in report.runs])
        lam = np.concatenate([r.series[f"lambda_max_{kind}"] for r in report.runs])
        ax.loglog(b, lam, "o", ms=4, alpha=0.6, label="random minimisers (Lanczos)")
        grid = np.logspace(np.log10(max(b.min(), 1e-3)) - 0.5, np.log10(b.max()) + 0.2, 100)
        k = curvature[kind]
        ax.loglog(grid, 2 * k * np.sqrt(grid**2 + c**2), "k--", lw=0.8,
                  label="bound 2 f'' sqrt(B^2 + c^2)")  # fmt: skip
        ax.axhline(report.runs[0].series[f"balanced_lambda_max_{kind}"], color="C3", lw=0.8,
                   label="balanced minimiser (B = 0)")  # fmt: skip
        ax.set(xlabel="|B| at the minimiser", ylabel="lambda_max",
               title=f"f = {kind}, f''(c) = {k:g}")  # fmt: skip
        ax.legend(fontsize=8)
    fig.suptitle(f"OP minimisers: sharpness vs balancedness: {report.verdict.label}", y=1.02)
    fig.tight_layout()
    return save_figure(fig, out_dir, "op_sharpness")
