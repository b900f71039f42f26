"""Tensor-parallel training on NeoX per-rank tensors: TP layers, vocab-parallel loss, optimizer, save.

The model is the reference forward of :mod:`.neox_forward` (NeoX semantics on the stored per-rank
tensors, no converter code), held as trainable parameters, with two changes at the output end:
logits stay **vocab-parallel** (each rank computes only its slice of the vocabulary) and go
straight into a vocab-parallel cross-entropy, as in NeoX/Megatron. Nothing here gathers the
full vocabulary.

TP building blocks (each takes one tensor per *local* rank, see :mod:`.ranks`; with
:class:`.DistributedGroup` that is one tensor per process):

* :func:`column_parallel_linear` -- ``copy_to_ranks`` (identity forward, all-reduce backward),
  then the rank's row slice of the weight (Megatron ``ColumnParallelLinear``, no gather).
* :func:`row_parallel_linear` -- the rank's column slice, then ``all_reduce_sum`` (all-reduce
  forward, identity backward); the bias is added after the reduce (sequential residual) or,
  with ``bias_before_reduce``, by every rank before it (NeoX ``gpt_j_residual``: the effective
  bias is the sum of the rank copies, neox-formats.md §3.1, T5).
* :func:`vocab_parallel_embedding` -- rows ``[r·V/p, (r+1)·V/p)`` on rank r, others zero, summed.
* :func:`vocab_parallel_cross_entropy` -- three all-reduces: max (for stability), sum of exp,
  target logit; the loss is ``log Σ exp(z - m) - (z_t - m)``, replicated on every rank.

The transformer layers themselves are :func:`.neox_layers.layer`, which composes exactly these
pairs (and NeoX's reduce-after-bias under a parallel residual), so parity checks and training
run one code path.

**Padded vocabulary rows** (T11): targets are real tokens only (the batch is drawn from the
real vocabulary), but the padded rows' logits *do* take part in the softmax, exactly as in
NeoX's own loss and in an HF export that keeps the padded rows (``neox-to-hf`` does by default).
When the model to compare with has fewer rows (an export with ``--trim-vocab-padding``),
``vocab_limit`` masks the logits of rows ``>= vocab_limit`` to ``-inf`` so both sides take the
softmax over the same columns; those rows then get no gradient.

**Parameters stored as p additive parts.** Under ``gpt_j_residual`` each rank's copy of the
row-parallel biases (``attention.dense.bias``, MLP output bias) is one of p parts whose *sum*
is the model's bias; every part receives the full gradient of that bias. NeoX applies the
optimizer to each part as if it were the whole bias, so its effective step on the bias is p
times larger (the TP-dependence behind gpt-neox issue #962). :func:`make_optimizer` steps the
*logical* bias instead: the parts get ``lr / p`` and ``weight_decay · p``, which for SGD and
AdamW (whose states are identical on every rank, since the gradients are) makes the summed
update exactly the single-device update an HF model takes.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..errors import NeoxconvError
from .neox_checkpoint import NeoxCheckpoint
from .neox_forward import spec_indices
from .neox_layers import IGNORED_SUFFIXES, ReferenceOptions, check_keys, final_norm, layer, make_run
from .neox_model import NeoxReferenceModel
from .ranks import DistributedGroup, RankGroup, SimulatedGroup

__all__ = [
    "PARTIAL_SUM_BIASES",
    "NeoxTrainModel",
    "all_reduce_max",
    "column_parallel_linear",
    "MixedPrecisionOptimizer",
    "build_optimizer",
    "make_optimizer",
    "param_value",
    "row_parallel_linear",
    "vocab_parallel_cross_entropy",
    "vocab_parallel_embedding",
    "write_rank_shards",
    "write_shared_files",
]

#: row-parallel biases; under gpt_j_residual every rank stores one additive part of them (T5)
PARTIAL_SUM_BIASES = ("attention.dense.bias", "mlp.linear2.bias", "mlp.dense_4h_to_h.bias")


# --------------------------------------------------------------------------------------------
# Collectives without autograd, and the TP layers
# --------------------------------------------------------------------------------------------


def all_reduce_max(group: RankGroup, parts: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Elementwise max over all ranks, no autograd (used only where the value cancels out)."""
    parts = [p.detach() for p in parts]
    if isinstance(group, SimulatedGroup):
        m = torch.stack(parts).amax(0)
        return [m for _ in parts]
    if isinstance(group, DistributedGroup):
        (p,) = parts
        m = p.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group.pg)
        return [m]
    raise TypeError(f"unsupported rank group {group!r}")


