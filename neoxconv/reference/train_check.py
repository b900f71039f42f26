"""``neoxconv train-check``: a tensor-parallel training step on a NeoX checkpoint, proven against HF.

One process per TP rank (world size = TP, no data or pipeline parallelism), joined by
torch.distributed (gloo on CPU, NCCL on CUDA). Launched either by ``torchrun`` (the command sees
RANK/WORLD_SIZE and uses, or initialises, the default process group) or, without it, by
:func:`run_train_check`, which spawns the TP processes locally.

Per rank: open the checkpoint reading **only this rank's files** (``open_neox(ranks=(r,))``),
hold its tensors as parameters of :class:`.train.NeoxTrainModel` (NeoX semantics, no converter
code), and for every step: forward, vocab-parallel next-token loss, backward, optimizer step.
Rank 0 also runs the **same steps on the HF model** (the ``--hf`` directory, or the checkpoint
converted by neoxconv into a temporary directory): same batch, same loss over the same softmax
columns, ``torch.optim`` SGD/AdamW with the same hyper-parameters.

Compared on rank 0, per step: the loss of both sides, and every gradient. NeoX gradients are
gathered tensor by tensor (one spec index at a time) and put into canonical form with the
converter's per-rank un-fusing (``rank_to_layer``) and TP roles -- the converter is used only
here and to make the HF side, which is exactly the mapping under test. Gradient rules differ from
weight rules in one place: a replicated tensor (norms; row biases, which under gpt_j_residual are
additive parts) receives the *same* gradient on every rank, so its canonical gradient is that
common value (the mean), and the spread between the rank copies is checked too. After the last
step the updated weights are compared (weight rules: parts summed, copies averaged) as the update
relative to the HF update. ``--save`` then writes the updated weights as a NeoX checkpoint, every
rank its own files, published by one rename.

Metrics: loss ``|Δ|``; gradient relative error of a tensor ``max|g_neox - g_hf| / max|g_hf|``
(over the vocab rows both sides have); update error ``(max|w_neox - w_hf| - 4·eps·max|w_hf|)⁺ /
max|w_hf - w_hf⁰|``: the weight difference beyond a few ulps of the weights themselves, relative to
the size of the HF update (over the elements whose gradient is determined, see
:func:`_compare_grads`). Tolerances per dtype: :data:`TOLERANCES`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..errors import NeoxconvError, ParityFailure
from .parity import canonical_dtype, make_batch
from .ranks import DistributedGroup, run_distributed
from .train import (
    LocalShards,
    NeoxTrainModel,
    build_optimizer,
    make_optimizer,
    param_value,
    write_rank_shards,
    write_shared_files,
)

__all__ = ["TOLERANCES", "TrainCheckOptions", "run_train_check", "run_train_checks", "cli_main"]

#: Per compute dtype. fp32: both sides run the same fp32 weights; what remains is summation order
#: (TP partial sums, vocab-parallel softmax, fused vs split projections). Measured on the tiny test
#: models (2 layers, TP 2 and 4, SGD and AdamW, 2-3 steps): loss |Δ| <= 1e-6, gradient relative
#: error <= 1e-5, update error <= 2e-4. (1e-5, 1e-4, 1e-3) keeps a 10x margin and still fails
#: every layout or bias-rule error tried (gradient errors >= 0.5, see tests/test_train.py).
#: fp16/bf16 (fp32 master weights on both sides) measured fp16 <= (1.1e-4, 6.2e-3, 6.9e-3) and
#: bf16 <= (6e-4, 4e-2, 2.3e-2); the tolerances below are ~5-20x that. They are smoke tests whose
#: noise grows with depth (docs/training.md): prove conversions in fp32.
TOLERANCES: dict[str, dict[str, float]] = {
    "float32": {"loss_abs": 1e-5, "grad_rel": 1e-4, "update_rel": 1e-3},
    "float16": {"loss_abs": 2e-3, "grad_rel": 5e-2, "update_rel": 5e-2},
    "bfloat16": {"loss_abs": 1e-2, "grad_rel": 2e-1, "update_rel": 2e-1},
}
OPTIMIZERS = ("sgd", "adamw")
DEVICES = ("cpu", "cuda")
_ERROR_MARK = re.compile(r"\[neoxconv-error (\d+)\] ([^\n]*)")
#: how long the local launcher waits for the workers' results
LAUNCH_TIMEOUT_S = 6 * 3600


@dataclass
class TrainCheckOptions:
    ckpt: Path
    hf: Path | None = None
    steps: int = 1
    lr: float = 1e-3
    optimizer: str = "sgd"
    weight_decay: float = 0.0
    batch: int = 2
    tokens: int = 64
    seed: int = 0
    dtype: str = "fp32"
    device: str = "cpu"
    save: Path | None = None
    config_files: tuple[Path, ...] = ()
    qkv_layout: str | None = None
    trust_pickle: bool = False
    #: how to step the additive bias parts of gpt_j_residual models: "logical" (the summed bias
    #: takes the single-device step, = HF) or "neox" (each part stepped as a whole bias, what NeoX
    #: does: p times the step at TP=p; the update check then fails). See .train.make_optimizer.
    partial_bias_step: str = "logical"

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, canonical_dtype(self.dtype))

    def validate(self) -> None:
        """Everything that can be checked before starting processes (exit 2 on bad input)."""
        from ..formats.hf import is_hf_dir
        from ..formats.neox_files import resolve_tag_dir
        from ..fusing import QKV_LAYOUTS

        tag_dir = resolve_tag_dir(Path(self.ckpt))
        if self.hf is not None and not is_hf_dir(Path(self.hf)):
            raise NeoxconvError(f"--hf {self.hf}: not a Hugging Face model directory (config.json + weights)")
        for name, value, low in (("--steps", self.steps, 1), ("--batch", self.batch, 1), ("--tokens", self.tokens, 2)):
            if int(value) < low:
                raise NeoxconvError(f"{name} must be at least {low}, got {value}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise NeoxconvError(f"--lr must be a positive number, got {self.lr}")
        if not (self.weight_decay >= 0 and math.isfinite(self.weight_decay)):
            raise NeoxconvError(f"--weight-decay must be >= 0, got {self.weight_decay}")
        if self.optimizer not in OPTIMIZERS:
            raise NeoxconvError(f"unknown --optimizer {self.optimizer!r} (use {' or '.join(OPTIMIZERS)})")
        try:
            canonical_dtype(self.dtype)
        except ValueError:
            raise NeoxconvError(f"unknown --dtype {self.dtype!r} (use fp32, fp16 or bf16)") from None
        if self.device not in DEVICES:
            raise NeoxconvError(f"unknown --device {self.device!r} (use cpu or cuda)")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise NeoxconvError("--device cuda: CUDA is not available on this machine (use --device cpu)")
        if self.partial_bias_step not in ("logical", "neox"):
            raise NeoxconvError(f"partial_bias_step must be 'logical' or 'neox', got {self.partial_bias_step!r}")
        if self.qkv_layout is not None and self.qkv_layout not in QKV_LAYOUTS:
            raise NeoxconvError(f"unknown --qkv-layout {self.qkv_layout!r} (known: {', '.join(QKV_LAYOUTS)})")
        for f in self.config_files:
            if not Path(f).is_file():
                raise NeoxconvError(f"--config {f}: file not found")
        if self.save is not None:
            out = Path(self.save)
            if out.exists():
                raise NeoxconvError(f"--save {out}: already exists (choose a new directory)")
            src = tag_dir.resolve()
            if out.resolve() == src or src in out.resolve().parents:
                raise NeoxconvError(f"--save {out}: must not be inside the source checkpoint")


# --------------------------------------------------------------------------------------------
# Agreement between ranks: every rank raises the same error, so none waits forever
# --------------------------------------------------------------------------------------------


class _AgreedError(NeoxconvError):
    """An error every rank knows about (so all of them stop together)."""

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code


def _status(e: BaseException) -> tuple[str, int]:
    if isinstance(e, NeoxconvError):
        return str(e), e.exit_code
    return f"{type(e).__name__}: {e}", 2  # OSError: disk full, permissions, ...


def _agreed(group: DistributedGroup, fn):
    """Run ``fn`` on every rank; if it fails with a user-facing error on any rank, all raise."""
    try:
        value, status = fn(), None
    except (NeoxconvError, OSError) as e:
        value, status = None, _status(e)
    statuses: list = [None] * group.tp
    dist.all_gather_object(statuses, status, group=group.pg)
    for r, s in enumerate(statuses):
        if s:
            raise _AgreedError(s[0] if r == 0 else f"rank {r}: {s[0]}", s[1])
    return value


def _agreed_root(group: DistributedGroup, fn):
    """Run ``fn`` on rank 0 only and hand its (picklable) result or error to every rank."""
    box: list = [None]
    if group.rank == 0:
        try:
            box = [(fn(), None)]
        except (NeoxconvError, OSError) as e:
            box = [(None, _status(e))]
    dist.broadcast_object_list(box, src=0, group=group.pg)
    value, status = box[0]
    if status:
        raise _AgreedError(*status)
    return value


def _broadcast(group: DistributedGroup, obj: Any) -> Any:
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=group.pg)
    return box[0]


def _gather(group: DistributedGroup, t: torch.Tensor) -> list[torch.Tensor] | None:
    """This rank's tensor -> the list over all ranks on rank 0 (on CPU), None elsewhere."""
    t = t.detach().contiguous()
    if group.tp == 1:
        return [t.cpu()]
    if group.rank == 0:
        out = [torch.empty_like(t) for _ in range(group.tp)]
        dist.gather(t, out, dst=0, group=group.pg)
        return [o.cpu() for o in out]
    dist.gather(t, None, dst=0, group=group.pg)
    return None


