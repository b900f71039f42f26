"""Outputs bit-identical across a change: the sha256 of every file of a matrix of conversions.

    python tools/output_hashes.py --sources DIR                 # make the tiny sources once
    python tools/output_hashes.py --sources DIR --json A.json   # run every conversion, record hashes
    python tools/output_hashes.py --compare A.json B.json       # which files differ

Run the second form before and after a change (same DIR, so the sources are the same files) and
compare. The matrix covers every path: HF (GPTNeoX parallel/sequential residual, tied/untied,
Llama MHA and GQA, Mistral) -> NeoX at TP 1-4, both layouts, both schemas, PP 2, fake-head QKV,
a dtype cast; NeoX -> HF from both layouts (neoxconv-made and DeepSpeed-made with drifted norm
copies), sharded and trimmed; NeoX -> NeoX resharding and QKV migration; HF/NeoX -> Meta at 1-2
shards in both styles; Meta (both embedding splits) -> NeoX and HF. `--workers N` is passed to
every conversion when the converter has it (to compare worker counts).
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the fixtures that write NeoX/Meta files without neoxconv


def make_sources(d: Path) -> None:
    import torch

    from fixtures.llama_factories import meta_shards, save_meta
    from fixtures.neox_raw import random_rank_tensors, write_neox_checkpoint
    from neoxconv.convert import convert
    from neoxconv.tiny import tiny_hf_model

    d.mkdir(parents=True, exist_ok=True)
    hf = {
        "neox-par": tiny_hf_model("gptneox", seed=1),
        "neox-seq-tied": tiny_hf_model("gptneox", seed=2, dtype=torch.float16, use_parallel_residual=False,
                                       tie_word_embeddings=True),
        "llama-mha": tiny_hf_model("llama", seed=3),
        "llama-gqa": tiny_hf_model("llama", seed=4, num_key_value_heads=2),
        "mistral-gqa": tiny_hf_model("mistral", seed=5, num_key_value_heads=2, dtype=torch.bfloat16),
        "neox-4h": tiny_hf_model("gptneox", seed=6, intermediate_size=128),  # the legacy schema's MLP
        "llama-gqa8": tiny_hf_model("llama", seed=7, num_attention_heads=8, num_key_value_heads=4),
    }
    for name, model in hf.items():
        model.save_pretrained(d / f"hf-{name}")
    # NeoX sources made by neoxconv (the baseline's writer: the same files before and after).
    convert(d / "hf-neox-par", d / "neox-par-tp2-pipe", to="neox", tp=2)
    convert(d / "hf-neox-par", d / "neox-par-tp2-seq", to="neox", tp=2, layout="sequential")
    convert(d / "hf-llama-gqa", d / "neox-gqa-tp2-fake", to="neox", tp=2, qkv_layout="gqa_fakehead")
    convert(d / "hf-llama-gqa", d / "neox-gqa-tp2-legacy", to="neox", tp=2, schema="legacy")
    convert(d / "hf-neox-4h", d / "neox-4h-tp2-legacy-seq", to="neox", tp=2, schema="legacy", layout="sequential")
    convert(d / "hf-llama-gqa8", d / "neox-gqa8-tp4-fake-seq", to="neox", tp=4, qkv_layout="gqa_fakehead",
            layout="sequential")
    # NeoX sources as DeepSpeed writes them, with norm copies that drifted apart across ranks.
    cfg = dict(num_layers=2, hidden_size=32, num_attention_heads=4, max_position_embeddings=64, rotary_pct=0.25,
               no_weight_tying=True, gpt_j_residual=True, make_vocab_size_divisible_by=8)
    for layout in ("pipeline", "sequential"):
        ranks = random_rank_tensors(tp=2, layers=2, hidden=32, heads=4, ffn=128, vocab_rows=64, tied=False)
        write_neox_checkpoint(d / f"neox-raw-{layout}", ranks, cfg, layout=layout)
    for dim in (0, 1):
        shards, params = meta_shards(hf["llama-gqa"], 2, embed_dim=dim)
        save_meta(d / f"meta-gqa-dim{dim}", shards, params)


def cases(d: Path) -> dict[str, tuple[Path, dict]]:
    c: dict[str, tuple[Path, dict]] = {}
    for name in ("neox-par", "neox-seq-tied", "llama-mha", "llama-gqa", "mistral-gqa", "neox-4h", "llama-gqa8"):
        src = d / f"hf-{name}"
        for tp in (1, 2, 4):
            for layout in ("pipeline", "sequential"):
                c[f"{name}-neox-tp{tp}-{layout}"] = (src, dict(to="neox", tp=tp, layout=layout))
        c[f"{name}-neox-tp2-legacy"] = (src, dict(to="neox", tp=2, schema="legacy"))
        c[f"{name}-neox-pp2"] = (src, dict(to="neox", tp=1, pp=2))
    c["neox-par-neox-fp16"] = (d / "hf-neox-par", dict(to="neox", tp=2, dtype="fp16", layout="sequential"))
    c["llama-gqa-neox-fakehead-seq"] = (d / "hf-llama-gqa", dict(to="neox", tp=2, qkv_layout="gqa_fakehead",
                                                                 layout="sequential"))
    c["neox-seq-tied-hf-roundtrip"] = (d / "hf-neox-seq-tied", dict(to="hf"))
    c["mistral-hf-bf16-to-fp32"] = (d / "hf-mistral-gqa", dict(to="hf", dtype="fp32", max_shard_size=20_000))
    for src in ("neox-par-tp2-pipe", "neox-par-tp2-seq", "neox-gqa-tp2-fake", "neox-gqa-tp2-legacy",
                "neox-raw-pipeline", "neox-raw-sequential", "neox-4h-tp2-legacy-seq", "neox-gqa8-tp4-fake-seq"):
        c[f"{src}-hf"] = (d / src, dict(to="hf"))
        c[f"{src}-neox-tp4"] = (d / src, dict(to="neox", tp=4))
        c[f"{src}-neox-tp1-seq"] = (d / src, dict(to="neox", tp=1, layout="sequential"))
    c["neox-par-tp2-pipe-hf-sharded-trim"] = (d / "neox-par-tp2-pipe", dict(to="hf", max_shard_size=30_000,
                                                                             trim_vocab_padding=True))
    c["neox-gqa-fake-migrate"] = (d / "neox-gqa-tp2-fake", dict(to="neox", tp=2, out_qkv_layout="gqa_blocked"))
    c["neox-gqa-meta-2"] = (d / "neox-gqa-tp2-fake", dict(to="meta", shards=2))
    c["neox-gqa8-tp4-to-tp2-blocked"] = (d / "neox-gqa8-tp4-fake-seq", dict(to="neox", tp=2,
                                                                             out_qkv_layout="gqa_blocked"))
    for name in ("llama-mha", "llama-gqa", "llama-gqa8"):
        for shards in (1, 2):
            for style in ("llama3", "llama2"):
                c[f"{name}-meta-{shards}-{style}"] = (d / f"hf-{name}", dict(to="meta", shards=shards, style=style))
    for dim in (0, 1):
        src = d / f"meta-gqa-dim{dim}"
        c[f"meta-dim{dim}-neox-tp2"] = (src, dict(to="neox", tp=2))
        c[f"meta-dim{dim}-neox-tp4-seq"] = (src, dict(to="neox", tp=4, layout="sequential"))
        c[f"meta-dim{dim}-hf"] = (src, dict(to="hf"))
        c[f"meta-dim{dim}-meta-1"] = (src, dict(to="meta", shards=1))
    return c


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run(d: Path, workers: int | None, only: list[str] | None) -> dict:
    from neoxconv.convert import convert
    from neoxconv.errors import NeoxconvError

    takes_workers = "workers" in inspect.signature(convert).parameters
    out_root = d / "_out"
    results = {}
    start = time.perf_counter()
    for name, (src, opts) in cases(d).items():
        if only and not any(o in name for o in only):
            continue
        out = out_root / name
        shutil.rmtree(out, ignore_errors=True)
        kw = dict(opts)
        if workers is not None and takes_workers:
            kw["workers"] = workers
        try:
            convert(src, out, **kw)
        except NeoxconvError as e:  # a refused combination: the refusal must stay the same too
            results[name] = {"error": str(e)}
            continue
        results[name] = {p.relative_to(out).as_posix(): sha(p) for p in sorted(out.rglob("*")) if p.is_file()}
        shutil.rmtree(out)
    print(f"{len(results)} conversions in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return results


def compare(a: dict, b: dict) -> int:
    bad = 0
    for case in sorted(a.keys() | b.keys()):
        fa, fb = a.get(case), b.get(case)
        if fa is None or fb is None:
            print(f"{case}: only in {'second' if fa is None else 'first'}")
            bad += 1
            continue
        for f in sorted(fa.keys() | fb.keys()):
            if fa.get(f) != fb.get(f):
                print(f"{case}: {f} differs ({'missing' if f not in fa or f not in fb else 'content'})")
                bad += 1
    print(f"{len(a)} vs {len(b)} conversions, {sum(map(len, a.values()))} files: {bad} difference(s)")
    return 1 if bad else 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sources", type=Path)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--only", nargs="*")
    ap.add_argument("--compare", nargs=2, type=Path)
    a = ap.parse_args()
    if a.compare:
        sys.exit(compare(*(json.loads(p.read_text()) for p in a.compare)))
    if not a.sources:
        ap.error("--sources DIR is needed")
    if not a.sources.exists() or not a.json:
        make_sources(a.sources)
    if a.json:
        a.json.write_text(json.dumps(run(a.sources, a.workers, a.only), indent=1))


if __name__ == "__main__":
    main()
