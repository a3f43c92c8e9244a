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
# # 03 · Sharpness of a trained model: metrics, invariance, landscapes
#
# "Flat minima generalise" is a claim about a *number*, and there are many numbers.
# `sharpkit.sharpness` measures the common ones on any model, loss and data
# (docs/theory.md, sharpness measures), with $c = |w|$ for the adaptive forms and $c = 1$ otherwise:
#
# | metric | definition |
# |---|---|
# | worst-case $S_{\max}(\rho)$ | $E_B \max_{\lVert d/c \rVert_p \le \rho} L_B(w+d) - L_B(w)$ (auto-PGD) |
# | average-case $S_{\mathrm{avg}}(\rho)$ | $E_{d \sim N(0, \rho^2 \mathrm{diag}(c^2))} L(w+d) - L(w)$ |
# | PAC-Bayes flatness | $1/\sigma^2$, $\sigma$ the largest noise with accuracy drop $\le 0.1$ |
# | Fisher-Rao norm | $\sqrt{E \langle w, \nabla_w \ell \rangle^2}$ |
# | $\varepsilon$-sharpness | Keskar's box-constrained worst case, in % of $1 + L$ |
#
# We first check two of them against closed forms on a quadratic, then show *why*
# the adaptive forms exist (ReLU rescaling), and finally measure a trained MLP and
# draw its loss landscape.

# %% [markdown]
# **Learning goals.** After this notebook you can
#
# - compute worst-case and average-case sharpness and check them against closed forms;
# - explain why a sharpness measure should be invariant to rescalings, and which ones are;
# - measure a trained network's full sharpness profile and read the report;
# - draw filter-normalised and trajectory loss landscapes.
#
# It runs top to bottom on a laptop CPU in about a minute. The mathematics
# is on the documentation site's theory page (`docs/theory.md`); the exercises
# at the end are checked by `sharpkit.course.check`.

# %%
import matplotlib.pyplot as plt
import torch
from torch import nn

from sharpkit.demo import train_demo
from sharpkit.landscape import (
    filter_normalized_direction,
    loss_surface_1d,
    loss_surface_2d,
    pca_directions,
)
from sharpkit.plotting.landscape import plot_surface_1d, plot_surface_2d
from sharpkit.sharpness import (
    average_case_sharpness,
    measure_sharpness,
    worst_case_sharpness,
)

torch.manual_seed(0)
torch.set_num_threads(1)  # tiny models: intra-op threads only add synchronisation

# %% [markdown]
# ## 1. Closed forms on a quadratic
#
# For $L(\theta) = \tfrac12 (\theta - \theta^*)^\top A (\theta - \theta^*)$ at
# $\theta = \theta^*$, the worst case over the $\ell_2$ ball is
# $\tfrac12 \rho^2 \lambda_{\max}(A)$ and the Gaussian average case is
# $\tfrac{\rho^2}{2} \sum_i A_{ii} c_i^2$.


# %%
class Quadratic(nn.Module):
    def __init__(self, A, center):
        super().__init__()
        self.theta = nn.Parameter(center.clone())
        self.register_buffer("A", A)
        self.register_buffer("center", center.clone())

    def forward(self, x):
        e = self.theta - self.center
        return 0.5 * e @ self.A @ e + 0.0 * x.sum()


g = torch.Generator().manual_seed(0)
Q, _ = torch.linalg.qr(torch.randn(5, 5, generator=g, dtype=torch.float64))
A = Q @ torch.diag(torch.tensor([0.1, 0.5, 1.0, 2.0, 4.0], dtype=torch.float64)) @ Q.T
quad = Quadratic(A, torch.tensor([1.0, -2.0, 0.5, 3.0, -1.0], dtype=torch.float64))
x0 = torch.zeros(1, 1, dtype=torch.float64)
loss = lambda m, b: m(b)  # noqa: E731
rho = 0.2
wc = worst_case_sharpness(quad, loss, x0, rho, steps=100)
avg = average_case_sharpness(quad, loss, x0, rho, samples=4000)
print(f"worst case : {wc.value:.6f}   exact {0.5 * rho**2 * 4.0:.6f}")
print(
    f"average    : {avg.value:.5f} ± {avg.stderr:.5f}   exact {0.5 * rho**2 * float(A.trace()):.5f}"
)

# %% [markdown]
# ## 2. Why adaptive: ReLU rescaling
#
# Multiplying a ReLU layer by $\alpha$ and the next one by $1/\alpha$ leaves the
# network function unchanged, but moves $w$: a plain ($c = 1$) sharpness changes,
# an adaptive one ($c = |w|$) cannot (Andriushchenko et al., 2023).

# %%
net = nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 3)).double()
xs = torch.randn(128, 5, generator=g, dtype=torch.float64)
ys = torch.randint(0, 3, (128,), generator=g)
ce = nn.CrossEntropyLoss()
print(" alpha   plain S_max   adaptive S_max")
alphas, plains, adaptives = (0.5, 1.0, 2.0, 4.0), [], []
for alpha in alphas:
    other = nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 3)).double()
    other.load_state_dict(net.state_dict())
    with torch.no_grad():
        other[0].weight.mul_(alpha)
        other[0].bias.mul_(alpha)
        other[2].weight.div_(alpha)
    plain = worst_case_sharpness(other, ce, (xs, ys), 0.05, steps=10).value
    adaptive = worst_case_sharpness(other, ce, (xs, ys), 0.05, adaptive=True, steps=10).value
    print(f"{alpha:5.1f}   {plain:11.5f}   {adaptive:14.5f}")
    plains.append(plain)
    adaptives.append(adaptive)
