"""The proof is independent of the converter: ``neoxconv/reference/`` imports nothing of neoxconv
but errors, io (safe pickle loading) and the NeoX file storage (formats/neox_files.py, the
YAML reading it uses, and ptio, the byte-level torch-file reader it indexes files with; ptio is
checked against torch.load itself in tests/test_ptio.py), directly or through those modules, at
module level or inside functions.

The imports are read from the source (ast), so a lazy import inside a function counts too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import neoxconv

ROOT = Path(neoxconv.__file__).parent
#: what the reference may import; each of these may only import modules of this set in turn
ALLOWED = {"neoxconv", "neoxconv.errors", "neoxconv.io", "neoxconv.formats", "neoxconv.formats.neox_files",
           "neoxconv.formats.neox_args", "neoxconv.ptio", "neoxconv.ptio.index", "neoxconv.ptio.ranges",
           "neoxconv.ptio.safetensors_index", "neoxconv.ptio.writer", "neoxconv.ptio.zipformat"}


def module_file(name: str) -> Path | None:
    """The source of a neoxconv module or package (None if there is none)."""
    path = ROOT.parent.joinpath(*name.split("."))
    for f in (path.with_suffix(".py"), path / "__init__.py"):
        if f.is_file():
            return f
    return None


def imports_of(name: str, source: str) -> set[str]:
    """neoxconv modules ``source`` (the text of module ``name``) imports, with their parent packages."""
    is_pkg = module_file(name) is not None and module_file(name).name == "__init__.py"
    package = name if is_pkg else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            # `from pkg import sub` imports the submodule when there is one
            targets = [base] + [f"{base}.{a.name}" for a in node.names if module_file(f"{base}.{a.name}")]
        else:
            continue
        for t in targets:
            if t == "neoxconv" or t.startswith("neoxconv."):
                parts = t.split(".")
                found.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return found


def reached(name: str, source: str | None = None) -> set[str]:
    """Every neoxconv module importing ``name`` can run, transitively (``source``: its text,
    default the file's)."""
    seen, todo = set(), [(name, source)]
    while todo:
        mod, text = todo.pop()
        if mod in seen:
            continue
        seen.add(mod)
        if text is None:
            f = module_file(mod)
            if f is None:
                continue
            text = f.read_text()
        todo += [(m, None) for m in imports_of(mod, text) - seen]
    return seen


def violations(name: str, source: str | None = None) -> set[str]:
    return {m for m in reached(name, source) if m not in ALLOWED and not m.startswith("neoxconv.reference")}


def reference_modules() -> list[str]:
    return sorted("neoxconv.reference" + ("" if f.stem == "__init__" else f".{f.stem}")
                  for f in (ROOT / "reference").glob("*.py"))


def test_reference_imports_only_storage():
    modules = reference_modules()
    assert {"neoxconv.reference.neox_forward", "neoxconv.reference.hf_forward",
            "neoxconv.reference.train"} <= set(modules)
    bad = {m: sorted(violations(m)) for m in modules if violations(m)}
    assert not bad, f"the reference imports converter modules: {bad}"
    # and it does reach the storage it is allowed (the walk follows imports for real)
    assert "neoxconv.formats.neox_files" in reached("neoxconv.reference.neox_checkpoint")
    assert "neoxconv.formats.neox_args" in reached("neoxconv.reference.neox_checkpoint")


def test_walker_catches_a_violation():
    """Direct, relative, lazy (inside a function) and indirect (through an allowed-looking chain) imports."""
    probe = "neoxconv.reference._probe"
    assert violations(probe, "from ..reshard import split\n") >= {"neoxconv.reshard"}
    assert "neoxconv.formats.neox" in violations(probe, "def f():\n    from neoxconv.formats import neox\n")
    assert "neoxconv.spec" in violations(probe, "import neoxconv.formats.neox_config\n")  # neox_config -> spec
    assert violations(probe, "from ..formats.neox_files import open_neox\nfrom . import ops\n") == set()
