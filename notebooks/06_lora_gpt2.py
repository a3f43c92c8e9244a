# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 06 · LoRA on a tiny GPT-2: LoRA, LoRA-SAM, LoRA-oBAR, LoRA-nBAR
#
# The setting of Li, Zhang and He (NeurIPS 2024, arXiv:2410.14802), small enough
# for a laptop: a GPT-2 built from a config (nothing is downloaded), first trained
# on one synthetic next-token task, then fine-tuned with PEFT LoRA adapters on a
# second task. Four ways to fine-tune:
#
# - **LoRA**: AdamW on the adapters;
# - **LoRA-SAM**: SAM around the same AdamW (two forward/backward passes a step);
# - **LoRA-oBAR** and **LoRA-nBAR**: the balancedness-aware regularisers, one
#   pass a step, which make SAM's implicit pull on the balancedness
#   $B = \tfrac12(\|B_{\rm LoRA}\|_F^2 - \|A_{\rm LoRA}\|_F^2)$ of every adapter explicit.
#
# For each we track $|B|$ per adapter (`BalanceTracker`), the step time and the
# final losses; then we save the nBAR adapter with `save_pretrained`, load it back
# and measure its sharpness with sharpkit.
#
# **Learning goals.** Run SAM-family optimizers on a Hugging Face + PEFT model
# with sharpkit's built-in loss for dict batches (`sharpkit.hf.hf_loss`, a token
# mean with the labels shifted as GPT-2 shifts them); read per-layer balancedness;
# see what BAR costs next to SAM; measure a saved checkpoint.

# %%
import tempfile
import time
import warnings
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.utils import logging as hf_logging

from sharpkit.balance import BalanceTracker, find_pairs, zero_factors
from sharpkit.hf import hf_accuracy, hf_loss
from sharpkit.optim import BAR, SAM
from sharpkit.plotting.balance import plot_balance
from sharpkit.sharpness import measure_sharpness

hf_logging.set_verbosity_error()
warnings.filterwarnings("ignore", category=FutureWarning)
t_start = time.perf_counter()
c_start = time.process_time()
torch.set_num_threads(1)  # tiny matrices: threads only add synchronisation

# %% [markdown]
# ## 1. A task the notebook generates
#
# Sequences of a noisy Markov chain over $V = 64$ tokens: each token is followed
# by its successor under a fixed random map with probability $0.9$, by a uniform
# random token otherwise. The base model learns one map (pre-training); the
# adapters must learn another one (fine-tuning). Sequences are right-padded to
# uneven lengths: padding has `attention_mask = 0` and label `-100`, and the loss
# is the mean over the real target tokens.

# %%
V, T = 64, 16


