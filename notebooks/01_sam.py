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
# # 01 · Sharpness-Aware Minimization in one notebook
#
# SAM (Foret et al., 2021) trains on the worst loss in a small ball around the
# weights instead of the loss at the weights:
#
# $$\min_w \max_{\|e\|\le\rho} L(w+e).$$
#
# The inner maximum is solved to first order, $e = \rho\, g/\|g\|$ with
# $g = \nabla L(w)$, and the gradient taken **at** $w+e$ is applied **at** $w$:
#
# $$w \leftarrow \mathrm{base\_step}\big(w,\ \nabla L(w+e)\big).$$
#
# This notebook checks that rule against a closed form, watches SAM's
# characteristic 2-cycle on a quadratic, trains a small network with SGD and SAM,
# and shows the practical details sharpkit takes care of (BatchNorm statistics,
# mixed precision, resuming from a checkpoint).

# %% [markdown]
# **Learning goals.** After this notebook you can
#
# - state SAM's min-max objective and derive its first-order inner solution $e = \rho g/\|g\|$;
# - check a SAM and an ASAM step against their closed forms;
# - predict the amplitude of SAM's 2-cycle on a quadratic;
# - train with SAM and handle BatchNorm, mixed precision and resuming.
#
# It runs top to bottom on a laptop CPU in about half a minute. The mathematics
# is on the documentation site's theory page (`docs/theory.md`); the exercises
# at the end are checked by `sharpkit.course.check`.

# %%
import matplotlib.pyplot as plt
import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import nn

from sharpkit.optim import ASAM, SAM, frozen_buffers

torch.manual_seed(0)
F64 = torch.float64

# %% [markdown]
# ## 1. One SAM step on a quadratic, against the closed form
#
# For $L(w) = \tfrac12 w^\top A w$ the gradient is $Aw$, so one SAM step with
# plain SGD is $w' = w - \eta A\big(w + \rho\, Aw/\|Aw\|\big)$.

# %%
A = torch.tensor([[3.0, 0.5], [0.5, 1.0]], dtype=F64)
w0 = torch.tensor([1.0, -1.0], dtype=F64)
rho, lr = 0.2, 0.1

w = nn.Parameter(w0.clone())
opt = SAM([w], torch.optim.SGD, rho=rho, lr=lr)


def closure():
    loss = 0.5 * w @ A @ w
    loss.backward()
    return loss


opt.step(closure)
g = A @ w0
expected = w0 - lr * A @ (w0 + rho * g / g.norm())
print("sharpkit:", w.detach().numpy(), " closed form:", expected.numpy())
assert torch.allclose(w.detach(), expected, atol=1e-14)

# %% [markdown]
# The picture: on the contours of $L$, gradient descent steps along $-\nabla L(w)$;
# SAM first moves to the highest point $w + e$ of the $\rho$-ball (to first order)
# and steps along $-\nabla L(w + e)$ from $w$.

# %%
grid = torch.linspace(-1.6, 1.6, 121, dtype=F64)
W1, W2 = torch.meshgrid(grid, grid, indexing="xy")
Z = 0.5 * (A[0, 0] * W1**2 + 2 * A[0, 1] * W1 * W2 + A[1, 1] * W2**2)
e = rho * g / g.norm()
gd_step = -lr * g
sam_step = -lr * A @ (w0 + e)
fig, ax = plt.subplots(figsize=(4.8, 4.2))
ax.contour(W1, W2, Z, levels=15, cmap="viridis", linewidths=0.8)
ax.add_patch(plt.Circle(w0.tolist(), rho, fill=False, ls=":", color="gray"))
ax.annotate("", w0 + e, w0, arrowprops={"arrowstyle": "->", "color": "C3"})
ax.annotate("", w0 + 4 * gd_step, w0, arrowprops={"arrowstyle": "->", "color": "C0"})
ax.annotate("", w0 + 4 * sam_step, w0, arrowprops={"arrowstyle": "->", "color": "C1"})
ax.plot([], [], c="C3", label=r"$e = \rho g/\|g\|$")
ax.plot([], [], c="C0", label=r"GD step (x4)")
ax.plot([], [], c="C1", label=r"SAM step (x4)")
ax.set(aspect="equal", xlabel="$w_1$", ylabel="$w_2$", title="one SAM step on a quadratic")
ax.plot(*w0.tolist(), "ko", ms=3)
ax.legend(loc="upper left", fontsize=8)
plt.show()

