r"""Losses and accuracies for Hugging Face models on dict batches.

A Hugging Face model takes a dict batch (``input_ids``, ``attention_mask``,
``labels``, ...) and returns a ``ModelOutput`` with ``logits``. This module
turns that into sharpkit's batch-loss convention (``loss_fn(model, batch)``, see
:mod:`sharpkit._batch`), so every optimizer and metric runs on such models with
no glue:

- :data:`hf_loss` (registry name ``"hf"``): the mean loss of a batch, the same
  number as the model's own ``.loss``; :data:`hf_per_example_loss` one loss per
  example (``reduction='none'``, for delta-SAM and Fisher-Rao);
  :data:`hf_accuracy` the matching arg-max accuracy.
- :func:`loss_for` picks the task from the model class (what ``--loss hf``
  should do when the model is known).
- Every loss says how it is normalised (:attr:`HFLoss.normalisation`,
  ``"tokens"`` or ``"examples"``) and gives the matching weights
  (:meth:`HFLoss.example_weights`, :meth:`HFLoss.batch_weight`), so that a mean
  over batches of mean losses is the data set's token mean, not a mean of
  per-batch means: :func:`batch_weight` (:func:`sharpkit._batch.batch_weight`,
  which every mean over batches in sharpkit uses) works for any loss.

The tasks (``labels`` of shape ``(n,)`` or ``(n, T)``, ``-100`` ignored):

- ``"causal_lm"``: token ``t`` predicts label ``t + 1`` (labels are shifted as
  Hugging Face's causal LM loss shifts them). With :math:`m_{it}` = 1 where
  ``labels[i, t+1] != -100``,

  .. math::

      \ell_i = \frac{\sum_t m_{it}\, \mathrm{CE}(z_{it}, y_{i,t+1})}{\sum_t m_{it}},
      \qquad
      L = \frac{\sum_i \sum_t m_{it}\, \mathrm{CE}(z_{it}, y_{i,t+1})}{\sum_{i,t} m_{it}}
        = \frac{\sum_i w_i \ell_i}{\sum_i w_i},\quad w_i = \sum_t m_{it}.

  ``L`` is a token mean; the weight of a sequence is its number of target
  tokens, that of a batch the sum (a sequence with no target token has weight 0
  and per-example loss 0; so has a batch, or an mSAM micro-batch, with none,
  where Hugging Face's own loss would be 0/0).
- ``"token"``: the same without the shift (masked LM, token classification,
  encoder-decoder decoders' labels).
- ``"sequence"``: one label per example: cross-entropy for integer labels,
  squared error for one regression output, binary cross-entropy (mean over
  labels) for float multi-label targets; every example has weight 1.
- ``"auto"`` (the default): integer labels with two or more dimensions mean
  ``"causal_lm"``, anything else ``"sequence"``. Use :func:`loss_for` or an
  explicit task for masked LM and token classification.

The loss is computed from ``logits`` in their own precision (at least float32):
Hugging Face's causal LM loss casts logits to float32, which would cap a float64
Hessian oracle at float32 accuracy. The numbers agree with the model's own
``.loss`` up to that cast.

Example:
    >>> import torch
    >>> from transformers import GPT2Config, GPT2LMHeadModel
    >>> cfg = GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32, n_positions=16,
    ...                  bos_token_id=0, eos_token_id=0)
    >>> model = GPT2LMHeadModel(cfg).eval()
    >>> ids = torch.randint(0, 32, (3, 8), generator=torch.Generator().manual_seed(0))
    >>> labels = ids.clone()
    >>> labels[0, 5:] = -100  # padding
    >>> batch = {"input_ids": ids, "labels": labels}
    >>> bool(torch.allclose(hf_loss(model, batch), model(**batch).loss))
    True
    >>> hf_loss.normalisation_of(batch), hf_loss.batch_weight(batch)  # 4 + 7 + 7 target tokens
    ('tokens', 18.0)

References:
    Wolf et al. Transformers: State-of-the-Art Natural Language Processing.
    EMNLP 2020 (system demonstrations). arXiv:1910.03771.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch.nn import functional as F

from ._batch import batch_weight

__all__ = [
    "BUILTIN_LOSSES",
    "TASKS",
    "HFAccuracy",
    "HFLoss",
    "batch_weight",
    "hf_accuracy",
    "hf_loss",
    "hf_per_example_loss",
    "loss_for",
    "task_of",
]

#: The tasks :class:`HFLoss` knows.
TASKS = ("auto", "causal_lm", "token", "sequence")
_REDUCTIONS = ("mean", "none")
IGNORE_INDEX = -100


def _check_task(task: Any) -> str:
    if not isinstance(task, str) or task not in TASKS:
        raise ValueError(f"task: expected one of {TASKS}, got {task!r}")
    return task


def _labels(batch: Any, who: str) -> torch.Tensor:
    if not isinstance(batch, Mapping):
        raise ValueError(
            f"batch: {who} expects a dict batch with a 'labels' entry (as Hugging Face "
            f"models take it), got {type(batch).__name__}"
        )
    labels = batch.get("labels")
    if not isinstance(labels, torch.Tensor):
        raise ValueError(
            f"batch: {who} needs a 'labels' tensor in the batch; it has keys {sorted(batch)}"
        )
    if labels.dim() == 0:
        raise ValueError("batch: 'labels' has no example dimension (a 0-d tensor)")
    return labels


def _resolve(task: str, labels: torch.Tensor) -> str:
    if task != "auto":
        return task
    if labels.dim() >= 2 and not labels.is_floating_point():
        return "causal_lm"
    return "sequence"


def _targets(task: str, labels: torch.Tensor) -> torch.Tensor:
    """The labels each logit position predicts (shifted for causal LM)."""
    if task == "causal_lm":
        if labels.dim() < 2:
            raise ValueError(
                f"batch: a causal LM loss needs labels of shape (n, T), got {tuple(labels.shape)}"
            )
        return labels[:, 1:]
    return labels


def _token_mask(task: str, labels: torch.Tensor) -> torch.Tensor:
    """``(n, T')`` mask of the target tokens (flattened over extra dimensions)."""
    targets = _targets(task, labels)
    return (targets != IGNORE_INDEX).reshape(targets.shape[0], -1)


def _logits(model: Callable[..., Any], batch: Mapping[str, Any]) -> torch.Tensor:
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    out = model(**inputs)
    logits = out.logits if hasattr(out, "logits") else out
    if not isinstance(logits, torch.Tensor):
        raise TypeError(
            f"model: expected an output with .logits (a ModelOutput) or a tensor, "
            f"got {type(out).__name__}"
        )
    wide = torch.promote_types(logits.dtype, torch.float32)
    return logits.to(wide)


def _token_losses(task: str, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``(n, T')`` cross-entropies, 0 where the target is ignored."""
    if labels.dim() < 2:
        raise ValueError(
            f"batch: a token loss needs labels of shape (n, T), got {tuple(labels.shape)}"
        )
    if task == "causal_lm":
        logits = logits[:, :-1]
    targets = _targets(task, labels)
    if logits.shape[:-1] != targets.shape:
        raise ValueError(
            f"batch: logits of shape {tuple(logits.shape)} do not match labels of shape "
            f"{tuple(labels.shape)} (task {task!r})"
        )
    n = targets.shape[0]
    ce = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]),
        targets.reshape(-1).to(logits.device),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    )
    return ce.reshape(n, -1)


