"""mSAM: micro-batch-averaged Sharpness-Aware Minimization (Behdin et al., 2023)."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from .._batch import batch_weight, split_batch
from .._functional import (
    FunctionalView,
    NotVectorisable,
    batch_leaves,
    train_mode_batchnorm,
    vmap_over_model,
)
from ._base import BatchDrivenSAM, Oracle, SAMBase, SkipStep, check_loss, check_nonneg_float

__all__ = ["MSAM", "VectorisationFallbackWarning"]

_PATHS = {"auto": "auto", "vectorised": "vectorised", "vectorized": "vectorised"}
_PATHS["sequential"] = "sequential"


class VectorisationFallbackWarning(UserWarning):
    """A vectorised (``torch.func.vmap``) code path could not be used; the
    sequential one ran instead. Issued once per optimizer, with the reason."""


def _check_micro_batches(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"micro_batches: expected a positive integer, got {value!r}")
    if value < 1:
        raise ValueError(f"micro_batches: must be >= 1, got {value}")
    return value


def _check_path(value: Any) -> str:
    if value not in _PATHS:
        raise ValueError(f"path: expected 'auto', 'vectorised' or 'sequential', got {value!r}")
    return _PATHS[value]


def _micro_weights(loss_fn: Any, pieces: list[Any]) -> list[float]:
    """``n_j / n`` for each micro-batch, in the loss's own normalisation."""
    weights = [batch_weight(loss_fn, piece) for piece in pieces]
    total = sum(weights)
    if not total > 0:
        raise ValueError(
            f"batch: has no weight in the loss's mean (micro-batch weights {weights}: no "
            "target tokens?)"
        )
    return [w / total for w in weights]


# ----------------------------------------------------------------------------
# mSAM
# ----------------------------------------------------------------------------


