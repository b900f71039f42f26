"""Model card: YAML front matter, provenance section, kept-unless-force."""

from __future__ import annotations

import hashlib
import json
import re

import yaml

import neoxconv
from neoxconv.modelcard import name_model_card, read_provenance, render_model_card, write_model_card

PROVENANCE = {
    "model_name": "pythia-tiny-step100",
    "family": "gpt-neox",
    "license": "apache-2.0",
    "source_format": "neox-pipeline",
    "source_dir": "/scratch/alice/runs/pythia-tiny/global_step100",
    "iteration": 100,
    "tp": 2,
    "pp": 4,
    "layout": "pipeline",
    "dtype": "float16",
    "vocab_size": 50277,
    "embedding_rows": 50304,
    "parity": {
        "max_abs_logit_diff": 0.0,
        "argmax_agreement": 1.0,
        "prompts": 4,
        "reference": "/home/alice/secret/reference_logits.pt",
        "per_layer": {"0": 0.0, "1": 0.0},
    },
}


def split_card(text: str) -> tuple[dict, str]:
    m = re.match(r"^---\n(.*?)\n---\n(.*)$", text, re.S)
    assert m, "README.md must start with YAML front matter"
    return yaml.safe_load(m.group(1)), m.group(2)


def test_front_matter_and_provenance(tmp_path):
    assert write_model_card(tmp_path, PROVENANCE) is True
    text = (tmp_path / "README.md").read_text()
    meta, body = split_card(text)

    assert meta["library_name"] == "transformers"
    assert meta["pipeline_tag"] == "text-generation"
    assert meta["license"] == "apache-2.0"
    assert "gpt-neox" in meta["tags"]

    assert body.lstrip().startswith("# pythia-tiny-step100")
    assert "## Provenance" in body
    rows = dict(re.findall(r"^\| ([^|]+?) \| (.+?) \|$", body, re.M))
    assert rows["Source format"] == "neox-pipeline"
    assert rows["Source checkpoint"] == "`global_step100`"
    assert rows["Iteration"] == "100"
    assert rows["Tensor parallel (source)"] == "2" and rows["Pipeline parallel (source)"] == "4"
    assert rows["Source layout"] == "pipeline"
    assert rows["Weights dtype"] == "float16"
    assert rows["Converted with"] == f"neoxconv {neoxconv.__version__}"
    assert "27 more rows than the tokenizer has tokens" in body  # 50304 - 50277 padding rows
    # local paths never leak, only their last component
    assert "/scratch/" not in text and "/home/" not in text and "alice" not in text
    # the parity report is there, as a table and as JSON
    assert rows["max_abs_logit_diff"] == "0" and rows["argmax_agreement"] == "1"
    report = json.loads(re.search(r"```json\n(.*?)\n```", body, re.S).group(1))
    assert report["prompts"] == 4 and report["per_layer"] == {"0": 0.0, "1": 0.0}
    assert report["reference"] == "reference_logits.pt"


def test_family_tag_and_optional_keys(tmp_path):
    text = render_model_card({"family": "llama", "source_dir": "C:\\runs\\llama7b"}, default_name="x")
    meta, body = split_card(text)
    assert meta["tags"][0] == "gpt-neox" and "llama" in meta["tags"]
    assert "license" not in meta
    assert "`llama7b`" in body and "runs" not in body
    assert "Parity check" not in body  # no report given
    # an empty provenance still gives a valid card
    meta, body = split_card(render_model_card({}, default_name="empty"))
    assert meta["library_name"] == "transformers" and "# empty" in body


def test_card_is_valid_for_huggingface_hub(tmp_path):
    import huggingface_hub
    write_model_card(tmp_path, PROVENANCE)
    card = huggingface_hub.ModelCard.load(tmp_path / "README.md")
    assert card.data.library_name == "transformers"
    assert card.data.license == "apache-2.0"
    assert "gpt-neox" in card.data.tags


