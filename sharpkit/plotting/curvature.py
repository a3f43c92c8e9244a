"""Figures for curvature results (no computation here)."""

from __future__ import annotations

from typing import Any

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.axes import Axes

__all__ = ["plot_spectral_density"]

# Densities below this are not drawn on the log axis (the Gaussian tails underflow
# to exact zeros, which a log scale cannot show).
_LOG_DENSITY_FLOOR = 1e-12


def plot_spectral_density(
    result: Any,
    ax: Axes | None = None,
    log: bool = True,
    *,
    label: str | None = None,
    color: str | None = None,
) -> Axes:
    """Plot an SLQ spectral density (``DensityResult``) like Ghorbani et al. (2019).

    Args:
        result: a :class:`sharpkit.curvature.DensityResult` (needs ``grid`` and ``density``).
        ax: axes to draw on (a new figure if ``None``).
        log: log-scaled density axis, which shows the outliers next to the bulk.
        label: legend label.
        color: line colour.

    Returns:
        The axes.

    Example:
        >>> import torch
        >>> from sharpkit.curvature import spectral_density
        >>> d = spectral_density(torch.diag(torch.arange(5.0)), runs=2, steps=5, seed=0)
        >>> plot_spectral_density(d).get_yscale()
        'log'
        >>> plt.close("all")
    """
    if ax is None:
        _, ax = plt.subplots(figsize=(5, 3.2))
    grid = np.asarray(result.grid, dtype=float)
    dens = np.asarray(result.density, dtype=float)
    if log:
        dens = np.where(dens > _LOG_DENSITY_FLOOR, dens, np.nan)
        ax.set_yscale("log")
    ax.plot(grid, dens, label=label, color=color, lw=1.2)
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density (log)" if log else "density")
    if label is not None:
        ax.legend()
    return ax
