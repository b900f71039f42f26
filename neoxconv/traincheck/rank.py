"""One TP rank's whole train-check run: load its own shards, train, compare (rank 0), save."""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from neoxconv.errors import NeoxconvError
from neoxconv.io import set_trust_pickle
from neoxconv.reference import NeoxCheckpoint, make_batch
from neoxconv.reference.parity import canonical_dtype
from neoxconv.reference.ranks import DistributedGroup
from neoxconv.reference.train import NeoxTrainModel, make_optimizer, write_rank_shards, write_shared_files

from .agree import AgreedError, agreed, agreed_root, broadcast
from .compare import Canonicaliser, compare_grads, compare_weights
from .hf_side import HFSide
from .options import TOLERANCES, TrainCheckOptions

__all__ = ["rank_main"]


def rank_main(group: DistributedGroup, opts: TrainCheckOptions) -> dict:
    """Run the check on this rank. Returns the full report on rank 0, ``{"verdict": ...}`` elsewhere."""
    t0 = time.perf_counter()
    set_trust_pickle(opts.trust_pickle)
    rank, tp = group.rank, group.tp
    dtype = opts.torch_dtype
    tol = TOLERANCES[canonical_dtype(dtype)]

    def load():
        source = NeoxCheckpoint(Path(opts.ckpt), list(opts.config_files) or None, opts.qkv_layout, ranks=(rank,))
        if source.tp != tp:
            raise NeoxconvError(f"{source.tag_dir}: the checkpoint has TP={source.tp} but {tp} processes were started "
                                f"(train-check runs one process per TP rank: use --nproc-per-node {source.tp})")
        return source, NeoxTrainModel(source, group=group, dtype=dtype)

    source, model = agreed(group, load)
    files = source.files
    layout = [(i, n, tuple(p.shape)) for i, _, n, p in model.named_rank_params()]
    layouts: list = [None] * tp
    dist.all_gather_object(layouts, layout, group=group.pg)
    for r, other in enumerate(layouts):
        if other != layouts[0]:
            bad = sorted(set(other) ^ set(layouts[0]))[:1]
            raise AgreedError(f"{files.tag_dir}: TP rank {r} holds different tensors than rank 0 (e.g. {bad})")

    hf: HFSide | None = None

    def prepare():
        nonlocal hf
        hf = HFSide(opts, files, model, group.device)
        return hf.plan

    try:
        plan = agreed_root(group, prepare)
        canon = Canonicaliser(opts, tp) if rank == 0 else None
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
            cmp = compare_grads(group, model, canon, hf, tol["grad_rel"])
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
        update = compare_weights(group, model, canon, hf, tol["update_rel"], torch.finfo(torch.float32).eps,
                                  optimizer)
        report = None
        if rank == 0:
            report = _report(opts, files, plan, group, steps, update, sorted(neox_only), frozen, tol)
        verdict = broadcast(group, report["verdict"] if rank == 0 else None)
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

    tmp = Path(agreed_root(group, make_tmp))
    try:
        agreed(group, lambda: write_rank_shards(model, source, tmp / tag, iteration, optimizer))

        def finish():
            from neoxconv.manifest import write_manifest

            write_shared_files(files, tmp, tag, iteration, opts.config_files)
            write_manifest(tmp)  # like every output neoxconv writes (`neoxconv verify` checks it)
            tmp.rename(out)

        agreed_root(group, finish)
    except BaseException:
        if group.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
