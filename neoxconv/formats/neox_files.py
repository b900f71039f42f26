"""Raw access to a GPT-NeoX/DeepSpeed checkpoint as stored: per pipeline-spec index, per TP rank.

Two on-disk layouts (neox-formats.md §1), detected from the files, never from the YAML (T3):

- pipeline: `global_stepN/layer_XX-model_YY-model_states.pt`, one file per spec index per TP
  rank (embedding 0, layer i at i+2, final norm L+3, untied head L+4), plus PP*TP
  `mp_rank_XX_model_states.pt` files with `module=None` (T1, T2).
- sequential: one `mp_rank_XX_model_states.pt` per TP rank whose `module` holds
  `sequential.{idx}.{name}` keys.

`NeoxFiles.rank_states(idx)` hands out what the reference forward and the adapter need; it
knows nothing about tensor semantics beyond what storage itself promises, which it checks on
every read (before a conversion writes anything, since readers take every index once for
shapes):

- NeoX shards every tensor in equal chunks, so all TP ranks of an index hold the same names,
  shapes and dtypes; and every transformer layer stores the same tensors as the first one.
  Any difference is damage (`DamagedInput`, naming file, tensor, rank, expected and found).
- Replicated copies (norms; the row biases of a sequential residual) should be equal on every
  rank; how far they drift is measured (`drift`, `drift_warning`), as GPT-NeoX-20B's do.
- With `--check-finite`, every tensor is scanned for NaN/Inf (neoxconv.io.check_finite).
"""

from __future__ import annotations

import json
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch

from neoxconv.errors import DamagedInput, NeoxconvError
from neoxconv.formats.neox_args import find_config_files, read_configs
from neoxconv.io import check_finite, check_finite_enabled, inside
from neoxconv.ptio import MappedFile, TensorRecord, index_pt

SIDECAR = "neoxconv.json"
QKV_LAYOUTS = ("mha_interleaved", "gqa_blocked", "gqa_fakehead")
SCHEMAS = ("current", "legacy")
LAYER_FILE = re.compile(r"^layer_(\d+)-model_(\d+)-model_states\.pt$")
MP_FILE = re.compile(r"^mp_rank_(\d+)_model_states\.pt$")
SEQ_KEY = re.compile(r"^sequential\.(\d+)\.(.+)$")
# Copies every TP rank holds in full; row biases only under a sequential residual (the GPT-J
# residual adds each rank's part, which is not a copy).
NORM_PREFIXES = ("input_layernorm.", "post_attention_layernorm.", "norm.")
ROW_BIASES = ("attention.dense.bias", "mlp.linear2.bias", "mlp.dense_4h_to_h.bias")
# Stored by some layers only: the block layout of layers with local (sparse) attention.
PER_LAYER_TYPE = ("attention.sparse_attn.master_layout",)


def resolve_tag_dir(path: Path) -> Path:
    """CKPT may be a save dir with `latest`, a global_stepN dir, or a save dir with one tag."""
    path = Path(path)
    if not path.exists():
        raise NeoxconvError(f"{path}: no such file or directory")
    if not path.is_dir():
        raise NeoxconvError(f"{path}: expected a NeoX checkpoint directory, got a file")
    if _has_model_files(path):
        return path
    latest = path / "latest"
    if latest.is_file():
        try:
            tag = latest.read_text().strip()
        except (OSError, UnicodeDecodeError) as e:
            raise DamagedInput(f"{latest}: unreadable ({e})") from None
        tag_dir = inside(path, tag, f"{latest}:")
        if not tag_dir.is_dir():
            raise DamagedInput(f"{latest}: names tag {tag!r}, but {tag_dir} does not exist")
        if not _has_model_files(tag_dir):
            raise DamagedInput(f"{tag_dir}: no layer_*-model_*-model_states.pt or mp_rank_*_model_states.pt files")
        return tag_dir
    tags = sorted(p for p in path.iterdir() if p.is_dir() and _has_model_files(p))
    if len(tags) == 1:
        return tags[0]
    if tags:
        raise NeoxconvError(f"{path}: several checkpoints ({', '.join(t.name for t in tags)}) and no `latest` file; pass one of them")
    raise NeoxconvError(f"{path}: not a NeoX checkpoint (no `latest`, no layer_*/mp_rank_* model files)")


