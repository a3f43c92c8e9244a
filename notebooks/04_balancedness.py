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
# # 04 · Balancedness: what SAM does to two-factor models, and BAR
#
# LoRA writes a weight update as a product, $W = W_0 + BA$. Such **scale-invariant
# two-factor** problems have a continuum of equivalent solutions: $x \to cx$,
# $y \to y/c$ changes nothing. Li, Zhang and He (NeurIPS 2024) show that the
# quantity telling them apart, the **balancedness**
#
# $$B = \tfrac12\left(\|x\|_F^2 - \|y\|_F^2\right),$$
#
# is conserved by gradient flow, but SAM drives it towards zero. On NOP problems
# $f(xy^\top)$ (LoRA is one), with $g_x = Gy$, $g_y = G^\top x$:
#
# $$\frac{dB}{dt} = \rho\,\frac{\|g_x\|^2 - \|g_y\|^2}{\sqrt{\|g_x\|^2 + \|g_y\|^2}} + O(\rho^2).$$
#
# This is *data-responsive*: the gradient gap is driven by noise in the data, so
# noisy data balances faster, clean data need not balance at all. **BAR** makes
# the regulariser explicit at the cost of a single forward/backward pass:
# nBAR scales $x \leftarrow (1 \pm a_t\eta_t)x$, $y \leftarrow (1 \mp a_t\eta_t)y$
# with the sign of $\|g_x\| - \|g_y\|$ (oBAR, for OP problems $f(x^\top y)$, uses
# the sign of $\|y\| - \|x\|$).
#
# This notebook checks these claims on the paper's toys (Appendix A.4), then
# tracks balancedness per layer in a small LoRA model.

# %% [markdown]
# **Learning goals.** After this notebook you can
#
# - define balancedness and show why gradient flow conserves it;
# - predict from Theorem 2 how fast SAM changes it, and why noise in the data matters;
# - apply BAR's rescaling rule and compare SGD, SAM and BAR on the paper's toys;
# - track balancedness per layer in a LoRA model (sharpkit's or PEFT's).
#
# It runs top to bottom on a laptop CPU in about a minute and a half. The mathematics
# is on the documentation site's theory page (`docs/theory.md`); the exercises
# at the end are checked by `sharpkit.course.check`.

# %%
import time

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from sklearn.datasets import load_digits
from torch import nn

from sharpkit.balance import BalanceTracker, LoRALinear, find_pairs
from sharpkit.balance.toys import NOPToy, OPToy, paper_init, simulate
from sharpkit.experiments.outlier_injection import OutlierNOPToy, OutlierOPToy
from sharpkit.optim import BAR, SAM
from sharpkit.plotting.balance import plot_balance, plot_toy_runs

t_start = time.perf_counter()
x0, y0 = paper_init()
print("x0 =", x0.tolist(), " y0 = -3 x0,  B0 =", 0.5 * float(x0 @ x0 - y0 @ y0))

# %% [markdown]
# ## 1. Gradient descent conserves B up to an O(η) drift
#
# Expanding the squares, one gradient step changes $B$ by exactly
# $\tfrac{\eta^2}{2}(\|g_x\|^2 - \|g_y\|^2)$: the first-order term is the conserved
# one. Over a fixed time $T = \eta \cdot \text{steps}$ the drift is therefore
# $O(\eta)$.

# %%
clean = NOPToy(noise=0.0)
for eta in (0.04, 0.02, 0.01):
    run = simulate(clean, "sgd", steps=round(5.0 / eta), lr=eta)
    drift = run.balancedness[-1, 0] - run.balancedness[0, 0]
    print(f"eta = {eta:5.3f}: B drift over t = 5 is {drift:+.2e}")

# %% [markdown]
# ## 2. The NOP toy: SGD vs SAM vs nBAR, at three noise levels
#
# Loss $\tfrac12\|xy^\top - (A + aN)\|_F^2$, $A = \mathrm{diag}(0.5, 0, 0)$,
# $N = \mathrm{diag}(1, 0.8, 0.5)\,U$ with fresh standard normal $U$ every step.
# The paper uses $\eta = 10^{-4}$ for $10^5$ steps; we use $\eta = 2\cdot10^{-3}$ for
# $5000$ steps (the same time $t = 10$), 16 independent runs each.

# %%
kw = {"steps": 5000, "lr": 2e-3, "runs": 16, "record_every": 50}
fig, axes = plt.subplots(1, 3, figsize=(13, 3.4), sharey=True)
for ax, noise in zip(axes, (0.0, 0.5, 1.0)):
    runs = {}
    for label, method, extra in (
        ("SGD", "sgd", {}),
        ("SAM ρ=0.1", "sam", {"rho": 0.1}),
        ("nBAR μ0=1", "nbar", {"mu0": 1.0, "schedule": "cosine"}),
    ):
        toy = NOPToy(noise, generator=torch.Generator().manual_seed(0))
        runs[label] = simulate(toy, method, **kw, **extra)
    plot_toy_runs(runs, ax=ax)
    ax.set_title(f"NOP, noise a = {noise}")
    finals = {k: float(np.abs(v.balancedness[-1]).mean()) for k, v in runs.items()}
    print(f"a = {noise}: final mean |B|", {k: round(v, 3) for k, v in finals.items()})
