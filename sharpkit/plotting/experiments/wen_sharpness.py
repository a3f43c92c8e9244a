"""Figure of the Wen et al. experiment (sharpkit.experiments.wen_sharpness)."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from .._save import save_figure

__all__ = ["plot"]

_LINES = (
    ("cos_lam", "with -P grad lambda_1", "tab:blue", "o", "-"),
    ("cos_tr", "with -P grad tr(H)", "tab:orange", "s", "--"),
    ("baseline", "baseline: between the two", "tab:gray", None, ":"),
)


def plot(report, out_dir: str | Path) -> list[Path]:
    """Per window, the cosine of the drift with each projected gradient and the
    baseline cosine between them, for full SAM (left) and 1-SAM (right): every seed
    thin, the mean over seeds thick."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.0), sharey=True, layout="constrained")
    window = report.runs[0].series["window"]
    for ax, (method, title) in zip(axes, (("full", "full-batch SAM"), ("one", "1-SAM"))):
        for key, label, color, marker, ls in _LINES:
            rows = np.array([r.series[f"{key}_{method}"] for r in report.runs])
            steps = window * np.arange(1, rows.shape[1] + 1)
            for row in rows:
                ax.plot(steps, row, color=color, lw=0.6, alpha=0.35, ls=ls)
            ax.plot(steps, rows.mean(0), color=color, lw=2, ls=ls, marker=marker, label=label)
        ax.set(xlabel="step (end of window)", title=f"{title}: drift of the tangent part")
        ax.axhline(0, color="k", lw=0.5)
    axes[0].set_ylabel("cosine")
    axes[0].legend(fontsize=8, loc="lower left")
    fig.suptitle(f"Wen et al., drift direction ({len(report.runs)} seeds): {report.verdict.label}")
    return save_figure(fig, out_dir, "wen_sharpness")