fig, ax = plt.subplots(figsize=(4.8, 3.2))
ax.plot(alphas, plains, "o-", label="plain ($c = 1$)")
ax.plot(alphas, adaptives, "s-", label="adaptive ($c = |w|$)")
ax.set(xscale="log", yscale="log", xlabel=r"rescaling $\alpha$ (same function)",
       ylabel=r"worst-case $S_{\max}$", title="one network, four parametrisations")  # fmt: skip
ax.set_xticks(alphas, [f"{a:g}" for a in alphas], minor=False)
ax.xaxis.set_minor_locator(plt.NullLocator())
ax.legend()
plt.show()

# %% [markdown]
# ## 3. A trained MLP on digits: the full profile
#
# `measure_sharpness` collects any metrics plus curvature (via `sharpkit.curvature`)
# into one report with error bars, costs and the measurement protocol; the same
# report is what `sharpkit measure` prints and writes to `report.json`.

# %%
run = train_demo(epochs=20)
x, y = run.train
data = [(x[i : i + 256], y[i : i + 256]) for i in range(0, len(y), 256)]
report = measure_sharpness(
    run.model, ce, data, ["lambda_max", "trace", "worst_case_adaptive", "pac_bayes", "fisher_rao"]
)
print(f"test accuracy {run.test_accuracy:.3f}")
print(report)

# %% [markdown]
# ## 4. Loss landscapes
#
# Filter-normalised directions (Li et al., 2018) make 1-D and 2-D slices comparable
# across networks; PCA directions of the training trajectory show the path taken.

# %%
d1 = filter_normalized_direction(run.model, seed=0)
d2 = filter_normalized_direction(run.model, seed=1)
s1 = loss_surface_1d(run.model, ce, data, d1, steps=25)
dirs, coords, explained = pca_directions(run.trajectory)
pad = 0.2 * float((coords.max(0).values - coords.min(0).values).max())
span = tuple((float(coords[:, i].min()) - pad, float(coords[:, i].max()) + pad) for i in range(2))
s2 = loss_surface_2d(run.model, ce, data, dirs, steps=15, span=span)
fig, axes = plt.subplots(1, 2, figsize=(11, 4))
plot_surface_1d(s1, axes[0])
plot_surface_2d(s2, axes[1], trajectory=coords.numpy())
axes[1].set_xlabel(f"PC1 ({100 * explained[0]:.0f}%)")
axes[1].set_ylabel(f"PC2 ({100 * explained[1]:.0f}%)")
fig.tight_layout()
plt.show()

# %% [markdown]
# ## 5. Training mode and dropout
#
# `mode="train"` (for BatchNorm's batch statistics, say) also switches dropout on,
# and then two evaluations of the loss at the *same* weights differ. Every metric
# therefore replays the random state it started in: all its evaluations draw the
# same masks, and $L(w + d) - L(w)$ measures the change of the weights. Comparing
# losses under fresh masks would instead measure the spread below, which on this
# briefly trained network is several times the sharpness itself.

# %%
torch.manual_seed(0)
drop = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Dropout(0.3), nn.Linear(64, 10))
opt = torch.optim.Adam(drop.parameters(), lr=1e-2)
for _ in range(100):  # a short training run with dropout
    opt.zero_grad()
    ce(drop(x), y).backward()
    opt.step()
batch = (x[:256], y[:256])
res = worst_case_sharpness(drop, ce, batch, 0.01, mode="train", steps=10)
drop.train()
with torch.no_grad():
    fresh = torch.tensor([ce(drop(batch[0]), batch[1]).item() for _ in range(20)])
print(f"worst-case sharpness at rho = 0.01, training mode, replayed masks: {res.value:.5f}")
print(f"loss at the same weights under 20 fresh draws of the masks: std {fresh.std():.5f}")

# %% [markdown]
# ## Exercises
#
# **03.1 Sharpness of a quadratic.** Write `quadratic_sharpness(A, rho)` returning
# `(worst, average)` for $L(d) = \tfrac12 d^\top A d$ at its minimum $d = 0$
# ($A$ positive semi-definite): the worst case over $\|d\| \le \rho$ and the mean
# over $d \sim N(0, \rho^2 I)$. Compare with section 1: which eigenvalues does
# each one see?
#
# **03.2 Filter normalisation.** Write `filter_normalize(direction, weight)` for one
# tensor: when `weight.dim() >= 2`, rescale each filter `direction[j]` to the norm
# of `weight[j]`; one-dimensional tensors get zero. Why would a plain random
# direction make the ReLU-rescaled networks of section 2 look different?

# %%
from sharpkit.course import check

quadratic_sharpness = None  # def quadratic_sharpness(A, rho): ... -> (worst, average)
check("03.1", quadratic_sharpness)

# %%
filter_normalize = None  # def filter_normalize(direction, weight): ...
check("03.2", filter_normalize)
