"""Model card (README.md) for an exported Hugging Face directory, rendered with huggingface_hub's
``ModelCard.from_template`` (front matter from ``ModelCardData``).

``provenance`` is a plain dict; every key is optional:

======================  ====================================================================
``model_name``          title of the card: the Hub repo id when published, else the output
                        directory's name (default: the name of the directory written to)
``repo_id``             Hub id used in the usage snippet (default: a placeholder)
``revision``            Hub branch of this export (e.g. ``step1000``), used in the snippet
``family``              "gpt-neox", "llama", "mistral", ... (added to the tags)
``license``             SPDX-style id, e.g. "apache-2.0" (front matter ``license``)
``base_model``          Hub id of the model this was trained from (front matter)
``source_format``       e.g. "neox-pipeline", "neox-sequential", "hf"
``source_dir``          where the checkpoint came from; only its last component is written
``run``                 name of the NeoX save directory of a training run (export-run)
``iteration``           training step of the checkpoint
``tokens_seen``         tokens trained on up to this step; ``tokens_rule`` says how it was
                        computed
``tp`` / ``pp``         tensor / pipeline parallel degree of the source
                        (``tensor_parallel`` / ``pipeline_parallel`` accepted too)
``layout``              on-disk layout of the source ("pipeline" / "sequential")
``dtype``               dtype of the exported weights
``vocab_size``          tokenizer size; ``embedding_rows``: rows of the embedding matrix
``padding_rows``        embedding_rows - vocab_size (computed when both are given)
``tokenizer``           a TokenizerInfo.to_dict() (its kind/class are shown)
``parity``              the parity report (a dict), rendered as a table plus JSON
``source_fingerprint``  ``{"digest": "sha256:...", "files": {name: {"size", "sha256"}}}`` of
                        the source step (export-run)
``notes``               free text appended to the provenance section
``custom_code``         markdown of a custom-code export (custom.export.model_card_section):
                        the model then loads with ``trust_remote_code=True``
``neoxconv_version``    the converting neoxconv (default: this one)
======================  ====================================================================

Absolute local paths never reach the card: ``source_dir`` is reduced to its base name and
any other string that is an absolute path is reduced the same way.

The (scrubbed) provenance is also stored in the front matter under ``neoxconv``, so a card can
be rendered again from itself: :func:`name_model_card` retitles an untouched neoxconv card with
the repo id it is published under, and leaves a card that someone edited alone.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import neoxconv
from neoxconv.errors import NeoxconvError

_WINDOWS_ABS = re.compile(r"^[A-Za-z]:[\\/]")

# Rendered by jinja2 through ModelCard.from_template (card_data is the YAML of ModelCardData).
TEMPLATE = """---
{{ card_data }}
---

# {{ title }}

