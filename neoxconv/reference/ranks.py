"""Tensor-parallel rank groups: one model code path, two backends.

The reference forward (``neox_forward``) is written the way every NeoX TP rank runs it: a loop
over ``group.local_ranks`` in which rank ``r`` only touches its own stored tensors, joined by
three Megatron collectives (NeoX ``megatron/mpu/mappings.py``):

=====================  ===========================  ===========================
collective             forward                      backward
=====================  ===========================  ===========================
``copy_to_ranks``      identity                     all-reduce (sum) of grads
``all_reduce_sum``     all-reduce (sum)             identity
``all_gather_cat``     all-gather + concat on dim   keep this rank's slice
=====================  ===========================  ===========================

Activations outside the TP regions (the residual stream) are *replicated*: the model keeps one
replica per local rank, as a list aligned with ``local_ranks``. That is what makes gradients
come out exactly as in Megatron/NeoX (a replicated norm receives the summed gradient of all
ranks' column-parallel branches through ``copy_to_ranks``; the residual stream is not counted
``p`` times), so a training step built on this code sees the same gradients in both backends.

Backends:

* :class:`SimulatedGroup` -- all ranks ``0..p-1`` in one process (parity checks, CI). The
  collectives are small ``autograd.Function`` s over the per-rank lists.
* :class:`DistributedGroup` -- one rank per process over ``torch.distributed`` (gloo on CPU,
  NCCL on CUDA), under ``torchrun`` (:meth:`DistributedGroup.from_env`) or the in-process
  spawn helper :func:`run_distributed` used by the tests.

Why not ``torch.distributed.nn.functional.all_reduce``: its backward all-reduces the gradient
again, which is the right rule for a loss that is summed over processes, but not for the
Megatron convention in which every TP rank holds the *same* replicated loss (it would scale the
gradients of sharded weights by ``p``). The explicit identity/all-reduce pairs above implement
the Megatron rule; they are equally autograd-aware.
"""

from __future__ import annotations

import io
import os
import socket
import traceback
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "RankGroup",
    "SimulatedGroup",
    "DistributedGroup",
    "run_distributed",
]


class RankGroup(ABC):
    """A tensor-parallel group of ``tp`` ranks, of which ``local_ranks`` run in this process."""

    tp: int
    local_ranks: tuple[int, ...]
    device: torch.device

    @abstractmethod
    def copy_to_ranks(self, xs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Enter a TP region: identity forward, all-reduce (sum) of the gradients backward."""

    @abstractmethod
    def all_reduce_sum(self, parts: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Sum per-rank partial results over all ``tp`` ranks.

        ``parts`` holds one tensor per local rank; the result holds one replica of the total per
        local rank (same order). Backward is the identity per rank (Megatron
        ``reduce_from_model_parallel_region``).
        """

    @abstractmethod
    def all_gather_cat(self, parts: Sequence[torch.Tensor], dim: int) -> torch.Tensor:
        """Concatenate the per-rank tensors of all ``tp`` ranks along ``dim`` (rank order).

        Returns the full (replicated) tensor. Backward keeps the slice of each local rank.
        """

    def _check(self, parts: Sequence[torch.Tensor]) -> None:
        if len(parts) != len(self.local_ranks):
            raise ValueError(
                f"expected one tensor per local rank ({len(self.local_ranks)}), got {len(parts)}"
            )


# --------------------------------------------------------------------------------------------
# Simulated backend
# --------------------------------------------------------------------------------------------


class _SimCopy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, *xs):  # noqa: D401 - autograd signature
        return tuple(x.view_as(x) for x in xs)

    @staticmethod
    def backward(ctx, *grads):
        total = grads[0]
        for g in grads[1:]:
            total = total + g
        return tuple(total for _ in grads)


class _SimAllReduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx, *parts):
        total = parts[0].clone()
        for p in parts[1:]:
            total = total + p
        return tuple(total.clone() for _ in parts)

    @staticmethod
    def backward(ctx, *grads):
        return grads


class SimulatedGroup(RankGroup):
    """All ``tp`` ranks in this process; collectives operate on the per-rank lists."""

    def __init__(self, tp: int, device: str | torch.device = "cpu"):
        if tp < 1:
            raise ValueError(f"tp must be >= 1, got {tp}")
        self.tp = tp
        self.local_ranks = tuple(range(tp))
        self.device = torch.device(device)

    def copy_to_ranks(self, xs):
        self._check(xs)
        return list(_SimCopy.apply(*xs))

    def all_reduce_sum(self, parts):
        self._check(parts)
        return list(_SimAllReduce.apply(*parts))

    def all_gather_cat(self, parts, dim):
        self._check(parts)
        return torch.cat(list(parts), dim=dim)

    def __repr__(self) -> str:
        return f"SimulatedGroup(tp={self.tp})"


# --------------------------------------------------------------------------------------------
# torch.distributed backend
# --------------------------------------------------------------------------------------------