def _has_model_files(d: Path) -> bool:
    return any(LAYER_FILE.match(p.name) or MP_FILE.match(p.name) for p in d.iterdir())


@dataclass
class NeoxFiles:
    tag_dir: Path
    layout: str  # "pipeline" | "sequential"
    tp: int
    pp: int
    iteration: int
    args: dict  # merged NeoX YAML, underscore keys
    config_files: list[Path]
    indices: list[int]  # spec indices present
    _files: dict[tuple[int, int], Path] = field(default_factory=dict, repr=False)  # pipeline (idx, rank)
    _rank_files: list[Path] | None = field(default=None, repr=False)  # sequential, per rank
    num_layers: int = 0
    qkv_layout: str = "mha_interleaved"  # the converter's reading (formats/neox.py); the proof never reads it
    # What the files hold, per spec index and TP rank: tensor name -> (shape, dtype), from the
    # file headers (ptio.index_pt). The spec-level check (neoxconv.validate) works on this record.
    stored: dict[int, list[dict[str, tuple[tuple[int, ...], torch.dtype]]]] = field(default_factory=dict, repr=False)
    # Replicated copies that differ across ranks: (spec index, name) -> Drift.
    drift: dict[tuple[int, str], "Drift"] = field(default_factory=dict, repr=False)
    _first_layer: int | None = field(default=None, repr=False)
    _finite_done: set[tuple[int, int]] = field(default_factory=set, repr=False)
    # (spec index, rank) -> name -> TensorRecord: every file is indexed once (a sequential
    # mp_rank file once per run, for all its spec indices), never unpickled per access.
    _records: dict[tuple[int, int], dict[str, TensorRecord]] = field(default_factory=dict, repr=False)
    _indexed: set[Path] = field(default_factory=set, repr=False)
    _drift_done: set[int] = field(default_factory=set, repr=False)
    _lock: threading.RLock = field(default_factory=threading.RLock, repr=False)

    def records(self, idx: int) -> list[dict[str, TensorRecord]]:
        """Tensor records of spec index `idx`, one dict per TP rank (names without
        `sequential.N.`), from the file headers: no tensor data is read. The storage checks of
        names, shapes and dtypes across ranks and layers run on the first call per index."""
        if idx not in self.indices:
            raise KeyError(idx)
        recs = [self.rank_records(idx, r) for r in range(self.tp)]
        with self._lock:
            if idx not in self.stored:
                self._screen(idx, recs)
        return recs

    def rank_records(self, idx: int, rank: int) -> dict[str, TensorRecord]:
        """Tensor records of spec index `idx` on TP rank `rank` (that rank's file only)."""
        if idx not in self.indices:
            raise KeyError(idx)
        if not 0 <= rank < self.tp:
            raise NeoxconvError(f"{self.tag_dir}: TP rank {rank} out of range (tp={self.tp})")
        with self._lock:
            if (idx, rank) not in self._records:
                self._index(idx, rank)
            return self._records.get((idx, rank), {})

    def rank_states(self, idx: int) -> list[dict[str, torch.Tensor]]:
        """Tensors of spec index `idx`, one dict per TP rank, names without `sequential.N.`:
        memory-mapped views of the files (read when touched). Storage checks as in `records`;
        replicated copies' drift and (--check-finite) NaN/Inf on the data, once per index."""
        states = [self._tensors(idx, r, recs) for r, recs in enumerate(self.records(idx))]
        with self._lock:
            if idx not in self._drift_done:
                self._measure_drift(idx, states)
                self._drift_done.add(idx)
        return states

    def rank_state(self, idx: int, rank: int) -> dict[str, torch.Tensor]:
        """Tensors of spec index `idx` on TP rank `rank` only: reads that rank's file and no other
        (a TP training process loads just its own shards)."""
        return self._tensors(idx, rank, self.rank_records(idx, rank))

    def file_for(self, idx: int, rank: int = 0) -> Path:
        if self.layout == "pipeline":
            return self._files[(idx, rank)]
        return self.tag_dir / f"mp_rank_{rank:02d}_model_states.pt"

    def stored_name(self, idx: int, name: str) -> str:
        """A tensor's name as its file holds it."""
        return name if self.layout == "pipeline" else f"sequential.{idx}.{name}"

    def _tensors(self, idx: int, rank: int, recs: dict[str, TensorRecord]) -> dict[str, torch.Tensor]:
        mapped = MappedFile(self.file_for(idx, rank)) if recs else None
        state = {k: mapped.tensor(rec) for k, rec in recs.items()}
        self._check_finite(idx, rank, state)
        return state

    def _index(self, idx: int, rank: int) -> None:
        """Index the file holding (idx, rank): a layer file, or a whole mp_rank file (all indices)."""
        path = self.file_for(idx, rank)
        if path in self._indexed:
            return
        tree = index_pt(path).obj
        if self.layout == "pipeline":
            if not isinstance(tree, dict):
                raise DamagedInput(f"{path}: expected a dict of tensors")
            self._records[(idx, rank)] = {k: v for k, v in tree.items() if isinstance(v, TensorRecord)}
        else:
            module = tree.get("module") if isinstance(tree, dict) else None
            if not isinstance(module, dict):
                raise DamagedInput(f"{path}: no `module` dict of tensors")
            for key, rec in module.items():
                m = SEQ_KEY.match(key) if isinstance(key, str) else None
                if m and isinstance(rec, TensorRecord):
                    self._records.setdefault((int(m[1]), rank), {})[m[2]] = rec
        self._indexed.add(path)

    # -- storage checks ------------------------------------------------------------------------

    def _check_finite(self, idx: int, rank: int, state: dict) -> None:
        if not check_finite_enabled() or (idx, rank) in self._finite_done:
            return
        for k, v in state.items():
            if isinstance(v, torch.Tensor):
                check_finite(v, self.file_for(idx, rank), self.stored_name(idx, k), rank)
        self._finite_done.add((idx, rank))

    def _screen(self, idx: int, recs: list[dict[str, TensorRecord]]) -> None:
        """The storage checks of one spec index, from the headers of all ranks (see the module
        docstring)."""
        seen = [{k: (tuple(v.shape), v.dtype) for k, v in st.items()} for st in recs]
        for r in range(1, len(seen)):
            ref = f"rank 0 ({self.file_for(idx, 0).name})"
            self._same(idx, r, seen[r], seen[0], ref, lambda n, f, e, ref=ref: (
                f"tensor {n} on TP rank {r} is {f}, expected {e} as on TP {ref}"))
        if 2 <= idx < self.num_layers + 2:
            if self._first_layer is None:
                self._first_layer = idx
            elif self._first_layer in self.stored:
                first = self._first_layer
                ref = f"layer {first - 2} ({self.file_for(first, 0).name})"
                # Which of the two is damaged is for the spec check to say: name both.
                mine, firsts = ({k: v for k, v in x.items() if k not in PER_LAYER_TYPE}
                                for x in (seen[0], self.stored[first][0]))
                self._same(idx, 0, mine, firsts, ref, lambda n, f, e, ref=ref: (
                    f"tensor {n} of layer {idx - 2} is {f} on TP rank 0, but {e} in {ref}: every NeoX layer stores "
                    "the same tensors"))
        self.stored[idx] = seen

    def _same(self, idx: int, rank: int, found: dict, expected: dict, ref: str, differs) -> None:
        file = self.file_for(idx, rank)
        for k in sorted(expected.keys() | found.keys()):
            name = self.stored_name(idx, k)
            if k not in found:
                raise DamagedInput(f"{file}: tensor {name} is missing on TP rank {rank} ({ref} has it)")
            if k not in expected:
                raise DamagedInput(f"{file}: unexpected tensor {name} on TP rank {rank} ({ref} has no such tensor)")
            if found[k] != expected[k]:
                raise DamagedInput(f"{file}: {differs(name, _fmt(*found[k]), _fmt(*expected[k]))}")

    def _measure_drift(self, idx: int, states: list[dict]) -> None:
        gpt_j = bool(self.args.get("gpt_j_residual"))
        for k, v0 in states[0].items():
            if not (k.startswith(NORM_PREFIXES) or (k in ROW_BIASES and not gpt_j)) \
                    or not isinstance(v0, torch.Tensor) or not v0.is_floating_point():
                continue
            worst = None
            for r in range(1, len(states)):
                d = Drift.of(v0, states[r][k], r)
                if d is not None and (worst is None or d.max_abs > worst.max_abs):
                    worst = d
            if worst is not None:
                self.drift[(idx, k)] = worst


