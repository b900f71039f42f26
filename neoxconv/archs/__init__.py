"""Architecture registry: one small table module per model family."""

from __future__ import annotations

from neoxconv.archs.base import Arch
from neoxconv.errors import NeoxconvError


def _registry() -> dict[str, Arch]:
    from neoxconv.archs import gptneox

    archs = [gptneox.ARCH]
    try:
        from neoxconv.archs import llama, mistral

        archs += [llama.ARCH, mistral.ARCH]
    except ImportError:
        pass
    return {a.family: a for a in archs}


def by_family(family: str) -> Arch:
    reg = _registry()
    if family not in reg:
        raise NeoxconvError(f"unsupported architecture {family!r} (supported: {', '.join(reg)})")
    return reg[family]


def by_hf_config(cfg: dict, where: str) -> Arch:
    model_type = cfg.get("model_type")
    for arch in _registry().values():
        if arch.model_type == model_type or arch.architecture in (cfg.get("architectures") or []):
            return arch
    raise NeoxconvError(f"{where}: unsupported model_type {model_type!r} (supported: "
                        f"{', '.join(a.model_type for a in _registry().values())})")


def families() -> list[str]:
    return list(_registry())
