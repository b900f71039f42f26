"""Benchmark: wall time and peak memory (max RSS) of conversions on a synthetic model.

    python benchmarks/convert_memory.py [--layers 24] [--hidden 1024] [--out DIR]

Makes a GPTNeoX-shaped HF checkpoint of random weights directly with safetensors (about 1.2 GB
in fp32 at the defaults), then runs each conversion in a fresh process and reads its peak RSS.
The point is the ratio peak RSS / model size: a streaming converter stays near one layer plus
the interpreter, whatever the depth. Results are reported (docs/benchmarks.md), not asserted.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from procstat import PeakSampler


def make_model(out: Path, layers: int, hidden: int, vocab: int) -> int:
    out.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    ff = 4 * hidden
    total = 0
    shard: dict[str, torch.Tensor] = {}
    weight_map: dict[str, str] = {}
    files = 0

    def flush():
        nonlocal shard, files
        name = f"model-{files:05d}.safetensors"
        save_file(shard, str(out / name))
        weight_map.update({k: name for k in shard})
        files += 1
        shard = {}

    def add(name, *shape):
        nonlocal total
        shard[name] = torch.randn(*shape, generator=g) * 0.02
        total += shard[name].numel() * 4

    add("gpt_neox.embed_in.weight", vocab, hidden)
    flush()
    for i in range(layers):
        p = f"gpt_neox.layers.{i}."
        for norm in ("input_layernorm", "post_attention_layernorm"):
            add(p + norm + ".weight", hidden)
            add(p + norm + ".bias", hidden)
        add(p + "attention.query_key_value.weight", 3 * hidden, hidden)
        add(p + "attention.query_key_value.bias", 3 * hidden)
        add(p + "attention.dense.weight", hidden, hidden)
        add(p + "attention.dense.bias", hidden)
        add(p + "mlp.dense_h_to_4h.weight", ff, hidden)
        add(p + "mlp.dense_h_to_4h.bias", ff)
        add(p + "mlp.dense_4h_to_h.weight", hidden, ff)
        add(p + "mlp.dense_4h_to_h.bias", hidden)
        flush()
    add("gpt_neox.final_layer_norm.weight", hidden)
    add("gpt_neox.final_layer_norm.bias", hidden)
    add("embed_out.weight", vocab, hidden)
    flush()
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    (out / "config.json").write_text(json.dumps({
        "model_type": "gpt_neox", "architectures": ["GPTNeoXForCausalLM"], "vocab_size": vocab, "hidden_size": hidden,
        "num_hidden_layers": layers, "num_attention_heads": 16, "intermediate_size": ff, "rotary_pct": 0.25,
        "use_parallel_residual": True, "max_position_embeddings": 2048, "hidden_act": "gelu"}))
    return total


def run(args: list[str]) -> tuple[float, float, float]:
    """Wall time, peak RSS (incl. memory-mapped file pages) and peak anonymous RSS, in MiB.

    Peak RSS (VmHWM) counts pages of memory-mapped checkpoint files the process has touched;
    the kernel can drop those at any time. Anonymous RSS is memory the process really owns:
    the number that decides whether a conversion fits in RAM.
    """
    t = time.perf_counter()
    p = subprocess.Popen([sys.executable, "-m", "neoxconv", *args], stdout=subprocess.DEVNULL)
    with PeakSampler(p.pid, 0.01) as mem:
        p.wait()
    anon, hwm = mem.peak["RssAnon"], mem.peak["VmHWM"]  # kB
    if p.returncode:
        raise SystemExit(f"neoxconv {' '.join(args)} failed")
    return time.perf_counter() - t, hwm / 1024, anon / 1024


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--vocab", type=int, default=50304)
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    root = a.out or Path(tempfile.mkdtemp(prefix="neoxconv-bench-"))
    size = make_model(root / "hf", a.layers, a.hidden, a.vocab)
    _, idle_hwm, idle_anon = run(["--help"])
    rows = []
    jobs = [
        ("hf-to-neox --tp 2 (pipeline)", ["hf-to-neox", root / "hf", root / "neox2", "--tp", "2"]),
        ("convert neox tp2 -> tp4 (sequential)", ["convert", root / "neox2", root / "neox4", "--to", "neox", "--tp", "4", "--layout", "sequential"]),
        ("neox-to-hf from tp4 sequential", ["neox-to-hf", root / "neox4", root / "hf-back"]),
        ("neox-to-hf from tp2 pipeline, 200MB shards", ["neox-to-hf", root / "neox2", root / "hf-back2", "--max-shard-size", "200MB"]),
    ]
    for label, args in jobs:
        secs, hwm, anon = run([str(x) for x in args])
        rows.append((label, secs, hwm, anon))
    mib = size / 2**20
    print(f"model: {a.layers} layers, hidden {a.hidden}, vocab {a.vocab}: {mib:.0f} MiB fp32 "
          f"(largest tensor {a.vocab * a.hidden * 4 / 2**20:.0f} MiB); `neoxconv --help` alone: {idle_anon:.0f} MiB anonymous")
    print("| conversion | wall time (s) | throughput (MiB/s) | peak anonymous RSS (MiB) | peak RSS incl. mapped files (MiB) |")
    print("|---|---|---|---|---|")
    for label, secs, hwm, anon in rows:
        print(f"| {label} | {secs:.1f} | {mib / secs:.0f} | {anon:.0f} ({anon / mib:.2f}× model) | {hwm:.0f} |")


if __name__ == "__main__":
    main()