class _DistCopy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pg, *xs):
        ctx.pg = pg
        return tuple(x.view_as(x) for x in xs)

    @staticmethod
    def backward(ctx, *grads):
        total = grads[0].clone()
        for g in grads[1:]:
            total = total + g
        dist.all_reduce(total, group=ctx.pg)
        return (None, *(total for _ in grads))


class _DistAllReduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pg, *parts):
        total = parts[0].clone(memory_format=torch.contiguous_format)
        for p in parts[1:]:
            total = total + p
        dist.all_reduce(total, group=pg)
        return tuple(total.clone() for _ in parts)

    @staticmethod
    def backward(ctx, *grads):
        return (None, *grads)


class _DistAllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pg, dim, world, rank, part):
        ctx.dim, ctx.rank = dim, rank
        part = part.contiguous()
        ctx.size = part.shape[dim]
        out = [torch.empty_like(part) for _ in range(world)]
        dist.all_gather(out, part, group=pg)
        return torch.cat(out, dim=dim)

    @staticmethod
    def backward(ctx, grad):
        local = grad.narrow(ctx.dim, ctx.rank * ctx.size, ctx.size).contiguous()
        return None, None, None, None, local


class DistributedGroup(RankGroup):
    """One TP rank per process over ``torch.distributed``; the whole process group is the TP group.

    ``local_ranks`` is ``(this process's rank,)``. The process group must already be
    initialised (see :meth:`from_env` for ``torchrun``, :func:`run_distributed` for tests).
    """

    def __init__(self, process_group: Any = None, device: str | torch.device | None = None):
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("torch.distributed is not initialised")
        self.pg = process_group
        self.tp = dist.get_world_size(group=process_group)
        self.rank = dist.get_rank(group=process_group)
        self.local_ranks = (self.rank,)
        if device is None:
            if dist.get_backend(process_group) == "nccl":
                device = torch.device("cuda", torch.cuda.current_device())
            else:
                device = torch.device("cpu")
        self.device = torch.device(device)

    @classmethod
    def from_env(cls) -> DistributedGroup:
        """Initialise from ``torchrun`` environment variables (NCCL on CUDA, else gloo)."""
        if not dist.is_initialized():
            if torch.cuda.is_available():
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
                dist.init_process_group("nccl")
            else:
                dist.init_process_group("gloo")
        return cls()

    def copy_to_ranks(self, xs):
        self._check(xs)
        return list(_DistCopy.apply(self.pg, *xs))

    def all_reduce_sum(self, parts):
        self._check(parts)
        return list(_DistAllReduce.apply(self.pg, *parts))

    def all_gather_cat(self, parts, dim):
        self._check(parts)
        (part,) = parts
        dim = dim % part.dim()
        return _DistAllGather.apply(self.pg, dim, self.tp, self.rank, part)

    def __repr__(self) -> str:
        return f"DistributedGroup(tp={self.tp}, rank={self.rank})"


# --------------------------------------------------------------------------------------------
# In-process spawn helper (tests)
# --------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _to_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _worker(fn, rank, world_size, port, backend, queue, args):
    torch.set_num_threads(1)
    try:
        dist.init_process_group(
            backend,
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world_size,
        )
        try:
            result = fn(DistributedGroup(), *args)
        finally:
            dist.destroy_process_group()
        queue.put((rank, True, _to_bytes(result)))
    except BaseException:  # report everything to the parent, including KeyboardInterrupt
        queue.put((rank, False, traceback.format_exc()))


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    backend: str = "gloo",
    timeout: float = 300.0,
) -> list[Any]:
    """Run ``fn(group, *args)`` in ``world_size`` spawned processes joined by ``backend``.

    ``group`` is a :class:`DistributedGroup` over all processes. ``fn`` must be picklable (a
    module-level function). Returns the per-rank return values, index = rank (they travel
    through ``torch.save``, so tensors are fine). Any exception in a worker is re-raised here
    with its traceback.
    """
    import queue as _queue

    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    results_q = ctx.Queue()
    port = _free_port()
    procs = [
        ctx.Process(
            target=_worker,
            args=(fn, rank, world_size, port, backend, results_q, args),
            daemon=True,
        )
        for rank in range(world_size)
    ]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors: list[str] = []
    try:
        while len(results) + len(errors) < world_size:
            try:
                rank, ok, payload = results_q.get(timeout=timeout)
            except _queue.Empty:
                dead = [i for i, p in enumerate(procs) if not p.is_alive() and p.exitcode != 0]
                errors.append(f"timeout after {timeout}s; dead workers: {dead}")
                break
            if ok:
                # Results travel as torch.save bytes and are read back with the safe loader:
                # plain containers, numbers, strings and tensors only.
                results[rank] = torch.load(io.BytesIO(payload), weights_only=True)
            else:
                errors.append(f"rank {rank}:\n{payload}")
                break
    finally:
        for p in procs:
            p.join(timeout=10 if not errors else 1)
            if p.is_alive():
                p.terminate()
                p.join()
    if errors:
        raise RuntimeError("distributed worker failed:\n" + "\n".join(errors))
    return [results[r] for r in range(world_size)]
