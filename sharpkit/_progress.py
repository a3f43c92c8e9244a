"""Progress bars that behave in terminals, pipes and notebooks.

:func:`progress_bar` wraps :class:`tqdm.tqdm`:

- off unless asked for (``enabled``), and off when stderr is not a terminal
  (``disable=None``), so piped or logged output never fills with ``\\r`` lines;
- the notebook widget only where ``ipywidgets`` is installed (``tqdm.auto``
  without it prints ``TqdmWarning: IProgress not found``); plain tqdm otherwise;
- redrawn at most twice a second (``mininterval=0.5``).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable
from typing import Any

__all__ = ["progress_bar"]


def _tqdm_class() -> Any:
    if importlib.util.find_spec("ipywidgets") is not None:
        from tqdm.auto import tqdm
    else:
        from tqdm import tqdm
    return tqdm


def progress_bar(iterable: Iterable[Any] | None, desc: str, enabled: bool, **kwargs: Any) -> Any:
    """``iterable`` with a tqdm bar when ``enabled`` and stderr is a terminal (``None`` and
    ``total=``: a bar updated by hand).

    Example:
        >>> list(progress_bar(range(3), "demo", enabled=False))
        [0, 1, 2]
    """
    return _tqdm_class()(
        iterable,
        desc=desc,
        disable=None if enabled else True,
        leave=False,
        mininterval=0.5,
        **kwargs,
    )
