"""Dense float64 references for tests and teaching (tiny models only).

:func:`dense_hessian` builds the full Hessian of the weighted loss with
plain double-backward autograd in float64, independently of :mod:`sharpkit.curvature`'s
Hessian-vector products, so the two can be checked against each other.
:func:`oracle_cases` returns the correctness-oracle problems of the curvature
engine (MLP tanh/relu, a small CNN, a tiny attention block, BatchNorm in eval
mode, LayerNorm, a LoRA pair, linear regression with ``H = X^T X / n`` in closed
form, and a multi-batch loader with an uneven last batch). :func:`check_optimizer`
runs the optimizer contract (:mod:`sharpkit.testing.contract`) on any SAM-family
optimizer.

Example:
    >>> import torch
    >>> model = torch.nn.Linear(2, 1, bias=False)
    >>> x = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    >>> dense_hessian(model, lambda m, b: 0.5 * (m(b) ** 2).mean(), x)
    tensor([[0.5000, 0.0000],
            [0.0000, 2.0000]], dtype=torch.float64)
"""

from sharpkit.testing.contract import ContractError, OptimizerSpec, check_optimizer
from sharpkit.testing.dense import dense_hessian
from sharpkit.testing.oracles import ORACLE_CASES, OracleCase, TwoFactorLinear, oracle_cases

__all__ = [
    "ORACLE_CASES",
    "ContractError",
    "OptimizerSpec",
    "OracleCase",
    "TwoFactorLinear",
    "check_optimizer",
    "dense_hessian",
    "oracle_cases",
]
