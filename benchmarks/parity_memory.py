"""Benchmark: wall time and peak memory of `neoxconv parity` between a NeoX checkpoint and its HF export.

    python benchmarks/parity_memory.py [--layers 8 32] [--hidden 2048] [--tp 2] [--dtype fp32] [--no-verify] [--out DIR]

For each depth: a GPTNeoX-shaped HF model of random fp16 weights is written with safetensors
(hidden 2048, 16 heads, vocab 50304, untied head, parallel residual), imported into a NeoX
checkpoint at TP 2 (`hf-to-neox`, pipeline files) and exported back (`neox-to-hf`): the pair
`parity NEOX HF` proves. Everything is written to a temporary directory (removed at the end
unless --out is given), never into the repository.

`parity NEOX HF` runs in a fresh process (fp32 compute, 2 x 64 random tokens, CPU) whose
`/proc/PID/status` is sampled every millisecond: peak anonymous RSS (memory the process owns)
and peak RSS incl. memory-mapped checkpoint pages (VmHWM: page cache the kernel can drop), both
above the anonymous RSS of a bare interpreter. The export alone and the export with `--verify`
are measured the same way (convert + verify should need no more memory than the conversion).
Reported next to the model size and the bound of docs/parity.md (3 x the largest layer group in
the compute dtype). Results go to docs/benchmarks.md; nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from procstat import PeakSampler

VOCAB, HEADS = 50304, 16


def make_hf_model(out: Path, layers: int, hidden: int, vocab: int = VOCAB) -> dict[str, int]:
    """A GPTNeoX HF directory of random fp16 weights, written one layer per file; returns sizes in bytes."""
    out.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    ff = 4 * hidden
    weight_map: dict[str, str] = {}
    sizes = {"model": 0, "largest_group_params": 0}

    def write(name: str, tensors: dict[str, tuple[int, ...]]) -> None:
        shard = {k: (torch.randn(*shape, generator=g) * (1.0 if k.endswith("norm.weight") else 0.02)
                     + (1.0 if k.endswith("norm.weight") else 0.0)).half() for k, shape in tensors.items()}
        save_file(shard, str(out / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
        numel = sum(t.numel() for t in shard.values())
        sizes["model"] += 2 * numel
        sizes["largest_group_params"] = max(sizes["largest_group_params"], numel)

    write("embed.safetensors", {"gpt_neox.embed_in.weight": (vocab, hidden)})
    for i in range(layers):
        p = f"gpt_neox.layers.{i}."
        write(f"layer-{i:03d}.safetensors", {
            p + "input_layernorm.weight": (hidden,), p + "input_layernorm.bias": (hidden,),
            p + "post_attention_layernorm.weight": (hidden,), p + "post_attention_layernorm.bias": (hidden,),
            p + "attention.query_key_value.weight": (3 * hidden, hidden), p + "attention.query_key_value.bias": (3 * hidden,),
            p + "attention.dense.weight": (hidden, hidden), p + "attention.dense.bias": (hidden,),
            p + "mlp.dense_h_to_4h.weight": (ff, hidden), p + "mlp.dense_h_to_4h.bias": (ff,),
            p + "mlp.dense_4h_to_h.weight": (hidden, ff), p + "mlp.dense_4h_to_h.bias": (hidden,),
        })
    write("head.safetensors", {"gpt_neox.final_layer_norm.weight": (hidden,), "gpt_neox.final_layer_norm.bias": (hidden,),
                               "embed_out.weight": (vocab, hidden)})
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": sizes["model"]}, "weight_map": weight_map}))
    (out / "config.json").write_text(json.dumps({
        "model_type": "gpt_neox", "architectures": ["GPTNeoXForCausalLM"], "vocab_size": vocab, "hidden_size": hidden,
        "num_hidden_layers": layers, "num_attention_heads": HEADS, "intermediate_size": ff, "rotary_pct": 0.25,
        "rotary_emb_base": 10000, "use_parallel_residual": True, "max_position_embeddings": 2048,
        "hidden_act": "gelu", "layer_norm_eps": 1e-5, "tie_word_embeddings": False, "dtype": "float16"}))
    return sizes


def measure(cmd: list[str]) -> tuple[float, int, int, int]:
    """(wall s, peak anonymous RSS, peak RSS incl. mapped files, exit code) of a fresh process."""
    t = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    with PeakSampler(p.pid, 0.001) as mem:
        err = p.communicate()[1].decode()
    anon, hwm = mem.peak["RssAnon"] * 1024, mem.peak["VmHWM"] * 1024
    if p.returncode not in (0, 1):
        raise SystemExit(f"{' '.join(cmd)} failed ({p.returncode}): {err[-2000:]}")
    return time.perf_counter() - t, anon, hwm, p.returncode


def neoxconv(*args) -> list[str]:
    return [sys.executable, "-m", "neoxconv", *map(str, args)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--dtype", default="fp32", help="compute dtype of parity (fp32, fp16, bf16)")
    ap.add_argument("--no-verify", dest="verify", action="store_false", help="skip the neox-to-hf --verify run")
    ap.add_argument("--out", type=Path, default=None, help="keep the checkpoints here (default: a temp dir, removed)")
    a = ap.parse_args()
    root = a.out or Path(tempfile.mkdtemp(prefix="neoxconv-parity-bench-"))
    compute_bytes = {"fp32": 4, "fp16": 2, "bf16": 2}[a.dtype]
    try:
        # the anonymous memory of a bare interpreter: "above interpreter start" subtracts it
        _, bare, bare_hwm, _ = measure([sys.executable, "-c", "import time; time.sleep(0.3)"])
        _, imports, _, _ = measure([sys.executable, "-c", "import torch, transformers, neoxconv.cli; "
                                    "import neoxconv.reference; import time; time.sleep(0.3)"])
        rows = []
        for layers in a.layers:
            base = root / f"L{layers}"
            sizes = make_hf_model(base / "hf-src", layers, a.hidden)
            subprocess.run(neoxconv("hf-to-neox", base / "hf-src", base / "neox", "--tp", a.tp), check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            shutil.rmtree(base / "hf-src")
            export = measure(neoxconv("neox-to-hf", base / "neox", base / "hf"))
            verified = measure(neoxconv("neox-to-hf", base / "neox", base / "hf-verified", "--verify")) \
                if a.verify else None
            secs, anon, hwm, rc = measure(neoxconv("parity", base / "neox", base / "hf", "--dtype", a.dtype,
                                                   "--json", base / "report.json"))
            verdict = json.loads((base / "report.json").read_text())["verdict"]
            rows.append((layers, sizes, secs, anon - bare, hwm - bare_hwm, verdict, export, verified))
            shutil.rmtree(base)
        gib = 2**30
        print(f"hidden {a.hidden}, vocab {VOCAB}, TP {a.tp}, fp16 on disk, parity in {a.dtype}, 2 x 64 tokens; "
              f"bare interpreter {bare / 2**20:.0f} MiB anonymous, after importing torch + transformers + neoxconv "
              f"{(imports - bare) / 2**20:.0f} MiB above it")
        print("| layers | model (fp16 on disk) | largest group in compute dtype | bound 3x | wall time (s) "
              "| peak anonymous above start | peak RSS incl. mapped files above start | verdict |")
        print("|---|---|---|---|---|---|---|---|")
        for layers, sizes, secs, anon, hwm, verdict, _, _ in rows:
            group = sizes["largest_group_params"] * compute_bytes
            print(f"| {layers} | {sizes['model'] / gib:.2f} GiB | {group / gib:.2f} GiB | {3 * group / gib:.2f} GiB "
                  f"| {secs:.1f} | {anon / gib:.2f} GiB ({anon / sizes['model']:.2f}x model) | {hwm / gib:.2f} GiB "
                  f"| {verdict} |")
        print("\n| layers | conversion | wall time (s) | peak anonymous above start |\n|---|---|---|---|")
        for layers, *_, export, verified in rows:
            for label, m in (("neox-to-hf", export), ("neox-to-hf --verify", verified)):
                if m is not None:
                    print(f"| {layers} | {label} | {m[0]:.1f} | {(m[1] - bare) / gib:.2f} GiB |")
    finally:
        if a.out is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
