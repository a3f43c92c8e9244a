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
# # 02 · Measuring curvature: Hessian spectra without the Hessian
#
# Sharpness is curvature: the top eigenvalue $\lambda_{\max}$ of the loss Hessian
# $H = \nabla^2 L(w)$, its trace, its whole spectrum. A network with $d$ parameters
# has a $d \times d$ Hessian, far too large to form, but a **Hessian-vector product**
# $v \mapsto Hv$ costs about as much as a gradient (Pearlmutter, 1994). Everything in
# `sharpkit.curvature` is built on that product:
#
# | quantity | estimator | products |
# |---|---|---|
# | top-k / bottom-k eigenvalues | Lanczos, full reorthogonalisation | tens |
# | $\mathrm{tr}(H)$ | Hutchinson $E[z^\top H z]$, Hutch++ | $O(1/\varepsilon^2)$, $O(1/\varepsilon)$ |
# | $\|H\|_F^2$ | $E\|Hz\|^2$ | as Hutchinson |
# | spectral density | stochastic Lanczos quadrature | runs x steps |
#
# This notebook checks the operator against a dense Hessian, then measures a small
# digits classifier.

# %% [markdown]
# **Learning goals.** After this notebook you can
#
# - multiply by a Hessian without forming it, and check the product against a dense Hessian;
# - compute extreme eigenvalues by Lanczos and read their residuals;
# - estimate a trace with an honest error bar (Hutchinson, Hutch++) and see how the error falls with the budget;
# - read a spectral density from stochastic Lanczos quadrature.
#
# It runs top to bottom on a laptop CPU in about half a minute. The mathematics
# is on the documentation site's theory page (`docs/theory.md`); the exercises
# at the end are checked by `sharpkit.course.check`.

# %%
import time

import matplotlib.pyplot as plt
import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import nn

from sharpkit.curvature import (
    HessianOperator,
    eigenvalues,
    frobenius_norm_sq,
    spectral_density,
    trace,
)
from sharpkit.plotting.curvature import plot_spectral_density
from sharpkit.testing import dense_hessian, oracle_cases

# These models are tiny: one thread is as fast as several and does not stall when the
# machine is busy (OpenMP threads spin-waiting for a shared core).
torch.set_num_threads(1)
t_start = time.perf_counter()
torch.manual_seed(0)

# %% [markdown]
# ## 1. The operator is the Hessian
#
# `HessianOperator(model, loss_fn, data)` is the Hessian of the example-weighted
# average loss $\sum_b (n_b/N) L_b(w)$ over the batches. On a tiny model we compare
# it with a dense float64 Hessian from `torch.func.hessian` (`sharpkit.testing`),
# here for data split into batches of 5, 5 and 3 examples: the short last batch must
# weigh 3/13, not 1/3.

# %%
case = oracle_cases(("multi_batch",))["multi_batch"]
H_dense = dense_hessian(case.model, case.loss_fn, case.full_batch)  # all 13 examples at once
H = HessianOperator(case.model, case.loss_fn, case.data, dtype=torch.float64)  # 3 batches
V = torch.randn(H.dim, 4, dtype=torch.float64)
print(f"dim {H.dim}, batches {H.num_batches}, max |Hv - H_dense v| = "
      f"{(H @ V - H_dense @ V).abs().max():.1e}")  # fmt: skip
assert torch.allclose(H @ V, H_dense @ V, atol=1e-10)

# %% [markdown]
# ## 2. A small classifier on digits
#
# A two-hidden-layer MLP trained for a few hundred full-batch steps. The module
# mode is explicit: the operator uses eval mode by default and restores the
# caller's mode afterwards (it is recorded in every result's protocol).

# %%
digits = load_digits()
x = torch.tensor(digits.data / 16.0, dtype=torch.float32)
y = torch.tensor(digits.target)
model = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 10))
opt = torch.optim.Adam(model.parameters(), lr=3e-3)
for _ in range(300):
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
print("train accuracy", (model(x).argmax(1) == y).float().mean().item())

loader = [(x[i : i + 512], y[i : i + 512]) for i in range(0, len(x), 512)]  # last batch: 261
# cache_graph keeps each batch's gradient graph, so a product is one double-backward
# pass (fast, costs memory); the default caches only when the data is one batch.
H = HessianOperator(model, nn.CrossEntropyLoss(), loader, cache_graph=True)
print(H)