def _sequence_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """One loss per example, as Hugging Face's sequence-classification heads pick it."""
    labels = labels.to(logits.device)
    if logits.dim() == 2 and logits.shape[-1] == 1:  # regression (num_labels = 1)
        return (logits.squeeze(-1) - labels.reshape(-1).to(logits.dtype)) ** 2
    if labels.is_floating_point():  # multi-label: mean BCE over the labels
        if labels.shape != logits.shape:
            raise ValueError(
                f"batch: float (multi-label) labels of shape {tuple(labels.shape)} do not "
                f"match logits of shape {tuple(logits.shape)}"
            )
        bce = F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype), reduction="none")
        return bce.reshape(bce.shape[0], -1).mean(dim=1)
    if labels.dim() != 1 or logits.dim() != 2:
        raise ValueError(
            f"batch: a sequence loss needs labels of shape (n,) and logits (n, classes); got "
            f"labels {tuple(labels.shape)}, logits {tuple(logits.shape)}"
        )
    return F.cross_entropy(logits, labels, reduction="none")


class _Weighted:
    """What :class:`HFLoss` and :class:`HFAccuracy` share: the task and the weights."""

    def __init__(self, task: str = "auto") -> None:
        self.task = _check_task(task)

    def normalisation_of(self, batch: Any) -> str:
        """``"tokens"`` or ``"examples"``: what this loss averages over in ``batch``."""
        task = _resolve(self.task, _labels(batch, type(self).__name__))
        return "examples" if task == "sequence" else "tokens"

    @property
    def normalisation(self) -> str:
        """``"tokens"``, ``"examples"``, or ``"auto"`` (decided per batch by the labels)."""
        if self.task == "auto":
            return "auto"
        return "examples" if self.task == "sequence" else "tokens"

    def example_weights(self, batch: Any) -> torch.Tensor:
        """Weight of each example (``(n,)``, float64): its number of target tokens, or 1.

        The mean loss of a batch is ``sum_i w_i l_i / sum_i w_i`` with ``l_i`` the
        per-example losses.
        """
        labels = _labels(batch, type(self).__name__)
        task = _resolve(self.task, labels)
        if task == "sequence":
            return torch.ones(labels.shape[0], dtype=torch.float64)
        return _token_mask(task, labels).sum(dim=1).to(torch.float64).cpu()

    def batch_weight(self, batch: Any) -> float:
        """Weight of the whole batch in a mean over batches: ``sum_i w_i``."""
        return float(self.example_weights(batch).sum())


