"""dense_hessian checked independently: central differences of autograd gradients."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from sharpkit.testing import ORACLE_CASES, dense_hessian, oracle_cases

F64 = torch.float64


def _fd_hessian(model: nn.Module, loss_fn, data, mode: str, eps: float = 1e-5) -> torch.Tensor:
    """Columns H e_i = (g(w + eps e_i) - g(w - eps e_i)) / (2 eps), in float64."""
    m = copy.deepcopy(model).double().train(mode == "train")
    params = [p for p in m.parameters() if p.requires_grad]
    batches = data if isinstance(data, list) else [data]
    batches = [tuple(t.double() if t.is_floating_point() else t for t in b) for b in batches]
    total = sum(len(b[1]) for b in batches)

    def grad() -> torch.Tensor:
        g = 0
        for b in batches:
            loss = loss_fn(m, b) * len(b[1]) / total
            g = g + torch.cat([x.reshape(-1) for x in torch.autograd.grad(loss, params)])
        return g

    w = nn.utils.parameters_to_vector(params).detach()
    cols = []
    for i in range(len(w)):
        e = torch.zeros_like(w)
        e[i] = eps
        with torch.no_grad():
            nn.utils.vector_to_parameters(w + e, params)
        gp = grad()
        with torch.no_grad():
            nn.utils.vector_to_parameters(w - e, params)
        gm = grad()
        cols.append((gp - gm) / (2 * eps))
    return torch.stack(cols, dim=1)


@pytest.mark.parametrize("name", [n for n in ORACLE_CASES if n != "mlp_relu"])
def test_dense_hessian_matches_finite_differences(name: str) -> None:
    # (ReLU kinks make finite differences unreliable; the ReLU case is covered by the
    # agreement of two independent autodiff routes in tests/curvature/test_hessian.py.)
    case = oracle_cases((name,))[name]
    H = dense_hessian(case.model, case.loss_fn, case.data)
    fd = _fd_hessian(case.model, case.loss_fn, case.data, "eval")
    # central differences: truncation O(eps^2 * |third derivative|) ~ 1e-10 and
    # rounding O(eps_mach / eps) ~ 1e-11 at eps = 1e-5; 1e-7 leaves a wide margin.
    torch.testing.assert_close(H, fd, atol=1e-7, rtol=0)
    torch.testing.assert_close(H, H.T)


def test_dense_hessian_train_mode_batchnorm() -> None:
    case = oracle_cases(("batchnorm_eval",))["batchnorm_eval"]
    case.model.eval()
    H = dense_hessian(case.model, case.loss_fn, case.data, mode="train")
    fd = _fd_hessian(case.model, case.loss_fn, case.data, "train")
    torch.testing.assert_close(H, fd, atol=1e-7, rtol=0)
    assert not case.model.training  # the caller's mode (eval here) is restored


def test_params_subset_and_errors() -> None:
    case = oracle_cases(("mlp_tanh",))["mlp_tanh"]
    H = dense_hessian(case.model, case.loss_fn, case.data)
    Hb = dense_hessian(case.model, case.loss_fn, case.data, params=["2.bias"])
    torch.testing.assert_close(Hb, H[-3:, -3:])
    with pytest.raises(ValueError, match="params"):
        dense_hessian(case.model, case.loss_fn, case.data, params=["nope"])
    with pytest.raises(ValueError, match="data"):
        dense_hessian(case.model, case.loss_fn, [])
    with pytest.raises(ValueError, match="mode"):
        dense_hessian(case.model, case.loss_fn, case.data, mode="x")