fig.tight_layout()

# %% [markdown]
# SGD keeps $|B|$ at its start; SAM drives it down, and faster with more noise,
# as the paper reports. With clean data ($a = 0$) SAM barely moves $B$: the
# balancing force comes from the data's noise. nBAR is a *sign* rule whose
# strength $a_t\eta_t$ does not shrink with the gradient: with noisy data it
# balances within a few hundred steps, but with clean data, near the minimiser,
# the sign of $\|g_x\| - \|g_y\|$ stops carrying information and nBAR keeps
# rescaling: $|B|$ grows again. A decaying schedule (cosine here) and a
# moderate $\mu_0$ limit that.
#
# ## 3. The OP toy: SGD vs SAM vs oBAR
#
# Loss $(x^\top y - (0.5 + an))^2$; the paper uses $\rho = 0.2$. Here SAM's drift
# is $-2\rho|f'|B/\sqrt{\|x\|^2+\|y\|^2}$, so it balances even with clean data
# (until the residual $f'$ vanishes), and oBAR balances directly.

# %%
runs = {}
for label, method, extra in (
    ("SGD", "sgd", {}),
    ("SAM ρ=0.2", "sam", {"rho": 0.2}),
    ("oBAR μ0=1", "obar", {"mu0": 1.0}),
):
    runs[label] = simulate(
        OPToy(0.5, generator=torch.Generator().manual_seed(0)), method, **kw, **extra
    )
ax = plot_toy_runs(runs)
ax.set_title("OP, noise a = 0.5")
print({k: round(float(np.abs(v.balancedness[-1]).mean()), 4) for k, v in runs.items()})

# %% [markdown]
# oBAR's rule flips sign around $B = 0$, so $|B|$ settles at the scale of one
# step, $\approx a_t\eta_t\|x\|^2$.
#
# ### Outliers drive the balancing
#
# If the balancing force comes from the data's noise, a few *outliers* (samples
# whose noise is $k$ times larger, with probability $p$) should speed it up under
# SAM and leave SGD alone. Experiment 2 of `sharpkit experiment` runs this over a
# grid of $(p, k)$ on both toys and on LoRA adapters on the digits
# (`figures/experiments/CLAIMS-small.md`); here is one point of its grid. The rate is
# $\log(|B_0|/|B_T|)$ per unit time $\eta T$.

# %%
steps, lr = 2000, 1e-3
for toy_cls, rho in ((OutlierNOPToy, 0.1), (OutlierOPToy, 0.2)):
    for p, k in ((0.0, 1.0), (0.3, 10.0)):
        rates = {}
        for method in ("sgd", "sam"):
            toy = toy_cls(0.25, p, k, generator=torch.Generator().manual_seed(0))
            B = simulate(toy, method, steps=steps, lr=lr, rho=rho, runs=16, record_every=steps)
            log_drop = np.log(np.abs(B.balancedness[0] / B.balancedness[-1]))
            rates[method] = float(log_drop.mean() / (lr * steps))
        print(f"{toy_cls.__name__:14s} p = {p:.1f}, k = {k:4.1f}: rate SGD {rates['sgd']:.4f}, "
              f"SAM {rates['sam']:.3f}")  # fmt: skip
    assert rates["sam"] > 10 * abs(rates["sgd"])

# %% [markdown]
# With outliers SAM balances three times faster on NOP and two and a half times on
# OP; SGD's rate stays two orders of magnitude below (its finite-step drift grows
# with the gradient noise too, but only like $\eta\|g\|^2$).
#
# ## 4. LoRA on a small model, tracked per layer
#
# A frozen random 64-48-10 MLP on scikit-learn's digits, with LoRA (rank 4) on
# both layers, started unbalanced (large $B$ factors). `BalanceTracker.attach(opt)`
# records $B$, $|B|$, the gradient gap and the factor norms per pair after every
# step, for any optimizer.

# %%
digits = load_digits()
X = torch.tensor(digits.data / 16.0, dtype=torch.float32)
Y = torch.tensor(digits.target)
STEPS, LR = 400, 0.05