class HFLoss(_Weighted):
    """A batch loss for Hugging Face models on dict batches with ``labels``.

    See the module docstring for the formulas of each task. An instance is a
    ``loss_fn(model, batch)``; ``model`` is called as ``model(**inputs)`` with
    every batch entry except ``labels``.

    Args:
        task: ``"auto"``, ``"causal_lm"``, ``"token"`` or ``"sequence"``.
        reduction: ``"mean"`` (the batch's mean loss, a scalar: a token mean for
            token tasks) or ``"none"`` (one loss per example, shape ``(n,)``: a
            token mean per sequence).

    Attributes:
        name: ``"hf"``, the registry name of the built-in loss.
        reduction: as given (sharpkit's mean-loss and per-example APIs read it).

    Example:
        >>> import torch
        >>> logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
        >>> model = lambda **kw: logits  # anything returning logits (or a ModelOutput)
        >>> batch = {"x": torch.zeros(2), "labels": torch.tensor([0, 0])}
        >>> HFLoss("sequence", reduction="none")(model, batch)
        tensor([0.1269, 1.3133])
    """

    name = "hf"

    def __init__(self, task: str = "auto", reduction: str = "mean") -> None:
        super().__init__(task)
        if not isinstance(reduction, str) or reduction not in _REDUCTIONS:
            raise ValueError(f"reduction: expected one of {_REDUCTIONS}, got {reduction!r}")
        self.reduction = reduction

    @property
    def per_example(self) -> HFLoss:
        """The same loss with ``reduction='none'``."""
        return HFLoss(self.task, "none")

    @property
    def mean(self) -> HFLoss:
        """The same loss with ``reduction='mean'``."""
        return HFLoss(self.task, "mean")

    def __call__(self, model: Callable[..., Any], batch: Any) -> torch.Tensor:
        labels = _labels(batch, "HFLoss")
        task = _resolve(self.task, labels)
        logits = _logits(model, batch)
        if task == "sequence":
            losses = _sequence_losses(logits, labels)
            return losses.mean() if self.reduction == "mean" else losses
        token = _token_losses(task, logits, labels)
        mask = _token_mask(task, labels).to(token.device)
        if self.reduction == "mean":  # no target token: 0 (and weight 0), not 0/0
            return token.sum() / mask.sum().clamp(min=1).to(token.dtype)
        count = mask.sum(dim=1)
        return token.sum(dim=1) / count.clamp(min=1).to(token.dtype)

    def __repr__(self) -> str:
        return f"HFLoss(task={self.task!r}, reduction={self.reduction!r})"


