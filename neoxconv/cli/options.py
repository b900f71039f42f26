"""Option types shared by the commands. Choice options take the Enums of neoxconv.choices
(typer lists them in --help and refuses other values); commands pass `.value` to the library."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from neoxconv.choices import Family, NeoxLayout, NeoxSchema, OutDtype, QkvLayout

DtypeOpt = Annotated[OutDtype, typer.Option("--dtype", help="Output dtype (auto: keep the source's).")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Replace OUT if it exists.")]
ArchOpt = Annotated[Family, typer.Option("--arch", help="Model family (auto: from the source).")]
ConfigOpt = Annotated[Optional[list[Path]], typer.Option(
    "--config", help="NeoX YAML file(s); default: every YAML in the checkpoint's configs/ folder. Repeatable.")]
QkvOpt = Annotated[Optional[QkvLayout], typer.Option(
    "--qkv-layout", help="NeoX fused-QKV layout for GQA models: gqa_blocked (NeoX since 2024-11, default) "
                         "or gqa_fakehead (NeoX 2024-02..2024-11). MHA models are always interleaved.")]
TokenizerOpt = Annotated[Optional[Path], typer.Option(
    "--tokenizer", help="Tokenizer to carry along: a tokenizer.json, a tokenizer.model or an HF tokenizer dir "
                        "(default: the source's own, e.g. the NeoX config's vocab-file or the HF dir's tokenizer).")]
ChatTemplateOpt = Annotated[Optional[Path], typer.Option(
    "--chat-template", help="Jinja chat template file that replaces the source's default chat template "
                            "(e.g. for Meta Llama 3 Instruct, whose files do not carry one).")]
EosTokenOpt = Annotated[Optional[list[str]], typer.Option(
    "--eos-token", help="End-of-turn token, repeatable: the first becomes the tokenizer's eos_token, and all are "
                        "added to generation_config.json's eos ids (Llama 3 Instruct: --eos-token '<|eot_id|>' "
                        "gives [<|end_of_text|>, <|eot_id|>]). Exit 2 if not in the vocabulary.")]
TrustOpt = Annotated[bool, typer.Option(
    "--trust-pickle", help="Load pickled inputs with full unpickling (can run code: only for files you trust).")]
FiniteOpt = Annotated[bool, typer.Option(
    "--check-finite", help="Scan every tensor of the input for NaN/Inf as it is read (on the data the conversion "
                           "copies); one is an error naming tensor, rank and file, and nothing is written to OUT.")]
VerifyOpt = Annotated[bool, typer.Option(
    "--verify", help="After writing, check logit parity of OUT against the source (fp32); on failure exit 1 and "
                     "move the output to OUT.parity-failed/ (report inside). See docs/parity.md.")]
DropWindowOpt = Annotated[bool, typer.Option(
    "--drop-sliding-window", help="Export to a stock class without the sliding window, for a model no stock class "
                                  "with a window holds (e.g. NeoX's configs/mistral/7B.yml: a window and MLP biases; "
                                  "without this flag it exports as custom code with the window). Logits stay "
                                  "identical for sequences of at most sliding_window_width + 1 tokens (a warning "
                                  "says how many; --verify compares within that length).")]
# NeoX-target options, shared by hf-to-neox, llama-to-neox and convert --to neox.
TpOpt = Annotated[int, typer.Option("--tp", help="Tensor-parallel degree to shard for (convert --to meta: number of "
                                                 "model-parallel shards).")]
PpOpt = Annotated[int, typer.Option("--pp", help="Pipeline-parallel degree (pipeline layout only).")]
LayoutOpt = Annotated[NeoxLayout, typer.Option(
    "--layout", help="NeoX on-disk layout: pipeline (layer_XX files) or sequential (mp_rank_XX files).")]
SchemaOpt = Annotated[NeoxSchema, typer.Option(
    "--neox-schema", help="NeoX tensor names: current (mlp.linear1/linear2) or legacy (dense_h_to_4h / w1-w3 and "
                          "inv_freq buffers, for NeoX before 2024-09).")]
VocabMultipleOpt = Annotated[int, typer.Option(
    "--vocab-multiple", help="NeoX make_vocab_size_divisible_by: the vocab is padded to a multiple of this × TP.")]
# HF-target options, shared by neox-to-hf and convert --to hf.
MaxShardOpt = Annotated[str, typer.Option("--max-shard-size", help="Largest safetensors shard, e.g. 5GB, 500MB.")]
TrimOpt = Annotated[bool, typer.Option(
    "--trim-vocab-padding", help="Drop padded embedding rows beyond the real vocabulary.")]


# Shared by every conversion command (how the output is written, not what it holds).
WorkersOpt = Annotated[Optional[int], typer.Option(
    "--workers", min=1, help="Threads that read, convert and write at once (default: the CPU count, at most 4). "
                             "The output is byte-identical for any value.")]
DryRunOpt = Annotated[bool, typer.Option(
    "--dry-run", help="Print the plan from the files' headers (output files, tensors, bytes copied and computed, "
                      "predicted peak memory) and write nothing.")]
ResumeOpt = Annotated[bool, typer.Option(
    "--resume", help="Continue an interrupted or failed run of the same conversion: finished files whose hashes "
                     "still match are kept, the rest is written (the result is byte-identical). A failed --resume "
                     "run keeps its finished files for the next one.")]
JsonOpt = Annotated[bool, typer.Option(
    "--json", help="Print the result (or the --dry-run plan) as JSON on stdout, without a progress bar.")]


def family_of(arch: Family) -> str | None:
    return None if arch.value == "auto" else arch.value
