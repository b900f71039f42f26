"""Train-check comparisons on rank 0: NeoX per-rank gradients and weights gathered one spec index
at a time, put into canonical form by the converter's rules, and compared with the HF model's.

Gradient rules differ from weight rules in one place: a replicated tensor (norms; row biases,
which under gpt_j_residual are additive parts) receives the *same* gradient on every rank, so
its canonical gradient is that common value (the mean), and the spread between the rank copies is
checked too. Weights: parts summed, copies averaged (the converter's merge).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from neoxconv import archs, graph
from neoxconv.formats.neox import rank_to_layer
from neoxconv.reference.ranks import DistributedGroup
from neoxconv.reference.train import NeoxTrainModel, param_value
from neoxconv.roles import COLUMN, ROW, VOCAB, Context

from .agree import gather
from .hf_side import HFSide
from .options import TrainCheckOptions

__all__ = ["Canonicaliser", "compare_grads", "compare_weights"]

_FINAL_NORM = {"norm.weight": "final_norm.weight", "norm.bias": "final_norm.bias", "norm.scale": "final_norm.weight"}


class Canonicaliser:
    """NeoX per-rank tensors of one spec index -> canonical full tensors, by the converter's rules
    (its reading of the checkpoint: ModelSpec, name schema, QKV layout; its per-rank un-fusing and
    TP roles): the mapping under test."""

    def __init__(self, opts: TrainCheckOptions, tp: int):
        ckpt = graph.read(Path(opts.ckpt), fmt="neox", config_files=list(opts.config_files) or None,
                          qkv_layout=opts.qkv_layout)
        self.spec, self.tp = ckpt.spec, tp
        self.schema, self.layout = ckpt.info["schema"], ckpt.info["qkv_layout"]

    def __call__(self, spec_idx: int, per_rank: list[dict[str, torch.Tensor]], kind: str
                 ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """(canonical tensors, replica spread per replicated tensor [grads only])."""
        L = self.spec.layers
        if spec_idx == 0:
            return {"embed.weight": torch.cat([s["word_embeddings.weight"] for s in per_rank])}, {}
        if spec_idx == L + 4:
            return {"lm_head.weight": torch.cat([s["final_linear.weight"] for s in per_rank])}, {}
        if spec_idx == L + 3:
            pieces = [{_FINAL_NORM[k]: v for k, v in s.items() if k in _FINAL_NORM} for s in per_rank]
            prefix = ""
        else:
            pieces = [rank_to_layer(self.spec, s, self.tp, self.schema, self.layout) for s in per_rank]
            prefix = f"layers.{spec_idx - 2}."
        out, spread = {}, {}
        ctx = Context.of(self.spec)
        for leaf in pieces[0]:
            name = prefix + leaf
            parts = [p[leaf] for p in pieces]
            role = archs.role_of(name, self.spec.family)
            if role in (VOCAB, COLUMN, ROW) or kind == "weight":
                (out[name],) = role.merge(parts, ctx)
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


def _walk(group: DistributedGroup, model: NeoxTrainModel, canon: Canonicaliser | None, kind: str, optimizer=None):
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
            got = gather(group, t)
            if got is not None:
                for r, g in enumerate(got):
                    per_rank[r][name] = g
        if group.rank == 0:
            tensors, spread = canon(spec_idx, per_rank, kind)
            for name, t in tensors.items():
                yield name, t, spread.get(name)


def compare_grads(group, model, canon, hf: HFSide | None, tol: float) -> dict | None:
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


def compare_weights(group, model, canon, hf: HFSide | None, tol: float, eps: float, optimizer) -> dict | None:
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
