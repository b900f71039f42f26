"""Benchmark (issue 12): wall time and peak anonymous memory of every conversion path next to
`cp -r` of the same bytes, at two depths, to see the gap to the machine's own copy speed and
whether time grows linearly with depth.

    python benchmarks/convert_speed.py [--layers 8 32] [--repeat 3] [--paths neox-to-hf-pipeline ...]
                                       [--dir DIR] [--keep] [--json FILE]
    python benchmarks/convert_speed.py --io-primitives --dir DIR [--layers 32]

Checkpoints (random fp16 weights, hidden 2048, made in DIR, default a temp dir; ~12 GB of disk at
8 + 32 layers, ~25 GB with --keep, checked first):

- `hf/`: GPT-NeoX-shaped HF model (vocab 50304, 16 heads, MLP 4x, untied head, 2 GB shards);
- `neox-pipeline/`, `neox-sequential/`: the same at TP 2 in both NeoX layouts (made by
  neoxconv hf-to-neox);
- `llama-hf/`: a Llama-shaped HF model of similar size (vocab 32000, MLP 5632), the source of
  HF -> Meta (Meta files are Llama only).

Paths: neox-to-hf from both layouts, hf-to-neox --tp 4 in both layouts, NeoX -> NeoX tp2 -> tp4
(pipeline -> pipeline), HF -> Meta with 2 shards. Each run is a fresh process:

- time: wall and CPU seconds (all threads, user + system) measured inside that process, from
  after the imports (torch, transformers, neoxconv's modules: what `neoxconv` pays at start
  whatever the work) to the end of the command, i.e. seconds beyond interpreter start; `cp -r`
  of the path's source is timed as a process (its start costs milliseconds). CPU seconds are the
  steadier figure on a loaded shared machine; the user-space part of it (hashing, CRC-32, merges,
  Python: the conversion's own work, without the kernel's copying and page handling) is reported
  too. Each is the median of --repeat runs, cp and conversion alternating, sources read once before
  (page cache warm), outputs deleted and dirty pages written back (`sync`) before each run. Without --keep each source is built just before
  its paths are measured and deleted after, so that the page cache holds only it and the outputs;
- memory: RssAnon of the process (memory it owns: heap, tensors; not the page cache of mapped
  checkpoint files, which the kernel may drop at any time) sampled every 5 ms from outside; the
  figure is the peak minus RssAnon right after the imports. VmHWM is not used: it counts mapped
  file pages, which are cache. Spikes shorter than the sampling interval can be missed.

The machine's load average is printed with every run: on a shared machine, times are indicative.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from procstat import PeakSampler

HIDDEN = 2048
NEOX = dict(vocab=50304, heads=16, ff=4 * HIDDEN)
LLAMA = dict(vocab=32000, heads=16, ff=5632)
SHARD = 2 * 10**9

SOURCES = ("hf", "neox-pipeline", "neox-sequential", "llama-hf")  # built and measured in this order
PATHS = {  # name -> (source, neoxconv arguments after SRC OUT)
    "neox-to-hf-pipeline": ("neox-pipeline", ["neox-to-hf"]),
    "neox-to-hf-sequential": ("neox-sequential", ["neox-to-hf"]),
    "hf-to-neox-tp4-pipeline": ("hf", ["hf-to-neox", "--tp", "4"]),
    "hf-to-neox-tp4-sequential": ("hf", ["hf-to-neox", "--tp", "4", "--layout", "sequential"]),
    "neox-tp2-to-tp4": ("neox-pipeline", ["convert", "--to", "neox", "--tp", "4"]),
    "hf-to-meta-2-shards": ("llama-hf", ["convert", "--to", "meta", "--tp", "2"]),
}

# Runs in the measured process: import what any conversion imports, then time the command only.
DRIVER = r"""
import json, os, resource, sys, time
import numpy, torch, safetensors.torch, transformers, yaml, rich, typer._adapters  # typer parses options with pydantic
import transformers.models.gpt_neox, transformers.models.llama
import neoxconv.cli, neoxconv.convert, neoxconv.graph, neoxconv.publish, neoxconv.modelcard, neoxconv.tokenizer
import neoxconv.formats.neox, neoxconv.formats.hf, neoxconv.formats.meta_llama, neoxconv.pipeline, neoxconv.ptio
def anon_kb():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1])
report = sys.argv[1]
sys.argv = ["neoxconv", *sys.argv[2:]]
def cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime, r.ru_utime
start_anon = anon_kb()
(c, u), t = cpu(), time.perf_counter()
code = 0
try:
    neoxconv.cli.main()