# %% [markdown]
# ASAM (Kwon et al., 2021) rescales the ball elementwise by $T_w = |w| + \xi$,
# $e = \rho\, T_w^2 g / \|T_w g\|$, which makes the probed sharpness invariant to
# rescalings of the weights that leave a ReLU network's function unchanged.
# Like the authors' code, sharpkit applies $T_w$ to weight tensors only and
# perturbs biases (parameters with at most one dimension) with $T = 1$; this
# toy's $w$ is a single vector, so `adaptive_bias=True` scales it as a weight.

# %%
w = nn.Parameter(w0.clone())
opt = ASAM([w], torch.optim.SGD, rho=0.5, xi=0.01, adaptive_bias=True, lr=lr)
opt.step(closure)
t = w0.abs() + 0.01
expected = w0 - lr * A @ (w0 + 0.5 * t**2 * g / (t * g).norm())
assert torch.allclose(w.detach(), expected, atol=1e-14)
print("ASAM step matches its closed form")

# %% [markdown]
# ## 2. SAM ends in a 2-cycle across the minimum
#
# Near a minimum the normalised gradient does not shrink: in 1-D with curvature
# $\lambda$, SAM is $w \leftarrow (1-\eta\lambda) w - \eta\lambda\rho\,\mathrm{sign}(w)$,
# which has a 2-cycle at $|w^*| = \eta\lambda\rho/(2-\eta\lambda)$
# (Bartlett, Long, Bousquet, 2023).

# %%
lam, eta, rho = 2.0, 0.3, 0.1
w = nn.Parameter(torch.tensor([1.0], dtype=F64))
opt = SAM([w], torch.optim.SGD, rho=rho, lr=eta)
path = []


def quad_closure():
    loss = 0.5 * lam * (w**2).sum()
    loss.backward()
    return loss


for _ in range(60):
    opt.step(quad_closure)
    path.append(float(w.detach()))
predicted = eta * lam * rho / (2 - eta * lam)
print(f"last iterates {path[-2]:+.5f} {path[-1]:+.5f}; predicted amplitude {predicted:.5f}")
assert abs(abs(path[-1]) - predicted) < 1e-9

fig, ax = plt.subplots(figsize=(6, 2.5))
ax.plot(path, marker=".")
ax.axhline(predicted, ls="--", c="gray")
ax.axhline(-predicted, ls="--", c="gray")
ax.set(xlabel="step", ylabel="w", title="SAM on a 1-D quadratic: the 2-cycle")
plt.show()

# %% [markdown]
# ## 3. SGD versus SAM on real data
#
# scikit-learn ships the 8x8 digits (1797 images), so this runs anywhere without
# downloads. Both runs use the same initialisation, batches and learning rate;
# SAM does two forward/backward passes per step.

# %%
digits = load_digits()
X = torch.tensor(digits.data / 16.0, dtype=torch.float32)
Y = torch.tensor(digits.target)
perm = torch.randperm(len(X), generator=torch.Generator().manual_seed(0))
train, test = perm[:1200], perm[1200:]


def make_model():
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(64, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 10))


def train_run(kind, epochs=15):
    model = make_model()
    kw = {"lr": 0.05, "momentum": 0.9}
    if kind == "SGD":
        opt = torch.optim.SGD(model.parameters(), **kw)
    else:  # model= keeps BatchNorm statistics from the clean pass only
        opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, model=model, **kw)
    gen = torch.Generator().manual_seed(2)
    losses = []
    for _ in range(epochs):
        model.train()
        for idx in train[torch.randperm(len(train), generator=gen)].split(64):

            def closure(idx=idx):
                loss = nn.functional.cross_entropy(model(X[idx]), Y[idx])
                loss.backward()
                return loss

            if kind == "SGD":
                opt.zero_grad()
                loss = closure()
                opt.step()
            else:
                loss = opt.step(closure)
            losses.append(loss.item())
    model.eval()
    with torch.no_grad():
        acc = (model(X[test]).argmax(1) == Y[test]).float().mean().item()
    return model, losses, acc


def avg_sharpness(model, rho=0.05, draws=20):
    """Mean loss rise under random perturbations of norm rho (a cheap flatness proxy)."""
    model.eval()
    params = [p for p in model.parameters()]
    with torch.no_grad():
        base = nn.functional.cross_entropy(model(X[train]), Y[train]).item()
        rises = []
        gen = torch.Generator().manual_seed(3)
        for _ in range(draws):
            d = [torch.randn(p.shape, generator=gen) for p in params]
            scale = rho / torch.sqrt(sum((x * x).sum() for x in d))
            for p, x in zip(params, d):
                p.add_(x * scale)
            rises.append(nn.functional.cross_entropy(model(X[train]), Y[train]).item() - base)
            for p, x in zip(params, d):
                p.sub_(x * scale)
    return float(np.mean(rises))