def open_neox(path: Path, config_files: list[Path] | None = None, ranks: tuple[int, ...] | None = None) -> NeoxFiles:
    """Open a checkpoint. `ranks`: the TP ranks the caller will read (default all); opening then
    reads only those ranks' files (the others are checked by name only)."""
    ranks = tuple(ranks) if ranks else None
    tag_dir = resolve_tag_dir(Path(path))
    configs = list(config_files or []) or find_config_files(tag_dir)
    args, used = read_configs(configs) if configs else ({}, [])
    names = [p.name for p in tag_dir.iterdir()]
    layer_files = [(int(m[1]), int(m[2]), tag_dir / n) for n in names if (m := LAYER_FILE.match(n))]
    mp_files = sorted((int(m[1]), tag_dir / n) for n in names if (m := MP_FILE.match(n)))
    iteration = _iteration(tag_dir, mp_files)
    if layer_files:
        return _open_pipeline(tag_dir, layer_files, mp_files, args, used, iteration, ranks)
    return _open_sequential(tag_dir, mp_files, args, used, iteration, ranks)


def _first_rank(tag_dir: Path, tp: int, ranks: tuple[int, ...] | None) -> int:
    for r in ranks or ():
        if not 0 <= r < tp:
            raise NeoxconvError(f"{tag_dir}: TP rank {r} requested, but the checkpoint has tp={tp}")
    return min(ranks) if ranks else 0


