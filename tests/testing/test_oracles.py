"""The oracle cases are what they claim to be."""

from __future__ import annotations

import pytest
import torch

from sharpkit.testing import ORACLE_CASES, TwoFactorLinear, dense_hessian, oracle_cases


def test_all_cases_build_and_are_tiny() -> None:
    cases = oracle_cases()
    assert tuple(cases) == ORACLE_CASES
    for case in cases.values():
        dim = sum(p.numel() for p in case.model.parameters() if p.requires_grad)
        assert 1 <= dim <= 100, case.name


def test_seeded() -> None:
    a = oracle_cases(("cnn",), seed=3)["cnn"]
    b = oracle_cases(("cnn",), seed=3)["cnn"]
    c = oracle_cases(("cnn",), seed=4)["cnn"]
    assert all(torch.equal(p, q) for p, q in zip(a.model.parameters(), b.model.parameters()))
    assert not torch.equal(a.data[0], c.data[0])


def test_linear_regression_closed_form() -> None:
    case = oracle_cases(("linear_regression",))["linear_regression"]
    x = case.data[0].double()
    torch.testing.assert_close(case.closed_form, x.T @ x / len(x))
    torch.testing.assert_close(dense_hessian(case.model, case.loss_fn, case.data), case.closed_form)


def test_multi_batch_uneven_and_lora_indefinite() -> None:
    case = oracle_cases(("multi_batch",))["multi_batch"]
    assert [len(b[0]) for b in case.data] == [5, 5, 3]
    lora = oracle_cases(("lora_pair",))["lora_pair"]
    assert isinstance(lora.model, TwoFactorLinear)
    eig = torch.linalg.eigvalsh(dense_hessian(lora.model, lora.loss_fn, lora.data))
    assert eig[0] < 0 < eig[-1]  # the product's cross-curvature makes it indefinite


def test_unknown_case() -> None:
    with pytest.raises(ValueError, match="unknown oracle case"):
        oracle_cases(("resnet",))
