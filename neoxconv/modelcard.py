"""Model card (README.md) for an exported Hugging Face directory.

``provenance`` is a plain dict; every key is optional:

=====================  ====================================================================
``model_name``         title of the card (default: the output directory's name)
``repo_id``            Hub id used in the usage snippet (default: a placeholder)
``family``             "gpt-neox", "llama", "mistral", ... (added to the tags)
``license``            SPDX-style id, e.g. "apache-2.0" (front matter ``license``)
``base_model``         Hub id of the model this was trained from (front matter)
``source_format``      e.g. "neox-pipeline", "neox-sequential", "hf"
``source_dir``         where the checkpoint came from; only its last component is written
``iteration``          training step of the checkpoint
``tp`` / ``pp``        tensor / pipeline parallel degree of the source
                       (``tensor_parallel`` / ``pipeline_parallel`` accepted too)
``layout``             on-disk layout of the source ("pipeline" / "sequential")
``dtype``              dtype of the exported weights
``vocab_size``         tokenizer size; ``embedding_rows``: rows of the embedding matrix
``padding_rows``       embedding_rows - vocab_size (computed when both are given)
``tokenizer``          a TokenizerInfo.to_dict() (its kind/class are shown)
``parity``             the parity report (a dict), rendered as a table plus JSON
``notes``              free text appended to the provenance section
=====================  ====================================================================

Absolute local paths never reach the card: ``source_dir`` is reduced to its base name and
any other string that is an absolute path is reduced the same way.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import yaml

import neoxconv
from neoxconv.errors import NeoxconvError

_WINDOWS_ABS = re.compile(r"^[A-Za-z]:[\\/]")


def _basename(value: str) -> str:
    text = str(value).rstrip("/\\")
    if _WINDOWS_ABS.match(text):
        return PureWindowsPath(text).name or text
    return PurePosixPath(text).name or text


def _scrub(value: Any) -> Any:
    """Replace absolute paths (anywhere in nested data) by their last component."""
    if isinstance(value, dict):
        return {k: _scrub(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_scrub(v) for v in value]
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if isinstance(value, str) and (value.startswith(("/", "~")) or _WINDOWS_ABS.match(value)) and "\n" not in value:
        return _basename(value)
    return value


def _get(prov: dict, *keys: str):
    for k in keys:
        if prov.get(k) is not None:
            return prov[k]
    return None


def front_matter(provenance: dict) -> dict:
    """The YAML metadata of the card, as a dict."""
    family = _get(provenance, "family")
    tags = ["gpt-neox", "neoxconv"]
    if family:
        fam = str(family).strip().lower().replace("_", "-")
        if fam and fam not in tags:
            tags.append(fam)
    meta: dict[str, Any] = {"library_name": "transformers", "pipeline_tag": "text-generation", "tags": tags}
    if _get(provenance, "license"):
        meta["license"] = str(provenance["license"])
    if _get(provenance, "base_model"):
        meta["base_model"] = str(provenance["base_model"])
    return meta


def render_model_card(provenance: dict, default_name: str = "model") -> str:
    """The full README.md text for ``provenance``."""
    prov = _scrub(dict(provenance or {}))
    meta = front_matter(prov)
    name = str(_get(prov, "model_name") or default_name)
    repo = str(_get(prov, "repo_id") or "<this repo>")

    rows: list[tuple[str, Any]] = []
    src_fmt = _get(prov, "source_format")
    src_dir = _get(prov, "source_dir")
    if src_fmt is not None:
        rows.append(("Source format", src_fmt))
    if src_dir is not None:
        rows.append(("Source checkpoint", f"`{_basename(src_dir)}`"))
    if _get(prov, "iteration") is not None:
        rows.append(("Iteration", prov["iteration"]))
    tp = _get(prov, "tp", "tensor_parallel", "tensor_model_parallel_size")
    pp = _get(prov, "pp", "pipeline_parallel", "pipe_parallel_size")
    if tp is not None:
        rows.append(("Tensor parallel (source)", tp))
    if pp is not None:
        rows.append(("Pipeline parallel (source)", pp))
    if _get(prov, "layout") is not None:
        rows.append(("Source layout", prov["layout"]))
    if _get(prov, "family") is not None:
        rows.append(("Architecture family", prov["family"]))
    if _get(prov, "dtype") is not None:
        rows.append(("Weights dtype", prov["dtype"]))
    tok = prov.get("tokenizer") if isinstance(prov.get("tokenizer"), dict) else None
    vocab = _get(prov, "vocab_size") if _get(prov, "vocab_size") is not None else (tok or {}).get("vocab_size")
    rows_emb = _get(prov, "embedding_rows") if _get(prov, "embedding_rows") is not None else (tok or {}).get("embedding_rows")
    padding = _get(prov, "padding_rows")
    if padding is None and vocab is not None and rows_emb is not None:
        padding = int(rows_emb) - int(vocab)
    if tok:
        rows.append(("Tokenizer", f"{tok.get('tokenizer_class', '?')} ({tok.get('kind', '?')})"))
    if vocab is not None:
        rows.append(("Tokenizer size", vocab))
    if rows_emb is not None:
        rows.append(("Embedding rows", rows_emb))
    rows.append(("Converted with", f"neoxconv {neoxconv.__version__}"))

    lines = ["---", yaml.safe_dump(meta, sort_keys=False).rstrip("\n"), "---", "", f"# {name}", ""]
    lines += [
        "A GPT-NeoX checkpoint converted to the Hugging Face `transformers` format with neoxconv.",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'model = AutoModelForCausalLM.from_pretrained("{repo}")',
        f'tokenizer = AutoTokenizer.from_pretrained("{repo}")',
        "```",
        "",
        "## Provenance",
        "",
        "| | |",
        "|---|---|",
    ]
    lines += [f"| {k} | {_cell(v)} |" for k, v in rows]
    lines.append("")
    if padding and int(padding) > 0:
        lines += [
            f"The embedding (and output) matrices have {padding} more rows than the tokenizer has tokens "
            f"(vocabulary padding used in training, kept as is). Token ids at or above {vocab} are never "
            "produced by the tokenizer; their logits should be ignored.",
            "",
        ]
    elif padding == 0:
        lines += ["The embedding matrix has exactly one row per tokenizer token (no vocabulary padding).", ""]
    parity = prov.get("parity")
    if isinstance(parity, dict) and parity:
        lines += ["### Parity check", ""]
        scalars = [(k, v) for k, v in parity.items() if not isinstance(v, (dict, list))]
        if scalars:
            lines += ["| check | value |", "|---|---|"] + [f"| {k} | {_cell(v)} |" for k, v in scalars] + [""]
        lines += ["```json", json.dumps(parity, indent=2, sort_keys=True, default=str), "```", ""]
    if _get(prov, "notes"):
        lines += [str(prov["notes"]).strip(), ""]
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        text = f"{value:.6g}"
    else:
        text = str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def write_model_card(out_dir: str | os.PathLike, provenance: dict, force: bool = False) -> bool:
    """Write ``out_dir/README.md``; an existing README.md is kept unless ``force``.

    Returns True when the file was written.
    """
    out = Path(out_dir)
    path = out / "README.md"
    if path.exists() and not force:
        return False
    try:
        out.mkdir(parents=True, exist_ok=True)
        text = render_model_card(provenance, default_name=out.resolve().name or "model")
        path.write_text(text, encoding="utf-8")
    except OSError as e:
        raise NeoxconvError(f"{path}: cannot write the model card ({e.strerror or e})") from None
    return True
