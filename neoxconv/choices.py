"""The values of the CLI's choice options, as Enums: typer lists them in --help and refuses
any other value as a usage error (exit 2) before a command starts. The library takes the
plain strings (`.value`); tests/test_cli.py checks every set against the library's own.
No torch here: `neoxconv --help` stays fast.
"""

from __future__ import annotations

from enum import Enum

from neoxconv import archs


class Target(str, Enum):
    neox = "neox"
    hf = "hf"
    meta = "meta"


class NeoxLayout(str, Enum):
    pipeline = "pipeline"
    sequential = "sequential"


class NeoxSchema(str, Enum):
    current = "current"
    legacy = "legacy"


class OutDtype(str, Enum):
    auto = "auto"
    fp32 = "fp32"
    fp16 = "fp16"
    bf16 = "bf16"


class ComputeDtype(str, Enum):
    fp32 = "fp32"
    fp16 = "fp16"
    bf16 = "bf16"


class QkvLayout(str, Enum):
    mha_interleaved = "mha_interleaved"
    gqa_blocked = "gqa_blocked"
    gqa_fakehead = "gqa_fakehead"


class MetaStyle(str, Enum):
    llama3 = "llama3"
    llama2 = "llama2"


class Replicated(str, Enum):
    own = "own"
    mean = "mean"


class MainBranch(str, Enum):
    latest = "latest"
    none = "none"


class Optimizer(str, Enum):
    sgd = "sgd"
    adamw = "adamw"


# Model families come from the registry, so a new family appears here by itself.
Family = Enum("Family", {"auto": "auto", **{f: f for f in archs.FAMILIES}}, type=str)


def value_of(choice: Enum | None) -> str | None:
    return None if choice is None else choice.value
