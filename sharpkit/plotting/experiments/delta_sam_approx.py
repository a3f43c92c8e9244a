"""Figure of the delta-SAM approximation experiment (sharpkit.experiments.delta_sam_approx)."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt

from .._save import save_figure

__all__ = ["plot"]

_METHODS = (
    ("cos_sam", "SAM", "C0", "o-"),
    ("cos_dsam", "delta-SAM (exact, tau = 1)", "C3", "s-"),
    ("cos_oracle", "oracle ceiling (best e in span, 1st order)", "k", "^--"),
)


def _line(ax, report, noises, key, label, color, style="o-") -> None:
    stats = [report.stats[f"{key}@{p:g}"] for p in noises]
    means = [s.mean for s in stats]
    ax.plot(noises, means, style, color=color, label=label)
    if all(s.has_ci for s in stats):
        ax.fill_between(noises, [s.ci_low for s in stats], [s.ci_high for s in stats],
                        color=color, alpha=0.2)  # fmt: skip


def plot(report, out_dir: str | Path) -> list[Path]:
    """One panel per arm: cos(G - g, G_PI - g) against label noise for SAM, delta-SAM
    and the oracle ceiling (mean and 95% CI over seeds, one y-range for all arms);
    last panel: digits test accuracy per method, when measured."""
    series = report.runs[0].series
    noises, arms = series["noises"], series.get("arms", ["digits"])
    has_acc = any(k.startswith("acc_sgd@") for k in report.stats)
    n = len(arms) + int(has_acc)
    fig, axes = plt.subplots(1, n, figsize=(4.6 * n, 3.8), squeeze=False)
    axes = axes[0]
    for ax, arm in zip(axes, arms):
        for key, label, color, style in _METHODS:
            _line(ax, report, noises, f"{arm}_{key}", label, color, style)
        ax.set(xlabel="label noise p", ylabel="cos(G - g, G_PI - g)", title=f"{arm}")
    lows = [ax.get_ylim()[0] for ax in axes[: len(arms)]]
    for ax in axes[: len(arms)]:
        ax.set_ylim(min(lows), 1.0)
    axes[len(arms) - 1].legend(fontsize=8, loc="lower left")
    if has_acc:
        ax = axes[-1]
        for key, label, color in (("acc_sgd", "SGD", "C2"), ("acc_sam", "SAM", "C0"),
                                  ("acc_dsam", "delta-SAM", "C3")):  # fmt: skip
            _line(ax, report, noises, key, label, color)
        ax.set(xlabel="label noise p", ylabel="test accuracy (clean labels)",
               title="digits: training (not judged)")  # fmt: skip
        ax.legend(fontsize=8)
    label = report.verdict.label
    if report.verdict.statement.startswith("Setting-dependent"):
        label += " (setting-dependent)"
    fig.suptitle(f"delta-SAM vs SAM against the per-instance update: {label}", y=1.02)
    fig.tight_layout()
    return save_figure(fig, out_dir, "delta_sam_approx")
