"""MoCo v2 pieces on tiny tensors, and 2-process MoCo against one process."""
import os
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import ROOT, needs_fmnist
from ltrainer.trainer.config import load_config
from ltrainer.trainer.methods.base import Batch
from ltrainer.trainer.methods.moco import MoCo, info_nce_logits
from ltrainer.trainer.step_context import StepContext


def make_moco(batch=8, queue=16, splits=1, momentum=0.9, name="resnet8"):
    cfg = load_config(None, [f"model.name={name}", "data.image_size=28", f"moco.queue={queue}",
                             f"moco.dim=8", f"moco.momentum={momentum}", f"moco.bn_splits={splits}",
                             f"data.batch_size={batch}", "data.augment=moco", "method.name=moco"])
    data = SimpleNamespace(world_size=1, rank=0, local_batch=batch, in_channels=1,
                           num_classes=10, class_counts=[1] * 10)
    torch.manual_seed(0)
    return MoCo(cfg, data, torch.device("cpu"))


def test_queue_is_fifo_and_wraps_around():
    m = make_moco(batch=4, queue=12)
    batches = [torch.full((4, 8), float(i)) for i in range(4)]
    for b in batches[:3]:
        m.enqueue(b)
    assert m.queue_ptr == 0                                  # 3 x 4 filled the 12 slots
    assert torch.equal(m.queue[0], torch.tensor([0.] * 4 + [1.] * 4 + [2.] * 4))
    m.enqueue(batches[3])                                    # the oldest keys go first
    assert m.queue_ptr == 4
    assert torch.equal(m.queue[0], torch.tensor([3.] * 4 + [1.] * 4 + [2.] * 4))


def test_momentum_update_formula():
    m = make_moco(momentum=0.9)
    q_params = [p.detach().clone() for p in m.model.parameters()]
    k_params = [torch.randn_like(p) for p in m.key_model.parameters()]
    for p, v in zip(m.key_model.parameters(), k_params):
        p.data.copy_(v)
    m.momentum_update()
    for p, k0, q in zip(m.key_model.parameters(), k_params, q_params):
        torch.testing.assert_close(p, 0.9 * k0 + 0.1 * q)


def test_info_nce_equals_hand_computation():
    q = F.normalize(torch.tensor([[1.0, 2.0], [0.5, -1.0]]), dim=1)
    k = F.normalize(torch.tensor([[1.0, 1.0], [0.0, -1.0]]), dim=1)
    queue = F.normalize(torch.tensor([[1.0, 0.0, -1.0], [0.0, 1.0, 0.5]]), dim=0)
    t = 0.2
    loss = F.cross_entropy(info_nce_logits(q, k, queue, t), torch.zeros(2, dtype=torch.long))
    expected = 0.0
    for i in range(2):
        pos = float(q[i] @ k[i]) / t
        negs = [float(q[i] @ queue[:, j]) / t for j in range(3)]
        expected += -pos + torch.logsumexp(torch.tensor([pos] + negs), 0).item()
    assert abs(loss.item() - expected / 2) < 1e-5


def test_no_gradient_reaches_key_encoder_and_queue_advances():
    m = make_moco(batch=8, queue=16, splits=2)
    views = torch.randn(8, 2, 1, 28, 28)
    loss, logs = m.training_step(m.model, Batch(views, torch.zeros(8, dtype=torch.long)),
                                 StepContext())
    loss.backward()
    assert all(p.grad is None for p in m.key_model.parameters())
    assert all(not p.requires_grad for p in m.key_model.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.model.parameters())
    assert m.queue_ptr == 8 and torch.isfinite(loss)


def test_shuffled_keys_come_back_in_original_order():
    """With one BatchNorm group, statistics do not depend on the order, so shuffled keys must
    equal a direct forward pass, row for row."""
    m = make_moco(batch=8, splits=1)
    im_k = torch.randn(8, 1, 28, 28)
    for step in (0, 1, 2):
        m.key_model.train()
        shuffled = m.keys(im_k, StepContext(step=step))[0]
        direct = F.normalize(m.key_model(im_k).float(), dim=1)
        torch.testing.assert_close(shuffled, direct, rtol=1e-4, atol=1e-5)


def test_split_bn_keys_depend_on_the_shuffle():
    """With 2 groups the shuffle decides which samples share statistics (that is its point)."""
    m = make_moco(batch=8, splits=2)
    im_k = torch.randn(8, 1, 28, 28)
    a = m.keys(im_k, StepContext(step=0))[0]
    direct = F.normalize(m.key_model(im_k).float(), dim=1)
    assert not torch.allclose(a, direct, atol=1e-4)