def column_parallel_linear(
    group: RankGroup,
    xs: Sequence[torch.Tensor],
    weights: Sequence[torch.Tensor],
    biases: Sequence[torch.Tensor | None] | None = None,
) -> list[torch.Tensor]:
    """Megatron ColumnParallelLinear without the output gather: rank r returns ``x W_r^T + b_r``."""
    biases = biases or [None] * len(weights)
    return [F.linear(x, w, b) for x, w, b in zip(group.copy_to_ranks(xs), weights, biases)]


def row_parallel_linear(
    group: RankGroup,
    xs: Sequence[torch.Tensor],
    weights: Sequence[torch.Tensor],
    biases: Sequence[torch.Tensor | None] | None = None,
    *,
    bias_before_reduce: bool = False,
) -> list[torch.Tensor]:
    """Megatron RowParallelLinear on an already-split input: ``Σ_r x_r W_r^T`` (+ bias).

    ``bias_before_reduce=False``: the reduce comes first and every rank adds its own (equal)
    bias copy once. ``True``: every rank adds its part before the reduce (NeoX gpt_j_residual),
    so the effective bias is the sum of the parts."""
    biases = biases or [None] * len(weights)
    parts = [F.linear(x, w) for x, w in zip(xs, weights)]
    if bias_before_reduce:
        parts = [p if b is None else p + b for p, b in zip(parts, biases)]
        return group.all_reduce_sum(parts)
    return [y if b is None else y + b for y, b in zip(group.all_reduce_sum(parts), biases)]