# --------------------------------------------------------------------------------------------
# The HF side (rank 0)
# --------------------------------------------------------------------------------------------


def _sidecar(files) -> dict:
    p = Path(files.tag_dir) / "neoxconv.json"
    try:
        return json.loads(p.read_text()) if p.is_file() else {}
    except (OSError, ValueError):
        return {}


def _real_vocab(files, hf_real: int) -> int:
    """The real (tokenizer) vocabulary: the neoxconv sidecar, the NeoX tokenizer, the HF
    tokenizer -- the smallest known; else every row counts as real."""
    sizes = [hf_real]
    if _sidecar(files).get("vocab_size"):
        sizes.append(int(_sidecar(files)["vocab_size"]))
    try:
        from ..tokenizer import find_neox_tokenizer, tokenizer_size

        path = find_neox_tokenizer(files.args, files.tag_dir)
        if path and tokenizer_size(path):
            sizes.append(int(tokenizer_size(path)))
    except ImportError:  # pragma: no cover - tokenizer support is optional
        pass
    return min(sizes)


class _HFSide:
    """The HF model doing the same steps, on rank 0."""

    def __init__(self, opts: TrainCheckOptions, files, model: NeoxTrainModel, device: torch.device):
        from .. import archs
        from ..formats.hf import read_hf
        from .hf_forward import load_hf_model

        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
        self.opts = opts
        self.tmp: Path | None = None
        try:
            if opts.hf is not None:
                hf_dir, origin = Path(opts.hf), "given"
            else:
                from ..convert import convert

                self.tmp = Path(tempfile.mkdtemp(prefix="neoxconv-train-check-"))
                hf_dir, origin = self.tmp / "hf", "converted"
                sem = model.semantics
                convert(Path(opts.ckpt), hf_dir, to="hf", src_format="neox",
                        config_files=list(opts.config_files) or None,
                        qkv_layout=sem.qkv_layout if sem.is_gqa else None)
            ckpt = read_hf(hf_dir)
            self.spec = ckpt.spec
            self.arch = archs.by_family(self.spec.family)
            self.model = load_hf_model(hf_dir, opts.torch_dtype).to(device)
        except BaseException:
            self.cleanup()
            raise
        self.device = device
        self.heads = (self.spec.heads, self.spec.kv_heads)
        self.w0 = self.canonical({n: p.detach().clone() for n, p in self.model.named_parameters()})
        self.grads: dict[str, torch.Tensor] = {}
        #: per canonical tensor, the elements whose gradient the check determines (see _compare_grads)
        self.determined: dict[str, torch.Tensor] = {}
        self.optimizer = None
        hf_rows = self.model.get_output_embeddings().weight.shape[0]
        padded = model.rank_state(0, model.group.local_ranks[0])["word_embeddings.weight"].shape[0] * model.group.tp
        if hf_rows > padded:
            raise NeoxconvError(f"the HF model has {hf_rows} vocabulary rows, the NeoX checkpoint only {padded}: "
                                "not the same model")
        real = _real_vocab(files, self.spec.vocab_size)
        self.plan = {
            "hf_dir": str(hf_dir) if origin == "given" else None,
            "hf_source": origin,
            "family": self.spec.family,
            "padded_vocab": padded,
            "softmax_vocab": hf_rows,
            "real_vocab": min(real, hf_rows),
        }

    def canonical(self, named: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {}
        for name, t in named.items():
            try:
                out.update(self.arch.to_canonical(self.heads, {name: t}))
            except KeyError:
                raise NeoxconvError(f"HF model: no canonical name for parameter {name!r}") from None
        return out

    def forward_backward(self, tokens: torch.Tensor) -> float:
        self.model.zero_grad(set_to_none=True)
        tokens = tokens.to(self.device)
        logits = self.model(input_ids=tokens, use_cache=False).logits.float()
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
        loss.backward()
        self.grads = self.canonical({n: p.grad for n, p in self.model.named_parameters()
                                     if p.requires_grad and p.grad is not None})
        return float(loss.item())

    def freeze_unmatched(self, neox_names: set[str]) -> list[str]:
        """HF parameters with no NeoX counterpart (e.g. the zero MLP biases an export of a
        bias-free GPTNeoX gets) are not trained, or the two models would stop being the same."""
        frozen = []
        for name, p in self.model.named_parameters():
            if not set(self.canonical({name: p.detach()})) & neox_names:
                p.requires_grad_(False)
                p.grad = None
                frozen.append(name)
        return frozen

    def step(self) -> None:
        if self.optimizer is None:
            params = [p for p in self.model.parameters() if p.requires_grad]
            self.optimizer = build_optimizer(self.opts.optimizer, params, self.opts.lr, self.opts.weight_decay)
        self.optimizer.step()

    def weights(self) -> dict[str, torch.Tensor]:
        """Current weights (fp32 masters in mixed precision), canonical."""
        opt = self.optimizer
        return self.canonical({n: (param_value(opt, p) if opt is not None else p).detach()
                               for n, p in self.model.named_parameters()})

    def cleanup(self) -> None:
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None


# --------------------------------------------------------------------------------------------
# Gathering NeoX per-rank tensors into canonical form and comparing
# --------------------------------------------------------------------------------------------


_FINAL_NORM = {"norm.weight": "final_norm.weight", "norm.bias": "final_norm.bias", "norm.scale": "final_norm.weight"}


class _Canonicaliser:
    """NeoX per-rank tensors of one spec index -> canonical full tensors (converter rules)."""

    def __init__(self, model: NeoxTrainModel, layer_keys: set[str]):
        from ..formats.neox_files import detect_schema

        sem = model.semantics
        self.tp = model.group.tp
        self.num_layers = model.num_layers
        self.gpt_j = sem.gpt_j_residual
        self.layout = sem.qkv_layout
        self.schema = detect_schema(layer_keys, "layer 0")
        # the four facts rank_to_layer reads (norm param names, head counts, gated MLP)
        self.shape = SimpleNamespace(norm=sem.norm, heads=sem.num_heads, kv_heads=sem.num_kv_heads,
                                     gated=sem.gated or "mlp.w1.weight" in layer_keys)

    def __call__(self, spec_idx: int, per_rank: list[dict[str, torch.Tensor]], kind: str
                 ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """(canonical tensors, replica spread per replicated tensor [grads only])."""
        from ..formats.neox import rank_to_layer
        from ..reshard import merge, role_of

        L = self.num_layers
        if spec_idx == 0:
            return {"embed.weight": torch.cat([s["word_embeddings.weight"] for s in per_rank])}, {}
        if spec_idx == L + 4:
            return {"lm_head.weight": torch.cat([s["final_linear.weight"] for s in per_rank])}, {}
        if spec_idx == L + 3:
            pieces = [{_FINAL_NORM[k]: v for k, v in s.items() if k in _FINAL_NORM} for s in per_rank]
            prefix = ""
        else:
            pieces = [rank_to_layer(self.shape, s, self.tp, self.schema, self.layout) for s in per_rank]
            prefix = f"layers.{spec_idx - 2}."
        out, spread = {}, {}
        for leaf in pieces[0]:
            name = prefix + leaf
            parts = [p[leaf] for p in pieces]
            role = role_of(name)
            if role in ("vocab", "column", "row") or kind == "weight":
                out[name] = merge(parts, role, self.gpt_j)
            else:  # gradient of a replicated tensor or of a bias part: the common value
                out[name] = torch.stack([p.double() for p in parts]).mean(0).to(parts[0].dtype)
                spread[name] = _rel(max(_maxabs(p.double() - parts[0].double()) for p in parts), _maxabs(parts[0]))
        return out, spread


def _maxabs(t: torch.Tensor) -> float:
    return float(t.abs().max().item()) if t.numel() else 0.0


def _rel(diff: float, scale: float) -> float:
    if not (math.isfinite(diff) and math.isfinite(scale)):
        return math.inf
    if scale > 0:
        return diff / scale
    return 0.0 if diff == 0 else math.inf


def _overlap(name: str, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Same shape, or vocab tensors cut to the rows both have; None if not comparable."""
    if a.shape == b.shape:
        return a, b
    if name in ("embed.weight", "lm_head.weight") and a.shape[1:] == b.shape[1:]:
        n = min(a.shape[0], b.shape[0])
        return a[:n], b[:n]
    return None


def _walk(group: DistributedGroup, model: NeoxTrainModel, canon: _Canonicaliser | None, kind: str, optimizer=None):
    """Yield (canonical name, full tensor, spread) on rank 0, spec index by spec index. Weights
    are the fp32 masters where the optimizer keeps them."""
    local = model.group.local_ranks[0]
    for spec_idx in model.spec_idx:
        params = model.rank_state(spec_idx, local)
        per_rank: list[dict[str, torch.Tensor]] = [{} for _ in range(group.tp)]
        for name in sorted(params):
            p = params[name]
            if not p.requires_grad:
                continue
            if kind == "weight":
                t = param_value(optimizer, p)
            else:
                t = p.grad if p.grad is not None else torch.zeros_like(p)
            got = _gather(group, t)
            if got is not None:
                for r, g in enumerate(got):
                    per_rank[r][name] = g
        if group.rank == 0:
            tensors, spread = canon(spec_idx, per_rank, kind)
            for name, t in tensors.items():
                yield name, t, spread.get(name)


def _compare_grads(group, model, canon, hf: _HFSide | None, tol: float) -> dict | None:
    """Gradient errors; also records which elements have a gradient above ``tol`` x the tensor's
    largest (the others are rounding noise around an exact zero, e.g. the non-rotary half of a
    key bias, which softmax ignores: Adam would turn that noise into full-size steps, so the
    update check skips those elements)."""
    worst_rel, worst_name, worst_spread, worst_spread_name = 0.0, None, 0.0, None
    missing, seen, count = [], set(), 0
    for name, g, spread in _walk(group, model, canon, "grad"):
        seen.add(name)
        ref = hf.grads.get(name)
        pair = None if ref is None else _overlap(name, g.double(), ref.detach().cpu().double())
        if pair is None:
            missing.append(name)
            continue
        count += 1
        a, b = pair
        scale = _maxabs(b)
        rel = _rel(_maxabs(a - b), scale)
        mask = b.abs() > tol * scale
        hf.determined[name] = mask if name not in hf.determined else hf.determined[name] & mask
        if rel > worst_rel or worst_name is None:
            worst_rel, worst_name = rel, name
        if spread is not None and (spread > worst_spread or worst_spread_name is None):
            worst_spread, worst_spread_name = spread, name
    if group.rank != 0:
        return None
    return {"grad_max_rel_err": worst_rel, "grad_worst_tensor": worst_name, "replica_max_rel_spread": worst_spread,
            "replica_worst_tensor": worst_spread_name, "tensors_compared": count, "neox_only": missing, "seen": seen}


def _compare_weights(group, model, canon, hf: _HFSide | None, tol: float, eps: float, optimizer) -> dict | None:
    worst_rel, worst_name, failing, count, skipped = 0.0, None, [], 0, 0
    now = hf.weights() if hf is not None else {}
    for name, w, _ in _walk(group, model, canon, "weight", optimizer):
        if name not in now or name not in hf.w0:
            continue
        pair = _overlap(name, w.double(), now[name].detach().cpu().double())
        if pair is None:
            continue
        a, b = pair
        b0 = hf.w0[name].detach().cpu().double()[: b.shape[0]]
        upd = _maxabs(b - b0)
        mask = hf.determined.get(name)
        if mask is not None and mask.shape == a.shape:
            skipped += int((~mask).sum())
            a, b = a[mask], b[mask]
        # what exceeds a few ulps of the weights themselves, relative to the size of the update
        excess = max(_maxabs(a - b) - 4 * eps * _maxabs(b), 0.0)
        rel = _rel(excess, upd)
        count += 1
        if not rel <= tol:
            failing.append(name)
        if rel > worst_rel or worst_name is None:
            worst_rel, worst_name = rel, name
    if group.rank != 0:
        return None
    return {"update_max_rel_err": worst_rel, "update_worst_tensor": worst_name, "update_failing": failing,
            "tensors_compared": count, "update_elements_skipped": skipped}


# --------------------------------------------------------------------------------------------
# One rank's whole run
# --------------------------------------------------------------------------------------------


def _declared_qkv_layout(opts: TrainCheckOptions, files, rank: int) -> str:
    """The converter's rule (neox_files.qkv_layout_for): legacy names + GQA = fake-head."""
    from ..formats.neox_files import detect_schema, qkv_layout_for

    a = files.args
    if "num_attention_heads" not in a:
        raise NeoxconvError(f"{files.tag_dir}: num_attention_heads is unknown: no NeoX YAML in configs/; pass --config FILE")
    heads = int(a["num_attention_heads"])
    kv = int(a.get("num_kv_heads") or heads)
    schema = detect_schema(set(files.rank_state(2, rank)), str(files.file_for(2, rank)))
    return qkv_layout_for(heads, kv, schema, declared=opts.qkv_layout, recorded=_sidecar(files).get("qkv_layout"),
                          where=files.tag_dir)


def _rank_main(group: DistributedGroup, opts: TrainCheckOptions) -> dict:
    """Run the check on this rank. Returns the full report on rank 0, ``{"verdict": ...}`` elsewhere."""
    from ..formats.neox_files import open_neox
    from ..io import set_trust_pickle

    t0 = time.perf_counter()
    set_trust_pickle(opts.trust_pickle)
    rank, tp = group.rank, group.tp
    dtype = opts.torch_dtype
    tol = TOLERANCES[canonical_dtype(dtype)]

    def load():
        files = open_neox(Path(opts.ckpt), list(opts.config_files) or None, ranks=(rank,))
        if files.tp != tp:
            raise NeoxconvError(f"{files.tag_dir}: the checkpoint has TP={files.tp} but {tp} processes were started "
                                f"(train-check runs one process per TP rank: use --nproc-per-node {files.tp})")
        source = LocalShards(files, (rank,), _declared_qkv_layout(opts, files, rank))
        model = NeoxTrainModel(source, group=group, dtype=dtype)
        return files, source, model

    files, source, model = _agreed(group, load)
    layout = [(i, n, tuple(p.shape)) for i, _, n, p in model.named_rank_params()]
    layouts: list = [None] * tp
    dist.all_gather_object(layouts, layout, group=group.pg)
    for r, other in enumerate(layouts):
        if other != layouts[0]:
            bad = sorted(set(other) ^ set(layouts[0]))[:1]
            raise _AgreedError(f"{files.tag_dir}: TP rank {r} holds different tensors than rank 0 (e.g. {bad})")

    hf: _HFSide | None = None

    def prepare():
        nonlocal hf
        hf = _HFSide(opts, files, model, group.device)
        return hf.plan

    try:
        plan = _agreed_root(group, prepare)
        layer_keys = set(model.rank_state(2, rank)) if model.num_layers else set()
        canon = _Canonicaliser(model, layer_keys) if rank == 0 else None
        limit = plan["softmax_vocab"] if plan["softmax_vocab"] < plan["padded_vocab"] else None
        optimizer = make_optimizer(model, opts.optimizer, opts.lr, opts.weight_decay, opts.partial_bias_step)
        steps: list[dict] = []
        frozen: list[str] = []
        neox_only: set[str] = set()
        for step in range(1, opts.steps + 1):
            tokens = make_batch(plan["real_vocab"], opts.batch, opts.tokens, opts.seed + step - 1)
            optimizer.zero_grad(set_to_none=True)
            losses = model.lm_loss(tokens, vocab_limit=limit)
            sum(losses).backward()
            loss_hf = hf.forward_backward(tokens) if rank == 0 else None
            cmp = _compare_grads(group, model, canon, hf, tol["grad_rel"])
            if rank == 0:
                if step == 1:
                    frozen = hf.freeze_unmatched(cmp.pop("seen"))
                else:
                    cmp.pop("seen")
                neox_only.update(cmp.pop("neox_only"))
                loss_neox = float(losses[0].item())
                steps.append({"step": step, "loss_neox": loss_neox, "loss_hf": loss_hf,
                              "loss_abs_diff": abs(loss_neox - loss_hf), **cmp})
            optimizer.step()
            if rank == 0:
                hf.step()
        # weights are compared in fp32 (the masters, in mixed precision): eps is fp32's
        update = _compare_weights(group, model, canon, hf, tol["update_rel"], torch.finfo(torch.float32).eps,
                                  optimizer)
        report = None
        if rank == 0:
            report = _report(opts, files, plan, group, steps, update, sorted(neox_only), frozen, tol)
        verdict = _broadcast(group, report["verdict"] if rank == 0 else None)
        saved = None
        if opts.save is not None and verdict == "pass":
            saved = _save(group, opts, files, source, model, optimizer)
        if rank != 0:
            return {"verdict": verdict}
        report["saved"] = str(saved) if saved else None
        if opts.save is not None and saved is None:
            report["save_skipped"] = "the check failed, so nothing was written"
        report["elapsed_s"] = round(time.perf_counter() - t0, 3)
        return report
    finally:
        if hf is not None:
            hf.cleanup()


def _report(opts, files, plan, group, steps, update, neox_only, frozen, tol) -> dict:
    loss_max = max(s["loss_abs_diff"] for s in steps)
    worst_grad = max(steps, key=lambda s: s["grad_max_rel_err"])
    worst_spread = max(steps, key=lambda s: s["replica_max_rel_spread"])
    failures = []
    if not loss_max <= tol["loss_abs"]:
        failures.append(f"loss |Δ| {loss_max:.3g} > {tol['loss_abs']:g}")
    if not worst_grad["grad_max_rel_err"] <= tol["grad_rel"]:
        failures.append(f"gradient relative error {worst_grad['grad_max_rel_err']:.3g} > {tol['grad_rel']:g} "
                        f"({worst_grad['grad_worst_tensor']}, step {worst_grad['step']})")
    if not worst_spread["replica_max_rel_spread"] <= tol["grad_rel"]:
        failures.append(f"replicated gradient differs between ranks by {worst_spread['replica_max_rel_spread']:.3g} "
                        f"({worst_spread['replica_worst_tensor']})")
    if update["update_failing"]:
        failures.append(f"weights after the steps differ from HF's by {update['update_max_rel_err']:.3g} x the HF "
                        f"update ({update['update_worst_tensor']}; {len(update['update_failing'])} tensor(s) > "
                        f"{tol['update_rel']:g})")
    if neox_only:
        failures.append(f"{len(neox_only)} NeoX tensor(s) without a matching HF tensor (missing, or of another "
                        f"shape; e.g. {neox_only[0]})")
    return {
        "command": "train-check",
        "checkpoint": str(files.tag_dir),
        "layout": files.layout,
        "tp": files.tp,
        "world_size": group.tp,
        "backend": dist.get_backend(group.pg),
        "device": opts.device,
        "dtype": canonical_dtype(opts.dtype),
        "optimizer": opts.optimizer,
        "lr": opts.lr,
        "weight_decay": opts.weight_decay,
        "steps": opts.steps,
        "batch": opts.batch,
        "tokens": opts.tokens,
        "seed": opts.seed,
        **plan,
        "per_step": steps,
        "loss_max_abs_diff": loss_max,
        "grad_max_rel_err": worst_grad["grad_max_rel_err"],
        "grad_worst": {"tensor": worst_grad["grad_worst_tensor"], "step": worst_grad["step"]},
        "replica_max_rel_spread": worst_spread["replica_max_rel_spread"],
        "update_max_rel_err": update["update_max_rel_err"],
        "update_worst_tensor": update["update_worst_tensor"],
        "update_failing": update["update_failing"],
        "update_elements_skipped": update["update_elements_skipped"],
        "neox_only_tensors": neox_only,
        "hf_frozen_parameters": frozen,
        "tolerances": dict(tol),
        "verdict": "fail" if failures else "pass",
        "failures": failures,
    }


def _save(group: DistributedGroup, opts: TrainCheckOptions, files, source, model, optimizer) -> Path:
    out = Path(opts.save)
    iteration = files.iteration + opts.steps
    tag = f"global_step{iteration}"

    def make_tmp():
        if out.exists():
            raise NeoxconvError(f"--save {out}: already exists")
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
        (tmp / tag).mkdir()
        return str(tmp)

    tmp = Path(_agreed_root(group, make_tmp))
    try:
        _agreed(group, lambda: write_rank_shards(model, source, tmp / tag, iteration, optimizer))

        def finish():
            from neoxconv.manifest import write_manifest

            write_shared_files(files, tmp, tag, iteration, opts.config_files)
            write_manifest(tmp)  # like every output neoxconv writes (`neoxconv verify` checks it)
            tmp.rename(out)

        _agreed_root(group, finish)
    except BaseException:
        if group.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------


def _device_group(group: DistributedGroup, device: str) -> DistributedGroup:
    if device == "cuda":
        torch.cuda.set_device(group.rank % torch.cuda.device_count())
        return DistributedGroup(group.pg, device=torch.device("cuda", torch.cuda.current_device()))
    return group


def _spawn_entry(group: DistributedGroup, jobs: list[TrainCheckOptions]) -> list[dict]:
    """Body of each spawned process: run the jobs one after the other in one process group."""
    group = _device_group(group, jobs[0].device)
    results = []
    for job in jobs:
        try:
            results.append(_rank_main(group, job))
        except _AgreedError as e:  # every rank stops this job the same way: go on with the next
            results.append({"error": str(e), "exit_code": e.exit_code})
        except NeoxconvError as e:
            raise RuntimeError(f"[neoxconv-error {e.exit_code}] {e}") from None
    return results


def checkpoint_tp(ckpt: Path) -> int:
    """TP degree from the file names alone (no tensor is read)."""
    from ..formats.neox_files import LAYER_FILE, MP_FILE, resolve_tag_dir

    tag_dir = resolve_tag_dir(Path(ckpt))
    names = [p.name for p in tag_dir.iterdir()]
    ranks = {int(m[2]) for n in names if (m := LAYER_FILE.match(n))}
    if not ranks:
        ranks = {int(m[1]) for n in names if (m := MP_FILE.match(n))}
    return len(ranks)


def run_train_checks(jobs: list[TrainCheckOptions]) -> list[dict]:
    """Several checks of checkpoints with the same TP in one set of local processes (world size
    = TP). Returns one report per job (``{"error", "exit_code"}`` for a job stopped by bad input)."""
    if not jobs:
        return []
    for job in jobs:
        job.validate()
    tps = {checkpoint_tp(j.ckpt) for j in jobs}
    devices = {j.device for j in jobs}
    if len(tps) != 1 or len(devices) != 1:
        raise NeoxconvError(f"jobs in one launch need one TP degree and one device (got TP {sorted(tps)}, {sorted(devices)})")
    tp, device = tps.pop(), devices.pop()
    if device == "cuda" and torch.cuda.device_count() < tp:
        raise NeoxconvError(f"TP={tp} needs {tp} GPUs on this machine, found {torch.cuda.device_count()} "
                            "(use torchrun across nodes, see docs/training.md)")
    try:
        results = run_distributed(_spawn_entry, tp, list(jobs), backend="nccl" if device == "cuda" else "gloo",
                                  timeout=LAUNCH_TIMEOUT_S)
    except RuntimeError as e:
        m = _ERROR_MARK.search(str(e))
        if m:
            raise _AgreedError(m[2], int(m[1])) from None
        raise
    return results[0]


def run_train_check(opts: TrainCheckOptions) -> dict:
    """One check in local processes; raises NeoxconvError on bad input."""
    (result,) = run_train_checks([opts])
    if "error" in result:
        raise _AgreedError(result["error"], result["exit_code"])
    return result


def under_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


@contextlib.contextmanager
def torchrun_group(opts: TrainCheckOptions) -> Iterator[DistributedGroup]:
    """The process group of a ``torchrun`` launch (initialised here if needed, and then destroyed)."""
    backend = "nccl" if opts.device == "cuda" else "gloo"
    created = False
    if not dist.is_initialized():
        if opts.device == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
        created = True
    elif dist.get_backend() != backend:
        raise NeoxconvError(f"the existing process group uses {dist.get_backend()}, but --device {opts.device} "
                            f"needs {backend}")
    try:
        device = torch.device("cuda", torch.cuda.current_device()) if opts.device == "cuda" else torch.device("cpu")
        yield DistributedGroup(device=device)
    finally:
        if created:
            dist.destroy_process_group()


def run_under_torchrun(opts: TrainCheckOptions) -> dict:
    """The check in the process group of a ``torchrun`` launch."""
    with torchrun_group(opts) as group:
        return _rank_main(group, opts)


# --------------------------------------------------------------------------------------------
# Command line glue
# --------------------------------------------------------------------------------------------


def render(report: dict, console) -> None:
    from rich.table import Table

    ok = report["verdict"] == "pass"
    title = (f"train-check {'PASS' if ok else 'FAIL'}: {report['family']} TP={report['tp']} {report['layout']}, "
             f"{report['steps']} step(s) {report['optimizer']} lr={report['lr']:g}, {report['dtype']} on "
             f"{report['device']} ({report['backend']}), HF {report['hf_source']}")
    table = Table(title=title, title_justify="left")
    for col in ("step", "loss NeoX", "loss HF", "|Δ|", "grad rel err", "worst tensor", "replica spread"):
        table.add_column(col, justify="left" if col == "worst tensor" else "right")
    for s in report["per_step"]:
        table.add_row(str(s["step"]), f"{s['loss_neox']:.7f}", f"{s['loss_hf']:.7f}", f"{s['loss_abs_diff']:.2e}",
                      f"{s['grad_max_rel_err']:.2e}", str(s["grad_worst_tensor"]), f"{s['replica_max_rel_spread']:.2e}")
    console.print(table)
    tol = report["tolerances"]
    console.print(f"update rel err {report['update_max_rel_err']:.2e} ({report['update_worst_tensor']}); "
                  f"tolerances: loss |Δ| <= {tol['loss_abs']:g}, grad rel <= {tol['grad_rel']:g}, "
                  f"update rel <= {tol['update_rel']:g}", highlight=False)
    for f in report["failures"]:
        console.print(f"[red]fail:[/red] {f}", highlight=False)
    if report.get("saved"):
        console.print(f"[green]saved[/green] {report['saved']}", highlight=False)


def _emit(report: dict, json_path: Path | None, console) -> None:
    text = json.dumps(report, indent=2, default=str)
    if json_path is not None and str(json_path) == "-":
        print(text)
    elif json_path is not None:
        Path(json_path).write_text(text + "\n")
    render(report, console)


def cli_main(opts: TrainCheckOptions, json_path: Path | None, console) -> None:
    """``neoxconv train-check``: launch (or join torchrun), print, write JSON, exit 0/1/2.

    Under torchrun every rank exits with the same code (0 pass, 1 fail, 2 bad input), and only
    after rank 0 has printed: torchrun stops the other ranks as soon as one exits non-zero."""
    opts.validate()
    if not under_torchrun():
        report = run_train_check(opts)
        _emit(report, json_path, console)
        if report["verdict"] != "pass":
            raise ParityFailure("train-check failed: " + "; ".join(report["failures"]))
        return
    from rich.console import Console

    with torchrun_group(opts) as group:
        try:
            report = _rank_main(group, opts)
        except _AgreedError as e:
            if group.rank == 0:
                Console(stderr=True).print(f"[red]error:[/red] {e}", highlight=False, soft_wrap=True)
            dist.barrier(group=group.pg)
            raise SystemExit(e.exit_code) from None
        if group.rank == 0:
            _emit(report, json_path, console)
            if report["verdict"] != "pass":
                Console(stderr=True).print(f"[red]error:[/red] train-check failed: {'; '.join(report['failures'])}",
                                           highlight=False, soft_wrap=True)
        dist.barrier(group=group.pg)
    raise SystemExit(0 if report["verdict"] == "pass" else 1)
