"""Figures for curvature results (no computation here)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.axes import Axes

__all__ = ["plot_spectral_density"]

# On the log axis, densities below this fraction of the peak are not drawn: the
# Gaussian tails between well-separated nodes underflow towards exact zeros, which a
# log scale cannot show, and a floor would draw them as flat segments. They are
# left as gaps instead.
_LOG_RELATIVE_FLOOR = 1e-10


def plot_spectral_density(
    result: Any,
    ax: Axes | None = None,
    log: bool = True,
    *,
    label: str | None = None,
    color: str | None = None,
) -> Axes:
    """Plot an SLQ spectral density like Ghorbani et al. (2019), gaps where it vanishes.

    On a log axis, stretches where the smoothed density falls below ``1e-10`` of its
    peak are left blank rather than drawn at a floor (docs/theory.md, stochastic
    Lanczos quadrature).

    Args:
        result: a :class:`sharpkit.curvature.DensityResult`, or a mapping with
            ``"grid"`` and ``"density"`` (the ``details`` of the ``esd`` metric in a
            :class:`~sharpkit.sharpness.SharpnessReport`).
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
        >>> ax = plot_spectral_density({"grid": d.grid.tolist(), "density": d.density.tolist()})
        >>> plt.close("all")
    """
    if isinstance(result, Mapping):
        grid, dens = result.get("grid"), result.get("density")
    else:
        grid, dens = getattr(result, "grid", None), getattr(result, "density", None)
    if grid is None or dens is None:
        raise TypeError(f"result: expected a DensityResult or a mapping with 'grid' and "
                        f"'density', got {type(result).__name__}")  # fmt: skip
    grid = np.asarray(grid, dtype=float)
    dens = np.asarray(dens, dtype=float)
    if grid.shape != dens.shape or grid.ndim != 1:
        raise ValueError(f"result: grid and density must be 1-D of one length, got "
                         f"{grid.shape} and {dens.shape}")  # fmt: skip
    if ax is None:
        _, ax = plt.subplots(figsize=(5, 3.2))
    if log:
        peak = np.nanmax(dens) if dens.size else 0.0
        dens = np.where(dens > _LOG_RELATIVE_FLOOR * peak, dens, np.nan)
        ax.set_yscale("log")
    ax.plot(grid, dens, label=label, color=color, lw=1.2)
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density (log)" if log else "density")
    if label is not None:
        ax.legend()
    return ax
