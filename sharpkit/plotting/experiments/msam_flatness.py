"""Figure of the mSAM flatness experiment (sharpkit.experiments.msam_flatness)."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from .._save import save_figure

__all__ = ["plot"]


def plot(report, out_dir: str | Path) -> list[Path]:
    """lambda_max and tr(H) at equal training loss, and test accuracy after the full
    budget, per method: mean with 95% CI over seeds, seeds as dots."""
    methods = report.runs[0].series["methods"]
    fig, axes = plt.subplots(1, 3, figsize=(12, 4.0), layout="constrained")
    panels = (
        ("lambda_max", "lambda_max at equal training loss"),
        ("trace", "tr(H) (Hutch++) at equal training loss"),
        ("acc", "test accuracy, full budget"),
    )
    for ax, (key, label) in zip(axes, panels):
        for i, m in enumerate(methods):
            s = report.stats[f"{key}_{m}"]
            err = [[s.mean - s.ci_low], [s.ci_high - s.mean]] if s.has_ci else None
            ax.bar(i, s.mean, yerr=err, color=f"C{i}", alpha=0.8, capsize=4)
            ax.plot(np.full(len(s.values), i), s.values, "k.", ms=4)
        ax.set_xticks(range(len(methods)), [m.replace("msam", "mSAM m=") for m in methods],
                      rotation=30)  # fmt: skip
        ax.set(ylabel=label)
    axes[2].set_ylim(max(0.0, min(report.stats[f"acc_{m}"].mean for m in methods) - 0.05), None)
    fig.suptitle(f"mSAM vs SAM on digits: {report.verdict.label}")
    return save_figure(fig, out_dir, "msam_flatness")
