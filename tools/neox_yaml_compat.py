"""Check the NeoX YAML neoxconv writes against the argument classes of real GPT-NeoX versions.

    python tools/neox_yaml_compat.py /path/to/gpt-neox-clone

NeoX builds its config with `NeoXArgs(**config)`: an unknown key is an error. This reads
`megatron/neox_arguments/*.py` at several commits of a local gpt-neox clone (git history
needed), collects the argument names, and checks that every key of the YAML neoxconv writes is
known to the versions it targets: legacy schema -> 299b68cd (Llama support, 2023-05) ..
0d4bdb96^ (last version with the legacy names; GQA/window models from f36aed7f, 2024-02);
current schema -> HEAD. Exits 1 on any unknown key. Needs a clone, so it is a tool, not a test.
"""

from __future__ import annotations

import dataclasses
import importlib
import subprocess
import sys
import tempfile
from pathlib import Path

LEGACY = ("299b68cd", "f36aed7f", "e109bf5e", "0d4bdb96^")


def arg_names(repo: Path, commit: str, tmp: Path) -> set[str]:
    pkg = tmp / commit.replace("^", "_parent") / "neox_arguments"
    pkg.mkdir(parents=True)
    for f in ("template.py", "neox_args.py", "deepspeed_args.py"):
        src = subprocess.run(["git", "-C", str(repo), "show", f"{commit}:megatron/neox_arguments/{f}"],
                             capture_output=True, text=True, check=True).stdout
        # adbf5d6f-era files use Optional without importing it
        (pkg / f).write_text(src.replace("from typing import ", "from typing import Optional, ", 1))
    (pkg / "__init__.py").write_text("")
    sys.path.insert(0, str(pkg.parent))
    try:
        names: set[str] = set()
        for mod in ("neox_arguments.neox_args", "neox_arguments.deepspeed_args"):
            for k, v in vars(importlib.import_module(mod)).items():
                if k.startswith("NeoXArgs") and dataclasses.is_dataclass(v):
                    names |= {f.name for f in dataclasses.fields(v)}
        return names
    finally:
        sys.path.pop(0)
        for m in [m for m in sys.modules if m.startswith("neox_arguments")]:
            del sys.modules[m]


def yaml_keys(family: str, schema: str, tmp: Path, **overrides) -> set[str]:
    from neoxconv.convert import convert
    from neoxconv.formats.neox_args import read_configs
    from neoxconv.tiny import tiny_hf_model

    name = f"{family}-{schema}-{len(list(tmp.iterdir()))}"
    tiny_hf_model(family, **overrides).save_pretrained(tmp / f"{name}.hf")
    convert(tmp / f"{name}.hf", tmp / name, to="neox", tp=2, schema=schema)
    cfg, _ = read_configs([next((tmp / name).glob("global_step*/configs/neoxconv.yml"))])
    return set(cfg)


def main(repo: Path) -> int:
    tmp = Path(tempfile.mkdtemp(prefix="neox-yaml-compat-"))
    known = {c: arg_names(repo, c, tmp / "args") for c in (*LEGACY, "HEAD")}
    models = tmp / "models"
    models.mkdir()
    cases = [("gptneox", {"intermediate_size": 128}, LEGACY), ("llama", {}, LEGACY[1:]),
             ("llama", {"num_key_value_heads": 2}, LEGACY[1:]), ("mistral", {"num_key_value_heads": 2}, LEGACY[1:])]
    bad = 0
    for family, over, legacy_range in cases:
        for schema, commits in (("legacy", legacy_range), ("current", ("HEAD",))):
            keys = yaml_keys(family, schema, models, **over)
            for c in commits:
                unknown = sorted(keys - known[c])
                bad += bool(unknown)
                print(f"{family:8s} {str(over):28s} {schema:8s} {c:10s} {'ok' if not unknown else 'UNKNOWN ' + str(unknown)}")
    return 1 if bad else 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    sys.exit(main(Path(sys.argv[1])))
