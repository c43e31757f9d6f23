"""MoCo v2 (He et al. 2020; Chen et al. 2020): contrast each query with its key from a momentum
encoder and with a queue of earlier keys. The paper's SSP for ImageNet-LT and iNaturalist.

Keys are computed on a batch shuffled across processes (or across SplitBatchNorm groups in one
process), so that BatchNorm statistics never tie a query to its own key. The shuffle and every
other random choice come from (run seed, global step), which keeps resume exact and lets one
process with N BatchNorm groups reproduce N processes.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from .. import distributed as dist_utils
from ..models import Classifier, ProjectionHead, convert_split_bn, create_backbone, matmul_fp32
from . import register
from .ssl_base import SelfSupervised


def info_nce_logits(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, t: float):
    """Logits [B, 1 + K]: column 0 the positive pair, then the queue; targets are all 0.
    All in float32 (also under autocast), so positives and negatives are rounded alike."""
    l_pos = (q.float() * k.float()).sum(dim=1, keepdim=True)
    l_neg = matmul_fp32(q, queue)
    return torch.cat([l_pos, l_neg], dim=1) / t


@register
class MoCo(SelfSupervised):
    name = "moco"

    def bn_splits(self) -> int:
        """BatchNorm groups inside each process."""
        world = self.data.world_size
        total = self.cfg.moco.bn_splits or (world if world > 1 else 4)
        if total % world or self.data.local_batch % (total // world):
            raise ValueError(f"moco.bn_splits = {total} must be a multiple of the number of "
                             f"processes ({world}) and divide each local batch "
                             f"({self.data.local_batch})")
        return total // world

    def build_model(self):
        c = self.cfg
        backbone = create_backbone(c.model.name, in_channels=self.data.in_channels,
                                   **self.model_kwargs())
        model = Classifier(backbone, ProjectionHead(backbone.out_dim, c.moco.dim))
        return convert_split_bn(model, self.bn_splits())

    def __init__(self, cfg, data, device):
        super().__init__(cfg, data, device)
        fmt = torch.channels_last if cfg.model.channels_last else torch.contiguous_format
        self.key_model = copy.deepcopy(self.model).to(device, memory_format=fmt)
        for p in self.key_model.parameters():
            p.requires_grad_(False)
        self.queue = F.normalize(torch.randn(cfg.moco.dim, cfg.moco.queue), dim=0).to(device)
        self.queue_ptr = 0

    @torch.no_grad()
    def momentum_update(self):
        m = self.cfg.moco.momentum
        for pk, pq in zip(self.key_model.parameters(), self.model.parameters()):
            pk.mul_(m).add_(pq.detach(), alpha=1 - m)

    @torch.no_grad()
    def keys(self, im_k: torch.Tensor) -> torch.Tensor:
        """Normalized keys of the whole global batch, in global order (shuffled BN)."""
        world, rank = self.data.world_size, self.data.rank
        gathered = dist_utils.all_gather_cat(im_k)
        g = torch.Generator().manual_seed((self.cfg.run.seed * 1_000_003 + self.global_step)
                                          % (2 ** 62))
        perm = torch.randperm(gathered.shape[0], generator=g).to(im_k.device)
        local = gathered[perm].chunk(world)[rank]
        k = F.normalize(self.key_model(local).float(), dim=1)
        shuffled_keys = dist_utils.all_gather_cat(k)
        keys = torch.empty_like(shuffled_keys)
        keys[perm] = shuffled_keys
        return keys

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor):
        n = keys.shape[0]
        self.queue[:, self.queue_ptr:self.queue_ptr + n] = keys.T
        self.queue_ptr = (self.queue_ptr + n) % self.queue.shape[1]

    def training_step(self, model, batch):
        views, _ = batch                                  # [b, 2, C, H, W]; labels unused
        im_q, im_k = views[:, 0].contiguous(), views[:, 1].contiguous()
        q = F.normalize(model(im_q).float(), dim=1)
        self.momentum_update()
        all_keys = self.keys(im_k)
        k = all_keys.chunk(self.data.world_size)[self.data.rank]
        logits = info_nce_logits(q, k, self.queue.clone(), self.cfg.moco.temperature)
        target = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
        loss = F.cross_entropy(logits, target)
        self.enqueue(all_keys)
        with torch.no_grad():
            acc = (logits.argmax(1) == 0).float().mean() * 100
        return loss, {"loss": loss.detach(), "pos_acc": acc}

    def state_dict(self) -> dict:
        return {"key_model": self.key_model.state_dict(), "queue": self.queue,
                "queue_ptr": self.queue_ptr}

    def load_state_dict(self, state: dict) -> None:
        self.key_model.load_state_dict(state["key_model"])
        self.queue.copy_(state["queue"])
        self.queue_ptr = int(state["queue_ptr"])