except SystemExit as e:
    code = e.code or 0
(c2, u2), t2 = cpu(), time.perf_counter()
json.dump({"seconds": t2 - t, "cpu": c2 - c, "user": u2 - u, "start_anon_kb": start_anon, "code": code},
          open(report, "w"))
sys.exit(code)
"""


# ---------------------------------------------------------------------------------------------
# checkpoints


def _write_hf(out: Path, layers: int, family: str) -> int:
    """A random fp16 HF checkpoint written tensor by tensor (neoxconv.io's streaming writer)."""
    import torch

    from neoxconv.io import SafetensorsStreamWriter

    dims = NEOX if family == "gptneox" else LLAMA
    h, ff, v = HIDDEN, dims["ff"], dims["vocab"]
    if family == "gptneox":
        layer = [("input_layernorm.weight", (h,)), ("input_layernorm.bias", (h,)),
                 ("post_attention_layernorm.weight", (h,)), ("post_attention_layernorm.bias", (h,)),
                 ("attention.query_key_value.weight", (3 * h, h)), ("attention.query_key_value.bias", (3 * h,)),
                 ("attention.dense.weight", (h, h)), ("attention.dense.bias", (h,)),
                 ("mlp.dense_h_to_4h.weight", (ff, h)), ("mlp.dense_h_to_4h.bias", (ff,)),
                 ("mlp.dense_4h_to_h.weight", (h, ff)), ("mlp.dense_4h_to_h.bias", (h,))]
        names = [("gpt_neox.embed_in.weight", (v, h))]
        names += [(f"gpt_neox.layers.{i}.{n}", s) for i in range(layers) for n, s in layer]
        names += [("gpt_neox.final_layer_norm.weight", (h,)), ("gpt_neox.final_layer_norm.bias", (h,)),
                  ("embed_out.weight", (v, h))]
        config = {"model_type": "gpt_neox", "architectures": ["GPTNeoXForCausalLM"], "vocab_size": v,
                  "hidden_size": h, "num_hidden_layers": layers, "num_attention_heads": dims["heads"],
                  "intermediate_size": ff, "rotary_pct": 0.25, "use_parallel_residual": True,
                  "max_position_embeddings": 2048, "hidden_act": "gelu", "tie_word_embeddings": False,
                  "torch_dtype": "float16"}
    else:
        layer = [("input_layernorm.weight", (h,)), ("post_attention_layernorm.weight", (h,)),
                 *((f"self_attn.{p}_proj.weight", (h, h)) for p in "qkvo"),
                 ("mlp.gate_proj.weight", (ff, h)), ("mlp.up_proj.weight", (ff, h)), ("mlp.down_proj.weight", (h, ff))]
        names = [("model.embed_tokens.weight", (v, h))]
        names += [(f"model.layers.{i}.{n}", s) for i in range(layers) for n, s in layer]
        names += [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]
        config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": v, "hidden_size": h,
                  "num_hidden_layers": layers, "num_attention_heads": dims["heads"],
                  "num_key_value_heads": dims["heads"], "intermediate_size": ff, "max_position_embeddings": 2048,
                  "rms_norm_eps": 1e-5, "hidden_act": "silu", "tie_word_embeddings": False, "torch_dtype": "float16"}
    out.mkdir(parents=True)
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in names:
        n = 2 * _numel(shape)
        if size and size + n > SHARD:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += n
    g = torch.Generator().manual_seed(0)
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        w = SafetensorsStreamWriter(out / fname, [(n, torch.float16, s) for n, s in shard], {"format": "pt"})
        for name, shape in shard:
            t = torch.randn(shape, generator=g, dtype=torch.float32).mul_(0.02).half()
            w.write(name, t if not name.endswith("norm.weight") else t.add_(1))
            weight_map[name] = fname
        w.close()
    total = sum(2 * _numel(s) for _, s in names)
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                 "weight_map": weight_map}))
    (out / "config.json").write_text(json.dumps(config))
    return total


