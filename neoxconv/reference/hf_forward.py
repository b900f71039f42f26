"""Logits of a Hugging Face model directory via transformers, streamed one layer group at a time.

:func:`hf_logits` runs transformers' own model: its class (from ``config.json``) is built with
every parameter on the meta device (no memory; buffers such as the rotary ``inv_freq`` are
computed as usual) and called through its own ``forward`` -- eager attention (the plain
masked-softmax path, closest to the reference forwards; sdpa/flash kernels add their own rounding
and, for sliding windows, may use other conventions), eval mode, no cache. A hook before each
layer group (the embedding, each decoder layer, the final norm, the head) loads that group's
weights from the weight files (memory-mapped safetensors, or pickles read with the safe loader)
in the model's dtype, and a hook after it puts the meta parameters back. So the numerics are
transformers' own, bit for bit those of ``from_pretrained(...)(ids).logits`` (tested on every
family), while memory holds one group plus the activations. Checkpoint names are mapped to
parameter names by transformers' own renaming rules (e.g. GPTNeoX's ``embed_out`` -> ``lm_head``
in transformers 5); a tied head takes the embedding's tensor, as ``from_pretrained`` ties it.

:func:`load_hf_model` loads a whole model (``from_pretrained``), for training steps.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn as nn

from ..errors import NeoxconvError
from ..io import load_pickle

__all__ = ["hf_logits", "hf_model_logits", "load_hf_model"]


def load_hf_model(model_dir: str | os.PathLike, dtype: torch.dtype = torch.float32, attn_implementation: str = "eager"):
    """The whole model: ``AutoModelForCausalLM.from_pretrained`` (local files only) in ``dtype``."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        Path(model_dir), dtype=dtype, attn_implementation=attn_implementation, local_files_only=True
    )
    return model.eval()


def hf_model_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    """fp32 logits [b, s, vocab] of a loaded HF causal LM for ``tokens`` [b, s]."""
    device = next(model.parameters()).device
    with torch.no_grad():
        out = model(input_ids=tokens.to(device), use_cache=False)
    return out.logits.float()


def hf_logits(model_dir: str | os.PathLike, tokens: torch.Tensor, dtype: torch.dtype = torch.float32,
              device: str | torch.device = "cpu", attn_implementation: str = "eager",
              trust_remote_code: bool = False, progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """fp32 logits [b, s, vocab] of the HF model stored in ``model_dir``, computed in ``dtype`` on
    ``device`` one layer group at a time (see the module docs). ``trust_remote_code``: the model
    class comes from the directory's own code (``auto_map``; the caller decides it may run).
    ``progress(done, total)`` is called as each layer group starts."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model_dir, device = Path(model_dir), torch.device(device)
    config = AutoConfig.from_pretrained(model_dir, local_files_only=True, trust_remote_code=trust_remote_code)
    with _parameters_on_meta():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn_implementation,
                                                 trust_remote_code=trust_remote_code)
    model.eval()
    for module in model.modules():  # buffers (rotary tables) are real: move them to the device
        for name, buf in module._buffers.items():
            if buf is not None:
                module._buffers[name] = buf.to(device)
    with _WeightFiles(model_dir) as files:
        keys = _checkpoint_keys(model, files.keys(), model_dir)
        loaded = _stream_groups(model, lambda name, like: files.get(keys[name]).to(device, like.dtype), progress)
        with torch.no_grad():
            logits = model(input_ids=tokens.to(device), use_cache=False).logits.float()
    if not all(loaded.values()):
        raise RuntimeError(f"streamed forward of {model_dir} did not run groups "
                           f"{[g for g, n in loaded.items() if not n]}")
    return logits


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Modules built inside get every parameter on the meta device (buffers stay real)."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


class _WeightFiles:
    """The tensors of an HF directory by checkpoint name, read on demand (memory-mapped)."""

    def __init__(self, model_dir: Path):
        self.dir = model_dir
        self.where: dict[str, Path] = {}
        self._open: dict[Path, object] = {}
        self._stack = contextlib.ExitStack()
        for index, single in (("model.safetensors.index.json", "model.safetensors"),
                              ("pytorch_model.bin.index.json", "pytorch_model.bin")):
            if (model_dir / index).is_file():
                try:
                    weight_map = json.loads((model_dir / index).read_text())["weight_map"]
                except (OSError, ValueError, KeyError) as e:
                    raise NeoxconvError(f"{model_dir / index}: unreadable weight index ({e})") from None
                self.where = {k: model_dir / f for k, f in weight_map.items()}
                return
            if (model_dir / single).is_file():
                self.where = dict.fromkeys(self._handle(model_dir / single).keys(), model_dir / single)
                return
        raise NeoxconvError(f"{model_dir}: no model.safetensors(.index.json) or pytorch_model.bin(.index.json)")

    def _handle(self, path: Path):
        if path not in self._open:
            if not path.is_file():
                raise NeoxconvError(f"{path}: weight file not found (named by the weight index)")
            if path.suffix == ".safetensors":
                from safetensors import safe_open

                self._open[path] = self._stack.enter_context(safe_open(str(path), framework="pt"))
            else:
                self._open[path] = load_pickle(path)
        return self._open[path]

    def keys(self) -> list[str]:
        return list(self.where)

    def get(self, key: str) -> torch.Tensor:
        handle = self._handle(self.where[key])
        return handle.get_tensor(key) if hasattr(handle, "get_tensor") else handle[key]

    def __enter__(self) -> _WeightFiles:
        return self

    def __exit__(self, *exc) -> None:
        self._open.clear()
        self._stack.close()


def _renamer(model: nn.Module) -> Callable[[str], str]:
    """transformers' own checkpoint-name -> parameter-name renaming for this model (transformers 5;
    weight *conversions* such as fusing experts are not renamings: such checkpoints are refused
    as missing tensors)."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightRenaming

    renamings = [t for t in get_model_conversion_mapping(model) if isinstance(t, WeightRenaming)]

    def rename(key: str) -> str:
        for t in renamings:
            key, _ = t.rename_source_key(key)
        return key

    return rename


