"""``neoxconv train-check``: a tensor-parallel training step on a NeoX checkpoint, proven against HF.

One process per TP rank (world size = TP, no data or pipeline parallelism), joined by
torch.distributed (gloo on CPU, NCCL on CUDA). Launched either by ``torchrun`` (the command sees
RANK/WORLD_SIZE and uses, or initialises, the default process group) or, without it, by
:func:`run_train_check`, which spawns the TP processes locally.

Per rank: open the checkpoint reading **only this rank's files**
(``reference.NeoxCheckpoint(..., ranks=(r,))``), hold its tensors as parameters of
:class:`neoxconv.reference.train.NeoxTrainModel` (NeoX semantics, no converter code), and for
every step: forward, vocab-parallel next-token loss, backward, optimizer step.
Rank 0 also runs the **same steps on the HF model** (the ``--hf`` directory, or the checkpoint
converted by neoxconv into a temporary directory): same batch, same loss over the same softmax
columns, ``torch.optim`` SGD/AdamW with the same hyper-parameters.

Compared on rank 0, per step: the loss of both sides, and every gradient. NeoX gradients are
gathered tensor by tensor (one spec index at a time) and put into canonical form with the
converter's per-rank un-fusing (``rank_to_layer``) and TP roles -- the converter is used only
here and to make the HF side, which is exactly the mapping under test. Gradient rules differ from
weight rules in one place: a replicated tensor (norms; row biases, which under gpt_j_residual are
additive parts) receives the *same* gradient on every rank, so its canonical gradient is that
common value (the mean), and the spread between the rank copies is checked too. After the last
step the updated weights are compared (weight rules: parts summed, copies averaged) as the update
relative to the HF update. ``--save`` then writes the updated weights as a NeoX checkpoint, every
rank its own files, published by one rename.

Metrics: loss ``|Δ|``; gradient relative error of a tensor ``max|g_neox - g_hf| / max|g_hf|``
(over the vocab rows both sides have); update error ``(max|w_neox - w_hf| - 4·eps·max|w_hf|)⁺ /
max|w_hf - w_hf⁰|``: the weight difference beyond a few ulps of the weights themselves, relative to
the size of the HF update (over the elements whose gradient is determined, see
:func:`.compare.compare_grads`). Tolerances per dtype: :data:`TOLERANCES`.

Modules: :mod:`.options` (options, tolerances, input checks), :mod:`.agree` (all ranks stop
together), :mod:`.hf_side` (the HF model, rank 0), :mod:`.compare` (canonical gradients and
weights), :mod:`.rank` (one rank's run, report, save), :mod:`.launch` (processes, torchrun, CLI).
This package is an orchestrator: it may use the converter (to make the HF side and to read the
NeoX gradients the converter's way); the NeoX model itself is the independent reference.
"""

from .launch import cli_main, run_train_check, run_train_checks, run_under_torchrun
from .options import TOLERANCES, TrainCheckOptions

__all__ = ["TOLERANCES", "TrainCheckOptions", "cli_main", "run_train_check", "run_train_checks", "run_under_torchrun"]
