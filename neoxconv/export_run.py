"""``neoxconv export-run``: every checkpoint of a GPT-NeoX training run to Hugging Face, one Hub
branch (or one local directory) per training step, incremental and resumable.

Each step is converted with the streaming converter into a temporary directory, gets a model
card with its step, tokens seen, provenance, source fingerprint (and parity result with
``--verify``), is uploaded, and is deleted before the next step: memory is bounded by the
largest layer and disk by one step's export.

Records: on the Hub, the commit that completes a step branch (its README.md goes last, see
``HubClient.push``) carries the line ``neoxconv-export-run: {"step": N, "fingerprint": "sha256:..."}``;
locally, OUT_DIR/<step>/README.md's front matter holds the same fingerprint. A step whose
record matches its source is skipped; anything else (new step, changed source, an upload that
never got its final commit) is converted and sent again. Files the Hub already has are not
re-sent by huggingface_hub, so a resumed step costs little more than its conversion.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import neoxconv
from neoxconv.errors import NeoxconvError, ParityFailure
from neoxconv.export_check import one_line
from neoxconv.progress import BYTES, GROUPS, counter
from neoxconv.run_steps import HashCache, discover_steps, fingerprint, select_steps, step_args, tokens_seen

RECORD = "neoxconv-export-run: "
_RECORD_LINE = re.compile(r"^" + re.escape(RECORD) + r"(\{.*\})\s*$", re.M)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
#: ``progress(label, done, total, unit)``, unit BYTES or GROUPS (neoxconv.progress)
PhaseProgress = Callable[[str, int, int, str], None]
MAIN_MODES = ("latest", "none")  # --main: main holds the newest exported step, or is left alone


@dataclass
class StepReport:
    step: int
    target: str  # branch (Hub) or directory name (local)
    status: str = "pending"  # uploaded | written | up to date | would upload | would write | would skip | failed
    bytes: int | None = None  # size of the export, when converted in this run
    source_bytes: int = 0
    seconds: float = 0.0
    fingerprint: str | None = None
    tokens_seen: int | None = None
    parity: str | None = None  # with --verify: the verdict and max |Δ|
    commit_url: str | None = None
    error: str | None = None
    warnings: list[str] = field(default_factory=list)


@dataclass
class RunReport:
    run_dir: str
    destination: str  # repo id or output directory
    mode: str  # "hub" | "local"
    dry_run: bool
    steps: list[StepReport] = field(default_factory=list)
    main: dict | None = None  # Hub mode with --main latest: {"status", "step", "commit_url"}

    @property
    def failed(self) -> int:
        return sum(r.status == "failed" for r in self.steps) + int(bool(self.main and self.main["status"] == "failed"))

    def to_dict(self) -> dict:
        return {**asdict(self), "failed": self.failed}


def branch_name(template: str, step: int) -> str:
    try:
        name = template.format(step=step)
    except (KeyError, IndexError, ValueError) as e:
        raise NeoxconvError(f"--branch-template {template!r}: cannot format it ({one_line(e)}); use e.g. step{{step}}") from None
    if "{step" not in template or not _NAME.match(name) or name == "main":
        raise NeoxconvError(f"--branch-template {template!r} gives {name!r}: it must contain {{step}} and give a "
                            "name of letters, digits, '.', '_' and '-' (not main)")
    return name


def record_text(step: int, fp: dict) -> str:
    """Commit description of a finished step: the machine-readable record, then the files."""
    lines = [RECORD + json.dumps({"step": step, "fingerprint": fp["digest"]}), "",
             "Source files (name, bytes, sha256):"]
    lines += [f"  {name} {f['size']} {f['sha256']}" for name, f in fp["files"].items()]
    return "\n".join(lines)


def read_record(text: str) -> dict | None:
    m = _RECORD_LINE.search(text or "")
    if not m:
        return None
    try:
        rec = json.loads(m[1])
    except ValueError:
        return None
    return rec if isinstance(rec, dict) else None


def _dir_bytes(d: Path) -> int:
    return sum(p.stat().st_size for p in Path(d).rglob("*") if p.is_file())


class _Run:
    """One export-run invocation: the loop over steps and what it shares between them."""

    def __init__(self, run_dir: Path, steps: dict[int, Path], report: RunReport, *, verify: bool,
                 say: Callable[[str], None], cache: HashCache, drop_sliding_window: bool = False,
                 progress: PhaseProgress | None = None):
        self.run_dir, self.steps, self.report, self.verify, self.say, self.cache = run_dir, steps, report, verify, say, cache
        self.drop_sliding_window = drop_sliding_window
        self.progress = progress or (lambda _label, _done, _total, _unit: None)

    def fingerprint(self, step: int) -> dict:
        return fingerprint(self.steps[step], self.cache,
                           lambda done, total: self.progress(f"step {step}: hashing the source", done, total, BYTES))

    def card_extras(self, step: int, fp: dict) -> dict:
        tokens, rule = tokens_seen(step_args(self.steps[step]), step)
        return {"run": self.run_dir.resolve().name, "iteration": step, "tokens_seen": tokens, "tokens_rule": rule,
                "source_fingerprint": fp}

    def convert(self, step: int, out: Path, extras: dict, rep: StepReport, force: bool = False) -> None:
        """Convert one step into ``out`` (atomically), card and --verify inside the temp dir."""
        from neoxconv.convert import convert
        from neoxconv.modelcard import write_model_card

        check = None
        if self.verify:
            from neoxconv.parity import verifier

            check = verifier(self.steps[step], out, to="hf", force=force,
                             progress=lambda label, done, total: self.progress(
                                 f"step {step}: parity, forward {label}", done, total, GROUPS))

        def after_write(tmp: Path, result: dict) -> None:
            if check is not None:
                self.say(f"step {step}: verifying logit parity (fp32)")
                check(tmp, result)
                parity = result["provenance"].get("parity") or {}
                rep.parity = f"{parity.get('verdict')} (max |Δ| {parity.get('max_abs_diff', float('nan')):.3g})"
            write_model_card(tmp, {**result["provenance"], **extras}, force=True)

        written = {}

        def on_plan(plan, done_files) -> None:
            written["add"] = counter(plan.data_bytes(skip=done_files),
                                     lambda done, total: self.progress(f"step {step}: converting", done, total, BYTES))

        result = convert(self.steps[step], out, to="hf", src_format="neox", force=force, after_write=after_write,
                         drop_sliding_window=self.drop_sliding_window, on_plan=on_plan,
                         progress=lambda n: written["add"](n))
        rep.warnings += result.get("warnings", [])
        rep.bytes = _dir_bytes(out)

    def each(self, selected: list[int], targets: dict[int, str], work: Callable[[int, StepReport], None]) -> None:
        for i, step in enumerate(selected, 1):
            rep = StepReport(step, targets[step])
            self.report.steps.append(rep)
            start = time.monotonic()
            self.say(f"[{i}/{len(selected)}] step {step} → {targets[step]}: fingerprinting the source")
            try:
                rep.source_bytes = _dir_bytes(self.steps[step])
                rep.tokens_seen = tokens_seen(step_args(self.steps[step]), step)[0]
                work(step, rep)
            except KeyboardInterrupt:
                raise
            except Exception as e:  # noqa: BLE001 - one step's failure is reported; the others go on
                rep.status = "failed"
                rep.error = one_line(e) if isinstance(e, NeoxconvError) else f"{type(e).__name__}: {one_line(e)}"
            finally:
                self.cache.save()
                rep.seconds = round(time.monotonic() - start, 3)
            self.say(f"step {step}: {rep.status}" + (f" ({rep.error})" if rep.error else ""))


def export_run(run_dir: str | Path, out_dir: str | Path | None = None, repo_id: str | None = None, *,
               steps: str = "all", branch_template: str = "step{step}", main: str = "latest", verify: bool = False,
               private: bool = False, token: str | None = None, endpoint: str | None = None, dry_run: bool = False,
               on_progress: Callable[[str], None] | None = None, cache: HashCache | None = None,
               drop_sliding_window: bool = False, progress: PhaseProgress | None = None) -> RunReport:
    """Export the steps of the NeoX save dir ``run_dir`` to ``out_dir`` (local) or ``repo_id`` (Hub).

    Bad input (no such run, a step that does not exist, a bad template, no token, a rejected
    token) raises NeoxconvError before any step; a step that fails is reported in its
    StepReport and the others go on. ``on_progress(message)``: a line per phase of a step;
    ``progress(label, done, total, unit)``: how far the long phases are (hashing the source and
    converting: bytes; --verify's forward passes: layer groups).
    """
    if (out_dir is None) == (repo_id is None):
        raise NeoxconvError("export-run: give either OUT_DIR or --push-to-hub REPO_ID (exactly one)")
    if main not in MAIN_MODES:
        raise NeoxconvError(f"unknown --main {main!r} (use {' or '.join(MAIN_MODES)})")
    run_dir = Path(run_dir)
    say = on_progress or (lambda _msg: None)
    available = discover_steps(run_dir)
    selected = select_steps(available, steps, run_dir)
    targets = {s: branch_name(branch_template, s) for s in selected}
    report = RunReport(str(run_dir), str(repo_id or out_dir), "hub" if repo_id else "local", dry_run)
    run = _Run(run_dir, available, report, verify=verify, say=say, cache=cache or HashCache(),
               drop_sliding_window=drop_sliding_window, progress=progress)
    if repo_id:
        _to_hub(run, selected, targets, repo_id, main=main, private=private, token=token, endpoint=endpoint,
                dry_run=dry_run)
    else:
        _to_local(run, selected, targets, Path(out_dir), dry_run)
    return report


def _to_local(run: _Run, selected: list[int], targets: dict[int, str], out_dir: Path, dry_run: bool) -> None:
    from neoxconv.modelcard import read_provenance

    def work(step: int, rep: StepReport) -> None:
        fp = run.fingerprint(step)
        rep.fingerprint = fp["digest"]
        out = out_dir / targets[step]
        if out.exists():
            prov = read_provenance(out)
            if prov is None or not isinstance(prov.get("source_fingerprint"), dict):
                raise NeoxconvError(f"{out}: exists and was not written by export-run; move it away first")
            if prov["source_fingerprint"].get("digest") == fp["digest"]:
                rep.status = "would skip" if dry_run else "up to date"
                return
        if dry_run:
            rep.status = "would write"
            return
        run.say(f"step {step}: converting")
        run.convert(step, out, run.card_extras(step, fp) | {"model_name": out_dir.resolve().name}, rep,
                    force=out.exists())
        rep.status = "written"

    run.each(selected, targets, work)


def _to_hub(run: _Run, selected: list[int], targets: dict[int, str], repo_id: str, *, main: str, private: bool,
            token: str | None, endpoint: str | None, dry_run: bool) -> None:
    from neoxconv.hub import HubClient, human_size

    client = HubClient.connect(repo_id, token, endpoint, require_token=not dry_run)
    run.report.destination = client.repo_id
    branches = client.branches()
    if not dry_run and (branches is None or private):
        client.ensure_repo(private)  # created when missing; with --private, an existing public repo is refused
        branches = client.branches()
    branches = branches or {}  # {} for a dry run against a repository that does not exist yet
    newest = max(selected)
    fps: dict[int, dict] = {}
    work_dir = _workdir()
    kept: dict[int, Path] = {}  # the newest step's export, until main has it

    def work(step: int, rep: StepReport) -> None:
        branch = targets[step]
        fps[step] = fp = run.fingerprint(step)
        rep.fingerprint = fp["digest"]
        if branch in branches and _matches(read_record(client.head_message(branch)), step, fp):
            rep.status = "would skip" if dry_run else "up to date"
            return
        if dry_run:
            rep.status = "would upload"
            return
        out = work_dir / branch
        try:
            run.say(f"step {step}: converting")
            try:
                run.convert(step, out, run.card_extras(step, fp)
                            | {"model_name": client.repo_id, "repo_id": client.repo_id, "revision": branch}, rep)
            except ParityFailure:  # the verifier moved the export aside, into the work dir that goes away
                raise ParityFailure(f"parity check failed ({_parity_reasons(out)}); not uploaded") from None
            run.say(f"step {step}: uploading {human_size(rep.bytes)} to {client.repo_id}@{branch}")
            client.ensure_branch(branch)
            pushed = client.push(out, branch, _title(run, step, branch), record_text(step, fp), replace=True,
                                 last="README.md")
            rep.commit_url, rep.status = pushed.commit_url, "uploaded"
            if step == newest and main == "latest":
                kept[step] = out
        finally:
            if step not in kept:
                _rmtree(out)

    try:
        run.each(selected, targets, work)
        if main == "latest":
            run.report.main = _update_main(run, client, newest, targets[newest], fps, kept, work_dir, dry_run,
                                           "main" in branches)
    finally:
        _rmtree(work_dir)


def _parity_reasons(out: Path) -> str:
    from neoxconv.parity import REPORT_NAME, failed_dir

    try:
        return "; ".join(json.loads((failed_dir(out) / REPORT_NAME).read_text())["info"]["reasons"])
    except (OSError, ValueError, KeyError, TypeError):
        return "no report"


def _matches(record: dict | None, step: int, fp: dict) -> bool:
    return bool(record) and record.get("step") == step and record.get("fingerprint") == fp["digest"]


def _title(run: _Run, step: int, branch: str) -> str:
    return f"Step {step} of {run.run_dir.resolve().name} ({branch}, neoxconv {neoxconv.__version__})"


def _update_main(run: _Run, client, newest: int, branch: str, fps: dict, kept: dict, work_dir: Path, dry_run: bool,
                 has_main: bool) -> dict:
    """``--main latest``: main gets the newest selected step, unless it holds a newer one."""
    from neoxconv.modelcard import read_provenance, write_model_card

    rep = next(r for r in run.report.steps if r.step == newest)
    if rep.status == "failed":
        return {"status": "not updated", "step": None, "error": f"step {newest} failed"}
    try:
        record = read_record(client.head_message("main")) if has_main else None
        if record and isinstance(record.get("step"), int) and record["step"] > newest:
            return {"status": "kept (holds a newer step)", "step": record["step"]}
        if _matches(record, newest, fps[newest]):
            return {"status": "up to date", "step": newest}
        if dry_run:
            return {"status": "would update", "step": newest}
        out = kept.get(newest)
        if out is None:  # the newest step was already on its branch: convert it again for main
            out, scratch = work_dir / "main", StepReport(newest, "main")
            run.say(f"main: converting step {newest} again")
            run.convert(newest, out, run.card_extras(newest, fps[newest])
                        | {"model_name": client.repo_id, "repo_id": client.repo_id}, scratch)
        write_model_card(out, {**read_provenance(out), "revision": None}, force=True)
        run.say(f"main: uploading step {newest}")
        pushed = client.push(out, "main", f"main = {branch}: " + _title(run, newest, branch),
                             record_text(newest, fps[newest]), replace=True, last="README.md")
        return {"status": "updated", "step": newest, "commit_url": pushed.commit_url}
    except Exception as e:  # noqa: BLE001 - reported in the summary like a failed step
        return {"status": "failed", "step": newest, "error": one_line(e)}


def render_report(report: RunReport, console) -> None:
    """The summary table (step, branch/directory, status, size, time) and the main branch."""
    from rich.markup import escape
    from rich.table import Table

    from neoxconv.hub import human_size

    verb = "Dry run: " if report.dry_run else ""
    table = Table(title=f"{verb}{report.run_dir} → {report.destination}", title_justify="left")
    for col, justify in (("step", "right"), ("branch" if report.mode == "hub" else "directory", "left"),
                         ("status", "left"), ("size", "right"), ("time", "right")):
        table.add_column(col, justify=justify)
    style = {"failed": "red", "uploaded": "green", "written": "green"}
    for r in report.steps:
        status = r.status + (f": {r.error}" if r.error else "") + (f", parity {r.parity}" if r.parity else "")
        size = human_size(r.bytes) if r.bytes is not None else f"{human_size(r.source_bytes)} source"
        table.add_row(str(r.step), r.target, f"[{style.get(r.status, 'default')}]{escape(status)}[/]", size,
                      f"{r.seconds:.1f}s")
    console.print(table)
    if report.main:
        m = report.main
        console.print(f"main: {m['status']}" + (f" (step {m['step']})" if m.get("step") is not None else "")
                      + (f": {escape(m['error'])}" if m.get("error") else ""), highlight=False)
    done = sum(r.status in ("uploaded", "written") for r in report.steps)
    console.print(f"{len(report.steps)} steps: {done} {'sent' if report.mode == 'hub' else 'written'}, "
                  f"{sum(r.status == 'up to date' for r in report.steps)} up to date, {report.failed} failed "
                  f"(neoxconv {neoxconv.__version__})", highlight=False)


def _workdir() -> Path:
    """A private temporary directory (TMPDIR decides where: it must hold one step's export)."""
    return Path(tempfile.mkdtemp(prefix="neoxconv-export-run-"))


def _rmtree(d: Path) -> None:
    shutil.rmtree(d, ignore_errors=True)
