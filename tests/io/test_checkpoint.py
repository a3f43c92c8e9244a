"""Safe checkpoint loading: formats, refusal of code-running pickles, mismatches, NaNs."""

from __future__ import annotations

import pathlib

import pytest
import torch
from torch import nn

from sharpkit.io import (
    CheckpointError,
    check_state_dict,
    load_checkpoint,
    load_state_dict,
    nonfinite_entries,
    save_state_dict,
)


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_round_trip(tmp_path, suffix) -> None:
    net = _net()
    path = save_state_dict(net.state_dict(), tmp_path / f"m{suffix}")
    other = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    load_checkpoint(other, path)
    for (k, a), b in zip(net.state_dict().items(), other.state_dict().values()):
        assert torch.equal(a, b), k


def test_nested_training_checkpoint(tmp_path) -> None:
    net = _net()
    torch.save({"model_state_dict": net.state_dict(), "epoch": 3}, tmp_path / "ckpt.pt")
    assert set(load_state_dict(tmp_path / "ckpt.pt")) == set(net.state_dict())


class _Evil:
    """Unpickling this creates a file: the attack a weights-only load must block."""

    def __init__(self, target: pathlib.Path) -> None:
        self.target = target

    def __reduce__(self):
        return (pathlib.Path.touch, (self.target,))


def test_malicious_pickle_refused_and_never_executed(tmp_path) -> None:
    target = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"weight": torch.zeros(2), "payload": _Evil(target)}, path)
    assert not target.exists()
    with pytest.raises(CheckpointError, match="refused: the file needs arbitrary code"):
        load_state_dict(path)
    assert not target.exists()
    # sanity of the test itself: an unsafe load would have created the file
    torch.load(path, weights_only=False)
    assert target.exists()


def test_key_and_shape_mismatches_named(tmp_path) -> None:
    state = dict(_net().state_dict())
    state.pop("0.bias")
    state["extra.weight"] = torch.zeros(1)
    state["2.weight"] = torch.zeros(5, 4)
    path = save_state_dict(state, tmp_path / "bad.safetensors")
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(_net(), path)
    msg = str(info.value)
    assert "missing keys: 0.bias" in msg
    assert "unexpected keys: extra.weight" in msg
    assert "2.weight (checkpoint (5, 4), model (2, 4))" in msg
    assert check_state_dict(_net(), _net().state_dict()) == []


def test_nonfinite_reported(tmp_path) -> None:
    state = dict(_net().state_dict())
    state["0.weight"] = state["0.weight"].clone()
    state["0.weight"][0, 0] = float("inf")
    state["2.bias"] = torch.full((2,), float("nan"))
    path = save_state_dict(state, tmp_path / "nan.pt")
    assert nonfinite_entries(state) == ["0.weight", "2.bias"]
    with pytest.raises(CheckpointError, match=r"non-finite weights .* 0.weight, 2.bias"):
        load_checkpoint(_net(), path)
    load_checkpoint(_net(), path, allow_nonfinite=True)


def test_unreadable_files(tmp_path) -> None:
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_state_dict(tmp_path / "missing.pt")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="safetensors"):
        load_state_dict(tmp_path / "junk.safetensors")
    (tmp_path / "junk.pt").write_bytes(b"garbage")
    with pytest.raises(CheckpointError):
        load_state_dict(tmp_path / "junk.pt")
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="expected a state dict"):
        load_state_dict(tmp_path / "list.pt")


def _kind(model: nn.Module, path) -> str:
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(model, path)
    assert "\n" not in str(exc.value)
    return exc.value.kind