def markov_batches(succ, n_batches, batch_size, seed, noise=0.1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        ids = torch.empty(batch_size, T, dtype=torch.long)
        ids[:, 0] = torch.randint(0, V, (batch_size,), generator=g)
        for t in range(1, T):
            follow = succ[ids[:, t - 1]]
            rand = torch.randint(0, V, (batch_size,), generator=g)
            keep = torch.rand(batch_size, generator=g) > noise
            ids[:, t] = torch.where(keep, follow, rand)
        lengths = torch.randint(T // 2, T + 1, (batch_size,), generator=g)
        mask = (torch.arange(T) < lengths[:, None]).long()
        out.append(
            {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
        )
    return out


g = torch.Generator().manual_seed(0)
pretrain_map, finetune_map = torch.randperm(V, generator=g), torch.randperm(V, generator=g)
pretrain = markov_batches(pretrain_map, 60, 32, seed=1)
train = markov_batches(finetune_map, 20, 32, seed=2)
held_out = markov_batches(finetune_map, 4, 64, seed=3)
print("target tokens per training batch:", [int(hf_loss.batch_weight(b)) for b in train[:5]], "...")

# %% [markdown]
# ## 2. The base model
#
# GPT-2 from a config (two layers, width 32), trained on the first map with
# AdamW on all weights. Eager attention keeps the second-order measurements at the
# end runnable on every sharpkit version.

# %%
config = GPT2Config(
    n_layer=2, n_embd=32, n_head=2, vocab_size=V, n_positions=T, bos_token_id=0, eos_token_id=0,
    resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation="eager",
)  # fmt: skip
torch.manual_seed(0)
base = GPT2LMHeadModel(config)
opt = torch.optim.AdamW(base.parameters(), lr=3e-3)
base.train()
for batch in pretrain:
    opt.zero_grad()
    hf_loss(base, batch).backward()
    opt.step()
base.eval()


def evaluate(model, batches):
    """Token-weighted loss and accuracy over batches (weights from the loss itself)."""
    with torch.no_grad():
        w = [hf_loss.batch_weight(b) for b in batches]
        loss = sum(float(hf_loss(model, b)) * wi for b, wi in zip(batches, w)) / sum(w)
        acc = sum(float(hf_accuracy(model, b)) * wi for b, wi in zip(batches, w)) / sum(w)
    return loss, acc


for task, batches in [
    ("its own task", markov_batches(pretrain_map, 2, 64, 9)),
    ("the new task", held_out),
]:
    loss, acc = evaluate(base, batches)
    print(f"base on {task}: loss {loss:.3f}  acc {acc:.3f}")

# %% [markdown]
# ## 3. Four fine-tuning runs
#
# The same adapters (rank 8, $\alpha = 16$ as in the paper, on every attention and
# MLP projection), the same initialisation and the same mini-batches for each
# run. SAM uses $\rho = 0.05$; BAR uses $\mu_0 = 1$ with a cosine schedule. With
# PEFT's initialisation $B_{\rm LoRA} = 0$, so every adapter starts unbalanced,
# $B = -\tfrac12\|A_{\rm LoRA}\|^2$.

# %%
LORA = LoraConfig(r=8, lora_alpha=16, target_modules=["c_attn", "c_proj", "c_fc"],
                  lora_dropout=0.0, fan_in_fan_out=True)  # fmt: skip
LR, RHO, MU0, EPOCHS = 3e-3, 0.05, 1.0, 3
STEPS = EPOCHS * len(train)


def fresh_adapter():
    torch.manual_seed(1)
    model = GPT2LMHeadModel(config)
    model.load_state_dict(base.state_dict())
    return get_peft_model(model, LORA)


def make_optimizer(kind, model):
    params = [p for p in model.parameters() if p.requires_grad]
    if kind == "LoRA":
        return torch.optim.AdamW(params, lr=LR)
    if kind == "LoRA-SAM":
        return SAM(params, torch.optim.AdamW, rho=RHO, lr=LR)
    variant = {"LoRA-oBAR": "obar", "LoRA-nBAR": "nbar"}[kind]
    return BAR(params, torch.optim.AdamW, variant=variant, mu0=MU0, schedule="cosine",
               total_steps=STEPS, model=model, lr=LR)  # fmt: skip


def fine_tune(kind):
    model = fresh_adapter()
    opt = make_optimizer(kind, model)
    tracker = BalanceTracker(model, every=10).attach(opt)
    model.train()
    times, losses = [], []
    for _ in range(EPOCHS):
        for batch in train:

            def closure(batch=batch):
                loss = hf_loss(model, batch)
                loss.backward()
                return loss

            t0 = time.perf_counter()
            if isinstance(opt, (SAM, BAR)):
                loss = opt.step(closure)  # zeroes the gradients itself
            else:
                opt.zero_grad()
                loss = closure()
                opt.step()
            times.append(time.perf_counter() - t0)
            losses.append(float(loss.detach()))
    model.eval()
    df = tracker.to_dataframe()
    df["optimizer"] = kind
    return model, df, times, losses


KINDS = ["LoRA", "LoRA-SAM", "LoRA-oBAR", "LoRA-nBAR"]
models, tracks, rows = {}, [], []
for kind in KINDS:
    model, df, times, losses = fine_tune(kind)
    models[kind] = model
    tracks.append(df)
    last = df[df.step == df.step.max()]
    val_loss, val_acc = evaluate(model, held_out)
    rows.append({
        "optimizer": kind,
        "step ms (median)": 1e3 * pd.Series(times).median(),
        "train loss (last epoch)": sum(losses[-len(train):]) / len(train),
        "held-out loss": val_loss,
        "held-out acc": val_acc,
        "mean |B| start": df[df.step == 0].abs_balancedness.mean(),
        "mean |B| end": last.abs_balancedness.mean(),
    })  # fmt: skip
table = pd.DataFrame(rows).set_index("optimizer")
table.insert(1, "time / LoRA", table["step ms (median)"] / table.loc["LoRA", "step ms (median)"])
print(table.round(4).to_string())

# %% [markdown]
# Step times here are per-run medians on whatever machine runs the notebook;
# `analysis/benchmarks/bench_lora_gpt2.py` measures the ratios properly
# (interleaved rounds against plain LoRA in the same process). SAM pays a second
# forward/backward pass; BAR adds one fused norm and one fused scaling of the
# factors to plain LoRA's step (the paper reports 1.03-1.05x LoRA).

# %% [markdown]
# ## 4. Balancedness per adapter
#
# One line per adapter, $|B|$ on a log scale. Balancedness is conserved by
# gradient flow (and nearly by small-step SGD), not by AdamW: its per-coordinate
# scaling moves $B$ by itself, so plain LoRA's curves move too. What to compare is
# the runs against each other from the same start on the same batches: SAM's
# implicit regulariser and BAR's explicit one pull the adapters towards balance
# on top of AdamW (the "mean |B| end" column above). nBAR follows the sign of the
# gradient gap $\|g_x\| - \|g_y\|$ (as SAM's NOP drift does), oBAR the sign of
# $\|B_{\rm LoRA}\| - \|A_{\rm LoRA}\|$; compare their columns below.

# %%
tracks = pd.concat(tracks, ignore_index=True)
tracks["pair"] = tracks.pair.str.replace("base_model.model.transformer.", "").str.replace(
    ".default", ""
)
fig, axes = plt.subplots(1, 4, figsize=(15, 3.4), sharey=True)
for ax, kind in zip(axes, KINDS):
    plot_balance(tracks[tracks.optimizer == kind], ax=ax, hue="pair")
    ax.set_title(kind)
    if ax is not axes[-1]:
        ax.get_legend().remove()
axes[-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
fig.tight_layout()

# %%
per_layer = tracks[tracks.step == tracks.step.max()].pivot(
    index="pair", columns="optimizer", values="balancedness"
)
print("final B per adapter:")
print(per_layer[KINDS].round(4).to_string())

# %% [markdown]
# ## 5. Save, load, measure
#
# `save_pretrained` writes the base model (config + weights) and, separately,
# the adapter (PEFT's `adapter_config.json` + `adapter_model.safetensors`). Both
# load back offline. A fresh adapter would make scale-relative measurements
# meaningless (`lora_B = 0`: see `sharpkit.balance.zero_factors`); these adapters
# are trained, so the check is empty.

# %%
out = Path(tempfile.mkdtemp())
base.save_pretrained(out / "base")
models["LoRA-nBAR"].save_pretrained(out / "nbar-adapter")
print(sorted(p.name for p in (out / "nbar-adapter").iterdir()))

reloaded = PeftModel.from_pretrained(
    GPT2LMHeadModel.from_pretrained(out / "base", attn_implementation="eager"), out / "nbar-adapter"
).eval()
print(
    "zero factors:",
    zero_factors(reloaded),
    "| pairs:",
    len(find_pairs(reloaded, trainable_only=False)),
)
before, after = evaluate(models["LoRA-nBAR"], held_out)[0], evaluate(reloaded, held_out)[0]
print(f"held-out loss, trained vs reloaded: {before:.6f} {after:.6f}")

# %% [markdown]
# The sharpness of fine-tuned adapters (the adapter's parameters only, the
# base frozen), on one held-out batch: the top Hessian eigenvalue and the
# worst-case sharpness within $\|\delta\| \le 0.05$.

# %%
probe = held_out[0]
adapter_params = lambda name: "lora_" in name  # noqa: E731
sharp = {}
for kind, model in [
    ("LoRA", models["LoRA"]),
    ("LoRA-SAM", models["LoRA-SAM"]),
    ("reloaded nBAR", reloaded),
]:
    rep = measure_sharpness(model, hf_loss, probe, ["lambda_max", "worst_case"], accuracy_fn=hf_accuracy,
                            params=adapter_params, options={"worst_case": {"steps": 5}})  # fmt: skip
    sharp[kind] = rep.values()
print(pd.DataFrame(sharp).T.round(5).to_string())

# %%
print(
    f"notebook ran in {time.perf_counter() - t_start:.1f} s ({time.process_time() - c_start:.1f} s CPU)"
)