def _model_bytes(layers: int) -> int:
    """fp16 bytes of the GPT-NeoX-shaped model (the Llama-shaped one is a little smaller)."""
    return 2 * (layers * 12 * HIDDEN * HIDDEN + 2 * NEOX["vocab"] * HIDDEN)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def build(root: Path, layers: int, needed: set[str]) -> dict[str, Path]:
    """The sources of the chosen paths at one depth (kept when already there)."""
    base = root / f"L{layers}"
    srcs = {}
    if needed & {"hf", "neox-pipeline", "neox-sequential"}:
        srcs["hf"] = base / "hf"
        if not srcs["hf"].exists():
            _write_hf(srcs["hf"], layers, "gptneox")
    for layout in ("pipeline", "sequential"):
        if f"neox-{layout}" in needed:
            p = srcs[f"neox-{layout}"] = base / f"neox-{layout}"
            if not p.exists():
                _neoxconv(["hf-to-neox", str(srcs["hf"]), str(p), "--tp", "2", "--layout", layout])
    if "llama-hf" in needed:
        srcs["llama-hf"] = base / "llama-hf"
        if not srcs["llama-hf"].exists():
            _write_hf(srcs["llama-hf"], layers, "llama")
    return srcs


def _neoxconv(args: list[str]) -> None:
    subprocess.run([sys.executable, "-m", "neoxconv", *args], check=True, stdout=subprocess.DEVNULL)


# ---------------------------------------------------------------------------------------------
# measuring


def run_conversion(args: list[str], report: Path) -> tuple[float, float, float, float]:
    """(seconds beyond imports, CPU seconds of all its threads in that time, the user-space part of
    them, peak RssAnon above the post-import level in MiB) of one run."""
    p = subprocess.Popen([sys.executable, "-c", DRIVER, str(report), *args], stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True)
    with PeakSampler(p.pid, 0.005, keys=("RssAnon",)) as mem:
        _, err = p.communicate()
    peak = mem.peak["RssAnon"]
    if p.returncode:
        raise SystemExit(f"neoxconv {' '.join(args)} failed ({p.returncode}): {err.strip()[-500:]}")
    r = json.loads(report.read_text())
    return r["seconds"], r["cpu"], r["user"], max(0, peak - r["start_anon_kb"]) / 1024


def run_cp(src: Path, dst: Path) -> tuple[float, float, float]:
    """(wall seconds, CPU seconds, user-space CPU seconds) of `cp -r src dst`."""
    t = time.perf_counter()
    p = subprocess.Popen(["cp", "-r", str(src), str(dst)])
    _, status, usage = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode:
        raise SystemExit(f"cp -r {src} {dst} failed")
    return time.perf_counter() - t, usage.ru_utime + usage.ru_stime, usage.ru_utime


def _warm(path: Path) -> None:
    for p in path.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                while f.read(64 << 20):
                    pass


def _settle() -> None:
    """Write back dirty pages before a timed run, so that none is slowed by the writeback of what
    ran before (building a source leaves gigabytes of them; the kernel throttles writers then)."""
    os.sync()


