"""Sharpness figures: metrics over a training run (``sharpkit measure`` series mode)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure

__all__ = ["plot_sharpness_series"]


def plot_sharpness_series(
    steps: Sequence[float],
    values: Mapping[str, Sequence[float]],
    errors: Mapping[str, Sequence[float | None]] | None = None,
    *,
    xlabel: str = "checkpoint",
) -> Figure:
    """One small panel per metric: value (with +-stderr bars where known) over training.

    Example:
        >>> fig = plot_sharpness_series([1, 2, 3], {"lambda_max": [3.0, 2.0, 1.5]})
        >>> len(fig.axes)
        1
        >>> plt.close(fig)
    """
    names = list(values)
    if not names:
        raise ValueError("values: no metrics to plot")
    cols = min(3, len(names))
    rows = (len(names) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.8 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        v = np.asarray(values[name], dtype=float)
        err = None
        if errors and name in errors:
            err = np.asarray([np.nan if e is None else e for e in errors[name]], dtype=float)
        ax.errorbar(steps, v, yerr=err, fmt="-o", ms=3, capsize=2)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(names) :]:
        ax.set_visible(False)
    fig.tight_layout()
    return fig
