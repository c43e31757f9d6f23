"""Divergence detection: a loss far above its start stops the run, not only NaN/inf (issue 12:
a cRT loss went 25 -> 2e26 at a batch changed without its lr, and nothing stopped it).

Checked at log steps only, where the loss is on the host already. Diverged when the loss is
not finite, above DIVERGE_FACTOR x the run's first logged loss (and above DIVERGE_FLOOR, so a
loss that starts near 0 may grow to ordinary values), or above DIVERGE_ABS whatever its start.
No recipe of this project comes near these at a sane lr (CE starts at ln C <= 9.1 for 8,142
classes).
"""
from __future__ import annotations

import math

DIVERGE_FACTOR, DIVERGE_FLOOR, DIVERGE_ABS = 100.0, 10.0, 1e4


class Diverged(FloatingPointError):
    """One line naming the lr used, optim.lr and the batch (the usual cause)."""


def check_loss(loss: float, first_loss: float | None, *, lr: float, optim_lr: float,
               batch_size: int, where: str, agree=None) -> float | None:
    """Return the run's first logged loss (this one if none yet); raise Diverged when the loss
    ran away. `agree(bad) -> bool` makes the ranks stop together (any rank's verdict)."""
    if first_loss is None and math.isfinite(loss):
        first_loss = loss
    limit = max(DIVERGE_FACTOR * (first_loss or 0.0), DIVERGE_FLOOR)
    bad = not (math.isfinite(loss) and loss <= limit and loss <= DIVERGE_ABS)
    if not (agree(bad) if agree is not None else bad):
        return first_loss
    if not bad:
        why = f"ran away on another rank (here {loss:.4g})"
    elif not math.isfinite(loss):
        why = f"is {loss}"
    elif loss > limit:
        why = f"{loss:.4g} is over {DIVERGE_FACTOR:g}x its first logged value {first_loss:.4g}"
    else:
        why = f"{loss:.4g} is over {DIVERGE_ABS:g}"
    raise Diverged(f"training diverged: loss {why} at {where}; lr used {lr:.4g} (optim.lr = "
                   f"{optim_lr:g}) with data.batch_size = {batch_size} (global): lower "
                   f"optim.lr (scale it with the batch) or set optim.grad_clip")
