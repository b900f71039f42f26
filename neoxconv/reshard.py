"""0.1.0's role-name interface, kept only for reference/train_check.py until it moves to
neoxconv.roles (then this module goes). The roles are the declared ones: `role_of` looks the
tensor up in the family tables (neoxconv.archs.role_of); nothing is inferred from the name.
"""

from __future__ import annotations

import torch

from neoxconv import archs
from neoxconv.roles import COLUMN, REPLICATED, ROW, ROW_BIAS, VOCAB, Context

_BY_NAME = {r.name: r for r in (VOCAB, COLUMN, ROW, ROW_BIAS, REPLICATED)}


def role_of(name: str) -> str:
    """The name of the declared role: "vocab", "column", "row", "row_bias" or "replicated"."""
    return archs.role_of(name).name


def merge(parts: list[torch.Tensor], role: str, parallel_residual: bool) -> torch.Tensor:
    return _BY_NAME[role].merge(parts, Context(parallel_residual=parallel_residual))[0]
