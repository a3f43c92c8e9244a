"""Figure of the mSAM flatness experiment (sharpkit.experiments.msam_flatness)."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from .._save import save_figure

__all__ = ["plot"]


def plot(report, out_dir: str | Path) -> list[Path]:
    """lambda_max, tr(H) and test accuracy per method: mean with 95% CI over seeds, seeds as dots."""
    methods = report.runs[0].series["methods"]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    for ax, (key, label) in zip(
        axes, (("lambda_max", "lambda_max"), ("trace", "tr(H) (Hutch++)"), ("acc", "test accuracy"))
    ):
        for i, m in enumerate(methods):
            s = report.stats[f"{key}_{m}"]
            err = [[s.mean - s.ci_low], [s.ci_high - s.mean]] if s.has_ci else None
            ax.bar(i, s.mean, yerr=err, color=f"C{i}", alpha=0.8, capsize=4)
            ax.plot(np.full(len(s.values), i), s.values, "k.", ms=4)
        ax.set_xticks(range(len(methods)), [m.replace("msam", "mSAM m=") for m in methods],
                      rotation=30)  # fmt: skip
        ax.set(ylabel=label)
    fig.suptitle(f"Sharpness after training on digits: {report.verdict.label}")
    fig.tight_layout()
    return save_figure(fig, out_dir, "msam_flatness")