def measure(name: str, src: Path, work: Path, repeat: int) -> dict:
    source, argv = PATHS[name]
    _warm(src)
    cps, cp_cpus, cp_users, secs, cpus, users, mems, loads = [], [], [], [], [], [], [], []
    for _ in range(repeat):
        out = work / "out"
        _settle()
        w, c, u = run_cp(src, out)
        cps.append(w)
        cp_cpus.append(c)
        cp_users.append(u)
        shutil.rmtree(out)
        loads.append(os.getloadavg()[0])
        args = [argv[0], str(src), str(out), *argv[1:]]
        _settle()
        s, c, u, m = run_conversion(args, work / "report.json")
        shutil.rmtree(out)
        secs.append(s)
        cpus.append(c)
        users.append(u)
        mems.append(m)
    med = statistics.median
    return {"path": name, "source_bytes": _dir_bytes(src), "cp_s": med(cps), "cp_cpu": med(cp_cpus),
            "cp_user": med(cp_users), "s": med(secs), "cpu": med(cpus), "user": med(users),
            "peak_anon_mib": max(mems), "runs_s": secs, "cp_runs_s": cps,
            "load": loads}


def largest_group_mib(source: str) -> float:
    dims = LLAMA if source == "llama-hf" else NEOX
    return dims["vocab"] * HIDDEN * 2 / 2**20  # the fp16 embedding (and head)


# ---------------------------------------------------------------------------------------------


def table(results: dict[int, dict[str, dict]], depths: list[int]) -> str:
    """Markdown: per depth wall and CPU seconds with their ratio to cp -r of the same source,
    growth with depth, and peak anonymous memory."""
    lo, hi = depths[0], depths[-1]
    head = "| path |" + "".join(f" {d} layers: wall s (× cp -r) | {d} layers: CPU s (× cp -r) |" for d in depths)
    head += f" growth {lo}→{hi}: wall / CPU / bytes |" if len(depths) > 1 else ""
    head += " peak anon above import, MiB (× largest group) |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    ref = {d: results[d].get("neox-to-hf-pipeline") or next(iter(results[d].values())) for d in depths}
    row = f"| `cp -r` ({PATHS[ref[lo]['path']][0]}) |"
    for d in depths:
        row += f" {ref[d]['cp_s']:.2f} ({ref[d]['source_bytes'] / 1e9:.2f} GB) | {ref[d]['cp_cpu']:.2f} |"
    if len(depths) > 1:
        row += f" {ref[hi]['cp_s'] / ref[lo]['cp_s']:.2f}× / {ref[hi]['cp_cpu'] / ref[lo]['cp_cpu']:.2f}× / " \
               f"{ref[hi]['source_bytes'] / ref[lo]['source_bytes']:.2f}× |"
    lines.append(row + " |")
    for name in PATHS:
        if name not in results[lo]:
            continue
        row = f"| {name} |"
        for d in depths:
            r = results[d][name]
            row += f" {r['s']:.2f} ({r['s'] / r['cp_s']:.1f}×) | {r['cpu']:.2f} ({r['cpu'] / r['cp_cpu']:.1f}×) |"
        if len(depths) > 1:
            a, b = results[lo][name], results[hi][name]
            grow = b["source_bytes"] / a["source_bytes"]
            row += f" {b['s'] / a['s']:.2f}× / {b['cpu'] / a['cpu']:.2f}× / {grow:.2f}× |"
        group = largest_group_mib(PATHS[name][0])
        row += " " + " / ".join(f"{results[d][name]['peak_anon_mib']:.0f} "
                                f"({results[d][name]['peak_anon_mib'] / group:.1f}×)" for d in depths) + " |"
        lines.append(row)
    return "\n".join(lines)


