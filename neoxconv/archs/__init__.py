"""Model families: one table module per family, registered here.

FAMILIES names each family's module (holding its `ARCH`), in order of preference: a NeoX
checkpoint records no HF family, so reading one picks the first family whose HF class computes
the model exactly (`family_for`), `custom` (its own code) when no stock class does. This module
imports no torch, so the CLI can list the families.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from neoxconv.errors import NeoxconvError

if TYPE_CHECKING:
    from neoxconv.archs.base import Arch
    from neoxconv.roles import Role
    from neoxconv.spec import ModelSpec

FAMILIES: dict[str, str] = {
    "gptneox": "neoxconv.archs.gptneox",
    "llama": "neoxconv.archs.llama",
    "mistral": "neoxconv.archs.mistral",
    "custom": "neoxconv.archs.custom",  # every dense NeoX model, with its own code: last resort
}


def families() -> list[str]:
    return list(FAMILIES)


def by_family(family: str) -> Arch:
    if family not in FAMILIES:
        raise NeoxconvError(f"unsupported architecture {family!r} (supported: {', '.join(FAMILIES)})")
    arch = importlib.import_module(FAMILIES[family]).ARCH
    if arch.family != family:
        raise NeoxconvError(f"{FAMILIES[family]} declares family {arch.family!r}, registered as {family!r}")
    return arch


def all_archs() -> list[Arch]:
    return [by_family(f) for f in FAMILIES]


def role_of(canonical: str, family: str | None = None) -> Role:
    """The TP role declared for a canonical tensor: by `family`'s table when it has the tensor,
    else by the family that has it (a LayerNorm model labelled llama has norm biases, which
    only gptneox's table holds). All tables agree on a tensor's role (tests/test_roles.py).
    KeyError when no family declares the tensor."""
    for arch in ([by_family(family)] if family else []) + all_archs():
        try:
            return arch.role_of(canonical)
        except KeyError:
            continue
    raise KeyError(canonical)


def by_hf_config(cfg: dict, where: str) -> Arch:
    model_type = cfg.get("model_type")
    for arch in all_archs():
        if arch.model_type == model_type or arch.architecture in (cfg.get("architectures") or []):
            return arch
    raise NeoxconvError(f"{where}: unsupported model_type {model_type!r} (supported: "
                        f"{', '.join(a.model_type for a in all_archs())})")


def family_for(spec: ModelSpec) -> str:
    """The first registered family whose HF class computes this model exactly: its
    `config_from_spec` accepts it (NeoX records no family; `custom` holds every dense NeoX model)."""
    refusals = []
    for arch in all_archs():
        try:
            arch.config_from_spec(spec)
            return arch.family
        except NeoxconvError as e:
            refusals.append(f"{arch.family}: {e}")
    raise NeoxconvError(f"no registered model family holds this model ({'; '.join(refusals)})")