def _iteration(tag_dir: Path, mp_files: list) -> int:
    m = re.search(r"(\d+)$", tag_dir.name)
    return int(m[1]) if m else 0


def _open_pipeline(tag_dir, layer_files, mp_files, args, used, iteration, want=None) -> NeoxFiles:
    by_idx: dict[int, dict[int, Path]] = {}
    for idx, rank, p in layer_files:
        by_idx.setdefault(idx, {})[rank] = p
    if 0 not in by_idx:
        raise DamagedInput(f"{tag_dir}: missing layer_00-model_00-model_states.pt (the embedding)")
    # TP: what the config declares, else the largest file count of any layer (a missing file
    # is then reported for the layer that lacks it, whichever layer that is).
    declared_tp = args.get("model_parallel_size")
    most = max(len(r) for r in by_idx.values())
    tp = int(declared_tp) if declared_tp else most
    for idx, ranks in sorted(by_idx.items()):
        if sorted(ranks) != list(range(tp)):
            have = ", ".join(f"model_{r:02d}" for r in sorted(ranks))
            what = f"model_parallel_size {tp} in the config" if declared_tp else "the other layers"
            raise DamagedInput(f"{tag_dir}: layer_{idx:02d} has {len(ranks)} TP file(s) ({have}), "
                                f"expected {tp} as {what} say(s)")
    files = {(idx, r): p for idx, ranks in by_idx.items() for r, p in ranks.items()}
    pp = max(1, len(mp_files) // tp) if mp_files else int(args.get("pipe_parallel_size") or 1)
    nf = NeoxFiles(tag_dir, "pipeline", tp, pp, iteration, args, used, sorted(by_idx), _files=files)
    first = _first_rank(tag_dir, tp, want)
    nf.num_layers = _check_indices(nf, lambda idx: f"layer_{idx:02d}-model_{first:02d}-model_states.pt", first)
    return nf


def _open_sequential(tag_dir, mp_files, args, used, iteration, want=None) -> NeoxFiles:
    if not mp_files:
        raise NeoxconvError(f"{tag_dir}: no mp_rank_XX_model_states.pt files")
    ranks = [r for r, _ in mp_files]
    if ranks != list(range(len(ranks))):
        raise DamagedInput(f"{tag_dir}: mp_rank files are not numbered 00..{len(ranks) - 1:02d} (found {ranks})")
    first = _first_rank(tag_dir, len(mp_files), want)
    tp = len(mp_files)
    nf = NeoxFiles(tag_dir, "sequential", tp, 1, iteration, args, used, [], _rank_files=[p for _, p in mp_files])
    read = [r for r, _ in mp_files if want is None or r in want]
    modules = []
    for r in read:  # each mp_rank file is indexed once, here: every spec index's records at once
        nf._index(-1, r)
        keys = {(idx, k) for (idx, rank), recs in nf._records.items() if rank == r for k in recs}
        if not keys:
            raise NeoxconvError(f"{mp_files[r][1]}: no `sequential.N.*` tensors in `module` and no layer_* files: "
                                "not a NeoX checkpoint (or its layer files are missing)")
        modules.append(keys)
    declared_tp = args.get("model_parallel_size")
    if declared_tp and int(declared_tp) != tp:
        raise NeoxconvError(f"{tag_dir}: {tp} mp_rank file(s), but the config says model_parallel_size {declared_tp}")
    for r, keys in zip(read[1:], modules[1:]):
        if keys != modules[0]:
            idx, name = sorted(modules[0] ^ keys)[0]
            raise DamagedInput(f"{mp_files[r][1]}: tensor names differ from mp_rank_{read[0]:02d} "
                               f"(e.g. sequential.{idx}.{name})")
    nf.indices = sorted({idx for idx, _ in modules[0]})
    nf.num_layers = _check_indices(nf, lambda idx: f"sequential.{idx}.* in mp_rank_{first:02d}_model_states.pt", first)
    return nf


def _fmt(shape: tuple[int, ...], dtype: torch.dtype) -> str:
    return f"{str(dtype).removeprefix('torch.')} {list(shape)}"


@dataclass(frozen=True)
class Drift:
    """How far TP rank `rank`'s copy of a replicated tensor is from rank 0's (the worst rank)."""

    max_abs: float
    rank: int
    beyond_rounding: bool  # some element differs by more than one rounding step of the dtype

    @staticmethod
    def of(a: torch.Tensor, b: torch.Tensor, rank: int) -> "Drift | None":
        """None when equal. Beyond rounding: |a - b| > eps(dtype) * max(|a|, |b|) somewhere,
        i.e. more than one unit in the last place: copies that close are what any rounding of
        their mean gives back; farther apart, a merged copy computes differently from a rank."""
        if torch.equal(a, b):
            return None
        x, y = a.double(), b.double()
        diff = (x - y).abs()
        eps = torch.finfo(a.dtype).eps
        return Drift(float(diff.max()), rank, bool((diff > eps * torch.maximum(x.abs(), y.abs())).any()))


def drift_warning(nf: NeoxFiles) -> str | None:
    """One line for a conversion warning when replicated copies differ beyond rounding."""
    beyond = {key: d for key, d in nf.drift.items() if d.beyond_rounding}
    if not beyond:
        return None
    (idx, name), worst = max(beyond.items(), key=lambda kv: kv[1].max_abs)
    return (f"{len(beyond)} replicated tensor(s) (norms"
            f"{'' if nf.args.get('gpt_j_residual') else ', row biases'}) differ across the {nf.tp} TP ranks by more "
            f"than one rounding step of their dtype (the tolerance); the largest difference is {worst.max_abs:.3g} "
            f"in {nf.stored_name(idx, name)} ({nf.file_for(idx, worst.rank).name}, rank {worst.rank} vs rank 0). "
            "The output holds their mean; NeoX computed with each rank's own copy "
            "(`neoxconv parity` measures the effect on the logits)")


def _kind(keys: set[str]) -> str:
    if not keys:
        return "empty"  # a module without parameters: the final non-parametric LayerNorm
    if any(k.startswith("word_embeddings.") for k in keys):
        return "embed"
    if any(k.startswith(("attention.", "input_layernorm.")) for k in keys):
        return "layer"
    if any(k.startswith("norm.") for k in keys):
        return "norm"
    if any(k.startswith("final_linear.") for k in keys):
        return "head"
    return "unknown"


def _check_indices(nf: NeoxFiles, describe, rank: int = 0) -> int:
    """Classify spec indices by content (rank `rank`'s files) and check the T1 layout; returns the layer count."""
    kinds = {idx: _kind(set(nf.rank_records(idx, rank))) for idx in nf.indices}
    layers = sorted(i for i, k in kinds.items() if k == "layer")
    declared = nf.args.get("num_layers")
    n = int(declared) if declared else (max(layers) - 1 if layers else 0)
    if nf.layout == "sequential" and not any(k == "norm" for k in kinds.values()) and n + 3 not in kinds:
        # a final norm without parameters (non-parametric LayerNorm) stores no `sequential.N.` key
        nf.indices = sorted([*nf.indices, n + 3])
        kinds[n + 3] = "empty"
    norm = [i for i, k in kinds.items() if k == "norm" or (k == "empty" and i == n + 3)]
    for i in range(2, n + 2):
        if kinds.get(i) != "layer":
            raise DamagedInput(f"{nf.tag_dir}: missing transformer layer {i - 2}: expected {describe(i)}")
    extra = [i for i in layers if i >= n + 2]
    if extra:
        raise NeoxconvError(f"{nf.tag_dir}: transformer layer at spec index {extra[0]} beyond num_layers {n}")
    if norm != [n + 3]:
        raise DamagedInput(f"{nf.tag_dir}: final norm expected at {describe(n + 3)}, found it at {norm or 'no index'}")
    unknown = [i for i, k in kinds.items() if k == "unknown"]
    if unknown:
        raise NeoxconvError(f"{nf.tag_dir}: unrecognised tensors at spec index {unknown[0]} "
                            f"({', '.join(sorted(nf.rank_records(unknown[0], rank))[:3])})")
    if kinds.get(n + 4, "head") != "head":
        raise NeoxconvError(f"{nf.tag_dir}: unexpected tensors at spec index {n + 4}")
    return n


# ---------------------------------------------------------------------------------------------
# Storage facts both the converter and the independent reference need: one rule each.


def read_sidecar(tag_dir: Path) -> dict:
    """What neoxconv recorded beside shards it wrote (neoxconv.json), {} when absent."""
    path = Path(tag_dir) / SIDECAR
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise NeoxconvError(f"{path}: unreadable neoxconv record ({e})") from None
    if not isinstance(data, dict):
        raise NeoxconvError(f"{path}: expected a JSON object")
    return data


def detect_schema(layer_keys: set[str], where: str) -> str:
    """NeoX tensor-name schema of a transformer layer: "current" (mlp.linear1/linear2, since
    2024-09) or "legacy" (dense_h_to_4h / w1-w3)."""
    if any(k.startswith("mlp.linear1.") for k in layer_keys):
        return "current"
    if any(k.startswith(("mlp.dense_h_to_4h.", "mlp.w1.")) for k in layer_keys):
        return "legacy"
    if any("fc1_weight" in k or k.startswith("attention.qkv.") for k in layer_keys):
        raise NeoxconvError(f"{where}: Transformer Engine parameter names are not supported yet")
    raise NeoxconvError(f"{where}: cannot tell the NeoX naming schema (no mlp.linear1 / dense_h_to_4h / w1)")


def qkv_layout_for(heads: int, kv_heads: int, schema: str, declared: str | None = None,
                   recorded: str | None = None, where: object = "") -> str:
    """The fused-QKV layout of a NeoX checkpoint: the one rule converter and checkers share.

    MHA (kv == heads) is always per-head interleaved: NeoX takes its MHA path whatever wrote
    the file (T8). GQA: `declared` (--qkv-layout), else what neoxconv `recorded` in its
    neoxconv.json, else NeoX's history: legacy names predate the blocked layout (GQA came
    2024-02 as fake-head, blocked came 2024-11, the legacy names left 2024-09), so legacy
    names mean fake-head and current names mean blocked.
    """
    prefix = f"{where}: " if where else ""
    for name, value in (("--qkv-layout", declared), ("recorded qkv_layout", recorded)):
        if value is not None and value not in QKV_LAYOUTS:
            raise NeoxconvError(f"{prefix}unknown {name} {value!r} (known: {', '.join(QKV_LAYOUTS)})")
    if kv_heads == heads:
        if declared and declared != "mha_interleaved":
            raise NeoxconvError(f"{prefix}--qkv-layout {declared} given, but the model has as many KV heads as heads "
                                "(NeoX stores that interleaved)")
        return "mha_interleaved"
    layout = declared or (recorded if recorded != "mha_interleaved" else None) \
        or ("gqa_fakehead" if schema == "legacy" else "gqa_blocked")
    if layout == "mha_interleaved":
        raise NeoxconvError(f"{prefix}--qkv-layout mha_interleaved cannot hold {kv_heads} KV heads for {heads} heads")
    return layout