def test_every_failure_has_a_kind(tmp_path) -> None:
    lin = nn.Linear(2, 2)
    sd = lin.state_dict()
    assert _kind(lin, tmp_path / "nope.pt") == "missing"
    (tmp_path / "dir.pt").mkdir()
    assert _kind(lin, tmp_path / "dir.pt") == "unreadable"
    (tmp_path / "text.pt").write_text("hello\n")
    assert _kind(lin, tmp_path / "text.pt") == "corrupt"
    # tensors torch cannot measure: corrupt (unsupported), named
    for name, t in {
        "meta": torch.empty(2, 2, device="meta"),
        "sparse": sd["weight"].to_sparse(),
        "quantized": torch.quantize_per_tensor(sd["weight"], 0.1, 0, torch.qint8),
    }.items():
        torch.save({**sd, "weight": t}, tmp_path / f"{name}.pt")
        with pytest.raises(CheckpointError, match=f"weight .*{name}") as exc:
            load_checkpoint(lin, tmp_path / f"{name}.pt")
        assert exc.value.kind == "corrupt"
    # dtype families that do not match the model: mismatched (half -> float loads)
    for dt in (torch.float8_e4m3fn, torch.complex64, torch.int64, torch.bool):
        save_state_dict({**sd, "weight": sd["weight"].to(dt)}, tmp_path / "d.safetensors")
        with pytest.raises(CheckpointError, match="dtype mismatches: weight") as exc:
            load_checkpoint(nn.Linear(2, 2), tmp_path / "d.safetensors")
        assert exc.value.kind == "mismatched"
    save_state_dict({**sd, "weight": sd["weight"].half()}, tmp_path / "h.safetensors")
    load_checkpoint(nn.Linear(2, 2), tmp_path / "h.safetensors")


def test_refused_load_changes_nothing_in_the_model(tmp_path) -> None:
    lin = nn.Linear(2, 2)
    before = {k: v.clone() for k, v in lin.state_dict().items()}
    bad = {"weight": torch.ones(2, 2), "bias": torch.ones(2, dtype=torch.long)}
    save_state_dict(bad, tmp_path / "b.pt")
    assert _kind(lin, tmp_path / "b.pt") == "mismatched"
    assert all(torch.equal(before[k], v) for k, v in lin.state_dict().items())


def test_key_lists_are_capped(tmp_path) -> None:
    state = {**nn.Linear(2, 2).state_dict(), **{f"extra.{i}": torch.zeros(1) for i in range(5000)}}
    save_state_dict(state, tmp_path / "big.pt")
    with pytest.raises(CheckpointError, match=r"and 4992 more") as exc:
        load_checkpoint(nn.Linear(2, 2), tmp_path / "big.pt")
    assert len(str(exc.value)) < 500


def test_save_is_atomic_and_leaves_no_temporaries(tmp_path) -> None:
    save_state_dict(nn.Linear(2, 2).state_dict(), tmp_path / "m.safetensors")
    with pytest.raises(ValueError, match="meta"):
        save_state_dict({"w": torch.empty(2, device="meta")}, tmp_path / "m.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]
    assert sorted(load_state_dict(tmp_path / "m.safetensors")) == ["bias", "weight"]


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_tied_gpt2_weights_save_and_load(tmp_path, suffix) -> None:
    transformers = pytest.importorskip("transformers")
    from sharpkit.io import save_model

    cfg = transformers.GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=20, n_positions=16)
    torch.manual_seed(0)
    g = transformers.GPT2LMHeadModel(cfg)
    path = save_model(g, tmp_path / f"gpt2{suffix}")
    assert sorted(load_state_dict(path)) == sorted(g.state_dict())
    torch.manual_seed(1)
    other = load_checkpoint(transformers.GPT2LMHeadModel(cfg), path)
    assert other.lm_head.weight is other.transformer.wte.weight  # still tied
    assert all(torch.equal(v, g.state_dict()[k]) for k, v in other.state_dict().items())


def test_file_with_one_name_of_a_tied_pair_loads(tmp_path) -> None:
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import save_model as st_save_model

    cfg = transformers.GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=20, n_positions=16)
    g = transformers.GPT2LMHeadModel(cfg)
    st_save_model(g, str(tmp_path / "st.safetensors"))  # keeps one name of the tied pair
    assert len(load_state_dict(tmp_path / "st.safetensors")) == len(g.state_dict()) - 1
    other = load_checkpoint(transformers.GPT2LMHeadModel(cfg), tmp_path / "st.safetensors")
    assert torch.equal(other.lm_head.weight, g.lm_head.weight)