class HFAccuracy(_Weighted):
    """Arg-max accuracy matching :class:`HFLoss`: token-level for token tasks.

    For token tasks it is the fraction of target tokens (labels shifted for
    ``"causal_lm"``, ``-100`` ignored) whose arg-max logit is the label; for
    ``"sequence"`` the fraction of examples. It returns a 0-d tensor, so it
    works as sharpkit's ``accuracy_fn(model, batch)``; its
    :meth:`~HFLoss.batch_weight` counts what it averages over.

    Args:
        task: as for :class:`HFLoss`.

    Example:
        >>> import torch
        >>> logits = torch.tensor([[[0.0, 1.0], [1.0, 0.0], [0.0, 1.0]]])  # (1, 3, 2)
        >>> model = lambda **kw: logits
        >>> batch = {"input_ids": torch.zeros(1, 3), "labels": torch.tensor([[0, 0, 1]])}
        >>> hf_accuracy(model, batch)  # predicts 0 then 1 for labels 0 then 1
        tensor(1.)
    """

    def __call__(self, model: Callable[..., Any], batch: Any) -> torch.Tensor:
        labels = _labels(batch, "HFAccuracy")
        task = _resolve(self.task, labels)
        logits = _logits(model, batch)
        if task == "sequence":
            if labels.is_floating_point() or labels.dim() != 1:
                raise ValueError(
                    "batch: accuracy needs integer class labels of shape (n,), got "
                    f"{labels.dtype} labels of shape {tuple(labels.shape)}"
                )
            return (logits.argmax(dim=-1) == labels.to(logits.device)).to(logits.dtype).mean()
        if task == "causal_lm":
            logits = logits[:, :-1]
        targets = _targets(task, labels).to(logits.device)
        mask = targets != IGNORE_INDEX
        hits = (logits.argmax(dim=-1) == targets) & mask
        return hits.sum().to(logits.dtype) / mask.sum().clamp(min=1)  # none: 0, weight 0

    def __repr__(self) -> str:
        return f"HFAccuracy(task={self.task!r})"


#: The built-in loss ``"hf"``: the mean loss of a batch, task from the labels.
hf_loss = HFLoss()
#: One loss per example (``reduction='none'``), task from the labels.
hf_per_example_loss = HFLoss(reduction="none")
#: The accuracy matching :data:`hf_loss`.
hf_accuracy = HFAccuracy()


def _base_model(model: Any) -> Any:
    get = getattr(model, "get_base_model", None)  # PEFT wrappers
    return get() if callable(get) else model


def task_of(model: Any) -> str:
    """The :class:`HFLoss` task of a Hugging Face model, from its class name.

    ``*ForCausalLM`` / ``*LMHeadModel`` mean ``"causal_lm"``;
    ``*ForMaskedLM``, ``*ForTokenClassification`` and
    ``*ForConditionalGeneration`` (decoder labels, not shifted by the loss)
    mean ``"token"``; ``*ForSequenceClassification`` means ``"sequence"``;
    anything else ``"auto"``. PEFT models are looked through; a class name (a
    ``config.json``'s ``architectures`` entry) works too.

    Example:
        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> task_of(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=16)))
        'causal_lm'
        >>> task_of("BertForSequenceClassification")
        'sequence'
    """
    name = model if isinstance(model, str) else type(_base_model(model)).__name__
    if name.endswith(("ForCausalLM", "LMHeadModel")):
        return "causal_lm"
    if name.endswith(("ForMaskedLM", "ForTokenClassification", "ForConditionalGeneration")):
        return "token"
    if name.endswith("ForSequenceClassification"):
        return "sequence"
    return "auto"


def loss_for(model: Any, reduction: str = "mean") -> HFLoss:
    """The built-in ``"hf"`` loss for ``model``, its task read from the model class.

    This is what ``--loss hf`` resolves to once the model is built (see
    :data:`BUILTIN_LOSSES`).

    Args:
        model: a Hugging Face (or PEFT) model.
        reduction: ``"mean"`` or ``"none"``.

    Example:
        >>> from transformers import BertConfig, BertForMaskedLM
        >>> cfg = BertConfig(num_hidden_layers=1, hidden_size=8, num_attention_heads=2,
        ...                  intermediate_size=16, vocab_size=16)
        >>> loss_for(BertForMaskedLM(cfg))
        HFLoss(task='token', reduction='mean')
    """
    return HFLoss(task_of(model), reduction)


#: Built-in losses by name: each maps a model to its ``loss_fn(model, batch)``.
BUILTIN_LOSSES: dict[str, Callable[..., HFLoss]] = {"hf": loss_for}