# %% [markdown]
# ## 3. Extreme eigenvalues by Lanczos
#
# Lanczos builds an orthonormal Krylov basis and a small tridiagonal matrix whose
# eigenvalues (Ritz values) converge to both ends of the spectrum at once. sharpkit
# stops on the **Ritz residual** $\|Hy - \theta y\| \le \mathrm{tol}\cdot\max|\theta|$,
# which bounds the error, instead of on a small change between iterations.

# %%
top = eigenvalues(H, k=5, seed=0)
bottom = eigenvalues(H, k=2, which="smallest", seed=0)
print("top-5     ", np.round(top.eigenvalues.numpy(), 4), f"({top.num_matvecs} products)")
print("residuals ", np.array2string(top.residuals.numpy(), precision=1))
print("bottom-2  ", np.round(bottom.eigenvalues.numpy(), 5))
print("lambda_min / lambda_max =", float(bottom.eigenvalues[0] / top.eigenvalues[0]))

# %% [markdown]
# ### Why the stopping rule matters
#
# Power iteration that stops when the Rayleigh quotient changes by less than 1e-3
# (relative) looks converged long before it is when the top two eigenvalues are
# close: the change per step is small because progress is slow. A 200 x 200
# matrix with $\lambda_1 = 1$, $\lambda_2 = 0.97$:

# %%
g = torch.Generator().manual_seed(0)
Q, _ = torch.linalg.qr(torch.randn(200, 200, generator=g, dtype=torch.float64))
lam = torch.cat([torch.tensor([1.0, 0.97]), torch.linspace(0.0, 0.9, 198)]).double()
A = Q @ torch.diag(lam) @ Q.T
A = (A + A.T) / 2

v = torch.randn(200, generator=g, dtype=torch.float64)
v /= v.norm()
old, rq, it = None, 0.0, 0
while it < 1000:
    it += 1
    w = A @ v
    rq = float(v @ w)
    v = w / w.norm()
    if old is not None and abs(rq - old) / abs(old) < 1e-3:
        break
    old = rq
lz = eigenvalues(A, k=1, seed=0)
print(f"power iteration, relative-change stop: {rq:.5f} after {it} products")
print(f"Lanczos, residual stop:                {float(lz.eigenvalues[0]):.5f} "
      f"after {lz.num_matvecs} products (true 1.00000)")  # fmt: skip

# %% [markdown]
# ## 4. Trace and Frobenius norm with error bars
#
# Hutchinson averages $z^\top H z$ over Rademacher $z$ and reports a standard error
# and a Student-t interval; `rtol` stops once the interval is narrow enough. Hutch++
# (Meyer et al., 2021) first removes a low-rank sketch of the top eigenspace, which
# helps most when a few outliers dominate.

# %%
for method in ("hutchinson", "hutch++"):
    t = trace(H, method=method, num_samples=90, seed=0)
    print(f"{method:10s} tr(H) = {t.estimate:8.3f} +- {t.stderr:.3f}  "
          f"95% CI [{t.ci[0]:.3f}, {t.ci[1]:.3f}]  ({t.num_matvecs} products)")  # fmt: skip
f = frobenius_norm_sq(H, num_samples=30, seed=0)
print(f"||H||_F^2 = {f.estimate:.3f} +- {f.stderr:.3f}")

# %% [markdown]
# How the error falls with the budget: Hutchinson's standard error shrinks like
# $1/\sqrt{N}$ in the number of products, Hutch++'s faster when a few large
# eigenvalues dominate (it removes them exactly first). The spread over 4 seeds,
# at three budgets:

# %%
budgets = [10, 30, 90]
spread = {"hutchinson": [], "hutch++": []}
for method in spread:
    for n in budgets:
        est = [trace(H, method=method, num_samples=n, seed=s).estimate for s in range(4)]
        spread[method].append(float(np.std(est)))
fig, ax = plt.subplots(figsize=(4.8, 3.4))
for method, sd in spread.items():
    ax.loglog(budgets, sd, "o-", label=method)
ax.loglog(budgets, [spread["hutchinson"][0] * (budgets[0] / n) ** 0.5 for n in budgets], "k:",
          label=r"$\propto 1/\sqrt{N}$")  # fmt: skip
ax.set(xlabel="products N", ylabel="std of the estimate over seeds", title="trace estimators")
ax.legend()
plt.show()

# %% [markdown]
# ## 5. The spectral density (stochastic Lanczos quadrature)
#
# Each Lanczos run from a random vector gives a Gauss quadrature: nodes (Ritz
# values) and weights (squared first components of the tridiagonal's
# eigenvectors). Averaged over runs and smoothed, it is the eigenvalue density; on
# a log scale (Ghorbani et al., 2019) the few large outliers stand apart from the
# bulk near zero. Its first moment is $\mathrm{tr}(H)/d$.