@needs_fmnist
def test_two_process_moco_matches_one_process_with_two_bn_groups(tmp_path, small_test_list):
    """2 gloo processes (one BN group each) == 1 process with 2 SplitBatchNorm groups: same
    batches, same key shuffle, same queue; equal up to float rounding (all-reduce order, BN
    arithmetic), which stays far below the gap to a run whose BN groups differ.

    Contiguous layout: with channels_last the 2-process gradients were seen to differ from the
    single-process ones by ~0.5% already at the first step (not explained yet; see the notes)."""
    from ltrainer.launchers.train import launch
    over = [f"run.out_dir={tmp_path}", "run.deterministic=true", "data.n_max=60", "data.rho=10",
            "data.batch_size=16", f"data.test_list={small_test_list}", "data.augment=moco",
            "method.name=moco", "moco.queue=32", "moco.dim=16", "moco.momentum=0.9",
            "optim.lr=0.03", "sched.epochs=1", "sched.warmup_epochs=0", "sched.name=constant",
            "eval.every_epochs=0", "engine.progress=none", "model.channels_last=false"]
    cfg = os.path.join(ROOT, "configs", "fmnist_lt_ce.yaml")
    runs = {"one": (1, 2), "two": (2, 2), "control": (1, 4)}   # name: (processes, BN groups)
    for name, (nproc, groups) in runs.items():
        launch(load_config(cfg, over + [f"run.name={name}", f"moco.bn_splits={groups}"]), nproc)
    load = lambda name, f: torch.load(tmp_path / name / f, weights_only=True)
    a, b, c = (load(n, "model_final.pt") for n in runs)
    gap = lambda x, y: max((x[k] - y[k]).abs().max().item() for k in x
                           if x[k].is_floating_point() and "running" not in k)
    same, different = gap(a, b), gap(a, c)
    assert same < 2e-4 and different > 20 * same, (same, different)
    qa, qb = load("one", "checkpoint_last.pt")["method"], load("two", "checkpoint_last.pt")["method"]
    torch.testing.assert_close(qa["queue"], qb["queue"], rtol=1e-3, atol=1e-4)
    assert qa["_extra_state"]["queue_ptr"] == qb["_extra_state"]["queue_ptr"] == 240 // 16 * 16 % 32


# ------------------------------------------------------------------ uneven batches, all_to_all

def test_queue_ring_write_wraps_for_any_batch_size():
    """Skipped images make the global batch shrink: the pointer must not drift off the end."""
    m = make_moco(batch=4, queue=12)
    ring = [None] * 12
    written = 0
    for n in (4, 3, 4, 5, 2, 15):
        m.enqueue(torch.arange(written, written + n, dtype=torch.float).view(n, 1).expand(n, 8))
        for v in range(max(written, written + n - 12), written + n):
            ring[v % 12] = float(v)
        written += n
        assert m.queue_ptr == written % 12
        assert m.queue[0].tolist() == [r if r is not None else m.queue[0, i].item()
                                       for i, r in enumerate(ring)], n


@pytest.mark.parametrize("sizes", [[4, 4], [5, 2], [1, 3, 6], [0, 2, 3, 3]])
def test_shuffle_plan_sends_each_rank_only_the_images_it_encodes(sizes):
    """Simulated all_to_all over every rank: rank r ends up with exactly its slice of the
    shuffled global batch (what the old all-gather of every image computed), and receives
    sizes[r] images, not the whole global batch."""
    from ltrainer.trainer.methods.moco import shuffle_plan

    n, world = sum(sizes), len(sizes)
    images = torch.arange(n * 3, dtype=torch.float).view(n, 3)
    starts = [sum(sizes[:r]) for r in range(world)]
    local = [images[s:s + k] for s, k in zip(starts, sizes)]
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(n))
    plans = [shuffle_plan(perm, sizes, r) for r in range(world)]
    sent = [list(local[r][p[0]].split(p[1])) for r, p in enumerate(plans)]
    for r, (_, _, recv_counts, recv_pos) in enumerate(plans):
        got = torch.cat([sent[s][r] for s in range(world)])
        assert [len(sent[s][r]) for s in range(world)] == recv_counts
        out = torch.empty_like(got)
        out[recv_pos] = got
        assert len(got) == sizes[r]
        assert torch.equal(out, images[perm][starts[r]:starts[r] + sizes[r]])


UNEVEN_STEPS = [(5, 2), (3, 4), (1, 5), (4, 4)]      # local batch of rank 0, rank 1


def _uneven_views(step):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(sum(UNEVEN_STEPS[step]), 2, 1, 28, 28, generator=g)


