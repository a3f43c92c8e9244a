"""Figure of the outlier-injection experiment (sharpkit.experiments.outlier_injection)."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import seaborn as sns

from .._save import save_figure

__all__ = ["plot"]

_LABEL = "log(|B_0| / |B_T|) per unit time"


def _grids(report, prefix: str, ps: list[float], ks: list[float]) -> dict[str, np.ndarray]:
    return {
        m: np.array([[report.stats[f"{prefix}rate_{m}@{p:g},{k:g}"].mean for k in ks] for p in ps])
        for m in ("sam", "sgd")
    }


def plot(report, out_dir: str | Path) -> list[Path]:
    """Heat maps of the balancing rate (mean over seeds) over the outlier fraction p and
    strength k, SAM and SGD side by side on the same colour scale, one row per arm: the
    NOP toy, the OP toy and LoRA on the digits (those present in the report; a diverging
    scale centred at 0 where a rate is negative, as SAM's can be on real data)."""
    series = report.runs[0].series
    rows = [("", series["fractions"], series["strengths"], "NOP toy", "noise x k")]
    if any(k.startswith("op_rate_") for k in report.stats):
        rows.append(("op_", series["fractions"], series["strengths"], "OP toy", "noise x k"))
    if "lora_fractions" in series and any(k.startswith("lora_rate_") for k in report.stats):
        rows.append(
            ("lora_", series["lora_fractions"], series["lora_strengths"], "LoRA on digits",
             "input noise k sigma")
        )  # fmt: skip
    fig, axes = plt.subplots(len(rows), 2, figsize=(10, 3.8 * len(rows)), squeeze=False)
    for row, (prefix, ps, ks, arm, kname) in zip(axes, rows):
        grids = _grids(report, prefix, ps, ks)
        vmax = max(float(np.abs(g).max()) for g in grids.values()) or 1.0
        signed = any(float(g.min()) < 0 for g in grids.values())
        for ax, (m, title) in zip(row, (("sam", "SAM"), ("sgd", "SGD"))):
            sns.heatmap(
                grids[m], ax=ax, annot=True, fmt=".3f", cmap="RdBu_r" if signed else "viridis",
                vmin=-vmax if signed else 0.0, vmax=vmax,
                xticklabels=[f"{k:g}" for k in ks], yticklabels=[f"{p:g}" for p in ps],
                cbar_kws={"label": _LABEL},
            )  # fmt: skip
            ax.set(
                xlabel=f"outlier strength k ({kname})",
                ylabel="outlier fraction p",
                title=f"{arm}: {title}",
            )
    fig.suptitle(f"Outlier injection: {report.verdict.label}")
    fig.tight_layout()
    return save_figure(fig, out_dir, "outlier_injection")