# %%
dens = spectral_density(H, runs=4, steps=40, seed=0)
print("integral", float(torch.trapezoid(dens.density, dens.grid)))
print("first moment * dim", dens.moment(1) * H.dim, " (compare the trace above)")
ax = plot_spectral_density(dens, label="digits MLP")
ax.set_title("Hessian eigenvalue density (SLQ, 4 runs x 40 steps)")
plt.show()

# %% [markdown]
# ## 6. Per-layer curvature
#
# `H.blocks()` gives the diagonal block of each module: per-layer spectra.

# %%
for name, block in H.blocks().items():
    r = eigenvalues(block, k=1, seed=0, tol=1e-4)
    print(f"layer {name}: {block.dim:5d} parameters, lambda_max = {float(r.eigenvalues[0]):.4f}")

# %% [markdown]
# ## 7. Three ways to multiply by H
#
# A Hessian-vector product never forms $H$ (Pearlmutter, 1994). sharpkit offers three:
#
# - `"rev-rev"` (the default): differentiate the gradient again,
#   $Hv = \nabla_w (\nabla_w L \cdot v)$, a double backward; with one batch the
#   gradient graph is built once and reused.
# - `"fwd-rev"`: push a tangent $v$ forward through the gradient computation
#   (`torch.func.jvp` of `torch.func.grad`); recomputes the forward and backward passes
#   every time.
# - `"linearize"`: `torch.func.linearize` traces the map $v \mapsto Hv$ once per batch,
#   and a product then runs only the tangent computation: the cheapest product after a
#   one-off trace, for more memory (it keeps every intermediate). Opt in with care: in
#   torch 2.13 tracing the second derivative of `nn.MSELoss` crashes the process.
#
# All three give the same products; their costs differ.

# %%
batch = (x[:512], y[:512])
params = list(model.parameters())
ops = {hvp: HessianOperator(model, nn.CrossEntropyLoss(), batch, hvp=hvp)
       for hvp in ("rev-rev", "fwd-rev", "linearize")}  # fmt: skip
v = torch.randn(ops["rev-rev"].dim, generator=torch.Generator().manual_seed(0))
ref = ops["rev-rev"].matvec(v)


def seconds(fn, repeat=20):
    fn()  # the first call builds caches or traces
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - t0) / repeat


t_grad = seconds(
    lambda: torch.autograd.grad(nn.functional.cross_entropy(model(batch[0]), batch[1]), params)
)
for hvp, op in ops.items():
    diff = (op.matvec(v) - ref).abs().max() / ref.abs().max()
    print(f"{hvp:10s} max relative difference to rev-rev {diff:.1e}, "
          f"{seconds(lambda op=op: op.matvec(v)) / t_grad:.1f} gradients per product")  # fmt: skip
    assert diff < 1e-4

print(f"notebook ran in {time.perf_counter() - t_start:.1f}s")

# %% [markdown]
# ## Exercises
#
# **02.1 A Hessian-vector product.** Write `hessian_vector_product(loss_of_w, w, v)`
# for a function `loss_of_w` of one flat tensor `w`: differentiate
# $\nabla L(w)^\top v$ once more (two calls to `torch.autograd.grad`, the first
# with `create_graph=True`). Never form the Hessian.
#
# **02.2 Hutchinson with an error bar.** Write
# `hutchinson_trace(matvec, dim, num_samples, generator)` returning
# `(estimate, stderr)` from Rademacher probes $z \in \{-1, 1\}^d$ drawn with
# `torch.randint(0, 2, (dim,), generator=generator)` (in float64), one product per
# probe. How many samples would you need for a 1% error on the digits model above?
#
# **02.3 Gauss quadrature from Lanczos.** Write `lanczos_quadrature(alpha, beta)`:
# for the tridiagonal matrix with diagonal `alpha` and off-diagonal `beta`, return
# the nodes (its eigenvalues, ascending) and weights (squared first components of
# its eigenvectors). Check on paper that the weights sum to one.

# %%
from sharpkit.course import check

hessian_vector_product = None  # def hessian_vector_product(loss_of_w, w, v): ...
check("02.1", hessian_vector_product)

# %%
hutchinson_trace = None  # def hutchinson_trace(matvec, dim, num_samples, generator): ...
check("02.2", hutchinson_trace)

# %%
lanczos_quadrature = None  # def lanczos_quadrature(alpha, beta): ...
check("02.3", lanczos_quadrature)
