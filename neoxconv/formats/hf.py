"""Hugging Face model directories: config.json + safetensors (sharded with an index above
--max-shard-size) or pytorch_model*.bin; names, roles and config come from the family's table
(neoxconv.archs): reading and writing HF is each role's merge and split at p = 1.

Reading is lazy (safetensors are memory-mapped, tensors fetched per layer). Writing streams:
the shard plan is made from shapes alone, then each layer is loaded, converted and appended,
and every shard is flushed as soon as it is complete.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open

from neoxconv import archs
from neoxconv.checkpoint import Checkpoint
from neoxconv.errors import DamagedInput, NeoxconvError
from neoxconv.io import (SafetensorsStreamWriter, check_finite, check_finite_enabled, inside, load_pickle, read_json,
                         write_json)
from neoxconv.tensormap import Group, TensorMap, group_of
from neoxconv.validate import check_canonical, check_hf_config, check_hf_sizes

_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}


def is_hf_dir(path: Path) -> bool:
    return (path / "config.json").is_file() and bool(_weight_files(path, strict=False))


def _weight_files(path: Path, strict: bool = True) -> list[Path]:
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (path / index).is_file():
            weight_map = read_json(path / index).get("weight_map", {})
            if not isinstance(weight_map, dict):
                raise DamagedInput(f"{path / index}: weight_map is not a mapping of tensor names to files")
            # Each file name must stay inside the directory (symlinks, as the HF cache makes, are fine).
            files = [inside(path, f, f"{path / index}: weight_map") for f in sorted(set(weight_map.values()), key=str)]
            missing = [f for f in files if not f.is_file()]
            if missing and strict:
                raise DamagedInput(f"{path / index}: names {missing[0].name}, which does not exist")
            return files
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (path / single).is_file():
            return [path / single]
    if strict:
        raise NeoxconvError(f"{path}: no model.safetensors(.index.json) or pytorch_model.bin(.index.json)")
    return []


class _Store:
    """Tensor name -> file. Safetensors files are opened per layer load and closed again, so a
    conversion does not keep every page it has touched mapped; pickles stay memory-mapped."""

    def __init__(self, files: list[Path]):
        self.where: dict[str, Path] = {}
        self.metas: dict[str, torch.Tensor] = {}
        self._open: dict[Path, object] = {}
        for f in files:
            if f.suffix == ".safetensors":
                try:
                    h = safe_open(str(f), framework="pt")
                except Exception as e:  # noqa: BLE001
                    raise DamagedInput(f"{f}: not a readable safetensors file ({e})") from None
                for k in h.keys():
                    sl = h.get_slice(k)
                    if sl.get_dtype() not in _ST_DTYPES:
                        raise NeoxconvError(f"{f}: tensor {k} has dtype {sl.get_dtype()}, which neoxconv does not read")
                    self.metas[k] = torch.empty(sl.get_shape(), dtype=_ST_DTYPES[sl.get_dtype()], device="meta")
                    self.where[k] = f
                    if check_finite_enabled():  # --check-finite: every tensor once, before anything is written
                        check_finite(h.get_tensor(k), f, k)
                del h
            else:
                sd = load_pickle(f)
                if not isinstance(sd, dict):
                    raise DamagedInput(f"{f}: expected a dict of tensors")
                self._open[f] = sd
                for k, v in sd.items():
                    if isinstance(v, torch.Tensor):
                        self.metas[k] = v.to("meta")
                        self.where[k] = f
                        check_finite(v, f, k)

    def get_many(self, names: list[str]) -> dict[str, torch.Tensor]:
        by_file: dict[Path, list[str]] = {}
        for n in names:
            by_file.setdefault(self.where[n], []).append(n)
        out: dict[str, torch.Tensor] = {}
        for f, group in by_file.items():
            if f in self._open:
                out.update({n: self._open[f][n] for n in group})
            else:
                with safe_open(str(f), framework="pt") as h:
                    out.update({n: h.get_tensor(n) for n in group})
        return {n: out[n] for n in names}


def _real_vocab(path: Path, rows: int) -> int | None:
    """The tokenizer's size when the directory has a tokenizer.json (None when unknown)."""
    tok = path / "tokenizer.json"
    if tok.is_file():
        try:
            from tokenizers import Tokenizer

            return min(Tokenizer.from_file(str(tok)).get_vocab_size(with_added_tokens=True), rows)
        except Exception:  # noqa: BLE001 - an unreadable tokenizer only loses the padding info
            return None
    return None


