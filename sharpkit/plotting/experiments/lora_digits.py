"""Figure of the LoRA-on-digits experiment (sharpkit.experiments.lora_digits)."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from .._save import save_figure

__all__ = ["plot"]

_LABELS = {
    "lora": "LoRA",
    "sam": "LoRA-SAM",
    "obar": "LoRA-oBAR",
    "nbar": "LoRA-nBAR",
    "bar": "BAR (val.)",
}
_COLORS = {
    "lora": "tab:gray",
    "sam": "tab:blue",
    "obar": "tab:green",
    "nbar": "tab:orange",
    "bar": "tab:red",
}


def _bar(ax, report, key: str, methods, ylabel: str, title: str) -> None:
    st = [report.stats[key.format(m)] for m in methods]
    mean = np.array([s.mean for s in st])
    err = None
    if all(s.has_ci for s in st):
        err = np.array([[s.mean - s.ci_low for s in st], [s.ci_high - s.mean for s in st]])
    ax.bar(range(len(methods)), mean, yerr=err, capsize=4, color=[_COLORS[m] for m in methods],
           tick_label=[_LABELS[m] for m in methods])  # fmt: skip
    ax.set(ylabel=ylabel, title=title)
    ax.tick_params(axis="x", labelrotation=25, labelsize=8)


def plot(report, out_dir: str | Path) -> list[Path]:
    """Test accuracy per method; BAR's gain over LoRA against SAM's, per seed, with
    the recovered fraction; seconds per step against LoRA (means with 95% CIs)."""
    from sharpkit.experiments.lora_digits import R_MIN

    methods = ["lora", "sam", "obar", "nbar", "bar"]
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(13, 4.2), layout="constrained")
    _bar(ax1, report, "acc_{}", methods, "test accuracy", "accuracy (mean, 95% CI)")
    lo = min(report.stats[f"acc_{m}"].mean for m in methods)
    ax1.set_ylim(max(0.0, lo - 0.1), 1.0)
    gs = 100 * np.array(report.stats["gain_sam"].values)
    gb = 100 * np.array(report.stats["gain_bar"].values)
    ax2.plot(gs, gb, "o", color=_COLORS["bar"], ms=5, label="one seed")
    ax2.plot(gs.mean(), gb.mean(), "*", color="k", ms=12, label="mean over seeds")
    span = np.array([min(gs.min(), gb.min(), 0) - 0.5, max(gs.max(), gb.max(), 0) + 0.5])
    ax2.plot(span, span, "k--", lw=0.8, label="BAR = SAM (fraction 1)")
    ax2.plot(span, R_MIN * span, "k:", lw=0.8, label=f"fraction {R_MIN:g}")
    ax2.axhline(0, color="k", lw=0.4)
    ax2.axvline(0, color="k", lw=0.4)
    ax2.set(xlabel="SAM - LoRA (points)", ylabel="BAR - LoRA (points)",
            title="gain over LoRA, paired per seed")  # fmt: skip
    ax2.legend(fontsize=7)
    _bar(ax3, report, "cost_{}", ["sam", "obar", "nbar", "bar"], "seconds per step / LoRA's",
         "cost (same run)")  # fmt: skip
    ax3.axhline(1, color="k", lw=0.6)
    fig.suptitle(f"LoRA on digits ({len(report.runs)} seeds): {report.verdict.label}")
    return save_figure(fig, out_dir, "lora_digits")
