"""Cost of second order through default (SDPA) attention against the eager twin.

sharpkit runs every Hessian-vector product with ``scaled_dot_product_attention``
on its math backend (the fused kernels have no double backward). This measures
what that costs on tiny-to-small Hugging Face models built from configs (nothing
downloaded), against the *eager twin*: the same model and weights with
``attn_implementation="eager"`` (attention written out in matmuls, which has
second derivatives anyway). Cases per model, interleaved, float32, ratios to the
eager twin's cached product in the same round:

- ``eager, rev-rev cached`` (baseline) and ``sdpa, rev-rev cached``: one double
  backward per product (the default with the graph cached);
- ``eager / sdpa, rev-rev uncached``: forward, backward and double backward;
- ``eager / sdpa, fwd-rev``: forward-over-reverse (``jvp`` of ``grad``);
- ``eager / sdpa, gradient``: the first-order pass (``HessianOperator.gradient``;
  sdpa keeps its fused kernel there), for scale.

Run: ``python -m analysis.benchmarks.bench_attention [--quick] [--threads N]``;
writes analysis/benchmarks/results/attention.md (and .json).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from sharpkit.curvature import HessianOperator

from .harness import Case, Row, compare, machine_info, write_table

RESULTS = Path(__file__).parent / "results"


def _gpt2(attn: str, quick: bool) -> nn.Module:
    import transformers

    cfg = transformers.GPT2Config(
        vocab_size=256, n_positions=64, n_embd=64 if quick else 128, n_layer=2, n_head=4,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
        attn_implementation=attn,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(cfg)


def _bert(attn: str, quick: bool) -> nn.Module:
    import transformers

    cfg = transformers.BertConfig(
        vocab_size=256, hidden_size=64 if quick else 128, num_hidden_layers=2,
        num_attention_heads=4, intermediate_size=256, max_position_embeddings=64,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=2,
        attn_implementation=attn,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(cfg)


def _causal_lm_loss(m: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    ids = batch["input_ids"]
    logits = m(input_ids=ids).logits
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def _classification_loss(m: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return m(**batch).loss


def _batch(kind: str, quick: bool) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    n, t = (4, 32) if quick else (8, 64)
    ids = torch.randint(0, 256, (n, t), generator=g)
    if kind == "gpt2":
        return {"input_ids": ids}
    mask = torch.ones(n, t, dtype=torch.long)
    mask[0, t // 2 :] = 0
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "labels": torch.randint(0, 2, (n,), generator=g),
    }


def _cases(kind: str, quick: bool) -> tuple[list[Case], str]:
    build: Callable[[str, bool], nn.Module] = _gpt2 if kind == "gpt2" else _bert
    loss = _causal_lm_loss if kind == "gpt2" else _classification_loss
    batch = _batch(kind, quick)
    sdpa = build("sdpa", quick)
    eager = build("eager", quick)
    eager.load_state_dict(sdpa.state_dict())
    cases = []
    v = None
    for label, model in (("eager", eager), ("sdpa", sdpa)):
        for form, kw in (
            ("rev-rev cached", {"hvp": "rev-rev", "cache_graph": True}),
            ("rev-rev uncached", {"hvp": "rev-rev", "cache_graph": False}),
            ("fwd-rev", {"hvp": "fwd-rev"}),
        ):
            op = HessianOperator(model, loss, batch, **kw)
            if v is None:
                v = torch.randn(op.dim, generator=torch.Generator().manual_seed(1))
            op.matvec(v)  # builds the cache outside the timing
            cases.append(Case(f"{label}, {form}", lambda op=op, v=v: op.matvec(v), group=kind))
        op = HessianOperator(model, loss, batch)
        cases.append(Case(f"{label}, gradient", op.gradient, group=kind))
    # the two products agree (the same function, to float32 rounding)
    a = HessianOperator(eager, loss, batch).matvec(v)
    b = HessianOperator(sdpa, loss, batch).matvec(v)
    rel = float((a - b).norm() / a.norm())
    return cases, f"{kind}: {a.numel()} parameters, |Hv_sdpa - Hv_eager| / |Hv_eager| = {rel:.1e}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller models, fewer rounds")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--out", default=str(RESULTS / "attention.md"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows: list[Row] = []
    agreement = []
    for kind in ("gpt2", "bert"):
        cases, note = _cases(kind, args.quick)
        agreement.append(note)
        rows += compare(
            cases, "eager, rev-rev cached", rounds=5 if args.quick else 11, calls=2, warmup=1
        )
    notes = [
        "Float32, tiny Hugging Face models from configs: GPT-2 and BERT, 2 layers, 4 heads, "
        + ("width 64, batch 4 x 32 tokens" if args.quick else "width 128, batch 8 x 64 tokens")
        + "; 'sdpa' is the default attention (run on the math backend inside every product), "
        "'eager' the eager-attention twin with the same weights. Ratios are to the eager "
        "twin's cached product in the same round. The machine was shared with other jobs "
        "while this ran: absolute times are noisy, the interleaved ratios less so.",
        "Agreement of the two products (same vector): " + "; ".join(agreement) + ".",
    ]
    path = write_table(
        rows,
        args.out,
        title="Second order through attention: default (SDPA, math backend) vs eager twin",
        machine={**machine_info(), "threads": args.threads},
        notes=notes,
    )
    print(path.read_text())


if __name__ == "__main__":
    main()
