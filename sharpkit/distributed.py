"""sharpkit over several processes: ``torch.distributed`` for curvature over sharded data.

sharpkit uses the engine PyTorch users already run (process groups, ``torchrun``,
NCCL on GPUs, gloo on CPUs); it starts no processes of its own. Every function
here also works without an initialised process group, as the one-process case
(rank 0 of a world of size 1), so library code calls them unconditionally.

**The sharded Hessian.** Rank ``r`` holds ``n_r`` of the ``N = sum_r n_r``
examples (a ``DistributedSampler`` shard, say) and builds the operator ``H_r`` of
its mean loss. The Hessian of the data set's mean loss is the example-weighted
average

    H v = sum_r (n_r / N) H_r v,

one ``all_reduce`` (sum) of a ``dim``-vector per product. :class:`ShardedOperator`
wraps any local operator (a :class:`~sharpkit.curvature.HessianOperator`, a dense
matrix) that way, so Lanczos, Hutchinson, Hutch++ and stochastic Lanczos
quadrature run unchanged: given the same seed on every rank they draw the same
random vectors, every rank receives the same product, and every rank computes
the same estimate as one process over the whole data set would. Each product
also checks (with a two-number ``all_reduce``) that every rank multiplied the
same vector, so a run whose ranks drew different random vectors (no seed given)
fails with a clear error instead of returning a mixture.

**The sharpness metrics** take the same sharding through their
``process_group`` argument (:func:`sharpkit.sharpness.measure_sharpness`): each
rank passes its batches and every rank returns the single-process report.

**Replicas.** :func:`broadcast_from_first` copies rank 0's tensors into every
rank's (the data-parallel optimizers' BatchNorm buffers, the weights
``sharpkit measure`` measures under ``torchrun``).

**Writing results.** :func:`is_main_process` is true on rank 0 only (and
without a process group): write reports and figures there, atomically.

References:
    Li et al. PyTorch Distributed: Experiences on Accelerating Data Parallel
    Training. VLDB 2020 (DistributedDataParallel's gradient all-reduce, which SAM's
    two passes inherit under DDP).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.distributed as dist

from sharpkit.protocol import MeasurementProtocol

__all__ = [
    "ShardedOperator",
    "all_reduce_sum",
    "barrier",
    "broadcast_from_first",
    "init_from_environment",
    "is_main_process",
    "require_process_group",
    "shared_seed",
    "world",
]


def _initialised() -> bool:
    return dist.is_available() and dist.is_initialized()


def world(group: Any = None) -> tuple[int, int]:
    """``(rank, world_size)`` in ``group`` (the default group if ``None``); ``(0, 1)``
    when no process group is initialised.

    Example:
        >>> world()  # no process group in a plain Python session
        (0, 1)
    """
    if not _initialised():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def is_main_process(group: Any = None) -> bool:
    """Whether this process writes results: rank 0, or the only process.

    Example:
        >>> is_main_process()
        True
    """
    return world(group)[0] == 0


def barrier(group: Any = None) -> None:
    """Wait for every rank of ``group`` (no-op without a process group)."""
    if _initialised():
        dist.barrier(group)


def _collective_device(group: Any, fallback: torch.device) -> torch.device:
    """The device a collective on ``group`` needs: CUDA for NCCL, else ``fallback``'s CPU."""
    backend = dist.get_backend(group)
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu") if fallback.type == "cuda" else fallback


def require_process_group(name: str = "process_group") -> None:
    """Raise ``ValueError`` (naming ``name``) unless a process group is initialised."""
    if not _initialised():
        raise ValueError(
            f"{name}: data-parallel use needs torch.distributed.init_process_group() first "
            "(torchrun sets up the environment for it)"
        )


