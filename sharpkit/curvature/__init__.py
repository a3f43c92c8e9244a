"""Hessian-vector-product operators and the spectral estimators that consume them.

- :class:`HessianOperator`: ``v -> H v`` for (model, loss, data), weighted over
  batches (by examples, or tokens for a token-mean loss), explicit module mode,
  any parameter subset or per-module blocks.
- :func:`eigenvalues`: top-k / bottom-k by Lanczos with full reorthogonalisation.
- :func:`trace` (Hutchinson, Hutch++) and :func:`frobenius_norm_sq` with error bars.
- :func:`spectral_density`: stochastic Lanczos quadrature.

Every estimator also accepts a dense symmetric tensor (tests, teaching).

Example:
    >>> import torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    >>> g = torch.Generator().manual_seed(0)
    >>> data = (torch.randn(32, 4, generator=g), torch.randint(0, 3, (32,), generator=g))
    >>> H = HessianOperator(model, nn.CrossEntropyLoss(), data, dtype=torch.float64)
    >>> top = eigenvalues(H, k=2, seed=0)
    >>> bool(top.converged), top.eigenvalues.shape
    (True, torch.Size([2]))
"""

from sharpkit.curvature._linop import DenseOperator, LinearOperator, as_operator
from sharpkit.curvature.hessian import HVP_IMPLEMENTATIONS, HessianOperator
from sharpkit.curvature.hutchinson import TraceResult, frobenius_norm_sq, trace
from sharpkit.curvature.lanczos import EigenResult, eigenvalues
from sharpkit.curvature.slq import DensityResult, spectral_density

__all__ = [
    "HVP_IMPLEMENTATIONS",
    "DenseOperator",
    "DensityResult",
    "EigenResult",
    "HessianOperator",
    "LinearOperator",
    "TraceResult",
    "as_operator",
    "eigenvalues",
    "frobenius_norm_sq",
    "spectral_density",
    "trace",
]