def _uneven_moco(rank, world):
    cfg = load_config(None, ["model.name=mlp", "data.image_size=28", "moco.queue=12",
                             "moco.dim=8", "moco.momentum=0.9", f"moco.bn_splits={world}",
                             "data.batch_size=4", "data.augment=moco", "method.name=moco",
                             "data.on_bad_image=skip"])
    data = SimpleNamespace(world_size=world, rank=rank, local_batch=4 // world, in_channels=1,
                           num_classes=10, class_counts=[1] * 10)
    torch.manual_seed(0)
    return MoCo(cfg, data, torch.device("cpu"))


def _uneven_worker(out):
    from ltrainer.trainer import distributed as dist_utils
    info = dist_utils.setup("cpu")
    torch.set_num_threads(1)
    m = _uneven_moco(info.rank, info.world_size)
    sent = []
    exchange = dist_utils.all_to_all_rows
    dist_utils.all_to_all_rows = lambda rows, s, r: (sent.append((str(rows.dtype), len(rows))),
                                                    exchange(rows, s, r))[1]
    losses = []
    for step, sizes in enumerate(UNEVEN_STEPS):
        views = _uneven_views(step)
        start = sum(sizes[:info.rank])
        mine = views[start:start + sizes[info.rank]]
        loss, _ = m.training_step(m.model, Batch(mine, torch.zeros(len(mine), dtype=torch.long)),
                                  StepContext(step=step, info=info))
        losses.append(loss.item())
    with torch.autocast("cpu", dtype=torch.bfloat16):   # images travel in the training dtype
        m.keys(mine[:, 1].contiguous(), StepContext(step=len(UNEVEN_STEPS), info=info))
    torch.save({"losses": losses, "queue": m.queue, "ptr": m.queue_ptr, "sent": sent},
               f"{out}/rank{info.rank}.pt")


def test_two_processes_with_unequal_local_batches(tmp_path):
    """A BatchNorm-free encoder makes keys independent of the grouping, so 2 processes with
    unequal local batches must give each rank the loss of its own rows and both the queue of
    one process; each rank sends and receives only the images it encodes."""
    from ltrainer.trainer import distributed as dist_utils

    dist_utils.run_local(_uneven_worker, 2, {"out": str(tmp_path)})
    ref = _uneven_moco(0, 1)
    ref_losses = [[], []]
    for step, sizes in enumerate(UNEVEN_STEPS):
        views = _uneven_views(step)
        ref.momentum_update()
        q = F.normalize(ref.model(views[:, 0].contiguous()).float(), dim=1)
        k = F.normalize(ref.key_model(views[:, 1].contiguous()).float(), dim=1)
        logits = info_nce_logits(q, k, ref.queue.clone(), ref.cfg.moco.temperature)
        for r, part in enumerate(logits.split(list(sizes))):
            ref_losses[r].append(F.cross_entropy(
                part, torch.zeros(len(part), dtype=torch.long)).item())
        ref.enqueue(k)
    for r in range(2):
        got = torch.load(tmp_path / f"rank{r}.pt", weights_only=True)
        assert got["losses"] == pytest.approx(ref_losses[r], rel=1e-5, abs=1e-6)
        torch.testing.assert_close(got["queue"], ref.queue)
        assert got["ptr"] == ref.queue_ptr == sum(map(sum, UNEVEN_STEPS)) % 12
        assert [n for _, n in got["sent"]][:-1] == [s[r] for s in UNEVEN_STEPS]
        assert got["sent"][-1][0] == str(torch.bfloat16)


def test_split_bn_takes_a_short_batch_in_uneven_groups():
    """One process emulating 4 BN groups used to raise on a batch one image short (an image
    skipped as unreadable); now each contiguous group (sizes 3, 2, 2, 2 of 9) is normalised on
    its own, and the running statistics follow the first group, as for full batches."""
    import torch
    from torch import nn

    from ltrainer.trainer.models.split_bn import SplitBatchNorm2d
    torch.manual_seed(0)
    x = torch.randn(9, 3, 4, 4)
    split = SplitBatchNorm2d(3, num_splits=4).train()
    ref = nn.BatchNorm2d(3).train()
    y = split(x)
    groups = torch.tensor_split(x, 4)
    want = torch.cat([nn.functional.batch_norm(g, None, None, training=True) for g in groups])
    torch.testing.assert_close(y, want)
    ref(groups[0])
    torch.testing.assert_close(split.running_mean, ref.running_mean)
    torch.testing.assert_close(split.running_var, ref.running_var)
    assert int(split.num_batches_tracked) == 1
