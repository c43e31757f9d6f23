"""MoCo v2 (He et al. 2020; Chen et al. 2020): contrast each query with its key from a momentum
encoder and with a queue of earlier keys. The paper's SSP for ImageNet-LT and iNaturalist.

Keys are computed on a batch shuffled across processes (or across SplitBatchNorm groups in one
process), so that BatchNorm statistics never tie a query to its own key. The shuffle and every
other random choice come from (run seed, global step), which keeps resume exact and lets one
process with N BatchNorm groups reproduce N processes.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import ltrainer.configspec as spec
from .. import distributed as dist_utils
from ..ema import ema_update, frozen_copy
from ..models import Classifier, ProjectionHead, convert_split_bn, create_backbone, matmul_fp32
from .registry import register
from .ssl_base import SelfSupervised


def info_nce_logits(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, t: float):
    """Logits [B, 1 + K]: column 0 the positive pair, then the queue; targets are all 0.
    All in float32 (also under autocast), so positives and negatives are rounded alike."""
    l_pos = (q.float() * k.float()).sum(dim=1, keepdim=True)
    l_neg = matmul_fp32(q, queue)
    return torch.cat([l_pos, l_neg], dim=1) / t


def shuffle_plan(perm: torch.Tensor, sizes: list[int], rank: int):
    """Who sends which images to whom for the shuffled key batch.

    Shuffled position j of the global batch holds sample perm[j]; rank r encodes positions
    [start_r, start_r + sizes[r]) (its own BatchNorm group), and owns samples
    [start_r, start_r + sizes[r]) of the global order. Returns, for `rank`: its local rows to
    send, in destination order; how many go to each rank; how many come from each; and, for
    each received row, its place in this rank's shuffled slice."""
    world = len(sizes)
    ends = torch.tensor(sizes).cumsum(0)
    starts = ends - torch.tensor(sizes)
    owner = torch.searchsorted(ends, perm, right=True)            # who holds sample perm[j]
    dest = torch.searchsorted(ends, torch.arange(len(perm)), right=True)  # who encodes j
    j = (owner == rank).nonzero().squeeze(1)
    send_rows = perm[j] - starts[rank]
    send_counts = torch.bincount(dest[j], minlength=world).tolist()
    mine = owner[starts[rank]:ends[rank]]
    recv_counts = torch.bincount(mine, minlength=world).tolist()
    return send_rows, send_counts, recv_counts, torch.argsort(mine, stable=True)


