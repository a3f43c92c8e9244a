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


def _paired_row(report, ps: list[float], row) -> None:
    """LoRA arm, paired measurements: the per-state one-step drift (SAM minus SGD)
    against p with its CI over seeds, and each seed's paired gains."""
    ax = row[0]
    stats = [report.stats[f"lora_drift@{p:g}"] for p in ps]
    ax.errorbar(
        ps, [s.mean for s in stats],
        yerr=[[s.mean - s.ci_low for s in stats], [s.ci_high - s.mean for s in stats]]
        if all(s.has_ci for s in stats) else None,
        fmt="o-", color="C3", capsize=3, label="common states (clean SAM run); 95% CI",
    )  # fmt: skip
    for r in report.runs:
        ax.plot(
            ps, [r.summary[f"lora_drift@{p:g}"] for p in ps], "-", color="C3", alpha=0.25, lw=0.8
        )
    own = [p for p in ps if f"lora_drift_own@{p:g}" in report.stats]
    if own:
        st = [report.stats[f"lora_drift_own@{p:g}"] for p in own]
        ax.errorbar(
            own, [s.mean for s in st],
            yerr=[[s.mean - s.ci_low for s in st], [s.ci_high - s.mean for s in st]]
            if all(s.has_ci for s in st) else None,
            fmt="s--", color="C0", capsize=3,
            label=f"diagnostic: states along SAM's run at p = {max(ps):g}",
        )  # fmt: skip
    ax.axhline(0, color="k", lw=0.6)
    k = max(report.runs[0].series["lora_strengths"])
    ax.set(xlabel="outlier fraction p", ylabel="one-step drift, SAM minus SGD (per unit time)",
           title=f"LoRA: per-state balancing force (k = {k:g}; thin: seeds)")  # fmt: skip
    ax.legend(fontsize=8)
    ax = row[1]
    names = [("lora_gain_sam_minus_sgd", "end-of-run rate gain\n(SAM minus SGD)"),
             ("lora_drift_gain", "per-state drift gain")]  # fmt: skip
    for i, (key, _) in enumerate(names):
        s = report.stats[key]
        ax.plot([i] * len(s.values), s.values, "o", color="C0", alpha=0.5)
        if s.has_ci:
            ax.errorbar([i + 0.15], [s.mean], yerr=[[s.mean - s.ci_low], [s.ci_high - s.mean]],
                        fmt="s", color="k", capsize=4)  # fmt: skip
    ax.axhline(0, color="k", lw=0.6)
    ax.set_xticks(range(len(names)), [label for _, label in names])
    ax.set(ylabel="largest p minus p = 0", title="LoRA: paired gains (dots: seeds; black: 95% CI)")


def plot(report, out_dir: str | Path) -> list[Path]:
    """Heat maps of the balancing rate (mean over seeds) over the outlier fraction p and
    strength k, SAM and SGD side by side on the same colour scale, one row per arm: the
    NOP toy, the OP toy and LoRA on the digits (those present in the report; a diverging
    scale centred at 0 where a rate is negative, as SAM's can be on real data); a last
    row with the LoRA arm's paired measurements (per-state drift against p, per-seed
    gains) when present."""
    series = report.runs[0].series
    rows = [("", series["fractions"], series["strengths"], "NOP toy", "noise x k")]
    if any(k.startswith("op_rate_") for k in report.stats):
        rows.append(("op_", series["fractions"], series["strengths"], "OP toy", "noise x k"))
    if "lora_fractions" in series and any(k.startswith("lora_rate_") for k in report.stats):
        rows.append(
            ("lora_", series["lora_fractions"], series["lora_strengths"], "LoRA on digits",
             "input noise k sigma")
        )  # fmt: skip
    paired = "lora_drift_gain" in report.stats
    n_rows = len(rows) + int(paired)
    fig, axes = plt.subplots(n_rows, 2, figsize=(10, 3.8 * n_rows), squeeze=False)
    if paired:
        _paired_row(report, series["lora_fractions"], axes[-1])
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
