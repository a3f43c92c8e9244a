"""``sharpkit measure`` on Hugging Face ``save_pretrained`` directories and PEFT adapter
directories, with no ``--model`` and no ``--loss``, offline.

The reference of every number is a direct computation on the same model and data:
the model loaded with transformers' own ``from_pretrained`` (and PEFT's own
``PeftModel.from_pretrained`` for adapters), a :class:`HessianOperator` in float64
with the loss of the model class, and the same estimators with the same seed and
options. Bad input is refused in one line, exit 2, before any compute, writing
nothing.
"""

from __future__ import annotations

import json
import pathlib
import textwrap

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from sharpkit.cli import main  # noqa: E402
from sharpkit.curvature import HessianOperator, eigenvalues, trace  # noqa: E402
from sharpkit.hf import loss_for  # noqa: E402
from sharpkit.sharpness._registry import resolve_options  # noqa: E402

V = 32
DATA = (pathlib.Path(__file__).parent / "_lm_spec.py").read_text() + textwrap.dedent(
    """


    def peft_gpt2(r=2):  # a PeftModel that build() returns, for an adapter file
        import peft
        import transformers

        transformers.utils.logging.disable_progress_bar()  # stderr for sharpkit alone
        base = transformers.GPT2LMHeadModel.from_pretrained("gpt2")
        lora = peft.LoraConfig(r=r, lora_alpha=4, target_modules=["c_attn"], fan_in_fan_out=True)
        return peft.get_peft_model(base, lora)


    def peft_gpt2_r4():
        return peft_gpt2(r=4)


    def classes():  # sequence classification, 3 classes
        g = torch.Generator().manual_seed(2)
        out = []
        for _ in range(2):
            ids = torch.randint(0, V, (5, 10), generator=g)
            labels = torch.randint(0, 3, (5,), generator=g)
            out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
        return out
    """
)
METRICS = ["lambda_max", "trace"]
SETS = ["--set", "trace.num_samples=20"]