def vocab_parallel_embedding(group: RankGroup, tokens: torch.Tensor, weights: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Rank r looks up the tokens of its row range ``[r·rows, (r+1)·rows)``, zeros elsewhere; summed."""
    parts = []
    for r, w in zip(group.local_ranks, weights):
        rows = w.shape[0]
        local = tokens - r * rows
        inside = (local >= 0) & (local < rows)
        parts.append(F.embedding(local.clamp(0, rows - 1), w) * inside.unsqueeze(-1).to(w.dtype))
    return group.all_reduce_sum(parts)


def vocab_parallel_cross_entropy(
    group: RankGroup,
    local_logits: Sequence[torch.Tensor],
    targets: torch.Tensor,
    vocab_limit: int | None = None,
) -> list[torch.Tensor]:
    """Mean cross-entropy of vocab-parallel logits, one (identical) replica per local rank.

    ``local_logits[i]``: [..., V/p] of local rank ``group.local_ranks[i]`` (columns
    ``[r·V/p, (r+1)·V/p)``); ``targets``: [...] global token ids (< ``vocab_limit``). Computed in
    fp32. Columns ``>= vocab_limit`` are excluded from the softmax (see the module docs).
    Gradients: each rank's slice gets ``softmax - onehot`` for its columns, through autograd over
    the all-reduce pairs (no full-vocabulary tensor is ever formed)."""
    zs, starts = [], []
    for r, z in zip(group.local_ranks, local_logits):
        z = z.float()
        width = z.shape[-1]
        start = r * width
        if vocab_limit is not None and start + width > vocab_limit:
            cols = torch.arange(start, start + width, device=z.device)
            z = z.masked_fill(cols >= vocab_limit, float("-inf"))
        zs.append(z)
        starts.append(start)
    maxes = all_reduce_max(group, [z.amax(-1) for z in zs])
    shifted = [z - m.unsqueeze(-1) for z, m in zip(zs, maxes)]
    sum_exp = group.all_reduce_sum([s.exp().sum(-1) for s in shifted])
    picked = []
    for s, start in zip(shifted, starts):
        width = s.shape[-1]
        local = targets.to(s.device) - start
        inside = (local >= 0) & (local < width)
        value = s.gather(-1, local.clamp(0, width - 1).unsqueeze(-1)).squeeze(-1)
        picked.append(torch.where(inside, value, torch.zeros_like(value)))
    target_logit = group.all_reduce_sum(picked)
    return [(torch.log(se) - t).mean() for se, t in zip(sum_exp, target_logit)]


# --------------------------------------------------------------------------------------------
# The trainable model (its source: a NeoxCheckpoint opened with ranks=(this rank,))
# --------------------------------------------------------------------------------------------


class NeoxTrainModel(NeoxReferenceModel):
    """The reference model with trainable per-rank parameters and a vocab-parallel LM loss."""

    def __init__(self, source, *, group: RankGroup, dtype: torch.dtype | None = None,
                 options: ReferenceOptions | None = None):
        super().__init__(source, group=group, dtype=dtype, requires_grad=True, options=options)
        for spec_idx in self.spec_idx:
            for r in self.group.local_ranks:
                for name, p in self.rank_state(spec_idx, r).items():
                    if name.endswith(IGNORED_SUFFIXES):
                        p.requires_grad_(False)  # buffers (inv_freq) are stored, never trained

    # -- forward ------------------------------------------------------------------------------
    def local_logits(self, tokens: torch.Tensor) -> list[torch.Tensor]:
        """Vocab-parallel logits: per local rank [b, s, V_pad/p] (this rank's vocabulary slice)."""
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be [batch, seq], got shape {tuple(tokens.shape)}")
        group, sem = self.group, self.semantics
        idx = spec_indices(self.num_layers, sem.tied_embeddings)
        tokens = tokens.to(group.device)
        emb_w = [st["word_embeddings.weight"] for st in self.local_states(idx["embed"])]
        run = make_run(group, sem, tokens.shape[1], emb_w[0].shape[1], self.dtype or emb_w[0].dtype, self.options,
                       self.num_layers)
        xs = vocab_parallel_embedding(group, tokens, emb_w)
        for i, spec_idx in enumerate(idx["layers"]):
            states = self.local_states(spec_idx)
            check_keys(states, spec_idx)
            xs = layer(run, xs, states, i)
        normed = final_norm(run, xs, self.local_states(idx["final_norm"]))
        name = "word_embeddings.weight" if sem.tied_embeddings else "final_linear.weight"
        return column_parallel_linear(group, normed, [st[name] for st in self.local_states(idx["head"])])

    def lm_loss(self, tokens: torch.Tensor, vocab_limit: int | None = None) -> list[torch.Tensor]:
        """Next-token loss (mean over ``b·(s-1)`` positions), one replica per local rank.

        Backward with ``sum(losses).backward()``: each rank starts from its own replica, the
        Megatron convention (identical replicated loss on every TP rank)."""
        logits = [z[:, :-1] for z in self.local_logits(tokens)]
        targets = tokens[:, 1:].to(self.group.device)
        return vocab_parallel_cross_entropy(self.group, logits, targets, vocab_limit)

    # -- parameters ---------------------------------------------------------------------------
    def named_rank_params(self) -> Iterator[tuple[int, int, str, torch.nn.Parameter]]:
        """(spec index, rank, NeoX name, parameter) for every local parameter, in a fixed order."""
        for spec_idx in self.spec_idx:
            for r in self.group.local_ranks:
                for name, p in sorted(self.rank_state(spec_idx, r).items()):
                    yield spec_idx, r, name, p

    def partial_sum_params(self) -> list[torch.nn.Parameter]:
        """Parameters stored as one of p additive parts (row biases under gpt_j_residual)."""
        if not self.semantics.gpt_j_residual:
            return []
        return [p for _, _, name, p in self.named_rank_params() if name in PARTIAL_SUM_BIASES]


def make_optimizer(model: NeoxTrainModel, name: str, lr: float, weight_decay: float = 0.0,
                   partial_step: str = "logical"):
    """SGD or AdamW (torch defaults otherwise) over the trainable local parameters.

    ``partial_step="logical"``: additive parts of a parameter
    (:meth:`NeoxTrainModel.partial_sum_params`) get ``lr / p`` and ``weight_decay · p``, so the
    summed parameter takes the single-device step (module docs). ``"neox"``: every part is stepped
    like a whole parameter, as NeoX does (the summed bias moves p times as far).
    Low-precision parameters get fp32 master weights (:class:`MixedPrecisionOptimizer`)."""
    if partial_step not in ("logical", "neox"):
        raise ValueError(f"partial_step must be 'logical' or 'neox', got {partial_step!r}")
    tp = model.group.tp
    partial = {id(p) for p in model.partial_sum_params()} if partial_step == "logical" else set()
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if id(p) not in partial]}]
    parts = [p for p in params if id(p) in partial]
    if parts:
        groups.append({"params": parts, "lr": lr / tp, "weight_decay": weight_decay * tp})
    return build_optimizer(name, groups, lr, weight_decay)


