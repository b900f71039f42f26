"""Starting ``neoxconv train-check``: local TP processes, or joining a torchrun launch; and the
command line glue (table, JSON, exit codes)."""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist

from neoxconv.errors import NeoxconvError, ParityFailure
from neoxconv.formats.neox_files import LAYER_FILE, MP_FILE, resolve_tag_dir
from neoxconv.reference.ranks import DistributedGroup, run_distributed

from .agree import AgreedError
from .options import TrainCheckOptions
from .rank import rank_main

__all__ = ["checkpoint_tp", "cli_main", "render", "run_train_check", "run_train_checks", "run_under_torchrun"]

_ERROR_MARK = re.compile(r"\[neoxconv-error (\d+)\] ([^\n]*)")
#: how long the local launcher waits for the workers' results
LAUNCH_TIMEOUT_S = 6 * 3600


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
            results.append(rank_main(group, job))
        except AgreedError as e:  # every rank stops this job the same way: go on with the next
            results.append({"error": str(e), "exit_code": e.exit_code})
        except NeoxconvError as e:
            raise RuntimeError(f"[neoxconv-error {e.exit_code}] {e}") from None
    return results


def checkpoint_tp(ckpt: Path) -> int:
    """TP degree from the file names alone (no tensor is read)."""
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
            raise AgreedError(m[2], int(m[1])) from None
        raise
    return results[0]


def run_train_check(opts: TrainCheckOptions) -> dict:
    """One check in local processes; raises NeoxconvError on bad input."""
    (result,) = run_train_checks([opts])
    if "error" in result:
        raise AgreedError(result["error"], result["exit_code"])
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
        return rank_main(group, opts)




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
            report = rank_main(group, opts)
        except AgreedError as e:
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