def all_reduce_sum(t: torch.Tensor, group: Any = None) -> torch.Tensor:
    """The sum of ``t`` over the ranks of ``group`` (a new tensor on ``t``'s device);
    ``t`` itself without a process group.

    Moves the tensor to the device the backend needs (CUDA for NCCL, the CPU for
    gloo) and back.

    Example:
        >>> all_reduce_sum(torch.tensor([1.0, 2.0])).tolist()
        [1.0, 2.0]
    """
    if not _initialised():
        return t
    comm = _collective_device(group, t.device)
    buf = t.detach().to(comm, copy=True)
    dist.all_reduce(buf, group=group)
    return buf.to(t.device)


def broadcast_from_first(tensors: list[torch.Tensor], group: Any = None) -> None:
    """Copy rank 0's ``tensors`` (of ``group``) into every rank's, in place; nothing
    without a process group.

    One broadcast per dtype and device (the tensors flattened together), moved to
    the device the backend needs. The ranks must pass tensors of the same shapes in
    the same order (their models' buffers, say).

    Example:
        >>> t = torch.ones(2)
        >>> broadcast_from_first([t]); t.tolist()
        [1.0, 1.0]
    """
    if not _initialised() or not tensors:
        return
    src = dist.get_global_rank(group, 0) if group is not None else 0
    by_kind: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
    for t in tensors:
        by_kind.setdefault((t.dtype, t.device), []).append(t)
    for (_, device), ts in by_kind.items():
        comm = _collective_device(group, device)
        flat = torch.cat([t.detach().reshape(-1) for t in ts]).to(comm)
        dist.broadcast(flat, src=src, group=group)
        with torch.no_grad():
            for t, chunk in zip(ts, torch.split(flat, [t.numel() for t in ts])):
                t.copy_(chunk.view_as(t))


def init_from_environment(device: torch.device, timeout: float = 600.0) -> tuple[Any, torch.device]:
    """The process group that ``torchrun``'s environment describes, and this rank's device.

    With ``WORLD_SIZE`` unset or 1 (one process) it returns ``(None, device)`` and
    starts nothing. Otherwise it checks ``RANK``, ``MASTER_ADDR`` and
    ``MASTER_PORT``, joins the default group (NCCL for a CUDA ``device``, which then
    becomes this rank's ``LOCAL_RANK`` device and the current one; gloo otherwise)
    with collectives bounded by ``timeout`` seconds, and returns ``(group.WORLD,
    device)``. Every command that runs under ``torchrun`` starts here.

    Raises:
        ValueError: a malformed environment, a ``cuda:N`` device (each rank takes
            its own), a ``LOCAL_RANK`` with no device, or a non-positive timeout.

    Example:
        >>> init_from_environment(torch.device("cpu"))  # one process: nothing to join
        (None, device(type='cpu'))
    """
    import datetime
    import os

    try:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError:
        raise ValueError("WORLD_SIZE / LOCAL_RANK: not integers (start with torchrun)") from None
    if world_size <= 1:
        return None, device
    if not timeout > 0:
        raise ValueError(f"--dist-timeout: expected a positive number, got {timeout}")
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise ValueError(
            f"WORLD_SIZE={world_size} but {', '.join(missing)} unset; start with torchrun"
        )
    backend = "gloo"
    if device.type == "cuda":
        if device.index is not None:
            raise ValueError(
                f"--device: under torchrun give 'cuda' (each rank takes its LOCAL_RANK "
                f"device), not {str(device)!r}"
            )
        if local_rank >= torch.cuda.device_count():
            raise ValueError(
                f"--device: LOCAL_RANK {local_rank} but {torch.cuda.device_count()} CUDA "
                "device(s) here"
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout))
    return dist.group.WORLD, device