def read_hf(path: Path, family: str | None = None) -> Checkpoint:
    path = Path(path)
    if not (path / "config.json").is_file():
        raise NeoxconvError(f"{path}: no config.json (not a Hugging Face model directory)")
    cfg = read_json(path / "config.json")
    check_hf_config(cfg, path / "config.json")
    arch = archs.by_family(family) if family else archs.by_hf_config(cfg, str(path / "config.json"))
    store = _Store(_weight_files(path))
    heads = cfg.get("num_attention_heads")
    if not heads:
        raise NeoxconvError(f"{path / 'config.json'}: num_attention_heads missing")
    kv = cfg.get("num_key_value_heads") or heads
    by_group: dict[Group, list[str]] = {}
    metas: dict[Group, dict[str, torch.Tensor]] = {}
    for name in store.metas:
        if arch.is_ignored(name):
            continue
        try:
            canon = arch.to_canonical((heads, kv), {name: store.metas[name]})
        except KeyError:
            raise NeoxconvError(f"{store.where[name]}: unexpected tensor {name!r} for {arch.architecture}") from None
        except NeoxconvError as e:  # a fused tensor whose shape its role cannot split
            raise DamagedInput(f"{store.where[name]}: tensor {name}: {e}") from None
        group = group_of(next(iter(canon)))
        by_group.setdefault(group, []).append(name)
        metas.setdefault(group, {}).update(canon)
    if "embed" not in metas:
        raise DamagedInput(f"{path}: no embedding tensor found for {arch.architecture}")
    order = ["embed", *sorted(g for g in metas if isinstance(g, int)), "final"]
    metas = {g: _order(metas.get(g, {})) for g in order}
    shapes = {n: tuple(t.shape) for g in metas.values() for n, t in g.items()}
    files = {g: sorted({str(store.where[n]) for n in names}) for g, names in by_group.items()}
    check_hf_sizes(cfg, shapes, lambda n: ", ".join(files[group_of(n)]), path / "config.json")
    try:
        spec = arch.spec_from_config(cfg, shapes)
    except KeyError as e:  # a tensor the sizes are read from
        raise DamagedInput(f"{path}: tensor {e.args[0]} (canonical name) is missing ({arch.architecture} reads the "
                           "model's sizes from it)") from None
    real_vocab = _real_vocab(path, spec.vocab_rows)
    spec = spec.replace(vocab_size=real_vocab or spec.vocab_rows,
                        dtype=str(metas["embed"]["embed.weight"].dtype).removeprefix("torch."))

    def load(group: Group) -> dict[str, torch.Tensor]:
        return arch.to_canonical((heads, kv), store.get_many(by_group.get(group, [])))

    info = {"format": "hf", "path": str(path), "hf_config": cfg, "iteration": 0, "hf_hidden_act": cfg.get("hidden_act"),
            "vocab_known": real_vocab is not None,
            "group_files": files}
    from neoxconv.tokenizer.settings import hf_dir_settings

    ckpt = Checkpoint(spec, TensorMap(metas, load), info, text=hf_dir_settings(path))
    check_canonical(ckpt)  # every tensor's shape against the spec and the config: before anyone uses it
    return ckpt


def _order(d: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return dict(sorted(d.items()))


def write_hf(ckpt: Checkpoint, out: Path, *, dtype: torch.dtype | None = None, max_shard_size: int = 5 * 10**9,
             trim_vocab_padding: bool = False, family: str | None = None,
             progress: Callable[[str], None] | None = None) -> dict:
    """Write an HF directory into `out` (exists, empty). Returns a summary."""
    spec = ckpt.spec
    if family and family != spec.family:
        spec = spec.replace(family=family)
    arch = archs.by_family(spec.family)
    out_dtype = dtype or getattr(torch, spec.dtype)
    rows = spec.vocab_size if trim_vocab_padding else spec.vocab_rows
    out_spec = spec.replace(vocab_rows=rows, dtype=str(out_dtype).removeprefix("torch."))
    config = arch.config_from_spec(out_spec)  # validates the family can hold this model first
    src_act = ckpt.info.get("hf_hidden_act")
    if src_act and arch.hf_activations.get(src_act) == out_spec.activation:
        config["hidden_act"] = src_act  # e.g. gelu_new stays gelu_new: same function, same rounding

    def to_hf(group: Group, t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return arch.from_canonical(out_spec, {k: v.to(out_dtype) for k, v in t.items()})

    # Plan: HF names, dtypes and shapes per group from metas alone, then pack shards in order.
    groups = ckpt.tensors.groups()
    plan: list[tuple[str, torch.dtype, tuple[int, ...], int]] = []
    for g in groups:
        for name, t in to_hf(g, ckpt.tensors.metas(g)).items():
            plan.append((name, t.dtype, tuple(t.shape), t.numel() * t.element_size()))
    shards: list[list[tuple[str, torch.dtype, tuple[int, ...]]]] = [[]]
    size = 0
    for name, dt, shape, nbytes in plan:
        if shards[-1] and size + nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append((name, dt, shape))
        size += nbytes
    n = len(shards)
    names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    shard_of = {entry[0]: i for i, s in enumerate(shards) for entry in s}
    # Each shard's header is written first; tensors stream in as their layer is converted.
    writers: dict[int, SafetensorsStreamWriter] = {}
    for g in groups:
        for name, t in to_hf(g, ckpt.tensors.load_group(g)).items():
            i = shard_of[name]
            if i not in writers:
                writers[i] = SafetensorsStreamWriter(out / names[i], shards[i], metadata={"format": "pt"})
            writers[i].write(name, t)
            if writers[i].complete:
                writers[i].close()
        if progress:
            progress(f"layer {g}" if isinstance(g, int) else str(g))
    for w in writers.values():
        w.close()
    if n > 1:
        write_json(out / "model.safetensors.index.json", {
            "metadata": {"total_size": sum(p[3] for p in plan)},
            "weight_map": {p[0]: names[shard_of[p[0]]] for p in plan},
        })
    import transformers

    dtype_name = str(out_dtype).removeprefix("torch.")
    gen = ckpt.text.generation  # special-token ids: the checkpoint's generation settings, when known
    config.update({**(gen.token_ids() if gen else {}), "dtype": dtype_name, "torch_dtype": dtype_name,
                   "transformers_version": transformers.__version__})
    write_json(out / "config.json", config)
    if gen is not None:
        write_json(out / "generation_config.json", {**gen.to_json(), "transformers_version": transformers.__version__})
    return {"shards": n, "vocab_rows": rows, "spec": out_spec, "config": config}