class MSAM(BatchDrivenSAM):
    r"""Micro-batch-averaged SAM: one SAM perturbation per micro-batch, averaged.

    The mini-batch :math:`B` of :math:`n` examples is split into ``m`` disjoint
    micro-batches :math:`B_1, \dots, B_m` of weights :math:`n_j` (their sizes, or
    their numbers of target tokens for a token-mean loss:
    :func:`sharpkit._batch.batch_weight`), :math:`n = \sum_j n_j`; each gets its
    own perturbation and the update averages the perturbed gradients:

    .. math::

        g_j = \nabla L_{B_j}(w), \qquad e_j = \rho\, g_j / \|g_j\|, \qquad
        G = \sum_j \frac{n_j}{n}\, \nabla L_{B_j}(w + e_j), \qquad
        w \leftarrow \mathrm{base\_step}(w, G).

    ``m = 1`` is SAM (the step is SAM's, bit for bit); data-parallel SAM with a
    per-replica perturbation is mSAM with ``m`` = the number of replicas.

    **Naming clash.** Foret et al.'s "m-sharpness" uses *m* for the micro-batch
    *size*; here (as in Behdin et al.) ``micro_batches`` is the *number* of
    micro-batches, so micro-batches hold about ``n / micro_batches`` examples.

    **How the batch is handed over.** mSAM must split the batch, so it is driven
    by ``opt.step(loss_fn=..., batch=...)`` rather than by a closure (which cannot
    be split; passing one raises ``TypeError``), following sharpkit's
    batch-loss convention (``sharpkit._batch``): ``loss_fn(model, micro_batch)``
    returns the *mean* loss of a micro-batch; a plain criterion such as
    ``nn.CrossEntropyLoss()`` means ``(inputs, targets)`` batches. ``model`` is
    given at construction. The micro-batches are :func:`torch.tensor_split`
    pieces of every tensor whose leading dimension is the batch size (other
    leaves are shared), as in :func:`sharpkit._batch.split_batch`.

    **Batch not divisible by m.** The sizes differ by at most one (the first
    ``n % m`` micro-batches take one extra example) and the average is weighted
    by :math:`n_j / n`, so with ``rho = 0`` the update uses exactly the
    full-batch gradient (the token-mean gradient for a token-mean loss such as
    ``sharpkit.hf.HFLoss`` on padded sequences). ``m`` larger than the batch
    raises ``ValueError``.

    **Two execution paths, one result** (equal to 1e-8 in float64, tested):

    - *vectorised* (the default where it applies): the ``m`` micro-batches run as
      one batched pass over ``m`` copies of the trainable parameters, twice
      (clean, then perturbed), with :func:`torch.func.vmap` over
      :func:`torch.func.functional_call` and one ordinary backward each; the
      module's own weights never move. FLOPs equal SAM's. Frozen parameters are
      shared, not copied; for LoRA-style models only the small adapters are
      stacked. Dropout draws different masks per micro-batch. Hugging Face
      models with attention masks run on it too
      (:func:`sharpkit._functional.vmap_over_model`: their value-reading mask
      shortcuts off, attention on the math backend).
    - *sequential*: a loop over micro-batches, each a SAM step's two passes on the
      module itself (``loss_fn(model, micro_batch)``), accumulating the
      weighted perturbed gradient. Works for any model.

    ``path='auto'`` uses the vectorised path unless it cannot apply: a
    BatchNorm updating running statistics in training mode (vmap cannot update
    them in place), an optimizer parameter that is not the model's, ``m = 1``,
    or ``vmap`` failing on the model (data-dependent control flow, ``.item()``,
    in-place updates of buffers). It then runs the sequential path and warns
    once (:class:`VectorisationFallbackWarning`) saying why. ``path='vectorised'``
    or ``'sequential'`` forces a path (a forced vectorised step raises instead of
    falling back).

    **Buffers.** BatchNorm running statistics come from the clean passes only:
    the ``m`` clean micro-batch forwards at ``w`` update them, in order; the
    perturbed forwards do not (their buffers are restored). Hence the
    sequential path for BatchNorm models in training mode.

    **Cost.** Same FLOPs as SAM. The vectorised path materialises ``m``
    gradients of the trainable parameters and ``m`` perturbed copies of them,
    and its matrix products have inner dimension ``n / m`` for the weight
    gradients; for full-width layers on a CPU that memory traffic makes it
    slower than SAM, for adapters (LoRA) it is close to SAM on large enough
    batches. Its floor is SAM's step plus what ``vmap`` itself costs on the two
    passes (a fixed per-operation dispatch cost, large relative to a small
    model's step on a CPU); the benchmark times that floor beside the method
    (analysis/benchmarks/results/msam_deltasam.md). Mixed precision via
    ``GradScaler`` and the manual ``first_step``/``second_step`` form are not
    supported (use :class:`~sharpkit.optim.SAM` for those).

    A zero or non-finite micro-batch gradient gives that micro-batch ``e_j = 0``;
    a non-finite gradient at ``w`` skips the whole step (weights, buffers and
    optimizer state unchanged, ``RuntimeWarning``). ``step`` returns the loss at
    ``w``, :math:`\sum_j (n_j/n) L_{B_j}(w)`, as a detached 0-d tensor.

    Args:
        params: parameters or parameter-group dicts (groups may set ``rho``).
        base_optimizer: optimizer class applied with ``G``, e.g. ``torch.optim.SGD``.
        rho: perturbation radius (>= 0), per micro-batch.
        micro_batches: the number ``m`` of micro-batches (>= 1).
        model: the module ``loss_fn`` evaluates (required). A
            ``DistributedDataParallel`` model makes the step data-parallel (see
            :class:`~sharpkit.optim._base.BatchDrivenSAM`): each rank perturbs with its
            own micro-batch gradients, with no communication, and the perturbed
            gradients are averaged by one all-reduce.
        process_group: the group to average over (default: the DDP model's;
            ``None`` and a plain module: one process).
        path: ``'auto'``, ``'vectorised'`` (alias ``'vectorized'``) or ``'sequential'``.
        **base_kwargs: passed to ``base_optimizer`` (``lr``, ``momentum``, ...).

    Returns:
        ``step(loss_fn=..., batch=...)`` returns the loss at ``w``,
        :math:`\sum_j (n_j/n) L_{B_j}(w)`, as a detached 0-d tensor.

    Example:
        >>> import torch
        >>> from sharpkit.optim.msam import MSAM
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
        >>> x, y = torch.randn(32, 4), torch.randn(32, 1)
        >>> opt = MSAM(model.parameters(), torch.optim.SGD, rho=0.05, micro_batches=4,
        ...            model=model, lr=0.1)
        >>> loss_fn = torch.nn.MSELoss()           # means (inputs, targets) batches
        >>> first = opt.step(loss_fn=loss_fn, batch=(x, y)).item()
        >>> later = [opt.step(loss_fn=loss_fn, batch=(x, y)).item() for _ in range(20)][-1]
        >>> later < first, opt.last_path
        (True, 'vectorised')

    References:
        Behdin, Song, Gupta, Keerthi, Acharya, Ocejo, Dexter, Khanna, Durfee,
        Mazumder. mSAM: Micro-Batch-Averaged Sharpness-Aware Minimization.
        arXiv:2302.09693. Foret, Kleiner, Mobahi, Neyshabur. Sharpness-Aware
        Minimization for Efficiently Improving Generalization. ICLR 2021.
    """

    _OWN_KEYS = ("rho",)
    _needs_batch = "it needs the batch to split it"

    def __init__(
        self,
        params: Iterable[Any],
        base_optimizer: Callable[..., Optimizer],
        rho: float = 0.05,
        micro_batches: int = 4,
        *,
        model: nn.Module,
        process_group: Any = None,
        path: str = "auto",
        **base_kwargs: Any,
    ) -> None:
        if model is None:
            raise TypeError(
                "model: MSAM needs the module, as model=..., because it evaluates "
                "loss_fn(model, micro_batch) itself"
            )
        self.micro_batches = _check_micro_batches(micro_batches)
        self.path = _check_path(path)
        defaults = {"rho": check_nonneg_float("rho", rho)}
        super().__init__(
            params, base_optimizer, defaults, base_kwargs, model=model, process_group=process_group
        )
        #: why the vectorised path is not used (after an automatic fallback), or None
        self.fallback_reason: str | None = None
        #: the path the last step took: 'vectorised' or 'sequential'
        self.last_path: str | None = None
        self._path_now = "sequential"
        self._vec: Any = None

    # -- the step: mSAM's hooks ------------------------------------------------------

    def check_hyperparameters(self) -> None:
        """Also ``micro_batches`` and ``path``, in case they were changed after construction."""
        super().check_hyperparameters()
        self.micro_batches = _check_micro_batches(self.micro_batches)
        self.path = _check_path(self.path)

    def _oracle(self, closure: Any, loss_fn: Any, batch: Any) -> Oracle | None:
        self.check_hyperparameters()  # micro_batches is compared with the batch below
        oracle = super()._oracle(closure, loss_fn, batch)
        if oracle is not None and self.micro_batches > oracle.n:
            raise ValueError(
                f"micro_batches: {self.micro_batches} micro-batches cannot be cut from a "
                f"batch of {oracle.n} examples"
            )
        return oracle

    def _vectorise_blocker(self, m: int) -> str | None:
        if self.path == "sequential":
            return "path='sequential'"
        if m == 1:
            return "micro_batches=1 is SAM"
        bn = train_mode_batchnorm(self.model)
        if bn is not None:
            return (
                f"BatchNorm '{bn}' updates its running statistics in training mode, which "
                "torch.func.vmap cannot do in place"
            )
        return None

    def _run(self, oracle: Oracle | None) -> Any:
        """Choose the path; the vectorised one runs the template's hooks functionally,
        the sequential one runs SAM's hooks once per micro-batch."""
        assert oracle is not None
        m = self.micro_batches
        blocker = self._vectorise_blocker(m)
        if blocker is not None and self.path == "vectorised" and m > 1:
            raise ValueError(f"path: the vectorised path cannot run: {blocker}")
        if blocker is None and self.fallback_reason is None:
            self._path_now = "vectorised"
            try:
                loss = super()._run(oracle)
            except (NotVectorisable, RuntimeError, NotImplementedError) as err:
                if self.path == "vectorised":
                    raise
                # the vectorised path never moves the module, so nothing to undo
                self.zero_grad(set_to_none=True)
                result = self._sequential(oracle)
                # the sequential path ran, so the failure was vmap's, not the model's
                text = str(err).strip().splitlines()
                self.fallback_reason = f"{type(err).__name__}: {text[0] if text else ''}".strip()
                self._warn_fallback(
                    "torch.func.vmap cannot run this model, so the sequential path (one SAM "
                    "step per micro-batch, the same update) is used from now on. Cause: "
                    f"{self.fallback_reason}. Remedy: make the forward free of value-dependent "
                    "Python control flow (.item(), `if tensor`, in-place buffer updates), or "
                    "pass path='sequential' to choose that path without this warning."
                )
                return result
            self.last_path = "vectorised"
            return loss
        if blocker is not None and self.path == "auto" and m > 1:
            self._warn_fallback(
                f"using the sequential path: {blocker}. Remedy: put the BatchNorm layers in "
                "eval mode, or pass path='sequential' to choose that path without this warning."
            )
        return self._sequential(oracle)

    def _warn_fallback(self, message: str) -> None:
        if not getattr(self, "_fallback_warned", False):
            self._fallback_warned = True
            warnings.warn(f"MSAM: {message}", VectorisationFallbackWarning, stacklevel=6)

    # -- sequential path: SAM's hooks per micro-batch, weighted average ------------

    def _sequential(self, oracle: Oracle) -> Any:
        self._path_now = "sequential"
        self.last_path = "sequential"
        m = self.micro_batches
        if m == 1:
            return SAMBase._run(self, oracle)
        acc: dict[torch.Tensor, torch.Tensor] = {}
        total: torch.Tensor | None = None
        pieces = split_batch(oracle.batch, m)
        for piece, weight in zip(pieces, _micro_weights(oracle.loss_fn, pieces)):
            loss = SAMBase._run(self, Oracle(None, oracle.loss_fn, piece, self.model))
            with torch.no_grad():
                for _, ps in self._params_with_grad():
                    for p in ps:
                        if p in acc:
                            acc[p].add_(p.grad, alpha=weight)
                        else:
                            acc[p] = p.grad.mul_(weight)
                wl = loss * weight
                total = wl if total is None else total + wl
            self.zero_grad(set_to_none=True)
        for p, g in acc.items():
            p.grad = g
        self._step_loss = total
        return total

    # -- vectorised path: the same three hooks, on m stacked copies ----------------------

    def _clean_gradient(self, oracle: Oracle | None) -> Any:
        """Vectorised: per-micro-batch gradients ``g_j`` at ``w`` (one batched pass per
        micro-batch size); returns the weighted mean loss at ``w``."""
        if self._path_now != "vectorised":
            return super()._clean_gradient(oracle)
        assert oracle is not None and oracle.n is not None
        n, m = oracle.n, self.micro_batches
        view = FunctionalView(self.model, self.param_groups)
        if not view.trainable:
            raise RuntimeError("MSAM: no parameter of the optimizer requires a gradient")
        leaves, rebuild = batch_leaves(oracle.batch, n)
        loss_fn = oracle.loss_fn

        def per_slice(tp: dict[str, torch.Tensor], piece: list[torch.Tensor]) -> torch.Tensor:
            out = check_loss(loss_fn(view.caller(tp), rebuild(piece)), "mean", None, "vectorised")
            return out

        batched = vmap_over_model(per_slice, in_dims=(0, 0), randomness="different")
        q, r = divmod(n, m)
        classes = [(q + 1, r, 0), (q, m - r, r * (q + 1))] if r else [(q, m, 0)]
        # the pieces are split_batch's, in order: the first r have q + 1 examples
        micro = _micro_weights(loss_fn, split_batch(oracle.batch, m))
        index = 0
        parts = []
        total: torch.Tensor | None = None
        for size, count, start in classes:
            if count == 0:
                continue
            piece = [
                t.narrow(0, start, size * count).reshape(count, size, *t.shape[1:]) for t in leaves
            ]
            stacked = [
                p.detach().unsqueeze(0).expand(count, *p.shape).requires_grad_()
                for p in view.params
            ]
            with torch.enable_grad():
                losses = batched(dict(zip(view.names, stacked)), piece)
                grads = torch.autograd.grad(losses.sum(), stacked, allow_unused=True)
            weights = torch.tensor(
                micro[index : index + count], dtype=losses.dtype, device=losses.device
            )
            index += count
            parts.append((count, piece, stacked, grads, weights))
            part = (losses.detach() * weights).sum()
            total = part if total is None else total + part
        if not any(g is not None for _, _, _, grads, _ in parts for g in grads):
            raise RuntimeError("MSAM: no parameter has a gradient after calling loss_fn at w")
        self._vec = (view, batched, parts)
        return total

    def _perturbation(self, oracle: Oracle | None) -> None:
        """Vectorised: ``w + e_j`` as stacked copies, ``e_j = rho g_j / ||g_j||``."""
        if self._path_now != "vectorised":
            return super()._perturbation(oracle)
        view, batched, parts = self._vec
        perturbed_parts = []
        for count, piece, stacked, grads, weights in parts:
            sq = [
                torch.linalg.vector_norm(g.reshape(count, -1), dim=1)
                for g in grads
                if g is not None
            ]
            norms = torch.linalg.vector_norm(torch.stack(sq), dim=0)  # (count,) ||g_j||
            if not bool(torch.isfinite(norms).all()):
                self.zero_grad(set_to_none=True)
                raise SkipStep("non-finite gradient at w")
            inv = torch.where(norms > 0, norms.reciprocal(), torch.zeros_like(norms))
            perturbed = []
            for (_, p, group), s, g in zip(view.trainable, stacked, grads):
                if g is None or group["rho"] == 0.0:
                    perturbed.append(s.detach().requires_grad_())
                    continue
                scale = (inv * group["rho"]).to(g.dtype).view(count, *([1] * p.dim()))
                perturbed.append(torch.addcmul(s.detach(), scale, g).requires_grad_())
            perturbed_parts.append((count, piece, perturbed, weights))
        self._vec = (view, batched, perturbed_parts)

    def _perturbed_gradient(self, oracle: Oracle | None) -> None:
        """Vectorised: ``G = sum_j (n_j/n) grad L_{B_j}(w + e_j)`` into ``.grad``."""
        if self._path_now != "vectorised":
            return super()._perturbed_gradient(oracle)
        view, batched, parts = self._vec
        self._vec = None
        acc: list[torch.Tensor | None] = [None] * len(view.params)
        for _, piece, perturbed, weights in parts:
            with torch.enable_grad():
                plosses = batched(dict(zip(view.names, perturbed)), piece)
                pgrads = torch.autograd.grad(
                    (plosses * weights).sum(), perturbed, allow_unused=True
                )
            for k, g in enumerate(pgrads):
                if g is None:
                    continue
                g = g.sum(0)
                acc[k] = g if acc[k] is None else acc[k].add_(g)
        self.zero_grad(set_to_none=True)
        for p, g in zip(view.params, acc):
            if g is not None:
                p.grad = g
