"""The HF side of ``neoxconv train-check`` (rank 0): the HF model doing the same steps.

The model is the ``--hf`` directory, or the checkpoint converted by neoxconv (the mapping under
test) into a temporary directory; it is trained whole (``from_pretrained``), with ``torch.optim``
and the same hyper-parameters as the NeoX side.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from neoxconv import archs
from neoxconv.convert import convert
from neoxconv.errors import NeoxconvError
from neoxconv.formats.hf import read_hf
from neoxconv.formats.neox_files import read_sidecar
from neoxconv.reference import load_hf_model
from neoxconv.reference.train import NeoxTrainModel, build_optimizer, param_value
from neoxconv.tokenizer import find_neox_tokenizer, tokenizer_size

from .options import TrainCheckOptions

__all__ = ["HFSide", "real_vocab"]


def real_vocab(files, hf_real: int) -> int:
    """The real (tokenizer) vocabulary: the neoxconv sidecar, the NeoX tokenizer, the HF
    tokenizer -- the smallest known; else every row counts as real."""
    sizes = [hf_real]
    recorded = read_sidecar(files.tag_dir).get("vocab_size")
    if recorded:
        sizes.append(int(recorded))
    path = find_neox_tokenizer(files.args, files.tag_dir)
    if path and tokenizer_size(path):
        sizes.append(int(tokenizer_size(path)))
    return min(sizes)


class HFSide:
    """The HF model doing the same steps, on rank 0."""

    def __init__(self, opts: TrainCheckOptions, files, model: NeoxTrainModel, device: torch.device):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
        self.opts = opts
        self.tmp: Path | None = None
        try:
            if opts.hf is not None:
                hf_dir, origin = Path(opts.hf), "given"
            else:
                self.tmp = Path(tempfile.mkdtemp(prefix="neoxconv-train-check-"))
                hf_dir, origin = self.tmp / "hf", "converted"
                convert(Path(opts.ckpt), hf_dir, to="hf", src_format="neox",
                        config_files=list(opts.config_files) or None, qkv_layout=opts.qkv_layout)
            ckpt = read_hf(hf_dir)
            self.spec = ckpt.spec
            self.arch = archs.by_family(self.spec.family)
            self.model = load_hf_model(hf_dir, opts.torch_dtype).to(device)
        except BaseException:
            self.cleanup()
            raise
        self.device = device
        self.heads = (self.spec.heads, self.spec.kv_heads)
        self.w0 = self.canonical({n: p.detach().clone() for n, p in self.model.named_parameters()})
        self.grads: dict[str, torch.Tensor] = {}
        #: per canonical tensor, the elements whose gradient the check determines (see .compare.compare_grads)
        self.determined: dict[str, torch.Tensor] = {}
        self.optimizer = None
        hf_rows = self.model.get_output_embeddings().weight.shape[0]
        padded = model.rank_state(0, model.group.local_ranks[0])["word_embeddings.weight"].shape[0] * model.group.tp
        if hf_rows > padded:
            raise NeoxconvError(f"the HF model has {hf_rows} vocabulary rows, the NeoX checkpoint only {padded}: "
                                "not the same model")
        real = real_vocab(files, self.spec.vocab_size)
        self.plan = {
            "hf_dir": str(hf_dir) if origin == "given" else None,
            "hf_source": origin,
            "family": self.spec.family,
            "padded_vocab": padded,
            "softmax_vocab": hf_rows,
            "real_vocab": min(real, hf_rows),
        }

    def canonical(self, named: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {}
        for name, t in named.items():
            try:
                out.update(self.arch.to_canonical(self.heads, {name: t}))
            except KeyError:
                raise NeoxconvError(f"HF model: no canonical name for parameter {name!r}") from None
        return out

    def forward_backward(self, tokens: torch.Tensor) -> float:
        self.model.zero_grad(set_to_none=True)
        tokens = tokens.to(self.device)
        logits = self.model(input_ids=tokens, use_cache=False).logits.float()
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
        loss.backward()
        self.grads = self.canonical({n: p.grad for n, p in self.model.named_parameters()
                                     if p.requires_grad and p.grad is not None})
        return float(loss.item())

    def freeze_unmatched(self, neox_names: set[str]) -> list[str]:
        """HF parameters with no NeoX counterpart (e.g. the zero MLP biases an export of a
        bias-free GPTNeoX gets) are not trained, or the two models would stop being the same."""
        frozen = []
        for name, p in self.model.named_parameters():
            if not set(self.canonical({name: p.detach()})) & neox_names:
                p.requires_grad_(False)
                p.grad = None
                frozen.append(name)
        return frozen

    def step(self) -> None:
        if self.optimizer is None:
            params = [p for p in self.model.parameters() if p.requires_grad]
            self.optimizer = build_optimizer(self.opts.optimizer, params, self.opts.lr, self.opts.weight_decay)
        self.optimizer.step()

    def weights(self) -> dict[str, torch.Tensor]:
        """Current weights (fp32 masters in mixed precision), canonical."""
        opt = self.optimizer
        return self.canonical({n: (param_value(opt, p) if opt is not None else p).detach()
                               for n, p in self.model.named_parameters()})

    def cleanup(self) -> None:
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None