results = {kind: train_run(kind) for kind in ("SGD", "SAM")}
for kind, (model, _losses, acc) in results.items():
    print(f"{kind}: test accuracy {acc:.3f}, random-direction sharpness {avg_sharpness(model):.2e}")

fig, ax = plt.subplots(figsize=(6, 3))
for kind, (_, losses, _) in results.items():
    ax.plot(np.convolve(losses, np.ones(10) / 10, mode="valid"), label=kind)
ax.set(xlabel="step", ylabel="training loss (moving average)", yscale="log")
ax.legend()
plt.show()

# %% [markdown]
# A single small run is not evidence that SAM generalises better; the
# experiments in `sharpkit.experiments` repeat such comparisons over seeds with
# confidence intervals. Notebook 02 measures curvature properly (Hessian
# eigenvalues and trace) instead of the random-direction proxy used here.
#
# ## 4. The practical details
#
# **BatchNorm.** The perturbed pass runs the network in training mode too, which
# would update BatchNorm's running statistics a second time, at the wrong
# weights. Passing `model=` makes SAM restore them; by hand, `frozen_buffers`
# does the same around any block:

# %%
bn = nn.BatchNorm1d(3)
with frozen_buffers(bn):
    bn(torch.randn(16, 3) + 4.0)
print("running mean after a frozen pass:", bn.running_mean.tolist())

# %% [markdown]
# **The two-phase form** (for gradient accumulation and mixed precision): run
# forward/backward, `first_step`, forward/backward again, `second_step`. With a
# `GradScaler`, `scaler.step(optimizer)` replaces `second_step`, and if the scaler
# skips the update because of inf/NaN gradients the weights still go back to $w$.

# %%
model = make_model()
opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.05, model=model)
scaler = torch.amp.GradScaler("cpu")
xb, yb = X[train[:64]], Y[train[:64]]
for _ in range(3):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = nn.functional.cross_entropy(model(xb), yb)
    scaler.scale(loss).backward()
    opt.first_step(zero_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss2 = nn.functional.cross_entropy(model(xb), yb)
    scaler.scale(loss2).backward()
    scaler.step(opt)
    scaler.update()
    opt.zero_grad()
print("mixed-precision SAM steps done; perturbed now?", opt.perturbed)

# %% [markdown]
# **Resuming.** `state_dict()` holds the base optimizer's state (momentum, Adam
# moments) and SAM's own hyperparameters, and LR schedulers act on SAM directly,
# so a resumed run continues exactly as an uninterrupted one would (the test suite
# checks this bit for bit).

# %%
sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=100)
state = {"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()}
print(sorted(state["opt"]["param_groups"][0]))

# %% [markdown]
# ## Exercises
#
# Replace each `None` with your function and run the cell; `check` compares it with
# a reference on a few inputs and says what differs.
#
# **01.1 The SAM perturbation.** Write `sam_perturbation(grads, rho)`: given the
# list of gradient tensors of all parameters, return the list of tensors of
# $e = \rho\, g/\|g\|$, with **one** norm over all tensors together. What should it
# return when every gradient is zero?
#
# **01.2 The ASAM perturbation.** Write `asam_perturbation(params, grads, rho, xi)`
# returning $e = \rho\, T_w^2 g / \|T_w g\|$ with $T_w = |w| + \xi$ on weight
# tensors and $T = 1$ on one-dimensional parameters (biases).
#
# **01.3 The 2-cycle.** Write `two_cycle_amplitude(lam, eta, rho)`, the $|w^*|$ of
# section 2, by solving $-w^* = (1 - \eta\lambda) w^* - \eta\lambda\rho$. Then change
# `eta` in section 2 so that $\eta\lambda$ is close to 2: what happens to the
# amplitude, and why does the formula need $\eta\lambda < 2$?

# %%
from sharpkit.course import check

sam_perturbation = None  # def sam_perturbation(grads, rho): ...
check("01.1", sam_perturbation)

# %%
asam_perturbation = None  # def asam_perturbation(params, grads, rho, xi=0.01): ...
check("01.2", asam_perturbation)

# %%
two_cycle_amplitude = None  # def two_cycle_amplitude(lam, eta, rho): ...
check("01.3", two_cycle_amplitude)
