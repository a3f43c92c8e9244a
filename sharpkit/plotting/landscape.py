"""Loss-landscape figures: 1-D curves and 2-D contour / filled-contour plots.

No computation here: the surfaces come from :mod:`sharpkit.landscape`.
"""

from __future__ import annotations

from typing import Any

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

__all__ = ["plot_landscape_2d", "plot_surface_1d", "plot_surface_2d"]


def plot_surface_1d(
    surface: Any, ax: Axes | None = None, *, label: str | None = None, accuracy: bool = True
) -> Axes:
    """Plot a 1-D :class:`~sharpkit.landscape.Surface` (loss; accuracy on a twin axis).

    Example:
        >>> import torch
        >>> from sharpkit.landscape import Surface
        >>> from sharpkit.protocol import MeasurementProtocol
        >>> s = Surface([torch.linspace(-1, 1, 5)], torch.linspace(-1, 1, 5) ** 2, None,
        ...             "direction", MeasurementProtocol("grid"))
        >>> ax = plot_surface_1d(s); plt.close(ax.figure)
    """
    if ax is None:
        _, ax = plt.subplots(figsize=(5, 3.5))
    x = np.asarray(surface.coords[0])
    ax.plot(x, np.asarray(surface.loss), color="C0", label=label or "loss")
    xlabel = {"interpolation": "t  (0 = A, 1 = B)"}.get(surface.kind, "alpha  (w + alpha d)")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("loss")
    if accuracy and surface.accuracy is not None:
        twin = ax.twinx()
        twin.plot(x, np.asarray(surface.accuracy), color="C1", ls="--", label="accuracy")
        twin.set_ylabel("accuracy", color="C1")
        twin.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    return ax


def plot_surface_2d(
    surface: Any,
    ax: Axes | None = None,
    *,
    filled: bool = True,
    levels: int = 30,
    log: bool = True,
    trajectory: Any = None,
) -> Axes:
    """Contour (``filled=False``) or filled contour of a 2-D surface.

    Args:
        surface: a 2-D :class:`~sharpkit.landscape.Surface`.
        ax: axes (a new figure if ``None``).
        filled: filled contour with contour lines on top, else lines only.
        levels: number of contour levels.
        log: contour ``log10(loss)`` (Li et al. plot losses spanning decades).
        trajectory: ``(n, 2)`` coordinates of a training path (e.g. from
            :func:`~sharpkit.landscape.pca_directions`) drawn on top.

    Example:
        >>> import torch
        >>> from sharpkit.landscape import Surface
        >>> from sharpkit.protocol import MeasurementProtocol
        >>> g = torch.linspace(-1, 1, 6)
        >>> s = Surface([g, g], 1 + g[:, None] ** 2 + 2 * g[None, :] ** 2, None, "plane",
        ...             MeasurementProtocol("grid"))
        >>> ax = plot_surface_2d(s, trajectory=[[0.5, 0.5], [0.0, 0.0]]); plt.close(ax.figure)
    """
    if ax is None:
        _, ax = plt.subplots(figsize=(5, 4.2))
    x, y = (np.asarray(c) for c in surface.coords)
    z = np.asarray(surface.loss).T  # contour wants z[y, x]
    if log:
        z = np.log10(np.maximum(z, np.finfo(float).tiny))
    X, Y = np.meshgrid(x, y)
    if filled:
        cs = ax.contourf(X, Y, z, levels=levels, cmap="viridis")
        ax.contour(X, Y, z, levels=levels, colors="k", linewidths=0.3)
    else:
        cs = ax.contour(X, Y, z, levels=levels, cmap="viridis")
        ax.clabel(cs, fontsize=6)
    ax.figure.colorbar(cs, ax=ax, label="log10 loss" if log else "loss")
    if trajectory is not None:
        t = np.asarray(trajectory, dtype=float)
        ax.plot(
            t[:, 0], t[:, 1], "-o", color="w", ms=2.5, lw=1, mec="k", mew=0.3, label="trajectory"
        )
        ax.plot(t[-1, 0], t[-1, 1], "*", color="r", ms=10, label="final")
        ax.legend(loc="upper right", fontsize=7)
    ax.set_xlabel("direction 1")
    ax.set_ylabel("direction 2")
    ax.set_aspect("auto")
    return ax


def plot_landscape_2d(surface: Any, *, levels: int = 15, title: str | None = None) -> Figure:
    """Two views of one 2-D loss slice: a contour map and a 3-D surface.

    The left panel is the top view (labelled contour lines of ``log10`` loss, the
    centre ``w`` marked): where the loss rises fast and in which direction. The
    right panel is the side view (the loss itself, linear scale, over the same
    plane): how deep and wide the basin is. The slice is any 2-D
    :class:`~sharpkit.landscape.Surface`, e.g. along two filter-normalised
    directions (Li et al., 2018; docs/theory.md, loss landscapes).

    Args:
        surface: a 2-D :class:`~sharpkit.landscape.Surface`.
        levels: number of contour levels of the left panel.
        title: figure title (default: none).

    Returns:
        The figure (two axes, the second a 3-D one).

    Example:
        >>> import torch
        >>> from sharpkit.landscape import Surface
        >>> from sharpkit.protocol import MeasurementProtocol
        >>> g = torch.linspace(-1, 1, 7)
        >>> s = Surface([g, g], 1 + g[:, None] ** 2 + 2 * g[None, :] ** 2, None, "plane",
        ...             MeasurementProtocol("grid"))
        >>> fig = plot_landscape_2d(s)
        >>> [ax.get_title() for ax in fig.axes if ax.get_title()]  # doctest: +ELLIPSIS
        ['top view: contours of log10 loss', 'side view: loss surface']
        >>> plt.close(fig)
    """
    coords = getattr(surface, "coords", None)
    if coords is None or len(coords) != 2:
        raise ValueError("surface: expected a 2-D Surface (two coordinate axes)")
    fig = plt.figure(figsize=(11, 4.4))
    ax = fig.add_subplot(1, 2, 1)
    plot_surface_2d(surface, ax, filled=False, levels=levels, log=True)
    ax.plot(0.0, 0.0, "k+", ms=9, mew=1.5)
    ax.set_title("top view: contours of log10 loss")
    ax3 = fig.add_subplot(1, 2, 2, projection="3d")
    x, y = (np.asarray(c, dtype=float) for c in coords)
    X, Y = np.meshgrid(x, y)
    Z = np.asarray(surface.loss, dtype=float).T
    ax3.plot_surface(X, Y, Z, cmap="viridis", linewidth=0, antialiased=True, alpha=0.95)
    ax3.set_xlabel("direction 1")
    ax3.set_ylabel("direction 2")
    ax3.set_zlabel("loss")
    ax3.view_init(elev=28, azim=-60)
    ax3.set_title("side view: loss surface")
    if title is not None:
        fig.suptitle(title)
    fig.tight_layout()
    return fig