def io_primitives(root: Path, layers: int) -> None:
    """What the I/O layer (neoxconv.ptio) costs here, on the built checkpoints at one depth:
    indexing vs unpickling an mp_rank file, rewriting files by copy_file_range vs torch.save,
    writing computed tensors in one call vs in pieces, and hashing throughput (the manifest's
    sha256, the zip records' CRC-32)."""
    import hashlib
    import resource
    import zlib

    import torch

    from neoxconv.io import load_pickle
    from neoxconv.ptio import index_pt, save

    def clock(fn, repeat: int = 3) -> tuple[float, float]:
        runs = []
        for _ in range(repeat):
            r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
            fn()
            r1 = resource.getrusage(resource.RUSAGE_SELF)
            runs.append((time.perf_counter() - t0, r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime))
        return statistics.median(x for x, _ in runs), statistics.median(y for _, y in runs)

    seq = next((root / f"L{layers}" / "neox-sequential").glob("global_step*/mp_rank_00_model_states.pt"))
    pipe = next((root / f"L{layers}" / "neox-pipeline").glob("global_step*"))
    print(f"\nI/O primitives, {layers} layers ({seq.stat().st_size / 1e9:.2f} GB mp_rank file), "
          f"load {os.getloadavg()[0]:.1f}; median of 3, wall s / CPU s")
    print(f"  index_pt(mp_rank)                      {'%.3f / %.3f' % clock(lambda: index_pt(seq))}")
    print(f"  load_pickle(mp_rank) (torch.load mmap)  {'%.3f / %.3f' % clock(lambda: load_pickle(seq))}")
    files = sorted(pipe.glob("layer_*.pt"))
    nbytes = sum(f.stat().st_size for f in files)
    out = root / "io-out"

    def rewrite(how: str) -> None:
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir()
        for f in files:
            if how == "torch":
                torch.save(load_pickle(f), out / f.name)
            elif how == "ptio":
                save(index_pt(f).obj, out / f.name)
            else:
                shutil.copyfile(f, out / f.name)

    for how, label in (("cp", "shutil.copyfile (cp)"), ("ptio", "index_pt + ptio.save (copy_file_range)"),
                       ("torch", "load_pickle + torch.save")):
        w, c = clock(lambda how=how: rewrite(how))
        print(f"  rewrite {len(files)} layer files, {nbytes / 1e9:.2f} GB: {label:<40} {w:.2f} / {c:.2f} "
              f"({nbytes / w / 1e9:.2f} GB/s)")
    shutil.rmtree(out, ignore_errors=True)
    from neoxconv.ptio.ranges import pwrite_all

    def write(whole: bool) -> None:  # 16 computed tensors of 64 MiB (1 GiB)
        fd = os.open(root / "io-pwrite.bin", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        try:
            for i in range(16):
                tensor = torch.full((64 << 20,), i, dtype=torch.uint8)
                data, at = memoryview(tensor.numpy()), i * tensor.numel()
                if whole:
                    os.pwrite(fd, data, at)
                else:
                    pwrite_all(fd, data, at)
        finally:
            os.close(fd)
            os.unlink(root / "io-pwrite.bin")

    for whole, label in ((True, "one os.pwrite per 64 MiB tensor"), (False, "ptio pwrite_all (1 MiB calls)")):
        w, c = clock(lambda whole=whole: write(whole))
        print(f"  write 1 GiB from memory: {label:<40} {w:.2f} / {c:.2f}")
    buf = os.urandom(256 << 20)
    for name, fn in (("sha256", lambda: hashlib.sha256(buf).digest()), ("crc32", lambda: zlib.crc32(buf))):
        w, c = clock(fn)
        print(f"  {name} of 256 MiB, one thread: {len(buf) / w / 1e9:.2f} GB/s wall, {len(buf) / c / 1e9:.2f} GB/s CPU")


def growth_table(results: dict[int, dict[str, dict]], lo: int, hi: int) -> str:
    """Markdown: how each path's time grew from lo to hi layers, split into user-space CPU (the
    conversion's own work: hashing, CRC-32, merges, Python) and all CPU (adds the kernel's copying
    and page handling), next to the same growth of `cp -r` of its source and of the bytes."""
    head = (f"| path ({lo}→{hi} layers) | bytes | conversion: wall / CPU / user CPU | "
            f"`cp -r`: wall / CPU / user CPU | user-CPU growth ÷ bytes growth |")
    lines = [head, "|---|---|---|---|---|"]
    for name in PATHS:
        if name not in results[lo]:
            continue
        a, b = results[lo][name], results[hi][name]
        grow = b["source_bytes"] / a["source_bytes"]
        g = lambda k: f"{b[k] / a[k]:.2f}×" if a[k] and b[k] else "–"  # noqa: E731 (cp -r's user CPU rounds to 0)
        ratio = f"{b['user'] / a['user'] / grow:.2f}" if a["user"] else "–"
        lines.append(f"| {name} | {grow:.2f}× | {g('s')} / {g('cpu')} / {g('user')} | "
                     f"{g('cp_s')} / {g('cp_cpu')} / {g('cp_user')} | {ratio} |")
    return "\n".join(lines)


def main() -> None:
    global HIDDEN
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--hidden", type=int, default=HIDDEN, help="model width (2048; smaller for a smoke run)")
    ap.add_argument("--paths", nargs="+", choices=list(PATHS), default=list(PATHS))
    ap.add_argument("--dir", type=Path, default=None, help="where to build (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoints (reused by a later run with --dir)")
    ap.add_argument("--json", type=Path, default=None, help="also write the raw results here")
    ap.add_argument("--io-primitives", action="store_true",
                    help="only measure neoxconv.ptio's primitives on checkpoints already built in --dir")
    a = ap.parse_args()
    HIDDEN = a.hidden
    NEOX["ff"] = 4 * HIDDEN
    if a.io_primitives:
        if a.dir is None:
            raise SystemExit("--io-primitives needs --dir with checkpoints built by an earlier --keep run")
        for layers in a.layers:
            io_primitives(a.dir, layers)
        return
    root = a.dir or Path(tempfile.mkdtemp(prefix="neoxconv-speed-"))
    root.mkdir(parents=True, exist_ok=True)
    biggest = _model_bytes(max(a.layers))  # sources (all kept, or two at a time) + one output
    need = (sum(4 * _model_bytes(L) for L in a.layers) if a.keep else 2 * biggest) + 1.3 * biggest
    free = shutil.disk_usage(root).free
    if free < need:
        raise SystemExit(f"{root}: needs ~{need / 1e9:.0f} GB free, has {free / 1e9:.0f} GB (use --dir elsewhere)")
    depths = sorted(a.layers)
    results: dict[int, dict[str, dict]] = {}
    try:
        for layers in depths:
            results[layers] = {}
            wanted = [src for src in SOURCES if any(PATHS[p][0] == src for p in a.paths)]
            for i, source in enumerate(wanted):
                srcs = build(root, layers, {source})
                if not a.keep:  # only this source in the page cache (hf stays while NeoX sources are made from it)
                    later_neox = any(w.startswith("neox") for w in wanted[i + 1:])
                    for other in SOURCES:
                        if other != source and not (other == "hf" and later_neox):
                            shutil.rmtree(root / f"L{layers}" / other, ignore_errors=True)
                for name in (p for p in a.paths if PATHS[p][0] == source):
                    r = measure(name, srcs[source], root, a.repeat)
                    results[layers][name] = r
                    print(f"{layers:>3} layers  {name:<28} {r['s']:7.2f} s (cpu {r['cpu']:6.2f}, user {r['user']:6.2f})  "
                          f"cp -r {r['cp_s']:5.2f} s (cpu {r['cp_cpu']:5.2f})  ratio {r['s'] / r['cp_s']:5.1f}  "
                          f"peak anon {r['peak_anon_mib']:6.0f} MiB  "
                          f"runs {['%.2f' % x for x in r['runs_s']]}  load {['%.1f' % x for x in r['load']]}", flush=True)
            if not a.keep:
                shutil.rmtree(root / f"L{layers}", ignore_errors=True)
    finally:
        if not a.keep and a.dir is None:
            shutil.rmtree(root, ignore_errors=True)
    print()
    print(table(results, depths))
    if len(depths) > 1:
        print()
        print(growth_table(results, depths[0], depths[-1]))
    if a.json:
        a.json.write_text(json.dumps({str(k): v for k, v in results.items()}, indent=1))


if __name__ == "__main__":
    main()