def _checkpoint_keys(model: nn.Module, keys: list[str], where: Path) -> dict[str, str]:
    """Parameter name -> checkpoint name, for every parameter (a tied one: its source's)."""
    rename, prefix = _renamer(model), getattr(model, "base_model_prefix", "")
    names = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    found: dict[str, str] = {}
    for key in keys:
        name = rename(key)
        if name not in names and prefix:  # a base-model checkpoint in a *ForCausalLM, or the reverse
            name = next((n for n in (f"{prefix}.{name}", name.removeprefix(f"{prefix}.")) if n in names), name)
        found.setdefault(name, key)
    source: dict[int, str] = {}
    out = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        first = source.setdefault(id(p), name)  # tied parameters load their source's tensor
        key = found.get(first, found.get(name))
        if key is None:
            raise NeoxconvError(f"{where}: no tensor for the model's parameter {first!r} in the weight files")
        out[name] = key
    return out


def _stream_groups(model: nn.Module, load: Callable[[str, torch.Tensor], torch.Tensor],
                   progress: Callable[[int, int], None] | None = None) -> dict[str, int]:
    """Hooks that load each layer group's parameters before it runs and drop them after.

    Groups: every decoder layer (the ``nn.ModuleList`` of ``num_hidden_layers`` modules), and
    every other module that owns parameters itself. Returns group name -> times it ran."""
    n_layers = getattr(model.config, "num_hidden_layers", None)
    stacks = [name for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) == n_layers]
    if n_layers is None or len(stacks) != 1:
        raise NeoxconvError(f"{type(model).__name__}: cannot find its stack of {n_layers} decoder layers")
    stack = stacks[0]
    groups: list[tuple[str, nn.Module, bool]] = []
    for name, m in model.named_modules():
        if name.startswith(f"{stack}.") and name.count(".") == stack.count(".") + 1:
            groups.append((name, m, True))
        elif not name.startswith(f"{stack}.") and any(True for _ in m.parameters(recurse=False)):
            groups.append((name, m, False))
    ran = dict.fromkeys((g for g, _, _ in groups), 0)
    for name, module, recurse in groups:
        slots = [(owner, attr, f"{name}.{path}" if name else path)
                 for path, owner, attr in _param_slots(module, recurse)]
        meta = {(id(owner), attr): owner._parameters[attr] for owner, attr, _ in slots}

        def pre(_module, _args, slots=slots, name=name):
            ran[name] += 1
            if progress is not None:
                progress(sum(1 for n in ran.values() if n), len(ran))
            for owner, attr, full in slots:
                like = owner._parameters[attr]
                owner._parameters[attr] = nn.Parameter(load(full, like), requires_grad=False)

        def post(_module, _args, _out, slots=slots, meta=meta):
            for owner, attr, _ in slots:
                owner._parameters[attr] = meta[(id(owner), attr)]

        module.register_forward_pre_hook(pre)
        module.register_forward_hook(post)
    return ran


def _param_slots(module: nn.Module, recurse: bool) -> list[tuple[str, nn.Module, str]]:
    """(dotted path below ``module``, owning module, attribute) of its parameters."""
    owners = module.named_modules() if recurse else [("", module)]
    return [(f"{prefix}.{attr}" if prefix else attr, owner, attr)
            for prefix, owner in owners for attr, p in owner._parameters.items() if p is not None]