def _torch_optimizer(name: str, groups, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)
    raise NeoxconvError(f"unknown optimizer {name!r} (use sgd or adamw)")


def build_optimizer(name: str, params, lr: float, weight_decay: float):
    """The same optimizer class and hyper-parameters for both sides of a check: ``torch.optim``
    SGD/AdamW, wrapped in :class:`MixedPrecisionOptimizer` when any parameter is not fp32."""
    groups = list(params)
    if groups and not isinstance(groups[0], dict):
        groups = [{"params": groups}]
    if any(p.dtype != torch.float32 for g in groups for p in g["params"]):
        return MixedPrecisionOptimizer(groups, lambda gs: _torch_optimizer(name, gs, lr, weight_decay))
    return _torch_optimizer(name, groups, lr, weight_decay)


class MixedPrecisionOptimizer:
    """A torch optimizer over fp32 **master copies** of low-precision (fp16/bf16) parameters, the
    way NeoX/DeepSpeed mixed-precision training keeps them: gradients are upcast, the step runs in
    fp32 (pure fp16 AdamW would underflow: its eps 1e-8 is 0 in fp16), and the model parameters
    receive the rounded result. No loss scaling. :meth:`value` gives the fp32 master of a parameter."""

    def __init__(self, groups: list[dict], build):
        self._pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._masters: dict[int, torch.Tensor] = {}
        master_groups = []
        for g in groups:
            masters = []
            for p in g["params"]:
                m = p.detach().to(torch.float32).clone().requires_grad_(True)
                self._pairs.append((p, m))
                self._masters[id(p)] = m
                masters.append(m)
            master_groups.append({**g, "params": masters})
        self.optimizer = build(master_groups)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p, m in self._pairs:
            p.grad = None
            m.grad = None

    def step(self) -> None:
        for p, m in self._pairs:
            m.grad = None if p.grad is None else p.grad.detach().to(torch.float32)
        self.optimizer.step()
        with torch.no_grad():
            for p, m in self._pairs:
                p.copy_(m)

    def value(self, p: torch.Tensor) -> torch.Tensor:
        return self._masters.get(id(p), p)


def param_value(optimizer, p: torch.Tensor) -> torch.Tensor:
    """The authoritative value of a parameter: its fp32 master if it has one, else itself."""
    return optimizer.value(p) if isinstance(optimizer, MixedPrecisionOptimizer) else p


