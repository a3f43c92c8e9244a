"""Figure of the Wen et al. experiment (sharpkit.experiments.wen_sharpness)."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from .._save import save_figure

__all__ = ["plot"]


def plot(report, out_dir: str | Path) -> list[Path]:
    """Relative reduction of lambda_max and tr(H) against GD, per method (mean and 95% CI
    over seeds, seeds as dots)."""
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    keys = [("lam_cut_full", "lam_cut_one"), ("tr_cut_full", "tr_cut_one")]
    labels = ["lambda_max", "tr(H)"]
    width = 0.35
    for j, (method, color) in enumerate((("full-batch SAM", "C0"), ("1-SAM", "C1"))):
        for i, pair in enumerate(keys):
            s = report.stats[pair[j]]
            xpos = i + (j - 0.5) * width
            err = [[100 * (s.mean - s.ci_low)], [100 * (s.ci_high - s.mean)]] if s.has_ci else None
            ax.bar(xpos, 100 * s.mean, width, yerr=err, color=color, alpha=0.8,
                   label=method if i == 0 else None, capsize=4)  # fmt: skip
            vals = np.array(s.values) * 100
            ax.plot(np.full(len(vals), xpos), vals, "k.", ms=4)
    ax.axhline(0, color="k", lw=0.6)
    ax.set_xticks(range(len(labels)), labels)
    ax.set(ylabel="reduction vs GD (%)", title=f"Wen et al.: {report.verdict.label}")
    ax.legend()
    return save_figure(fig, out_dir, "wen_sharpness")