A GPT-NeoX checkpoint converted to the Hugging Face `transformers` format with neoxconv.

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained({{ load_args }}{% if custom_code %}, trust_remote_code=True{% endif %})
tokenizer = AutoTokenizer.from_pretrained({{ load_args }}{% if custom_code %}, trust_remote_code=True{% endif %})
```

{% if custom_code %}{{ custom_code }}

{% endif %}## Provenance

| | |
|---|---|
{% for key, value in rows %}| {{ key }} | {{ value }} |
{% endfor %}
{% for paragraph in notes %}{{ paragraph }}

{% endfor %}{% if parity_rows or parity_json %}### Parity check

{% if parity_rows %}| check | value |
|---|---|
{% for key, value in parity_rows %}| {{ key }} | {{ value }} |
{% endfor %}
{% endif %}```json
{{ parity_json }}
```

{% endif %}{% if fingerprint %}### Source fingerprint

`{{ fingerprint.digest }}`: SHA-256 over the name, size and SHA-256 of each source file of this
step. `neoxconv export-run` compares it with the source to skip steps that have not changed
(on the Hub, the commit that completes the branch carries it too).

<details>
<summary>{{ fingerprint.files | length }} source files</summary>

| file | bytes | sha256 |
|---|---|---|
{% for name, f in fingerprint.files.items() %}| `{{ name }}` | {{ f.size }} | `{{ f.sha256 }}` |
{% endfor %}
</details>

{% endif %}{% if extra %}{{ extra }}

{% endif %}"""


def _basename(value: str) -> str:
    text = str(value).rstrip("/\\")
    if _WINDOWS_ABS.match(text):
        return PureWindowsPath(text).name or text
    return PurePosixPath(text).name or text


def _scrub(value: Any) -> Any:
    """Replace absolute paths (anywhere in nested data) by their last component."""
    if isinstance(value, dict):
        return {str(k): _scrub(v) for k, v in value.items()}
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


def card_data(provenance: dict):
    """The front matter of the card, as a ``huggingface_hub.ModelCardData``."""
    from huggingface_hub import ModelCardData

    family = _get(provenance, "family")
    tags = ["gpt-neox", "neoxconv"]
    if family:
        fam = str(family).strip().lower().replace("_", "-")
        if fam and fam not in tags:
            tags.append(fam)
    return ModelCardData(
        library_name="transformers", pipeline_tag="text-generation", tags=tags,
        license=str(provenance["license"]) if _get(provenance, "license") else None,
        base_model=str(provenance["base_model"]) if _get(provenance, "base_model") else None,
        neoxconv=provenance,
    )


def _rows(prov: dict) -> tuple[list[tuple[str, Any]], Any, Any]:
    rows: list[tuple[str, Any]] = []

    def add(label: str, *keys: str, fmt=lambda v: v) -> None:
        value = _get(prov, *keys)
        if value is not None:
            rows.append((label, fmt(value)))

    add("Source format", "source_format")
    add("Training run", "run", fmt=lambda v: f"`{v}`")
    add("Source checkpoint", "source_dir", fmt=lambda v: f"`{_basename(v)}`")
    add("Iteration", "iteration")
    if _get(prov, "tokens_seen") is not None:
        rule = _get(prov, "tokens_rule")
        rows.append(("Tokens seen", f"{int(prov['tokens_seen']):,}" + (f" ({rule})" if rule else "")))
    add("Tensor parallel (source)", "tp", "tensor_parallel", "tensor_model_parallel_size")
    add("Pipeline parallel (source)", "pp", "pipeline_parallel", "pipe_parallel_size")
    add("Source layout", "layout")
    add("Architecture family", "family")
    add("Weights dtype", "dtype")
    tok = prov.get("tokenizer") if isinstance(prov.get("tokenizer"), dict) else {}
    vocab = _get(prov, "vocab_size") if _get(prov, "vocab_size") is not None else tok.get("vocab_size")
    emb = _get(prov, "embedding_rows") if _get(prov, "embedding_rows") is not None else tok.get("embedding_rows")
    if tok:
        rows.append(("Tokenizer", f"{tok.get('tokenizer_class', '?')} ({tok.get('kind', '?')})"))
    if vocab is not None:
        rows.append(("Tokenizer size", vocab))
    if emb is not None:
        rows.append(("Embedding rows", emb))
    rows.append(("Converted with", f"neoxconv {prov['neoxconv_version']}"))
    return rows, vocab, emb


def _notes(prov: dict, vocab, emb) -> list[str]:
    padding = _get(prov, "padding_rows")
    if padding is None and vocab is not None and emb is not None:
        padding = int(emb) - int(vocab)
    if padding and int(padding) > 0:
        return [f"The embedding (and output) matrices have {padding} more rows than the tokenizer has tokens "
                "(vocabulary padding used in training, kept as is). Token ids at or above "
                f"{vocab} are never produced by the tokenizer; their logits should be ignored."]
    if padding == 0:
        return ["The embedding matrix has exactly one row per tokenizer token (no vocabulary padding)."]
    return []


def render_model_card(provenance: dict, default_name: str = "model") -> str:
    """The full README.md text for ``provenance``."""
    from huggingface_hub import ModelCard

    prov = _scrub(dict(provenance or {}))
    if prov.get("source_dir") is not None:
        prov["source_dir"] = _basename(prov["source_dir"])
    for key, default in (("neoxconv_version", neoxconv.__version__), ("model_name", default_name)):
        if prov.get(key) is None:
            prov[key] = default
    rows, vocab, emb = _rows(prov)
    load_args = json.dumps(str(_get(prov, "repo_id") or "<this repo>"))
    if _get(prov, "revision") and prov["revision"] != "main":
        load_args += f", revision={json.dumps(str(prov['revision']))}"
    parity = prov.get("parity") if isinstance(prov.get("parity"), dict) and prov.get("parity") else {}
    fingerprint = prov.get("source_fingerprint")
    card = ModelCard.from_template(
        card_data(prov), template_str=TEMPLATE, title=str(prov["model_name"]), load_args=load_args,
        rows=[(k, _cell(v)) for k, v in rows], notes=_notes(prov, vocab, emb),
        parity_rows=[(k, _cell(v)) for k, v in parity.items() if not isinstance(v, (dict, list))],
        parity_json=json.dumps(parity, indent=2, sort_keys=True, default=str) if parity else "",
        fingerprint=fingerprint if isinstance(fingerprint, dict) and fingerprint.get("files") else None,
        extra=str(prov["notes"]).strip() if _get(prov, "notes") else "",
        custom_code=str(prov["custom_code"]).strip() if _get(prov, "custom_code") else "",
    )
    return str(card).rstrip("\n") + "\n"


def _cell(value: Any) -> str:
    text = f"{value:.6g}" if isinstance(value, float) else str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def _write(path: Path, text: str) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    except OSError as e:
        raise NeoxconvError(f"{path}: cannot write the model card ({e.strerror or e})") from None


def write_model_card(out_dir: str | os.PathLike, provenance: dict, force: bool = False) -> bool:
    """Write ``out_dir/README.md``; an existing README.md is kept unless ``force``.

    The title is ``provenance["model_name"]``, else ``out_dir``'s name. Returns True when the
    file was written.
    """
    out = Path(out_dir)
    path = out / "README.md"
    if path.exists() and not force:
        return False
    _write(path, render_model_card(provenance, default_name=out.resolve().name or "model"))
    return True


def read_provenance(out_dir: str | os.PathLike) -> dict | None:
    """The provenance a neoxconv card in ``out_dir`` was rendered from; None when there is no
    README.md or it is not neoxconv's."""
    from huggingface_hub import ModelCard

    path = Path(out_dir) / "README.md"
    if not path.is_file():
        return None
    try:
        prov = ModelCard.load(path, ignore_metadata_errors=True).data.to_dict().get("neoxconv")
    except Exception:  # noqa: BLE001 - an unreadable card is simply not ours
        return None
    return prov if isinstance(prov, dict) else None


def name_model_card(out_dir: str | os.PathLike, model_name: str, repo_id: str | None = None,
                    revision: str | None = None) -> str:
    """Give the neoxconv card in ``out_dir`` its published name (title, usage snippet, branch).

    Returns "named" (README.md rewritten), "unchanged" (already so named), "edited" (a neoxconv
    card changed by hand since it was written: left alone) or "foreign" (no README.md, or not
    neoxconv's: left alone).
    """
    path = Path(out_dir) / "README.md"
    prov = read_provenance(out_dir)
    if prov is None:
        return "foreign"
    if path.read_text(encoding="utf-8") != render_model_card(prov):
        return "edited"
    named = {**prov, "model_name": model_name, "repo_id": repo_id or prov.get("repo_id"),
             "revision": revision or prov.get("revision")}
    text = render_model_card(named)
    if text == path.read_text(encoding="utf-8"):
        return "unchanged"
    _write(path, text)
    _refresh_manifest(Path(out_dir), "README.md")
    return "named"


def _refresh_manifest(out_dir: Path, name: str) -> None:
    """Keep ``neoxconv-manifest.json`` (every output file's size and sha256) true for ``name``."""
    import hashlib

    manifest = out_dir / "neoxconv-manifest.json"
    try:
        data = json.loads(manifest.read_text())
        entry = data["files"][name]
    except (OSError, ValueError, KeyError, TypeError):
        return  # no manifest, or it does not list the card
    raw = (out_dir / name).read_bytes()
    entry.update(size=len(raw), sha256=hashlib.sha256(raw).hexdigest())
    manifest.write_text(json.dumps(data, indent=2) + "\n")