# --------------------------------------------------------------------------------------------
# Writing the updated weights back as a NeoX checkpoint (same TP, same layout)
# --------------------------------------------------------------------------------------------


def _stored(model: NeoxTrainModel, source: NeoxCheckpoint, spec_idx: int, rank: int,
            optimizer) -> dict[str, torch.Tensor]:
    from ..io import owned

    out = {}
    for name, p in model.rank_state(spec_idx, rank).items():
        dtype = source.stored_dtypes.get((spec_idx, rank, name), p.dtype)
        out[name] = owned(param_value(optimizer, p).detach().to(device="cpu", dtype=dtype))
    return out


def _mp_state(state: dict, module, iteration: int) -> dict:
    """A source mp_rank dict carried over: new module and step counters, no optimizer state
    (train-check does not save it; a NeoX run loads the result with ``finetune: true``)."""
    state = dict(state)
    state["module"] = module
    state["optimizer"] = None
    for key in ("iteration", "global_steps"):
        state[key] = iteration
    return state


def write_rank_shards(model: NeoxTrainModel, source: NeoxCheckpoint, tag_dir: Path, iteration: int,
                      optimizer=None) -> list[Path]:
    """Write this process's ranks' files into ``tag_dir``: ``layer_XX-model_RR`` files (pipeline)
    or its ``mp_rank_RR`` file (sequential, the source's dict with the new module). Tensors (fp32
    masters where ``optimizer`` keeps them) are cast back to their stored dtypes."""
    from ..io import load_pickle, save_pickle

    files = source.files
    written = []
    for r in model.group.local_ranks:
        if files.layout == "pipeline":
            for spec_idx in model.spec_idx:
                path = tag_dir / f"layer_{spec_idx:02d}-model_{r:02d}-model_states.pt"
                save_pickle(_stored(model, source, spec_idx, r, optimizer), path)
                written.append(path)
        else:
            src = files.file_for(0, r)
            state = load_pickle(src)
            module = dict(state["module"])
            for spec_idx in model.spec_idx:
                for name, t in _stored(model, source, spec_idx, r, optimizer).items():
                    module[f"sequential.{spec_idx}.{name}"] = t
            path = tag_dir / src.name
            save_pickle(_mp_state(state, module, iteration), path)
            written.append(path)
    return written


def write_shared_files(files, out_root: Path, tag: str, iteration: int, config_files: Sequence[Path] = ()) -> None:
    """Rank 0's part of a save: ``latest``, the pipeline layout's ``mp_rank`` files (module=None,
    PP×TP of them as in the source), and every other non-weight file of the source tag directory
    (``configs/``, the neoxconv sidecar, a tokenizer copy). Optimizer shards are not carried.
    Explicit ``config_files`` (``--config``) replace the source's ``configs/`` folder."""
    from ..formats.neox_files import LAYER_FILE, MP_FILE
    from ..io import load_pickle, save_pickle

    src_dir = Path(files.tag_dir)
    tag_dir = out_root / tag
    for p in sorted(src_dir.iterdir()):
        if LAYER_FILE.match(p.name) or p.name.endswith("optim_states.pt"):
            continue
        if config_files and p.name == "configs":
            continue
        if MP_FILE.match(p.name):
            if files.layout == "pipeline":
                save_pickle(_mp_state(load_pickle(p), None, iteration), tag_dir / p.name)
            continue
        if p.is_dir():
            shutil.copytree(p, tag_dir / p.name, dirs_exist_ok=True)
        else:
            shutil.copy2(p, tag_dir / p.name)
    if config_files:
        configs = tag_dir / "configs"
        configs.mkdir(exist_ok=True)
        for f in config_files:
            shutil.copy2(f, configs / Path(f).name)
    (out_root / "latest").write_text(tag)