def shared_seed(seed: int | None = None, group: Any = None) -> int:
    """One integer seed for every rank: ``seed`` if given (checked equal on all ranks),
    else rank 0's fresh draw broadcast to the others.

    Pass it to the estimators (``eigenvalues(..., seed=shared_seed())``) so that every
    rank draws the same random vectors.

    Raises:
        ValueError: ``seed`` given but not the same on every rank.

    Example:
        >>> shared_seed(7)
        7
    """
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise TypeError(f"seed: expected an int or None, got {type(seed).__name__}")
    if not _initialised():
        return int(torch.randint(0, 2**31 - 1, (1,)).item()) if seed is None else seed
    device = _collective_device(group, torch.device("cpu"))
    if seed is None:
        t = torch.randint(0, 2**31 - 1, (1,), dtype=torch.int64).to(device)
        src = dist.get_global_rank(group, 0) if group is not None else 0
        dist.broadcast(t, src=src, group=group)
        return int(t.item())
    t = torch.tensor([seed, -seed], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    if int(t[0]) != seed or int(t[1]) != -seed:
        raise ValueError(
            f"seed: the ranks were given different seeds (this rank {seed}); pass the same one"
        )
    return seed


@dataclasses.dataclass
class _Shard:
    examples: int
    total: int
    weight: float  # this shard's weight in the mean (examples, or target tokens)
    total_weight: float
    rank: int
    world_size: int


class ShardedOperator:
    """The example-weighted average of the ranks' local operators, ``v -> sum_r (n_r/N) H_r v``.

    Args:
        local: this rank's operator over its shard of the data (anything with
            ``matvec``, ``dim``, ``dtype``, ``device``; a
            :class:`~sharpkit.curvature.HessianOperator` or a dense symmetric tensor).
        examples: ``n_r``, the examples of this rank's shard; ``None`` reads
            ``local.num_examples`` (a HessianOperator has it). Ranks with uneven
            shards are weighted correctly. Without ``examples``, a local operator
            with a ``total_weight`` (a HessianOperator's weight in its loss's own
            normalisation: target tokens for a token-mean loss) is weighted by it,
            so the product is that of the loss of all the data.
        group: the process group (``None``: the default group).
        check_inputs: verify on every product, with an all-reduce of two numbers,
            that all ranks multiply the same vector.

    Attributes:
        dim, dtype, device: those of the local operator (the same on every rank;
            checked at construction).
        num_examples: ``N``, the examples over all ranks.
        num_matvecs: products so far (one per collective product).

    Raises:
        ValueError: the ranks' operators differ in dimension, a shard is empty or
            negative, or (at product time) the ranks multiplied different vectors.

    Without a process group it is the local operator itself (a world of size 1).

    Example:
        >>> A = torch.diag(torch.tensor([3.0, 1.0], dtype=torch.float64))
        >>> op = ShardedOperator(A, examples=10)   # one process: the local matrix
        >>> op.matvec(torch.ones(2, dtype=torch.float64)).tolist(), op.num_examples
        ([3.0, 1.0], 10)
    """

    def __init__(
        self,
        local: Any,
        *,
        examples: int | None = None,
        group: Any = None,
        check_inputs: bool = True,
    ) -> None:
        from sharpkit.curvature._linop import as_operator

        self.local = as_operator(local)
        # the shard's weight in the mean: the examples given, else the operator's own
        # weight (tokens for a token-mean loss), else its examples
        weight = examples if examples is not None else getattr(self.local, "total_weight", None)
        if examples is None:
            examples = getattr(self.local, "num_examples", None)
            if examples is None:
                raise ValueError(
                    "examples: the local operator has no num_examples; pass examples= "
                    "(the number of examples in this rank's shard)"
                )
        if not isinstance(examples, int) or isinstance(examples, bool) or examples < 0:
            raise ValueError(f"examples: expected an int >= 0, got {examples!r}")
        self.group = group
        self.check_inputs = bool(check_inputs)
        self.dim = int(self.local.dim)
        self.shape = (self.dim, self.dim)
        self.dtype = self.local.dtype
        self.device = self.local.device
        self.num_matvecs = 0
        weight = float(examples if weight is None else weight)
        rank, size = world(group)
        total, total_weight = examples, weight
        if size > 1:
            dev = self._comm_device()
            counts = torch.tensor([float(examples), weight], dtype=torch.float64, device=dev)
            dist.all_reduce(counts, group=group)
            total, total_weight = int(counts[0].item()), float(counts[1].item())
            dims = torch.tensor([self.dim, -self.dim], dtype=torch.int64, device=dev)
            dist.all_reduce(dims, op=dist.ReduceOp.MAX, group=group)
            if int(dims[0]) != self.dim or int(dims[1]) != -self.dim:
                raise ValueError(
                    f"local: the ranks' operators differ in dimension (this rank {self.dim}, "
                    f"largest {int(dims[0])}); every rank must select the same parameters"
                )
        if total <= 0 or not total_weight > 0:
            raise ValueError("examples: the shards hold no examples (or no weight) in all")
        self._shard = _Shard(
            examples=examples,
            total=total,
            weight=weight,
            total_weight=total_weight,
            rank=rank,
            world_size=size,
        )
        self.num_examples = total

    def _comm_device(self) -> torch.device:
        return _collective_device(self.group, self.device)

    @property
    def rank(self) -> int:
        """This process's rank in the group."""
        return self._shard.rank

    @property
    def world_size(self) -> int:
        """The number of ranks the data is sharded over."""
        return self._shard.world_size

    def _check_same_vector(self, v: torch.Tensor) -> None:
        # two numbers that differ between ranks whenever their vectors differ (up to a
        # measure-zero coincidence): a weighted sum and the first entry
        w = torch.arange(1, self.dim + 1, dtype=torch.float64, device=v.device).reciprocal_()
        s = torch.stack([(v.double() * w).sum(), v[0].double()]).to(self._comm_device())
        both = torch.cat([s, -s])
        dist.all_reduce(both, op=dist.ReduceOp.MAX, group=self.group)
        spread = (both[:2] + both[2:]).abs()  # max - min of each number over the ranks
        scale = s.abs().clamp_min(1.0)
        if bool((spread > 1e-12 * scale).any()):
            raise ValueError(
                "matvec: the ranks multiplied different vectors (did every rank draw its own "
                "random vectors? pass the same seed to the estimator on every rank, e.g. "
                "seed=sharpkit.distributed.shared_seed())"
            )

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """``sum_r (n_r / N) H_r v``: the local product, weighted, all-reduced (``n_r``
        the shard's weight: examples, or target tokens for a token-mean loss)."""
        if self.world_size == 1:
            out = self.local.matvec(v)
            self.num_matvecs += 1
            return out
        if self.check_inputs:
            self._check_same_vector(v)
        if self._shard.weight > 0:
            h = self.local.matvec(v)
            h = h * (self._shard.weight / self._shard.total_weight)
        else:  # an empty shard contributes nothing (but joins the collective)
            h = torch.zeros(self.dim, dtype=self.dtype, device=self.device)
        comm = self._comm_device()
        buf = h.to(comm)
        dist.all_reduce(buf, group=self.group)
        self.num_matvecs += 1
        return buf.to(self.device)

    def __matmul__(self, v: torch.Tensor) -> torch.Tensor:
        return self.matvec(v)

    def protocol(self) -> MeasurementProtocol:
        """The local operator's protocol with the global example count and the world size."""
        base = self.local.protocol() if hasattr(self.local, "protocol") else None
        extra = dict(base.extra) if base is not None and base.extra else {}
        extra.update(
            {
                "world_size": self.world_size,
                "shard_examples": self._shard.examples,
                **({"tokens": self._shard.total_weight} if "tokens" in extra else {}),
                "backend": dist.get_backend(self.group) if _initialised() else None,
            }
        )
        if base is None:
            return MeasurementProtocol(
                estimator="sharded",
                examples=self.num_examples,
                dtype=str(self.dtype),
                device=str(self.device),
                matvecs=self.num_matvecs,
                extra=extra,
            )
        return dataclasses.replace(
            base, examples=self.num_examples, matvecs=self.num_matvecs, extra=extra
        )

    def __repr__(self) -> str:
        return (
            f"ShardedOperator(dim={self.dim}, examples={self.num_examples}, "
            f"world_size={self.world_size}, rank={self.rank})"
        )