def test_existing_readme_is_kept_unless_force(tmp_path):
    (tmp_path / "README.md").write_text("my own card\n")
    assert write_model_card(tmp_path, PROVENANCE) is False
    assert (tmp_path / "README.md").read_text() == "my own card\n"
    assert write_model_card(tmp_path, PROVENANCE, force=True) is True
    assert (tmp_path / "README.md").read_text().startswith("---\n")


def test_padding_note_from_tokenizer_info(tmp_path):
    tok = {"kind": "hf-json", "tokenizer_class": "GPTNeoXTokenizer", "vocab_size": 100, "embedding_rows": 128}
    _, body = split_card(render_model_card({"tokenizer": tok}))
    assert "28 more rows" in body and "GPTNeoXTokenizer (hf-json)" in body
    _, body = split_card(render_model_card({"vocab_size": 128, "embedding_rows": 128}))
    assert "no vocabulary padding" in body


def test_card_renders_again_from_itself(tmp_path):
    """The front matter keeps the (scrubbed) provenance: the card can be rendered again from itself."""
    write_model_card(tmp_path, PROVENANCE)
    text = (tmp_path / "README.md").read_text()
    prov = read_provenance(tmp_path)
    assert prov["source_dir"] == "global_step100" and prov["parity"]["reference"] == "reference_logits.pt"
    assert render_model_card(prov) == text
    assert read_provenance(tmp_path / "nowhere") is None


def test_name_model_card(tmp_path):
    write_model_card(tmp_path, PROVENANCE)
    assert name_model_card(tmp_path, "org/pythia-tiny", "org/pythia-tiny", "step100") == "named"
    meta, body = split_card((tmp_path / "README.md").read_text())
    assert body.lstrip().startswith("# org/pythia-tiny\n")
    assert 'from_pretrained("org/pythia-tiny", revision="step100")' in body and "<this repo>" not in body
    assert meta["neoxconv"]["iteration"] == 100  # the provenance is kept
    assert name_model_card(tmp_path, "org/pythia-tiny", "org/pythia-tiny", "step100") == "unchanged"
    # an output manifest (neoxconv-manifest.json) stays true for the renamed card
    (tmp_path / "neoxconv-manifest.json").write_text(json.dumps(
        {"format": "neoxconv-manifest", "version": 1, "files": {"README.md": {"size": 1, "sha256": "0"}}}))
    assert name_model_card(tmp_path, "org/pythia-tiny", "org/pythia-tiny", "step200") == "named"
    raw = (tmp_path / "README.md").read_bytes()
    listed = json.loads((tmp_path / "neoxconv-manifest.json").read_text())["files"]["README.md"]
    assert listed == {"size": len(raw), "sha256": hashlib.sha256(raw).hexdigest()}
    edited = (tmp_path / "README.md").read_text().replace("## Provenance", "## Provenance\n\nTrained on my data.")
    (tmp_path / "README.md").write_text(edited)
    assert name_model_card(tmp_path, "org/other", "org/other") == "edited"
    assert (tmp_path / "README.md").read_text() == edited  # a hand-edited card is left alone
    (tmp_path / "README.md").write_text("---\nlicense: mit\n---\n# mine\n")
    assert name_model_card(tmp_path, "org/other", "org/other") == "foreign"


def test_conversion_card_is_titled_by_the_output_dir(tmp_path):
    """Not by the temporary directory the conversion writes into (`.hf.partial-XXXX`)."""
    from fixtures.neox_raw import random_rank_tensors, write_neox_checkpoint
    from neoxconv.convert import convert

    ranks = random_rank_tensors(tp=1, layers=2, hidden=32, heads=4, ffn=128, vocab_rows=128, tied=False)
    save = write_neox_checkpoint(tmp_path / "ckpt", ranks, dict(num_layers=2, hidden_size=32, num_attention_heads=4,
                                                                rotary_pct=0.25, no_weight_tying=True))
    convert(save, tmp_path / "pythia-tiny-hf", to="hf")
    meta, body = split_card((tmp_path / "pythia-tiny-hf" / "README.md").read_text())
    assert body.lstrip().startswith("# pythia-tiny-hf\n") and "partial" not in body
    assert meta["neoxconv"]["model_name"] == "pythia-tiny-hf"
