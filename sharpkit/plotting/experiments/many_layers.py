"""Figure of the many-layers experiment (sharpkit.experiments.many_layers)."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from .._save import save_figure

__all__ = ["plot"]

_COLORS = {"sgd": "tab:gray", "sam": "tab:blue", "nbar": "tab:orange"}


def plot(report, out_dir: str | Path) -> list[Path]:
    """Left: mean |B_l| / |B_l(0)| over training at the smallest and largest depth
    (first seed). Right: balancing rate relative to D = 1 against D, SAM and nBAR,
    mean and 95% CI over seeds, with 1/sqrt(D) and 1/D for reference."""
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4.0), layout="constrained")
    run0 = report.runs[0]
    depths = run0.series["depths"]
    every = run0.series["record_every"]
    for depth, ls in ((min(depths), "-"), (max(depths), "--")):
        for name, c in _COLORS.items():
            ys = run0.series[f"{name}@{depth}"]
            xs = [min(i * every, run0.config["steps"]) for i in range(len(ys))]
            ax1.plot(xs, ys, ls=ls, color=c, label=f"{name}, D = {depth}")
    ax1.set(xlabel="step", ylabel="mean |B_l| / |B_l(0)|", title="per-layer balancedness")
    ax1.legend(fontsize=7)
    d = np.asarray(depths, dtype=float)
    for name in ("sam", "nbar"):
        st = [report.stats[f"ratio_{name}@{k}"] for k in depths]
        mean = np.array([s.mean for s in st])
        if all(s.has_ci for s in st):
            err = np.array([[s.mean - s.ci_low for s in st], [s.ci_high - s.mean for s in st]])
            ax2.errorbar(d, mean, yerr=err, marker="o", capsize=3, color=_COLORS[name], label=name)
        else:
            ax2.plot(d, mean, marker="o", color=_COLORS[name], label=name)
    ax2.plot(d, 1 / np.sqrt(d), "k:", lw=0.8, label="1/sqrt(D)")
    ax2.plot(d, 1 / d, "k--", lw=0.8, label="1/D")
    ax2.set_xscale("log", base=2)
    ax2.set(xlabel="D (LoRA layers)", ylabel="rate(D) / rate(1)", title=f"{len(report.runs)} seeds")
    ax2.legend(fontsize=7)
    fig.suptitle(f"Many layers: {report.verdict.label}")
    return save_figure(fig, out_dir, "many_layers")