def _gpt2(n_embd: int = 16) -> torch.nn.Module:
    cfg = transformers.GPT2Config(
        n_layer=1, n_embd=n_embd, n_head=2, vocab_size=V, n_positions=16, bos_token_id=0,
        eos_token_id=0,
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(cfg)


def _bert() -> torch.nn.Module:
    cfg = transformers.BertConfig(
        num_hidden_layers=1, hidden_size=16, num_attention_heads=2, intermediate_size=32,
        vocab_size=V, max_position_embeddings=16, num_labels=3,
    )  # fmt: skip
    return transformers.BertForSequenceClassification(cfg)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A folder with the data spec, a GPT-2 and a BERT classifier saved with
    save_pretrained, and a trained-looking (B != 0) LoRA adapter of the GPT-2."""
    root = tmp_path_factory.mktemp("pretrained")
    (root / "hfdata.py").write_text(DATA)
    torch.manual_seed(0)
    _gpt2().save_pretrained(root / "gpt2")
    _bert().save_pretrained(root / "bert")
    _gpt2(n_embd=8).save_pretrained(root / "gpt2_narrow")
    # the base loaded from its directory: PEFT records it as base_model_name_or_path
    base = transformers.GPT2LMHeadModel.from_pretrained(root / "gpt2")
    lora = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn"], fan_in_fan_out=True)
    adapted = peft.get_peft_model(base, lora)
    with torch.no_grad():
        for name, p in adapted.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.3, generator=torch.Generator().manual_seed(3))
    adapted.save_pretrained(root / "adapter")
    # the same adapter recorded without a usable base
    (root / "adapter_nobase").mkdir()
    for f in ("adapter_model.safetensors", "adapter_config.json"):
        (root / "adapter_nobase" / f).write_bytes((root / "adapter" / f).read_bytes())
    cfg = json.loads((root / "adapter" / "adapter_config.json").read_text())
    (root / "adapter_nobase" / "adapter_config.json").write_text(
        json.dumps(cfg | {"base_model_name_or_path": "openai-community/gpt2"})
    )
    return root


def _measure(work, monkeypatch, *args: str) -> tuple[int, dict | None]:
    monkeypatch.chdir(work)  # the data spec and relative directories from here
    out = work / "out"
    metrics = [] if "--metrics" in args else ["--metrics", ",".join(METRICS)]
    code = main(
        ["measure", *args, *metrics, *SETS, "--dtype", "float64",
         "--out", str(out), "--overwrite", "--no-landscape", "--no-progress"]
    )  # fmt: skip
    doc = json.loads((out / "report.json").read_text()) if code in (0, 1) else None
    return code, doc


def _reference(model: torch.nn.Module, batches: list) -> dict[str, float]:
    """λmax and trace of the float64 Hessian over the trainable parameters, computed
    directly with the report's options and seed."""
    opts = resolve_options(METRICS, {"trace": {"num_samples": 20}})
    model = model.double().eval()
    H = HessianOperator(model, loss_for(model), batches)
    top = eigenvalues(H, k=1, tol=opts["lambda_max"]["tol"], seed=0)
    tr = trace(H, method=opts["trace"]["method"], num_samples=20, seed=0)
    return {"lambda_max": float(top.eigenvalues[0]), "trace": float(tr.estimate)}


def _data(work, name: str) -> list:
    import importlib.util

    spec = importlib.util.spec_from_file_location("hfdata_ref", work / "hfdata.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return getattr(mod, name)()


def _check(doc: dict, ref: dict[str, float]) -> None:
    assert not doc["failures"], doc["failures"]
    for name in METRICS:
        assert doc["metrics"][name]["value"] == pytest.approx(ref[name], rel=1e-8), name


def test_gpt2_directory_with_tied_weights(work, monkeypatch) -> None:
    code, doc = _measure(work, monkeypatch, "gpt2", "--data", "hfdata:lm")
    assert code == 0
    assert doc["config"]["loss"] == "hf"  # the default for a save_pretrained directory
    assert doc["config"]["model"] is None
    assert 0.0 <= doc["base"]["accuracy"] <= 1.0  # token accuracy (HFAccuracy)
    ref_model = transformers.GPT2LMHeadModel.from_pretrained(work / "gpt2")
    assert ref_model.lm_head.weight is ref_model.transformer.wte.weight
    _check(doc, _reference(ref_model, _data(work, "lm")))


def test_bert_classifier_directory(work, monkeypatch) -> None:
    code, doc = _measure(work, monkeypatch, "bert", "--data", "hfdata:classes",
                         "--metrics", "lambda_max,trace,fisher_rao")  # fmt: skip
    assert code == 0
    ref_model = transformers.BertForSequenceClassification.from_pretrained(work / "bert")
    batches = _data(work, "classes")
    _check(doc, _reference(ref_model, batches))
    with torch.no_grad():
        losses = [float(ref_model(**b).loss) * len(b["labels"]) for b in batches]
    assert doc["base"]["loss"] == pytest.approx(sum(losses) / 10, rel=1e-9)
    # Fisher-Rao with the loss's per-example form: sqrt(mean_i <w, grad l_i(w)>^2)
    params = [p for p in ref_model.parameters() if p.requires_grad]
    per_example = loss_for(ref_model, reduction="none")
    sq = []
    for b in batches:
        for li in per_example(ref_model, b):
            grads = torch.autograd.grad(li, params, retain_graph=True)
            sq.append(float(sum((g * p).sum() for g, p in zip(grads, params))) ** 2)
    ref = (sum(sq) / len(sq)) ** 0.5
    assert doc["metrics"]["fisher_rao"]["value"] == pytest.approx(ref, rel=1e-8)


@pytest.mark.parametrize("how", ["recorded base", "--base"])
def test_peft_adapter_directory(work, monkeypatch, how) -> None:
    if how == "--base":  # the configuration names a hub model: --base gives the local one
        args = ["adapter_nobase", "--base", "gpt2"]
    else:
        args = ["adapter"]
    code, doc = _measure(work, monkeypatch, *args, "--data", "hfdata:lm")
    assert code == 0
    base = transformers.GPT2LMHeadModel.from_pretrained(work / "gpt2")
    ref_model = peft.PeftModel.from_pretrained(base, work / "adapter", is_trainable=True)
    trainable = [n for n, p in ref_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)  # the Hessian of the adapters
    _check(doc, _reference(ref_model, _data(work, "lm")))


def test_peft_adapter_file_onto_the_model_build_returns(work, monkeypatch) -> None:
    """adapter_model.safetensors (keys without the adapter name) loads onto the
    PeftModel that --model builds; the numbers are the adapter directory's."""
    adapter = "adapter/adapter_model.safetensors"
    code, doc = _measure(work, monkeypatch, adapter, "--model", "hfdata:peft_gpt2",
                         "--loss", "hf", "--data", "hfdata:lm")  # fmt: skip
    assert code == 0
    base = transformers.GPT2LMHeadModel.from_pretrained(work / "gpt2")
    ref_model = peft.PeftModel.from_pretrained(base, work / "adapter", is_trainable=True)
    _check(doc, _reference(ref_model, _data(work, "lm")))


def test_series_of_trainer_checkpoint_directories(work, monkeypatch) -> None:
    """transformers.Trainer's checkpoint-N folders (save_pretrained files next to
    pickled optimizer state, which is never opened) give a series over the steps."""
    runs = work / "trainer"
    for step, seed in ((100, 5), (200, 6)):
        torch.manual_seed(seed)
        _gpt2().save_pretrained(runs / f"checkpoint-{step}")
        (runs / f"checkpoint-{step}" / "optimizer.pt").write_bytes(b"not even a pickle")
    monkeypatch.chdir(work)
    out = work / "out_series"
    dirs = ["trainer/checkpoint-100", "trainer/checkpoint-200"]
    code = main(["measure", *dirs, "--data", "hfdata:lm", "--metrics", "lambda_max",
                 "--dtype", "float64", "--out", str(out), "--no-progress"])  # fmt: skip
    assert code == 0
    series = json.loads((out / "series.json").read_text())
    assert series["steps"] == [100, 200] and series["step_source"] == "file name"
    for d, rep in zip(dirs, series["reports"]):
        model = transformers.GPT2LMHeadModel.from_pretrained(work / d).double().eval()
        H = HessianOperator(model, loss_for(model), _data(work, "lm"))
        tol = resolve_options(["lambda_max"], {})["lambda_max"]["tol"]
        ref = float(eigenvalues(H, k=1, tol=tol, seed=0).eigenvalues[0])
        assert rep["metrics"]["lambda_max"]["value"] == pytest.approx(ref, rel=1e-8)


def _dir_with(work, name: str, files: dict[str, bytes]) -> str:
    d = work / name
    d.mkdir(exist_ok=True)
    for f, content in files.items():
        (d / f).write_bytes(content)
    return name


def _bad_cases(work) -> dict[str, tuple[list[str], str]]:
    config = (work / "gpt2" / "config.json").read_bytes()
    pickle_dir = _dir_with(work, "pickled", {"config.json": config})
    torch.save(_gpt2().state_dict(), work / pickle_dir / "pytorch_model.bin")
    no_arch = json.loads(config) | {"architectures": None}
    return {
        "empty directory": ([_dir_with(work, "empty", {})], "not a save_pretrained directory"),
        "no weights": ([_dir_with(work, "cfg_only", {"config.json": config})], "no model weights"),
        "pickle weights": ([pickle_dir], "never unpickles"),
        "no architectures": (
            [_dir_with(work, "noarch", {"config.json": json.dumps(no_arch).encode()})],
            "names no architectures",
        ),
        "weights of another config": (
            [
                _dir_with(
                    work,
                    "other_config",
                    {
                        "config.json": (work / "gpt2_narrow" / "config.json").read_bytes(),
                        "model.safetensors": (work / "gpt2" / "model.safetensors").read_bytes(),
                    },
                )
            ],
            "mismatched: does not fit the model: shape mismatches",
        ),
        "hub base": (["adapter_nobase"], "never downloads"),
        "mismatched base": (
            ["adapter", "--base", "gpt2_narrow", "--metrics", "lambda_max"],
            "shape mismatches",
        ),
        "--model with a directory": (["gpt2", "--model", "hfdata:lm"], "--model: not used"),
        "adapter file of another rank": (
            ["adapter/adapter_model.safetensors", "--model", "hfdata:peft_gpt2_r4", "--loss", "hf"],
            "the adapter does not fit the base: shape mismatches: transformer.h.0.attn.c_attn.lora_A",
        ),
        "--base with a model": (["gpt2", "--base", "gpt2"], "--base: only used"),
    }


BAD = [
    "empty directory",
    "no weights",
    "pickle weights",
    "no architectures",
    "weights of another config",
    "hub base",
    "mismatched base",
    "--model with a directory",
    "adapter file of another rank",
    "--base with a model",
]


@pytest.mark.parametrize("case", BAD)
def test_bad_directories_are_refused_in_one_line(work, monkeypatch, capsys, case) -> None:
    args, needle = _bad_cases(work)[case]
    monkeypatch.chdir(work)
    out = work / f"out_bad_{BAD.index(case)}"
    code = main(["measure", *args, "--data", "hfdata:lm", "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("sharpkit measure: error: "), err
    assert needle in err[0], err[0]
    assert not out.exists()  # nothing written
