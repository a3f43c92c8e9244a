"""Figure of the delta-SAM approximation experiment (sharpkit.experiments.delta_sam_approx)."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt

from .._save import save_figure

__all__ = ["plot"]


def _line(ax, report, noises, key, label, color) -> None:
    stats = [report.stats[f"{key}@{p:g}"] for p in noises]
    means = [s.mean for s in stats]
    ax.plot(noises, means, "o-", color=color, label=label)
    if all(s.has_ci for s in stats):
        ax.fill_between(noises, [s.ci_low for s in stats], [s.ci_high for s in stats],
                        color=color, alpha=0.2)  # fmt: skip


def plot(report, out_dir: str | Path) -> list[Path]:
    """Left: cos(G - g, G_PI - g) against label noise (mean and 95% CI over seeds).
    Right: test accuracy against label noise per method."""
    noises = report.runs[0].series["noises"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    _line(ax1, report, noises, "cos_sam", "SAM", "C0")
    _line(ax1, report, noises, "cos_dsam", "delta-SAM (exact, tau = 1)", "C3")
    ax1.set(xlabel="label noise p", ylabel="cos(G - g, G_PI - g)", title="approximation of G_PI")
    ax1.legend()
    for key, label, color in (("acc_sgd", "SGD", "C2"), ("acc_sam", "SAM", "C0"),
                              ("acc_dsam", "delta-SAM", "C3")):  # fmt: skip
        _line(ax2, report, noises, key, label, color)
    ax2.set(xlabel="label noise p", ylabel="test accuracy (clean labels)", title="training")
    ax2.legend()
    fig.suptitle(f"delta-SAM vs SAM: {report.verdict.label}")
    return save_figure(fig, out_dir, "delta_sam_approx")
