"""Figure of the balancedness-toys experiment (sharpkit.experiments.balance_toys)."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from .._save import save_figure

__all__ = ["plot"]

_STYLE = {"sgd": ("SGD", "C0"), "nsgd": ("normalised SGD", "C2"), "sam": ("SAM", "C3")}


def plot(report, out_dir: str | Path) -> list[Path]:
    """|B| over time on NOP and OP (first seed, a = 1 or the largest noise), and the final
    |B_T|/|B_0| against the noise level (mean over seeds) per toy and method."""
    run0 = report.runs[0]
    noises = run0.series["noises"]
    a_show = 1.0 if 1.0 in noises else noises[-1]
    t = np.array(run0.series["time"])
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.0), layout="constrained")
    for ax, kind in zip(axes[:2], ("nop", "op")):
        for m, (label, color) in _STYLE.items():
            ax.semilogy(t, run0.series[f"{kind}_{m}@{a_show:g}"], color=color, label=label)
        ax.set(
            xlabel="time (lr x steps)", ylabel="mean |B|", title=f"{kind.upper()}, a = {a_show:g}"
        )
        ax.legend(fontsize=8)
    ax = axes[2]
    # NOP and OP differ by marker shape and fill as well as by line style
    for kind, ls, marker, fill in (("nop", "-", "o", None), ("op", "--", "s", "white")):
        for m, (label, color) in _STYLE.items():
            ys = [report.stats[f"ratio_{kind}_{m}@{a:g}"].mean for a in noises]
            ax.semilogy(
                noises, ys, ls=ls, marker=marker, color=color, ms=5, mfc=fill or color,
                label=f"{kind.upper()} {label}",
            )  # fmt: skip
    ax.set(xlabel="noise a", ylabel="|B_T| / |B_0|", title="after the run")
    ax.legend(fontsize=7, ncols=2)
    fig.suptitle(f"Balancedness on the paper's toys: {report.verdict.label}")
    return save_figure(fig, out_dir, "balance_toys")
