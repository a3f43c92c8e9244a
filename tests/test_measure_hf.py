"""``sharpkit measure --loss hf`` end to end on a tiny GPT-2 built from a config, at its
default (SDPA) attention, with tied input/output embeddings and unevenly padded
dict batches; the top eigenvalue is checked against an independent Lanczos on the
eager-attention twin of the same weights."""

from __future__ import annotations

import json
import pathlib
import textwrap

import pytest

transformers = pytest.importorskip("transformers")

from sharpkit.cli import main  # noqa: E402
from sharpkit.curvature import HessianOperator, eigenvalues  # noqa: E402
from sharpkit.hf import hf_loss  # noqa: E402
from sharpkit.io import save_model  # noqa: E402

SPEC = (pathlib.Path(__file__).parent / "_lm_spec.py").read_text() + textwrap.dedent(
    """
    import transformers

    CONFIG = dict(n_layer=1, n_embd=16, n_head=2, vocab_size=V, n_positions=16)


    def model(attn="sdpa"):
        torch.manual_seed(0)
        cfg = transformers.GPT2Config(**CONFIG, attn_implementation=attn)
        return transformers.GPT2LMHeadModel(cfg)
    """
)


@pytest.mark.slow
def test_measure_hf_checkpoint(tmp_path, monkeypatch) -> None:
    spec = tmp_path / "gpt_spec.py"
    spec.write_text(SPEC)
    monkeypatch.syspath_prepend(str(tmp_path))
    import gpt_spec

    net = gpt_spec.model()
    ckpt = save_model(net, tmp_path / "gpt.safetensors")  # wte and lm_head are tied
    out = tmp_path / "out"
    code = main(
        ["measure", str(ckpt), "--model", f"{spec}:model", "--data", f"{spec}:lm",
         "--loss", "hf", "--metrics", "lambda_max,pac_bayes", "--dtype", "float64",
         "--set", "pac_bayes.samples=2", "--set", "pac_bayes.max_iter=6",
         "--out", str(out), "--no-landscape", "--no-progress"]
    )  # fmt: skip
    assert code in (0, 1)  # 1 only if a metric failed; the report is kept either way
    doc = json.loads((out / "report.json").read_text())
    assert "lambda_max" in doc["metrics"], doc.get("failures")
    assert 0.0 < doc["base"]["accuracy"] < 1.0  # hf_accuracy is the default with --loss hf
    eager = gpt_spec.model("eager").double()
    eager.load_state_dict(net.state_dict())
    ref = eigenvalues(HessianOperator(eager, hf_loss, gpt_spec.lm()), k=1, tol=1e-10, seed=0)
    assert doc["metrics"]["lambda_max"]["value"] == pytest.approx(
        float(ref.eigenvalues[0]), rel=1e-6
    )
