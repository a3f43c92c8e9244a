"""The delta-SAM optimizer (Zhou, Liu, Zhang, Chen, 2022)."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from ... import per_example as pe  # a module import: per_example imports optim too
from ..._batch import batch_size, weighted_mean
from ..._functional import FunctionalView, NotVectorisable
from ..._rng import RandomState
from .._base import BatchDrivenSAM, Oracle, check_loss, check_nonneg_float
from ..msam import VectorisationFallbackWarning
from .statistics import MODES, exact_statistics, probe_points, probe_statistics
from .weighting import ExampleStats, UnguardednessSoftmax, Weighting, normalised_weights

__all__ = ["DeltaSAM"]


class DeltaSAM(BatchDrivenSAM):
    r"""delta-SAM: SAM with one dynamically reweighted batch perturbation.

    .. math::

        g_\lambda = \sum_i \lambda_i g_i, \qquad
        e = \rho\, g_\lambda / \|g_\lambda\|, \qquad
        w \leftarrow \mathrm{base\_step}\big(w,\ \nabla L_B(w + e)\big),

    with :math:`\lambda` on the simplex, chosen to approximate the per-instance
    target :math:`G_{PI} = \frac1n \sum_i \nabla l_i(w + \rho g_i/\|g_i\|)`
    (:func:`per_instance_target`) with one perturbation instead of ``n``.

    **Paper versus reconstruction.** The update above, the idea of up-weighting
    the instances that the shared perturbation leaves unguarded, and estimating
    guardedness with a few extra forward passes under random Gaussian
    perturbations are Zhou et al.'s. Their weighting formula is not available to
    sharpkit; the weighting here is a replaceable callable (``weighting=``, a
    function of :class:`ExampleStats`), and the default is sharpkit's
    reconstruction :class:`UnguardednessSoftmax`:
    :math:`u_i = 1 - \cos(g_i, g)`, :math:`\lambda = \mathrm{softmax}(u/\tau)`.

    **Statistics** (``mode=``):

    - ``'exact'``: per-example gradients with ``torch.func`` (``vmap`` over
      single examples; the Jacobian of the loss vector when BatchNorm couples
      the examples), then :math:`g_\lambda = \sum_i \lambda_i g_i` directly.
      Costs a per-example backward (memory ``n x`` the trainable parameters).
      Hugging Face models with attention masks vectorise
      (:func:`sharpkit._functional.vmap_over_model`); where ``vmap`` cannot run
      a model, the Jacobian is used from the first step on, with one
      :class:`~sharpkit.optim.msam.VectorisationFallbackWarning` naming the
      cause and the remedy (``exact_fallback`` keeps the cause).
    - ``'probe'``: backward of the mean loss (graph kept)
      gives ``g``; ``K`` forward probes :math:`a_{ik} = (l_i(w + s z_k) - l_i(w))/s`,
      :math:`z_k \sim N(0, I)`, estimate :math:`\|g_i\|^2 = E[(g_i\cdot z)^2]`
      by :math:`\frac1K\sum_k a_{ik}^2`; one more forward along
      :math:`\hat g` gives :math:`g_i \cdot \hat g`; a second backward of
      :math:`\sum_i \lambda_i l_i` gives :math:`g_\lambda`. Cost: SAM + 1 backward
      + ``K + 1`` forwards.
    - ``'forward-only'``: weights *before* the only backward, from ``K`` forward
      probes alone: :math:`\|g_i\|^2 \approx \frac1K \sum_k a_{ik}^2`,
      :math:`g_i \cdot g \approx \frac1K \sum_k a_{ik} b_k` with
      :math:`b_k = \frac1n \sum_i a_{ik}`, then one backward of
      :math:`\sum_i \lambda_i l_i`. Cost: SAM + ``K`` forwards; noisier.

    Probe forwards run functionally on perturbed copies of the trainable
    parameters (one ``vmap`` over the probes, a plain call for a single one;
    the module's weights never move, its BatchNorm buffers are not updated by
    them). They replay the random-number state of the clean forward, so a model
    with dropout in training mode draws the same masks at ``w`` and at every
    probe point (common random numbers; otherwise the differences would measure
    the masks). The probe step is
    :math:`s = r/\sqrt{d}` (``d`` trainable scalars, ``r = probe_radius``, so
    :math:`\|s z\| \approx r`); forward differences, whose error is far below
    the estimator's own noise (relative standard deviation of the squared-norm
    estimate :math:`\sqrt{2/K}`).

    **Example weights.** For a loss with ``example_weights(batch)``
    (:func:`sharpkit._batch.example_weights`; ``sharpkit.hf.HFLoss`` gives a
    sequence's number of target tokens :math:`w_i`) the batch objective is the
    loss's own mean :math:`L_B = \sum_i w_i l_i / \sum_i w_i` (the token mean),
    :math:`g` is its gradient, and the weights are
    :math:`\lambda_i \propto w_i\, \mathrm{weighting}(\mathrm{stats})_i`, so a
    uniform weighting is SAM on the token mean. Other losses: :math:`w_i = 1`.

    **Choosing a mode.** ``'exact'`` (the default) gives the best statistics
    and is cheap for adapter (LoRA) training, where the trainable parameters are
    few. ``'probe'`` costs SAM + 1 backward + ``K + 1`` forwards whatever the
    model size. ``'forward-only'`` is the cheapest (SAM + ``K`` forwards) but its
    weights are noisy at small ``K``. The default temperature ``tau = 1`` keeps
    the weights spread; small ``tau`` lets a handful of examples dominate ``e``.
    Measured comparisons are in the repository's benchmark results.

    BatchNorm running statistics come from the clean forward at ``w`` only.
    ``rho = 0`` reproduces the base optimizer bit for bit (no statistics are
    computed then). A non-finite loss or gradient at ``w`` skips the step.

    ``step(loss_fn=..., batch=...)`` returns the mean loss at ``w`` (a detached
    0-d tensor), like every sharpkit optimizer; the per-example losses, the
    statistics and the weights of the last step are the attributes
    ``last_losses``, ``last_stats`` and ``last_weights``. A closure cannot give
    per-example losses, so ``step(closure)`` raises ``TypeError``.

    Args:
        params: parameters or parameter-group dicts (groups may set ``rho``).
        base_optimizer: optimizer class, e.g. ``torch.optim.SGD``.
        rho: perturbation radius (>= 0).
        model: the module ``loss_fn`` evaluates (required).
        process_group: data-parallel use (default: the group of a
            ``DistributedDataParallel`` model): each rank reweights its own examples
            (the weights are local to a rank's batch) and the ranks' perturbed
            gradients are averaged by one all-reduce, weighted by the batches' weights
            (example counts, or target tokens for a token-mean loss).
        mode: ``'exact'``, ``'probe'`` or ``'forward-only'``.
        tau: temperature of the default weighting (default 1.0); not with ``weighting``.
        weighting: a callable ``ExampleStats -> (n,)`` non-negative weights, in place
            of the default.
        probes: number ``K`` of random probes (probe modes).
        probe_radius: ``r``, the norm of a probe perturbation (> 0).
        seed: seed of the probes' random generator (its state is in ``state_dict``).
        **base_kwargs: passed to ``base_optimizer``.

    Returns:
        ``step(loss_fn=..., batch=...)`` returns the mean loss at ``w`` as a
        detached 0-d tensor (per-example values in ``last_losses``).

    Example:
        >>> import torch
        >>> from sharpkit.optim import DeltaSAM
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
        >>> x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
        >>> opt = DeltaSAM(model.parameters(), torch.optim.SGD, rho=0.05, model=model, lr=0.1)
        >>> loss_fn = torch.nn.CrossEntropyLoss(reduction="none")   # one loss per example
        >>> first = opt.step(loss_fn=loss_fn, batch=(x, y)).item()
        >>> later = [opt.step(loss_fn=loss_fn, batch=(x, y)).item() for _ in range(20)][-1]
        >>> later < first, opt.last_losses.shape, round(opt.last_weights.sum().item(), 6)
        (True, torch.Size([16]), 1.0)

    References:
        Zhou, Liu, Zhang, Chen. Sharpness-Aware Minimization with Dynamic
        Reweighting. Findings of EMNLP 2022. arXiv:2112.08772.
    """

    _OWN_KEYS = ("rho",)
    _needs_batch = "it needs per-example losses"
    _loss_reduction = "none"

    def __init__(
        self,
        params: Iterable[Any],
        base_optimizer: Callable[..., Optimizer],
        rho: float = 0.05,
        *,
        model: nn.Module,
        process_group: Any = None,
        mode: str = "exact",
        tau: float | None = None,
        weighting: Weighting | None = None,
        probes: int = 4,
        probe_radius: float = 1e-2,
        seed: int = 0,
        **base_kwargs: Any,
    ) -> None:
        if model is None:
            raise TypeError(
                "model: DeltaSAM needs the module, as model=..., because it evaluates "
                "loss_fn(model, batch) itself"
            )
        _check_settings(mode, probes, probe_radius)
        if weighting is not None and tau is not None:
            raise ValueError("tau: applies to the default weighting; do not pass it with weighting")
        if weighting is None:
            weighting = UnguardednessSoftmax(1.0 if tau is None else tau)
        elif not callable(weighting):
            raise TypeError(f"weighting: expected a callable, got {type(weighting).__name__}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed: expected an integer, got {seed!r}")
        defaults = {"rho": check_nonneg_float("rho", rho)}
        super().__init__(
            params, base_optimizer, defaults, base_kwargs, model=model, process_group=process_group
        )
        self.mode = mode
        self.weighting = weighting
        self.probes = probes
        self.probe_radius = float(probe_radius)
        self.seed = seed
        self._generator: torch.Generator | None = None
        self._pending_generator_state: torch.Tensor | None = None
        #: the normalised weights of the last step (``None`` before, or when rho = 0)
        self.last_weights: torch.Tensor | None = None
        #: the statistics of the last step
        self.last_stats: ExampleStats | None = None
        #: the per-example losses at ``w`` of the last step, shape ``(n,)``
        self.last_losses: torch.Tensor | None = None
        #: why mode='exact' uses the Jacobian of the loss vector instead of vmap over
        #: examples (set at the first step where vmap failed), or None
        self.exact_fallback: str | None = None

    # -- state dict: the probes' generator travels with it ---------------------------

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        if self._generator is not None:
            sd["delta_sam_generator"] = self._generator.get_state()
        return sd

    def check_hyperparameters(self) -> None:
        """Also the settings kept as attributes (``mode``, ``probes``, ``probe_radius``,
        ``weighting``), in case they were changed after construction."""
        super().check_hyperparameters()
        _check_settings(self.mode, self.probes, self.probe_radius)
        if not callable(self.weighting):
            raise TypeError(f"weighting: expected a callable, got {type(self.weighting).__name__}")

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        gen_state = state_dict.get("delta_sam_generator") if isinstance(state_dict, dict) else None
        if gen_state is not None:
            try:
                torch.Generator().set_state(gen_state)
            except (TypeError, RuntimeError) as err:
                raise ValueError(
                    f"state_dict: 'delta_sam_generator' is not a generator state ({err})"
                ) from None
        if isinstance(state_dict, dict):
            state_dict = {k: v for k, v in state_dict.items() if k != "delta_sam_generator"}
        super().load_state_dict(state_dict)
        self._generator = None
        self._pending_generator_state = gen_state

    def _gen(self, device: torch.device) -> torch.Generator:
        if self._generator is None:
            self._generator = torch.Generator(device=device)
            self._generator.manual_seed(self.seed)
            if self._pending_generator_state is not None:
                self._generator.set_state(self._pending_generator_state)
                self._pending_generator_state = None
        return self._generator

    # -- the step: delta-SAM's hooks ------------------------------------------------

    def _save_extra(self) -> Any:
        gen = self._generator
        return None if gen is None else gen.get_state()

    def _restore_extra(self, saved: Any) -> None:
        if saved is not None and self._generator is not None:
            self._generator.set_state(saved)

    def _clean_gradient(self, oracle: Oracle | None) -> Any:
        r"""Leave :math:`g_\lambda` in ``.grad``; return the mean loss at ``w``."""
        assert oracle is not None and oracle.n is not None
        self.zero_grad(set_to_none=True)
        with torch.enable_grad():
            losses = self._clean_pass(
                oracle.loss_fn, oracle.batch, oracle.n, oracle.example_weights
            )
        self._require_grads("calling loss_fn at w")
        self.last_losses = losses
        return weighted_mean(losses, oracle.example_weights)

    # -- the clean pass: leave g_lam in .grad ------------------------------------------------

    def _per_example(self, loss_fn: Callable[..., Any], batch: Any, where: str) -> torch.Tensor:
        return check_loss(loss_fn(self.model, batch), "none", batch_size(batch), where)

    def _clean_pass(
        self, loss_fn: Callable[..., Any], batch: Any, n: int, ew: torch.Tensor | None
    ) -> torch.Tensor:
        if all(group["rho"] == 0.0 for group in self.param_groups):
            # e = 0 whatever the weights: a plain gradient, no statistics
            losses = self._per_example(loss_fn, batch, "at w")
            weighted_mean(losses, ew).backward()
            self.last_weights, self.last_stats = None, None
            return losses.detach()
        try:
            view = FunctionalView(self.model, self.param_groups)
        except NotVectorisable as err:
            raise ValueError(
                f"model: {err}; DeltaSAM evaluates the model functionally and needs every "
                "optimized parameter to be one of model's"
            ) from err
        if not view.trainable:
            raise RuntimeError("DeltaSAM: no parameter of the optimizer requires a gradient")
        if self.mode == "exact":
            losses, grads = self._exact(view.params, loss_fn, batch)
            stats = exact_statistics(losses, grads, ew)
            lam = normalised_weights(self.weighting, stats, n)
            self.last_weights, self.last_stats = lam, stats
            with torch.no_grad():
                for p, g in zip(view.params, grads):
                    p.grad = torch.tensordot(lam.to(g.dtype), g, dims=1)
            return losses
        low = sorted({str(p.dtype) for p in view.params if torch.finfo(p.dtype).bits < 32})
        if low:
            raise ValueError(
                f"mode: {self.mode!r} perturbs the weights by tiny finite-difference steps, "
                f"which vanish in {', '.join(low)}; use float32 or float64 trainable "
                "parameters, or mode='exact'"
            )
        rng = RandomState(view.params)  # what the clean forward draws its masks from
        gen = self._gen(view.params[0].device)
        if self.mode == "probe":
            losses = self._per_example(loss_fn, batch, "at w")
            weighted_mean(losses, ew).backward(retain_graph=True)
            grads = [p.grad for p in view.params]
            if any(g is None for g in grads):
                grads = [
                    torch.zeros_like(p) if g is None else g for p, g in zip(view.params, grads)
                ]
            stacked, s, t = probe_points(view.params, self.probes, self.probe_radius, gen, grads)
            L = self._evaluate(view.params, loss_fn, batch, stacked, rng)
            self.zero_grad(set_to_none=True)
        else:
            # the probes need nothing from the clean pass, so they run first, while no
            # autograd graph is held in memory
            stacked, s, t = probe_points(view.params, self.probes, self.probe_radius, gen, None)
            L = self._evaluate(view.params, loss_fn, batch, stacked, rng)
            losses = self._per_example(loss_fn, batch, "at w")
        stats = probe_statistics(
            L, losses.detach(), s, t, self.probes, self.probe_radius, self.mode, ew
        )
        lam = normalised_weights(self.weighting, stats, n)
        self.last_weights, self.last_stats = lam, stats
        losses.backward(lam.to(losses.dtype))
        return losses.detach()

    def _exact(
        self, params: list[torch.Tensor], loss_fn: Callable[..., Any], batch: Any
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Per-example losses and gradients (vmap; the Jacobian of the loss vector when
        BatchNorm couples the examples, or from the first step on where vmap cannot run
        the model: decided once, with one warning)."""
        coupled = pe.examples_coupled(self.model) or self.exact_fallback is not None
        if coupled:
            return pe.per_example_gradients(self.model, loss_fn, batch, params=params, coupled=True)
        try:
            return pe.per_example_gradients(
                self.model, loss_fn, batch, params=params, coupled=False
            )
        except (RuntimeError, NotImplementedError) as err:
            out = pe.per_example_gradients(self.model, loss_fn, batch, params=params, coupled=True)
            # the Jacobian path ran, so the failure was vmap's, not the model's
            self.exact_fallback = f"{type(err).__name__}: {_first_line(err)}"
            warnings.warn(
                "DeltaSAM(mode='exact'): torch.func.vmap cannot run this model over single "
                "examples, so per-example gradients come from the Jacobian of the loss "
                "vector (n vectorised backward passes of the whole batch) from now on. "
                f"Cause: {self.exact_fallback}. Remedy: make the forward free of "
                "value-dependent Python control flow (.item(), `if tensor`, in-place "
                "buffer updates), or use mode='probe' (no per-example gradients).",
                VectorisationFallbackWarning,
                stacklevel=7,
            )
            return out

    def _evaluate(
        self,
        params: list[torch.Tensor],
        loss_fn: Callable[..., Any],
        batch: Any,
        stacked: list[torch.Tensor],
        rng: RandomState,
    ) -> torch.Tensor:
        kw = {"params": params, "random_state": rng}
        if getattr(self, "_probe_fallback", None) is None:
            try:
                return pe.per_example_losses_at(self.model, loss_fn, batch, stacked, **kw)
            except (NotVectorisable, RuntimeError, NotImplementedError) as err:
                out = pe.per_example_losses_at(
                    self.model, loss_fn, batch, stacked, vectorise=False, **kw
                )
                self._probe_fallback = f"{type(err).__name__}: {_first_line(err)}"
                warnings.warn(
                    "DeltaSAM: torch.func.vmap cannot run the probe forwards as one batch; "
                    f"they run one by one from now on (the same numbers). Cause: "
                    f"{self._probe_fallback}. Remedy: make the forward free of value-dependent "
                    "Python control flow (.item(), `if tensor`, in-place buffer updates).",
                    VectorisationFallbackWarning,
                    stacklevel=7,
                )
                return out
        return pe.per_example_losses_at(self.model, loss_fn, batch, stacked, vectorise=False, **kw)


def _check_settings(mode: Any, probes: Any, probe_radius: Any) -> None:
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
    if isinstance(probes, bool) or not isinstance(probes, int):
        raise TypeError(f"probes: expected a positive integer, got {probes!r}")
    if probes < 1:
        raise ValueError(f"probes: must be >= 1, got {probes}")
    if check_nonneg_float("probe_radius", probe_radius) == 0.0:
        raise ValueError("probe_radius: must be > 0")


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
