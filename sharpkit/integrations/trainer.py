r"""SAM-family optimizers inside ``transformers.Trainer``.

``Trainer`` computes one gradient per step (``training_step``) and then calls
``optimizer.step()`` without a closure. SAM (Foret et al., 2021) needs two
gradients per update,

.. math::

    g = \nabla L_B(w), \qquad e = \rho\, \frac{T_w^2 g}{\|T_w g\|}, \qquad
    w \leftarrow \mathrm{base\_step}\big(w,\ \nabla L_B(w + e)\big),

so :class:`SAMTrainer` overrides ``training_step`` to run both passes on the same
batch: the usual forward/backward at ``w``, ``optimizer.first_step()`` (move to
``w + e``), a second forward/backward there. The ``optimizer.step()`` that
``Trainer`` calls next is then sharpkit's second step: it restores ``w`` exactly
and applies the base optimizer to the gradient from ``w + e``. Gradient
clipping (``max_grad_norm``) and the gradient norm ``Trainer`` logs therefore
act on that perturbed gradient, the one the update uses; the logged loss is the
loss at ``w``.

Which optimizers:

- :class:`~sharpkit.optim.SAM` and :class:`~sharpkit.optim.ASAM` (and any other
  closure-driven :class:`~sharpkit.optim._base.SAMBase`): the two passes above.
- :class:`~sharpkit.optim.BAR` and every single-pass optimizer: ``Trainer``'s own
  step, unchanged (BAR needs one gradient, like plain LoRA).
- ``MSAM`` and ``DeltaSAM`` need the whole batch inside ``step``; they are
  refused with a message.

SAM needs ``gradient_accumulation_steps=1``: with accumulation the perturbation
would have to come from the gradient of all micro-batches together, which
``training_step`` (one micro-batch at a time) never sees.

``loss_fn`` (optional) makes training use a sharpkit batch loss
``loss_fn(model, batch)`` such as :data:`sharpkit.hf.hf_loss` instead of the
model's own ``.loss`` (evaluation keeps the model's loss). Its value is taken as
a per-batch mean: with gradient accumulation ``Trainer`` averages the
micro-batches' means.

Example:
    >>> import tempfile, torch
    >>> from transformers import GPT2Config, GPT2LMHeadModel, PrinterCallback, TrainingArguments
    >>> from sharpkit.optim import SAM
    >>> cfg = GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32, n_positions=16,
    ...                  bos_token_id=0, eos_token_id=0)
    >>> model = GPT2LMHeadModel(cfg)
    >>> ids = torch.randint(0, 32, (4, 8), generator=torch.Generator().manual_seed(0))
    >>> data = [{"input_ids": x, "labels": x} for x in ids]
    >>> args = TrainingArguments(tempfile.mkdtemp(), max_steps=2, per_device_train_batch_size=4,
    ...                          report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True)
    >>> opt = SAM(model.parameters(), torch.optim.AdamW, rho=0.05, lr=1e-3)
    >>> trainer = SAMTrainer(model=model, args=args, train_dataset=data, optimizers=(opt, None))
    >>> trainer.remove_callback(PrinterCallback)  # quiet
    >>> trainer.train().global_step
    2

References:
    Foret, Kleiner, Mobahi, Neyshabur. Sharpness-Aware Minimization for
    Efficiently Improving Generalization. ICLR 2021. arXiv:2010.01412.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

try:
    from transformers import Trainer, TrainingArguments
except ImportError as err:  # pragma: no cover - exercised only without transformers
    raise ImportError(
        "sharpkit.integrations.trainer needs the transformers package "
        "(pip install 'sharpkit[hf]' or pip install transformers)"
    ) from err

from ..optim._base import BatchDrivenSAM, SAMBase

__all__ = ["SAMTrainer", "optimizer_cls_and_kwargs", "sharpkit_optimizer"]


def sharpkit_optimizer(optimizer: Any) -> Any:
    """The sharpkit optimizer inside ``optimizer`` (through accelerate's wrappers).

    Returns ``optimizer`` itself when no wrapper holds a sharpkit optimizer.
    """
    seen = optimizer
    while not isinstance(seen, SAMBase) and hasattr(seen, "optimizer"):
        seen = seen.optimizer
    return seen if isinstance(seen, SAMBase) else optimizer


class SAMTrainer(Trainer):
    """A ``transformers.Trainer`` that drives SAM's two passes per update.

    Pass the optimizer as ``optimizers=(SAM(...), None)`` or through
    ``optimizer_cls_and_kwargs`` (see :func:`optimizer_cls_and_kwargs`). With a
    single-pass optimizer (``BAR``, ``AdamW``, ...) it is ``Trainer`` itself.

    Args:
        *args: as for ``transformers.Trainer``.
        loss_fn: optional sharpkit batch loss ``loss_fn(model, batch)`` used for
            training instead of the model's ``.loss`` (see the module docstring).
        **kwargs: as for ``transformers.Trainer``.
    """

    def __init__(
        self, *args: Any, loss_fn: Callable[[Any, Any], torch.Tensor] | None = None, **kwargs: Any
    ) -> None:
        if loss_fn is not None and not callable(loss_fn):
            raise TypeError(
                f"loss_fn: expected a callable loss_fn(model, batch), got {type(loss_fn).__name__}"
            )
        super().__init__(*args, **kwargs)
        self.loss_fn = loss_fn
        if loss_fn is not None:
            self.loss_is_scaled_for_ga = False  # a per-batch mean: Trainer divides by GA
        opt = kwargs.get("optimizers", (None, None))[0]
        if opt is not None:
            self._check_optimizer(opt)

    def _check_optimizer(self, optimizer: Any) -> SAMBase | None:
        opt = sharpkit_optimizer(optimizer)
        if not isinstance(opt, SAMBase):
            return None
        if isinstance(opt, BatchDrivenSAM):
            raise TypeError(
                f"optimizers: {type(opt).__name__} needs the batch inside step(loss_fn, batch), "
                "which transformers.Trainer does not give it; use SAM, ASAM or BAR with "
                "SAMTrainer, or drive it in your own loop"
            )
        if self.args.gradient_accumulation_steps != 1:
            raise ValueError(
                f"args.gradient_accumulation_steps: {type(opt).__name__} in SAMTrainer needs 1 "
                f"(got {self.args.gradient_accumulation_steps}): its perturbation is built from "
                "the gradient of the whole batch; use a larger per_device_train_batch_size"
            )
        return opt

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> Any:
        if self.loss_fn is None or return_outputs:
            return super().compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )
        return self.loss_fn(model, inputs)

    def training_step(
        self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None
    ) -> torch.Tensor:
        opt = self._check_optimizer(self.optimizer)
        if opt is None:
            return super().training_step(model, inputs, num_items_in_batch)
        if opt.perturbed:
            raise RuntimeError(
                "SAMTrainer: the weights are still perturbed from the last training_step; "
                "optimizer.step() must follow every training_step"
            )
        loss = super().training_step(model, inputs, num_items_in_batch)  # g(w) in .grad
        opt.first_step(zero_grad=True)  # w -> w + e
        try:
            super().training_step(model, inputs, num_items_in_batch)  # g(w + e) in .grad
        except BaseException:
            opt._restore()  # back to w before the error propagates
            raise
        return loss  # Trainer's optimizer.step() now restores w and takes the base step


def optimizer_cls_and_kwargs(
    args: TrainingArguments,
    optimizer: type,
    base_optimizer: type = torch.optim.AdamW,
    **kwargs: Any,
) -> tuple[type, dict[str, Any]]:
    """``(cls, kwargs)`` for ``Trainer(optimizer_cls_and_kwargs=...)``.

    The base optimizer gets the learning rate (and for ``AdamW`` the betas and
    epsilon) of ``args``, as ``Trainer`` would build its default ``AdamW``;
    weight decay comes per parameter group from ``Trainer`` (``args.weight_decay``
    on weights, none on biases and norms). ``kwargs`` go to the sharpkit
    optimizer (``rho=...``; for BAR ``mu0=...``, ``model=...``) and override
    those defaults.

    Args:
        args: the ``TrainingArguments``.
        optimizer: a sharpkit optimizer class (``SAM``, ``ASAM``, ``BAR``).
        base_optimizer: the base optimizer class.
        **kwargs: further arguments of ``optimizer`` and of the base optimizer.

    Example:
        >>> import tempfile
        >>> from sharpkit.optim import SAM
        >>> args = TrainingArguments(tempfile.mkdtemp(), learning_rate=1e-3, report_to=[])
        >>> cls, kw = optimizer_cls_and_kwargs(args, SAM, rho=0.1)
        >>> cls.__name__, kw["rho"], kw["lr"], kw["base_optimizer"].__name__
        ('SAM', 0.1, 0.001, 'AdamW')
    """
    if not isinstance(args, TrainingArguments):
        raise TypeError(f"args: expected TrainingArguments, got {type(args).__name__}")
    if not isinstance(optimizer, type):
        raise TypeError(f"optimizer: expected an optimizer class, got {type(optimizer).__name__}")
    out: dict[str, Any] = {"base_optimizer": base_optimizer, "lr": args.learning_rate}
    if base_optimizer in (torch.optim.AdamW, torch.optim.Adam):
        out["betas"] = (args.adam_beta1, args.adam_beta2)
        out["eps"] = args.adam_epsilon
    out.update(kwargs)
    return optimizer, out
