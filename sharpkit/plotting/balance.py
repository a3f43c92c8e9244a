"""Figures for balancedness dynamics (no computation here).

Li, Zhang, He (NeurIPS 2024): SGD keeps ``|B|`` near its start, SAM and BAR drive
it down; a log scale shows the decay per layer.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.axes import Axes

__all__ = ["plot_balance", "plot_toy_runs"]

_VALUES = ("abs_balancedness", "balancedness", "grad_gap", "norm_x_sq", "norm_y_sq")


def plot_balance(
    data: Any,
    ax: Axes | None = None,
    *,
    value: str = "abs_balancedness",
    log: bool | None = None,
    hue: str = "pair",
) -> Axes:
    """Line plot of a tracked quantity over steps, one line per pair (seaborn).

    Args:
        data: a :class:`~sharpkit.balance.BalanceTracker`, its
            ``to_dataframe()``, or its list of records.
        ax: axes to draw on (a new figure if ``None``).
        value: the column to plot (default ``|B|``).
        log: log-scaled y axis; default: on for ``abs_balancedness`` and the norms.
        hue: the column that separates lines (``"pair"``, or any column added to
            the DataFrame, e.g. an optimizer label).

    Returns:
        The axes.

    Example:
        >>> import torch
        >>> from sharpkit.balance import BalanceTracker, LoRALinear
        >>> net = LoRALinear(3, 2, rank=1, generator=torch.Generator().manual_seed(0))
        >>> tracker = BalanceTracker([(net.lora_B, net.lora_A)])
        >>> tracker.record(); tracker.record()
        >>> plot_balance(tracker).get_yscale()
        'log'
        >>> plt.close("all")
    """
    import pandas as pd
    import seaborn as sns

    if value not in _VALUES:
        raise ValueError(f"value: expected one of {_VALUES}, got {value!r}")
    if hasattr(data, "to_dataframe"):
        df = data.to_dataframe()
    elif isinstance(data, pd.DataFrame):
        df = data
    elif isinstance(data, list):
        df = pd.DataFrame(data)
    else:
        raise TypeError(
            f"data: expected a BalanceTracker, a DataFrame or a list of records, "
            f"got {type(data).__name__}"
        )
    if df.empty:
        raise ValueError("data: no records to plot")
    if hue not in df.columns:
        raise ValueError(f"hue: no column {hue!r} in the data")
    if log is None:
        log = value in ("abs_balancedness", "norm_x_sq", "norm_y_sq")
    if ax is None:
        _, ax = plt.subplots(figsize=(5.5, 3.4))
    sns.lineplot(data=df, x="step", y=value, hue=hue, ax=ax, errorbar=None)
    if log:
        ax.set_yscale("log")
    labels = {
        "abs_balancedness": "|B| = |‖x‖² − ‖y‖²| / 2",
        "balancedness": "B = (‖x‖² − ‖y‖²) / 2",
        "grad_gap": "‖g_x‖² − ‖g_y‖²",
        "norm_x_sq": "‖x‖²",
        "norm_y_sq": "‖y‖²",
    }
    ax.set_ylabel(labels[value])
    ax.set_xlabel("step")
    return ax


def plot_toy_runs(
    runs: Mapping[str, Any],
    ax: Axes | None = None,
    *,
    log: bool = True,
    band: bool = True,
) -> Axes:
    """Mean ``|B|`` over runs against step for several :class:`~sharpkit.balance.toys.ToyRun`.

    Args:
        runs: label -> ``ToyRun`` (e.g. ``{"SGD": ..., "SAM": ..., "nBAR": ...}``).
        ax: axes to draw on (a new figure if ``None``).
        log: log-scaled y axis.
        band: shade the 10-90 % range over runs (when there are several).

    Returns:
        The axes.

    Example:
        >>> import torch
        >>> from sharpkit.balance.toys import NOPToy, simulate
        >>> toy = NOPToy(1.0, generator=torch.Generator().manual_seed(0))
        >>> r = simulate(toy, "sam", steps=20, lr=0.01, runs=3)
        >>> plot_toy_runs({"SAM": r}).get_yscale()
        'log'
        >>> plt.close("all")
    """
    if not runs:
        raise ValueError("runs: empty")
    if ax is None:
        _, ax = plt.subplots(figsize=(5.5, 3.4))
    for label, run in runs.items():
        b = np.abs(np.asarray(run.balancedness, dtype=float))
        t = np.asarray(run.steps)
        (line,) = ax.plot(t, b.mean(axis=1), label=label, lw=1.4)
        if band and b.shape[1] > 1:
            lo, hi = np.quantile(b, [0.1, 0.9], axis=1)
            ax.fill_between(t, lo, hi, color=line.get_color(), alpha=0.2, lw=0)
    if log:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("|B| (mean over runs)")
    ax.legend()
    return ax
