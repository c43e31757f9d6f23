"""Virtual Adversarial Training (Miyato et al. 2018; the paper's Appendix): the model learns from
the labels and from keeping its prediction on each pool image under the small perturbation that
changes it most: loss = L(D_L) + omega * KL(p(x) || p(x + r_adv)), ||r_adv|| = semi.vat_eps.

r_adv comes from one power iteration started at a random direction (semi.vat_xi) drawn from
(seed, step, rank). Those extra passes run in float32, through the unwrapped model, and leave
the BatchNorm statistics as they were.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

import ltrainer.configspec as spec
from ..losses import no_autocast
from .registry import register
from .semi_base import SemiSupervised


def l2_normalize(d: torch.Tensor) -> torch.Tensor:
    """Each sample scaled to unit L2 norm over all its dimensions; scaled by its largest entry
    first, since the power iteration's gradients (~xi^2) are too small to square in float32."""
    flat = d.flatten(1)
    flat = flat / flat.abs().amax(dim=1, keepdim=True).clamp_min(torch.finfo(d.dtype).tiny)
    return (flat / flat.norm(dim=1, keepdim=True).clamp_min(1e-12)).view_as(d)


def kl_to(target: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(target || softmax(logits)), mean over the batch."""
    return F.kl_div(F.log_softmax(logits.float(), dim=1), target, reduction="batchmean")


def vat_perturbation(forward, x: torch.Tensor, target: torch.Tensor, xi: float, eps: float,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """The adversarial direction of one power iteration, scaled to L2 norm eps per sample."""
    d = l2_normalize(torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype))
    d.requires_grad_(True)
    grad, = torch.autograd.grad(kl_to(target, forward(x + xi * d)), d)
    return eps * l2_normalize(grad.detach())


@contextlib.contextmanager
def frozen_buffers(model: torch.nn.Module):
    """Run forward passes in train mode without moving BatchNorm's running statistics."""
    saved = [(b, b.detach().clone()) for b in model.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, value in saved:
                b.copy_(value)


@register
class VAT(SemiSupervised):
    name = "vat"
    config = {"semi": {
        "vat_xi": spec.F("float", 1e-6, gt=0, help="step of the power iteration"),
        "vat_eps": spec.F("float", 6.0, gt=0, help="L2 norm of the adversarial perturbation"),
    }}

    def training_step(self, model, batch, ctx):
        images, labels, u_images = batch.images, batch.labels, batch.u_images
        s, n = self.cfg.semi, images.shape[0]
        g = ctx.generator(0x0FA7, u_images.device, per_rank=True)
        with no_autocast(u_images.device.type), frozen_buffers(self.model):
            with torch.no_grad():
                target = F.softmax(self.model(u_images).float(), dim=1)
            r_adv = vat_perturbation(self.model, u_images, target, s.vat_xi, s.vat_eps, g)
        logits = model(torch.cat([images, u_images + r_adv]))
        loss_l = self.loss(logits[:n], labels)
        loss_u = kl_to(target, logits[n:])
        loss = loss_l + self.unlabeled_weight(ctx.epoch) * loss_u
        return loss, self.labeled_logs(logits[:n], labels, loss_l, loss_u, loss)
