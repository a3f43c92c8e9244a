"""Record balancedness and the gradient gap per pair and step, for any optimizer.

Li, Zhang, He (NeurIPS 2024): SGD conserves ``B = (||x||^2 - ||y||^2) / 2`` up to
an ``O(eta)`` drift, SAM drives ``|B|`` down at a rate set by the gradient gap
``||g_x||^2 - ||g_y||^2`` (NOP) and BAR does so explicitly. The tracker makes
those dynamics visible per layer: tidy records, pandas, CSV/JSON, and
:func:`sharpkit.plotting.balance.plot_balance`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from .pairs import FactorPair, pairs_from

__all__ = ["COLUMNS", "BalanceTracker"]

#: The columns of every record, in order.
COLUMNS = (
    "step",
    "pair",
    "balancedness",
    "abs_balancedness",
    "grad_gap",
    "norm_x_sq",
    "norm_y_sq",
)


class BalanceTracker:
    """Records ``B``, ``|B|``, the gradient gap, ``||x||^2`` and ``||y||^2`` per pair.

    Two ways to drive it:

    - ``record(step)`` by hand, after ``backward()``: ``B`` and the norms are
      those of the current weights, ``grad_gap`` that of the gradients now in
      ``.grad`` (NaN for a pair without gradient).
    - ``attach(optimizer)``: records the current state as step 0 (``grad_gap``
      NaN), then after every ``optimizer.step()`` (a step post-hook, so it works
      for torch.optim, SAM, BAR, ...) records step ``t = 1, 2, ...``: ``B`` after
      the update and the gap of the gradients the step left in ``.grad`` (the ones
      it used; for SAM the gradients at the perturbed point).

    Only steps that are multiples of ``every`` are recorded. All pairs are read
    with one fused norm pass and one host synchronisation per record.

    Args:
        model_or_pairs: a model (its pairs are found with
            :func:`~sharpkit.balance.find_pairs`) or a list of
            :class:`~sharpkit.balance.FactorPair` / ``(x, y)`` tuples.
        every: record every this many steps (>= 1).

    Example:
        >>> from sharpkit.balance import LoRALinear
        >>> net = LoRALinear(4, 2, rank=2, generator=torch.Generator().manual_seed(0))
        >>> tracker = BalanceTracker(torch.nn.Sequential(net))
        >>> opt = torch.optim.SGD(net.parameters(), lr=0.1)
        >>> _ = tracker.attach(opt)
        >>> for _ in range(3):
        ...     opt.zero_grad()
        ...     net(torch.ones(1, 4)).sum().backward()
        ...     opt.step()
        >>> df = tracker.to_dataframe()
        >>> df["step"].tolist(), list(df.columns) == list(COLUMNS)
        ([0, 1, 2, 3], True)
    """

    def __init__(
        self,
        model_or_pairs: nn.Module | Iterable[FactorPair | tuple[torch.Tensor, torch.Tensor]],
        *,
        every: int = 1,
    ) -> None:
        if isinstance(every, bool) or not isinstance(every, int):
            raise TypeError(f"every: expected an int, got {type(every).__name__}")
        if every < 1:
            raise ValueError(f"every: must be >= 1, got {every}")
        self.pairs = pairs_from(model_or_pairs, "model_or_pairs")
        if not self.pairs:
            raise ValueError(
                "model_or_pairs: no factor pair found (sharpkit LoRALinear, PEFT LoRA "
                "layers, or an explicit list of (x, y) pairs)"
            )
        self.every = every
        self.records: list[dict[str, Any]] = []
        self._next_step = 0
        self._handle: Any = None

    # -- recording -----------------------------------------------------------------

    @torch.no_grad()
    def record(self, step: int | None = None) -> None:
        """Record every pair now (if ``step`` is a multiple of ``every``).

        Args:
            step: the step label; ``None`` continues the tracker's own counter
                (0, 1, 2, ... over the calls).
        """
        if step is None:
            step = self._next_step
        elif isinstance(step, bool) or not isinstance(step, int):
            raise TypeError(f"step: expected an int or None, got {type(step).__name__}")
        self._next_step = step + 1
        if step % self.every:
            return
        tensors = [t for p in self.pairs for t in (p.x, p.y)]
        has_grad = [p.x.grad is not None and p.y.grad is not None for p in self.pairs]
        tensors += [t.grad for p, h in zip(self.pairs, has_grad) if h for t in (p.x, p.y)]
        norms = torch._foreach_norm(tensors)
        first = norms[0]
        if all(n.device == first.device for n in norms):  # one transfer, one sync
            values = torch.stack([n.to(torch.float64) for n in norms]).tolist()
        else:
            values = [float(n) for n in norms]
        k = 2 * len(self.pairs)
        grad_values = iter(values[k:])
        for i, pair in enumerate(self.pairs):
            nx, ny = values[2 * i] ** 2, values[2 * i + 1] ** 2
            if has_grad[i]:
                gap = next(grad_values) ** 2 - next(grad_values) ** 2
            else:
                gap = math.nan
            b = 0.5 * (nx - ny)
            self.records.append(
                {
                    "step": step,
                    "pair": pair.name,
                    "balancedness": b,
                    "abs_balancedness": abs(b),
                    "grad_gap": gap,
                    "norm_x_sq": nx,
                    "norm_y_sq": ny,
                }
            )

    def attach(self, optimizer: Optimizer) -> BalanceTracker:
        """Record now (step 0) and after every ``optimizer.step()``; returns ``self``."""
        if not isinstance(optimizer, Optimizer):
            raise TypeError(
                f"optimizer: expected a torch.optim.Optimizer, got {type(optimizer).__name__}"
            )
        self.detach()
        self.record(self._next_step)
        self._handle = optimizer.register_step_post_hook(lambda *_: self.record())
        return self

    def detach(self) -> None:
        """Stop recording on optimizer steps."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    # -- export ----------------------------------------------------------------------

    def to_dataframe(self) -> Any:
        """The records as a tidy pandas DataFrame with :data:`COLUMNS`."""
        import pandas as pd

        return pd.DataFrame(self.records, columns=list(COLUMNS))

    def to_csv(self, path: str | Path) -> Path:
        """Write the records as CSV (one row per pair and step)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.to_dataframe().to_csv(path, index=False)
        return path

    def to_json(self, path: str | Path) -> Path:
        """Write ``{"columns", "pairs", "every", "records"}`` as JSON (NaN as ``"nan"``)."""
        from ..io.results import write_json_atomic

        return write_json_atomic(
            path,
            {
                "columns": list(COLUMNS),
                "pairs": [p.name for p in self.pairs],
                "every": self.every,
                "records": self.records,
            },
        )
