"""Figure of the LoRA-on-digits experiment (sharpkit.experiments.lora_digits)."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from .._save import save_figure

__all__ = ["plot"]

_LABELS = {"lora": "LoRA", "sam": "LoRA-SAM", "obar": "LoRA-oBAR", "nbar": "LoRA-nBAR"}
_COLORS = {"lora": "tab:gray", "sam": "tab:blue", "obar": "tab:green", "nbar": "tab:orange"}


def _bar(ax, report, key: str, methods, ylabel: str, title: str) -> None:
    st = [report.stats[key.format(m)] for m in methods]
    mean = np.array([s.mean for s in st])
    err = None
    if all(s.has_ci for s in st):
        err = np.array([[s.mean - s.ci_low for s in st], [s.ci_high - s.mean for s in st]])
    ax.bar(
        range(len(methods)),
        mean,
        yerr=err,
        capsize=4,
        color=[_COLORS[m] for m in methods],
        tick_label=[_LABELS[m] for m in methods],
    )
    ax.set(ylabel=ylabel, title=title)
    ax.tick_params(axis="x", labelrotation=20, labelsize=8)


def plot(report, out_dir: str | Path) -> list[Path]:
    """Test accuracy, seconds per step and per-layer |B| at the end, per method
    (means with 95% CIs over seeds when there are several)."""
    methods = report.runs[0].series["methods"]
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(13, 3.8))
    _bar(ax1, report, "acc_{}", methods, "test accuracy", "accuracy")
    lo = min(report.stats[f"acc_{m}"].mean for m in methods)
    ax1.set_ylim(max(0.0, lo - 0.1), 1.0)
    _bar(ax2, report, "sec_per_step_{}", methods, "seconds per step (median)", "cost")
    n_layers = len(report.runs[0].series[f"abs_B_{methods[0]}"])
    width = 0.8 / len(methods)
    for j, m in enumerate(methods):
        vals = np.array([r.series[f"abs_B_{m}"] for r in report.runs]).mean(0)
        ax3.bar(np.arange(n_layers) + j * width, vals, width, color=_COLORS[m], label=_LABELS[m])
    ax3.set_xticks(np.arange(n_layers) + 0.4 - width / 2, [f"layer {i}" for i in range(n_layers)])
    ax3.set(ylabel="|B| at the end (mean over seeds)", yscale="log", title="balancedness")
    ax3.legend(fontsize=7)
    fig.suptitle(f"LoRA on digits ({len(report.runs)} seeds): {report.verdict.label}", y=1.02)
    return save_figure(fig, out_dir, "lora_digits")
