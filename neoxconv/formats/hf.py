"""Hugging Face model directories: config.json + safetensors (sharded with an index above
--max-shard-size) or pytorch_model*.bin; names, roles and config come from the family's table
(neoxconv.archs): reading and writing HF is each role's merge and split at p = 1.

Reading is lazy: names, shapes and byte ranges come from the file headers; each layer's tensors
are rows of the memory-mapped files (neoxconv.lazy). Writing is a plan
(neoxconv.plan): the shards are packed from shapes alone, then neoxconv.pipeline writes every
tensor at its offset, rows that do not change copied file to file.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from neoxconv import archs
from neoxconv.checkpoint import Checkpoint
from neoxconv.errors import DamagedInput, NeoxconvError
from neoxconv.io import check_finite, inside, read_json, write_json
from neoxconv.lazy import Lazy
from neoxconv.plan import Plan, make_plan, safetensors_file
from neoxconv.ptio import MappedFile, TensorRecord, index_pt, index_safetensors
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
    """Tensor name -> file and record, from the file headers (safetensors headers; pickles'
    zip directory and pickle, neoxconv.ptio): nothing is read or unpickled per access. A group
    load maps its files and hands out Lazy rows of them (neoxconv.lazy)."""

    def __init__(self, files: list[Path]):
        self.where: dict[str, Path] = {}
        self.records: dict[str, TensorRecord] = {}
        for f in files:
            if f.suffix == ".safetensors":
                records, _ = index_safetensors(f)
            else:
                tree = index_pt(f).obj
                if not isinstance(tree, dict):
                    raise DamagedInput(f"{f}: expected a dict of tensors")
                records = {k: v for k, v in tree.items() if isinstance(v, TensorRecord)}
            for k, rec in records.items():
                if rec.dtype not in _ST_DTYPES.values():
                    raise NeoxconvError(f"{f}: tensor {k} has dtype {str(rec.dtype).removeprefix('torch.')}, which "
                                        "neoxconv does not read")
                self.records[k] = rec
                self.where[k] = f
        self.metas = {k: Lazy.shape_only(rec.shape, rec.dtype) for k, rec in self.records.items()}

    def get_many(self, names: list[str]) -> dict[str, Lazy]:
        """The named tensors as Lazy rows of their (mapped) files; with --check-finite each is
        scanned on the mapping the conversion then copies from."""
        mapped: dict[Path, MappedFile] = {}
        out = {}
        for n in names:
            f = self.where[n]
            if f not in mapped:
                mapped[f] = MappedFile(f)
            t = mapped[f].tensor(self.records[n])
            check_finite(t, f, n)
            out[n] = Lazy.of_record(t, self.records[n])
        return out


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


def write_hf(ckpt: Checkpoint, out: Path, *, progress: Callable[[int], None] | None = None, workers: int = 1,
             **opts) -> dict:
    """Write an HF directory into `out` (exists, empty). Returns a summary."""
    from neoxconv.pipeline import execute

    plan = plan_hf(ckpt, **opts)
    execute(plan, out, workers=workers, progress=progress)
    return plan.finish(out)


def plan_hf(ckpt: Checkpoint, *, dtype: torch.dtype | None = None, max_shard_size: int = 5 * 10**9,
            trim_vocab_padding: bool = False, family: str | None = None) -> Plan:
    """The files of an HF export (neoxconv.plan): safetensors shards packed in tensor order."""
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

    # Shards: HF names, dtypes and shapes per group from the headers alone, packed in order.
    groups = ckpt.tensors.groups()
    sizes = [(name, t.numel() * t.element_size())
             for g in groups for name, t in to_hf(g, ckpt.tensors.shapes(g)).items()]
    shard_of: dict[str, int] = {}
    shard, size = 0, 0
    for name, nbytes in sizes:
        if size and size + nbytes > max_shard_size:
            shard, size = shard + 1, 0
        shard_of[name] = shard
        size += nbytes
    n = shard + 1
    names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]

    def outputs(group: Group, t: dict[str, torch.Tensor]):
        return [(names[shard_of[name]], name, x) for name, x in to_hf(group, t).items()]

    def finish(out: Path) -> dict:
        if n > 1:
            write_json(out / "model.safetensors.index.json", {
                "metadata": {"total_size": sum(nbytes for _, nbytes in sizes)},
                "weight_map": {name: names[shard_of[name]] for name, _ in sizes},
            })
        import transformers

        dtype_name = str(out_dtype).removeprefix("torch.")
        gen = ckpt.text.generation  # special-token ids: the checkpoint's generation settings, when known
        config.update({**(gen.token_ids() if gen else {}), "dtype": dtype_name, "torch_dtype": dtype_name,
                       "transformers_version": transformers.__version__})
        write_json(out / "config.json", config)
        if gen is not None:
            write_json(out / "generation_config.json", {**gen.to_json(),
                                                        "transformers_version": transformers.__version__})
        return {"shards": n, "vocab_rows": rows, "spec": out_spec, "config": config}

    options = {"to": "hf", "dtype": str(out_dtype), "max_shard_size": max_shard_size,
               "trim_vocab_padding": trim_vocab_padding, "family": spec.family}
    return make_plan(groups, ckpt.tensors.shapes, outputs,
                     lambda rel, entries: safetensors_file(rel, entries, {"format": "pt"}),
                     ckpt.tensors.lazy_group, finish, options)
