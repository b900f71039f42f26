"""Agreement between the TP processes of a check: every rank raises the same error, so none
waits forever in a collective; small object/tensor exchanges with rank 0."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from neoxconv.errors import NeoxconvError
from neoxconv.reference.ranks import DistributedGroup

__all__ = ["AgreedError", "agreed", "agreed_root", "broadcast", "gather"]


class AgreedError(NeoxconvError):
    """An error every rank knows about (so all of them stop together)."""

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code


def _status(e: BaseException) -> tuple[str, int]:
    if isinstance(e, NeoxconvError):
        return str(e), e.exit_code
    return f"{type(e).__name__}: {e}", 2  # OSError: disk full, permissions, ...


def agreed(group: DistributedGroup, fn):
    """Run ``fn`` on every rank; if it fails with a user-facing error on any rank, all raise."""
    try:
        value, status = fn(), None
    except (NeoxconvError, OSError) as e:
        value, status = None, _status(e)
    statuses: list = [None] * group.tp
    dist.all_gather_object(statuses, status, group=group.pg)
    for r, s in enumerate(statuses):
        if s:
            raise AgreedError(s[0] if r == 0 else f"rank {r}: {s[0]}", s[1])
    return value


def agreed_root(group: DistributedGroup, fn):
    """Run ``fn`` on rank 0 only and hand its (picklable) result or error to every rank."""
    box: list = [None]
    if group.rank == 0:
        try:
            box = [(fn(), None)]
        except (NeoxconvError, OSError) as e:
            box = [(None, _status(e))]
    dist.broadcast_object_list(box, src=0, group=group.pg)
    value, status = box[0]
    if status:
        raise AgreedError(*status)
    return value


def broadcast(group: DistributedGroup, obj: Any) -> Any:
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=group.pg)
    return box[0]


def gather(group: DistributedGroup, t: torch.Tensor) -> list[torch.Tensor] | None:
    """This rank's tensor -> the list over all ranks on rank 0 (on CPU), None elsewhere."""
    t = t.detach().contiguous()
    if group.tp == 1:
        return [t.cpu()]
    if group.rank == 0:
        out = [torch.empty_like(t) for _ in range(group.tp)]
        dist.gather(t, out, dst=0, group=group.pg)
        return [o.cpu() for o in out]
    dist.gather(t, None, dst=0, group=group.pg)
    return None