def lora_net(seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    net = nn.Sequential(
        LoRALinear(64, 48, rank=4, alpha=8.0, generator=g),
        nn.ReLU(),
        LoRALinear(48, 10, rank=4, alpha=8.0, generator=g),
    )
    with torch.no_grad():  # start unbalanced: B factors larger than A factors
        for m in (net[0], net[2]):
            m.lora_B.normal_(0.0, 0.3, generator=g)
    return net


def train(kind: str) -> tuple[pd.DataFrame, float]:
    net = lora_net()
    params = [p for p in net.parameters() if p.requires_grad]
    if kind == "SGD":
        opt = torch.optim.SGD(params, lr=LR)
    elif kind == "SAM":
        opt = SAM(params, torch.optim.SGD, rho=0.1, lr=LR)
    else:
        opt = BAR(
            params, torch.optim.SGD, mu0=0.1, schedule="cosine", total_steps=STEPS, model=net, lr=LR
        )
    tracker = BalanceTracker(net, every=5).attach(opt)
    g = torch.Generator().manual_seed(1)
    for _ in range(STEPS):
        idx = torch.randint(0, len(X), (32,), generator=g)
        opt.zero_grad()  # torch.optim.SGD does not zero inside step(closure)
        opt.step(lambda idx=idx: nn.functional.cross_entropy(net(X[idx]), Y[idx]).backward())
    with torch.no_grad():
        acc = float((net(X).argmax(1) == Y).float().mean())
    df = tracker.to_dataframe()
    df["optimizer"] = kind
    return df, acc


print("isotropic-noise equilibrium ||x||^2/||y||^2 = out/in:", [48 / 64, round(10 / 48, 2)])
frames = []
for kind in ("SGD", "SAM", "nBAR"):
    df, acc = train(kind)
    frames.append(df)
    last = df[df.step == df.step.max()]
    ratio = (last.norm_x_sq / last.norm_y_sq).round(2).tolist()
    print(
        f"{kind:5s} train acc {acc:.3f}  final B per layer {last.balancedness.round(2).tolist()}"
        f"  ||x||^2/||y||^2 {ratio}"
    )
tracks = pd.concat(frames, ignore_index=True)
fig, axes = plt.subplots(1, 2, figsize=(11, 3.4), sharey=True)
for ax, layer in zip(axes, ("0", "2")):
    plot_balance(tracks[tracks.pair == layer], ax=ax, hue="optimizer")
    ax.set_title(f"LoRA layer {layer}")
fig.tight_layout()

# %% [markdown]
# What to read from this (and what not). At this learning rate SGD's $O(\eta)$
# drift already moves $B$; SAM and nBAR move it further. But nBAR, like SAM's NOP
# drift it imitates, follows the *gradient gap*, not $B$ itself: it pushes
# towards where $\|g_x\| = \|g_y\|$. For an $m \times n$ layer under isotropic
# gradient noise that is $m\|y\|^2 = n\|x\|^2$, not $B = 0$, and structured data
# (digits have always-dark pixels, whose $A$ columns get no gradient) shifts it
# further. So on a real layer $|B|$ can pass through zero and settle on the other
# side; the paper's toys are square and isotropic, where the two coincide.

# %% [markdown]
# The tidy records export directly: `tracker.to_csv(path)`, `tracker.to_json(path)`
# or `tracker.to_dataframe()` (columns `step, pair, balancedness,
# abs_balancedness, grad_gap, norm_x_sq, norm_y_sq`).
#
# ## 5. PEFT models work the same way
#
# `find_pairs` recognises PEFT's `lora_A` / `lora_B` modules (per adapter), so
# `BAR(..., model=peft_model)` and `BalanceTracker(peft_model)` need no extra code.

# %%
try:
    from peft import LoraConfig, get_peft_model
except ImportError:  # peft is optional
    print("peft not installed")
else:
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 10))
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["0", "2"]))
    print([p.name for p in find_pairs(peft_model)])

print(f"notebook ran in {time.perf_counter() - t_start:.1f} s")

# %% [markdown]
# ## Exercises
#
# **04.1 Balancedness.** Write `balancedness(x, y)`, $\tfrac12(\|x\|_F^2 - \|y\|_F^2)$,
# for vectors or matrices.
#
# **04.2 Theorem 2's rate.** Write `nop_sam_drift(G, x, y, rho)`, the leading term
# $\rho(\|g_x\|^2 - \|g_y\|^2)/\sqrt{\|g_x\|^2 + \|g_y\|^2}$ for $f(xy^\top)$ with
# $G = \nabla f$ at $xy^\top$, $g_x = Gy$, $g_y = G^\top x$. (The test suite checks
# the reference against one SAM step with tiny $\eta$: the error falls like $\rho^2$.)
#
# **04.3 One nBAR rescaling.** Write `nbar_scale(x, y, gx, gy, a, eta)` returning the
# rescaled `(x, y)`: if $\|g_x\| \ge \|g_y\|$, $x(1 + a\eta)$ and $y(1 - a\eta)$,
# otherwise the signs swap. By how much does one such step change $B$, to first
# order in $a\eta$?

# %%
from sharpkit.course import check

balancedness = None  # def balancedness(x, y): ...
check("04.1", balancedness)

# %%
nop_sam_drift = None  # def nop_sam_drift(G, x, y, rho): ...
check("04.2", nop_sam_drift)

# %%
nbar_scale = None  # def nbar_scale(x, y, gx, gy, a, eta): ... -> (x, y)
check("04.3", nbar_scale)
