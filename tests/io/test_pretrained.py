"""sharpkit.io.pretrained: save_pretrained directories, built offline and loaded with
safetensors only; the reference is transformers' own from_pretrained."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from sharpkit.io import CheckpointError  # noqa: E402
from sharpkit.io.pretrained import load_pretrained, read_pretrained  # noqa: E402


def _gpt2() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        n_layer=2, n_embd=16, n_head=2, vocab_size=32, n_positions=16, bos_token_id=0,
        eos_token_id=0,
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(cfg)


def test_sharded_directory_equals_from_pretrained_and_keeps_the_global_rng(tmp_path) -> None:
    _gpt2().save_pretrained(tmp_path, max_shard_size="8KB")
    info = read_pretrained(tmp_path)
    assert len(info.weights) > 1  # model.safetensors.index.json and its shards
    torch.manual_seed(123)
    before = torch.get_rng_state()
    model = load_pretrained(info)
    assert torch.equal(torch.get_rng_state(), before)  # building drew no global numbers
    ref = transformers.GPT2LMHeadModel.from_pretrained(tmp_path)
    assert model.lm_head.weight is model.transformer.wte.weight
    mine, theirs = model.state_dict(), ref.state_dict()
    assert mine.keys() == theirs.keys()
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert not model.training


def test_a_configuration_that_needs_its_own_code_is_refused(tmp_path) -> None:
    _gpt2().save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_mine.MyModel"}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="auto_map"):
        read_pretrained(tmp_path)
    cfg.pop("auto_map")
    cfg["architectures"] = ["NotAModel"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="'NotAModel', which is not a transformers model"):
        read_pretrained(tmp_path)


def test_missing_shard_and_bad_json(tmp_path) -> None:
    _gpt2().save_pretrained(tmp_path, max_shard_size="8KB")
    shard = sorted(tmp_path.glob("model-*.safetensors"))[0]
    shard.unlink()
    with pytest.raises(CheckpointError, match="missing weight shards") as err:
        read_pretrained(tmp_path)
    assert err.value.kind == "missing"
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="corrupt: not valid JSON"):
        read_pretrained(tmp_path)