def _on(index: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small CPU index tensor on `device`; on CUDA pinned and asynchronous, so the step
    does not wait for the GPU to drain."""
    if device.type == "cuda":
        return index.pin_memory().to(device, non_blocking=True)
    return index


@register
class MoCo(SelfSupervised):
    name = "moco"
    state_fields = ("queue_ptr",)   # key_model and the queue are a submodule and a buffer
    no_sync_bn = "MoCo shuffles BatchNorm across the ranks itself (moco.bn_splits)"
    config = {"moco": {
        "dim": spec.F("int", 128, ge=1, help="projection (key) dimension"),
        "queue": spec.F("int", 65536, ge=1, help="K: queue length, a multiple of the global "
                                                 "batch"),
        "momentum": spec.F("float", 0.999, ge=0, le=1, help="key encoder EMA momentum"),
        "temperature": spec.F("float", 0.2, gt=0),
        "bn_splits": spec.F("int", 0, ge=0, help="BatchNorm groups per global batch (shuffled "
                                                 "BN); 0 = one per process, or 4 for a single "
                                                 "process"),
    }}

    @classmethod
    def check_config(cls, cfg, fail):
        if cfg.moco.queue % cfg.data.batch_size:
            fail("moco.queue", f"moco.queue = {cfg.moco.queue} must be a multiple of the global "
                               f"batch data.batch_size = {cfg.data.batch_size}")
        if cfg.data.augment != "moco":
            fail("method.name", "method 'moco' needs two views per image: set data.augment: moco")
        super().check_config(cfg, fail)

    @staticmethod
    def total_bn_splits(cfg, world: int) -> int:
        """BatchNorm groups per global batch (moco.bn_splits, or its automatic value)."""
        return cfg.moco.bn_splits or (world if world > 1 else 4)

    @classmethod
    def check_world(cls, cfg, world):
        problems = super().check_world(cfg, world)
        total = cls.total_bn_splits(cfg, world)
        if not problems and (total % world or cfg.data.batch_size // world % (total // world)):
            problems.append(f"moco.bn_splits = {total} must be a multiple of the {world} ranks "
                            f"and divide each local batch ({cfg.data.batch_size // world})")
        return problems

    def bn_splits(self) -> int:
        """BatchNorm groups inside each process."""
        world = self.data.world_size
        problems = self.check_world(self.cfg, world)
        if problems:
            raise ValueError(problems[0])
        return self.total_bn_splits(self.cfg, world) // world

    def build_model(self):
        c = self.cfg
        backbone = create_backbone(c.model.name, in_channels=self.data.in_channels,
                                   **self.model_kwargs())
        model = Classifier(backbone, ProjectionHead(backbone.out_dim, c.moco.dim))
        return convert_split_bn(model, self.bn_splits())

    def __init__(self, cfg, data, device):
        super().__init__(cfg, data, device)
        fmt = torch.channels_last if cfg.model.channels_last else torch.contiguous_format
        self.key_model = frozen_copy(self.model, device, fmt)   # trainer/ema.py
        self.register_buffer("queue", F.normalize(torch.randn(cfg.moco.dim, cfg.moco.queue),
                                                  dim=0).to(device))
        self.queue_ptr = 0

    def momentum_update(self):
        """key encoder <- m key + (1 - m) query, over the parameters (its BN: its own)."""
        ema_update(self.key_model, self.model, self.cfg.moco.momentum)

    @torch.no_grad()
    def keys(self, im_k: torch.Tensor, ctx) -> tuple[torch.Tensor, torch.Tensor]:
        """(normalized keys of the whole global batch in global order, this rank's keys),
        encoded on a batch shuffled across processes (shuffled BN). Only the permutation is
        shared (a pure function of seed and step); each rank receives just the images it
        encodes, in the training dtype, and local batches may differ in size (skipped images)."""
        world, rank, dev = self.data.world_size, self.data.rank, im_k.device
        if world == 1 or self.cfg.data.on_bad_image == "fail":
            sizes = [im_k.shape[0]] * world    # the samplers drop the tail: equal batches
        else:
            sizes = dist_utils.gather_sizes(im_k.shape[0], dev)
        perm = torch.randperm(sum(sizes), generator=ctx.generator(0x5F1E))   # same on all ranks
        start = sum(sizes[:rank])
        if world == 1:
            local = im_k[_on(perm, dev)]
        else:
            send_rows, send_counts, recv_counts, recv_pos = shuffle_plan(perm, sizes, rank)
            dtype = (torch.get_autocast_dtype(dev.type) if torch.is_autocast_enabled(dev.type)
                     else im_k.dtype)   # what the first layer would cast the images to anyway
            got = dist_utils.all_to_all_rows(im_k[_on(send_rows, dev)].to(dtype), send_counts,
                                             recv_counts)
            local = torch.empty_like(got)
            local[_on(recv_pos, dev)] = got
        k = F.normalize(self.key_model(local).float(), dim=1)
        shuffled_keys = dist_utils.all_gather_cat(k, sizes)
        keys = torch.empty_like(shuffled_keys)
        keys[_on(perm, dev)] = shuffled_keys
        return keys, keys[start:start + sizes[rank]]

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor):
        """Write keys into the ring at the pointer, wrapping around: any number of keys
        (the global batch shrinks when images are skipped), the newest K when more."""
        size = self.queue.shape[1]
        ptr = (self.queue_ptr + max(0, keys.shape[0] - size)) % size  # as if all were written
        keys = keys[-size:]
        n = keys.shape[0]
        first = min(n, size - ptr)
        self.queue[:, ptr:ptr + first] = keys[:first].T
        self.queue[:, :n - first] = keys[first:].T
        self.queue_ptr = (ptr + n) % size

    def training_step(self, model, batch, ctx):
        views = batch.images                              # [b, 2, C, H, W]; labels unused
        im_q, im_k = views[:, 0].contiguous(), views[:, 1].contiguous()
        q = F.normalize(model(im_q).float(), dim=1)
        self.momentum_update()
        all_keys, k = self.keys(im_k, ctx)
        logits = info_nce_logits(q, k, self.queue.clone(), self.cfg.moco.temperature)
        target = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
        loss = F.cross_entropy(logits, target)
        self.enqueue(all_keys)
        with torch.no_grad():
            acc = (logits.argmax(1) == 0).float().mean() * 100
        return loss, {"loss": loss.detach(), "pos_acc": acc}
