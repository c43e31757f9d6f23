"""Gradient accumulation: one optimizer step over a global batch larger than memory allows.

data.batch_size stays the global batch of one optimizer step (the lr rule, the sampler and
the per-rank slices are unchanged); each rank's batch is cut into optim.accum_steps
contiguous micro-batches, each forwarded and backpropagated alone (DDP synchronises only the
last), its loss weighted by its share of the batch. For a loss that is a plain mean over the
batch the accumulated gradient is the large batch's (up to float summation order). It is not
where the batch is seen as a whole: BatchNorm normalises each micro-batch with its own
statistics (and moves its running statistics once per micro-batch), and a class-weighted
cross-entropy (Reweight, DRW, CB) divides by each micro-batch's weight sum. Methods whose
step keeps state per forward (MoCo's queue and key encoder, VAT's and Mean Teacher's noise)
do not accumulate (Method.accumulates).
"""
from __future__ import annotations

import contextlib

import torch

import ltrainer.configspec as spec
from .methods.registry import METHODS


def micro_batches(batch, chunks: int) -> list:
    """The batch (a NamedTuple of tensors or None) cut into `chunks` contiguous parts; the
    labeled and the unlabeled fields are each cut evenly."""
    if chunks == 1:
        return [batch]
    parts = [[] for _ in range(chunks)]
    for value in batch:
        pieces = (list(torch.tensor_split(value, chunks)) if isinstance(value, torch.Tensor)
                  else [value] * chunks)
        for p, piece in zip(parts, pieces):
            p.append(piece)
    return [type(batch)(*p) for p in parts]


def accumulated_step(forward, backward, batch, chunks: int, no_sync=None):
    """forward(micro) -> (loss, logs); backward(loss) backpropagates; no_sync: DDP's
    context that skips the gradient all-reduce (None: one process). Returns the batch's loss
    and logs (each the size-weighted mean over the micro-batches), gradients left
    accumulated for one optimizer step."""
    if chunks == 1:                  # the plain step, without any extra operation
        loss, logs = forward(batch)
        backward(loss)
        return loss, logs
    no_sync = no_sync or contextlib.nullcontext
    micros = micro_batches(batch, chunks)
    n = batch[0].shape[0]
    total, logs = None, {}
    for i, micro in enumerate(micros):
        share = micro[0].shape[0] / n
        with no_sync() if i < len(micros) - 1 else contextlib.nullcontext():
            loss, part = forward(micro)
            backward(loss * share)
        total = loss.detach() * share if total is None else total + loss.detach() * share
        for k, v in part.items():
            logs[k] = v * share if k not in logs else logs[k] + v * share
    return total, logs


def check_accumulation(cfg, fail):
    steps = cfg.optim.accum_steps
    if steps == 1:
        return
    if not getattr(METHODS[cfg.method.name], "accumulates", False):
        can = ", ".join(sorted(n for n, m in METHODS.items() if getattr(m, "accumulates", False)))
        fail("optim.accum_steps", f"optim.accum_steps = {steps}: method '{cfg.method.name}' "
                                  f"keeps state per forward pass and cannot accumulate "
                                  f"gradients (methods that can: {can})")


CONFIG = spec.Part({"optim": {"accum_steps": spec.F(
    "int", 1, ge=1, help="micro-batches per optimizer step (gradient accumulation); "
                         "data.batch_size stays the batch of one step")}},
    check_accumulation, owner=__name__)
