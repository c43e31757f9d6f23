"""The device-side input path (data_pipelines/gpu_input.py) on the CPU: uint8 batches from the
workers, the shared stage on the batch; the same pixels as the per-sample path, the seeds of
the right samples even when bad images are dropped, and chosen automatically."""
import os

import numpy as np
import pytest
import torch

import ltrainer.data_pipelines.loaders as L
from ltrainer.data_pipelines.augment import build_transform
from ltrainer.data_pipelines.datasets import AugmentedDataset
from ltrainer.data_pipelines.gpu_input import StagedLoader
from ltrainer.data_pipelines.samplers import build_sampler
from ltrainer.data_pipelines.sources import ArraySource, DataError
from tests.conftest import FMNIST

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def _source(n=40):
    g = np.random.default_rng(0)
    return ArraySource(g.integers(0, 256, (n, 20, 24, 3), dtype=np.uint8), np.arange(n) % 4, 4,
                       "rand")


class _Broken(ArraySource):
    """Item 5 cannot be read (the loader drops it with data.on_bad_image=skip)."""

    def load(self, i):
        if i == 5:
            raise DataError("broken[5]: cannot decode")
        return super().load(i)


def _cfg(policy="fail"):
    return {"source": "list", "stats": "svhn", "augment": "moco", "image_size": 16,
            "workers": 0, "on_bad_image": policy, "loader": "torchvision"}


def _loader(src, augment, train, policy="fail"):
    cfg = {**_cfg(policy), "augment": augment}
    ds = AugmentedDataset(src, build_transform(augment, train, 16, (0.5,) * 3, (0.5,) * 3, 3))
    sampler = build_sampler("uniform", src.labels, batch_size=8, seed=3)
    make = L.make_train_loader if train else L.make_eval_loader
    return make(cfg, ds, sampler, batch_size=8, seed=1, in_channels=3), ds, sampler


def test_staged_moco_batches_equal_the_per_sample_path(monkeypatch):
    monkeypatch.setattr(L, "cuda_device", lambda: None)
    src = _source()
    loader, ds, sampler = _loader(src, "moco", True)
    assert isinstance(loader, StagedLoader) and loader.device.type == "cpu"
    got = torch.cat([x for x, _ in loader])
    want = torch.stack([ds[k][0] for k in sampler])       # the dataset's own (per-sample) path
    assert got.shape == (40, 2, 3, 16, 16) and got.dtype == torch.float32
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()


def test_dropped_images_keep_the_other_samples_seeds(monkeypatch):
    monkeypatch.setattr(L, "cuda_device", lambda: None)
    base = _source()
    src = _Broken(base.images, base.labels, 4, "broken")
    loader, ds, sampler = _loader(src, "moco", True, policy="skip")
    keys = [k for k in sampler if k[0] != 5]
    got, ids = [], []
    for x, _ in loader:
        got.append(x)
        ids += torch.as_tensor(loader.batch_indices).tolist()
    assert loader.skipped == 1 and ids == [k[0] for k in keys]
    want = torch.stack([ds[k][0] for k in keys])
    assert torch.allclose(torch.cat(got), want, atol=1e-5)


def test_the_path_is_chosen_by_device_and_recipe(monkeypatch):
    src = _source()
    monkeypatch.setattr(L, "cuda_device", lambda: None)
    plain, _, _ = _loader(src, "imagenet", True)
    assert not isinstance(plain, StagedLoader)              # CPU: workers normalise
    monkeypatch.setattr(L, "cuda_device", lambda: 0)
    on_gpu, _, _ = _loader(src, "imagenet", True)
    assert isinstance(on_gpu, StagedLoader) and on_gpu.device == torch.device("cuda", 0)
    evals, _, _ = _loader(src, "small", False)
    assert isinstance(evals, StagedLoader)


def test_staged_normalisation_equals_the_workers(monkeypatch):
    """uint8 out of the workers + the stage's normalisation = the workers' own float output."""
    monkeypatch.setattr(L, "cuda_device", lambda: None)
    src = _source()
    for augment in ("small", "imagenet", "none"):
        tf = build_transform(augment, False, 16, (0.5,) * 3, (0.5,) * 3, 3)
        crops = tf.crops_only()
        for i in range(3):
            img = src.load(i)
            want = tf(img)
            got = crops.stage(crops(img)[None])[0]
            assert torch.allclose(got, want.as_subclass(torch.Tensor), atol=1e-5), augment


def _device_reads_in_training(monkeypatch, overrides):
    """Calls that read a tensor's value on the host (each a device sync on a GPU) while
    Trainer.train_epoch runs."""
    from ltrainer.trainer.config import load_config
    from ltrainer.trainer.engine import Trainer, train

    count, inside = [0], [False]
    for name in ("item", "__float__", "__bool__", "__int__", "tolist"):
        real = getattr(torch.Tensor, name)

        def spy(self, *a, _real=real, **k):
            if inside[0]:
                count[0] += 1
            return _real(self, *a, **k)
        monkeypatch.setattr(torch.Tensor, name, spy)
    real_epoch = Trainer.train_epoch

    def epoch(self):
        inside[0] = True
        try:
            return real_epoch(self)
        finally:
            inside[0] = False
    monkeypatch.setattr(Trainer, "train_epoch", epoch)
    train(load_config(None, overrides))
    monkeypatch.undo()
    return count[0]


@pytest.mark.skipif(not os.path.exists(FMNIST), reason="apt-get install dataset-fashion-mnist")
def test_training_steps_read_no_device_value_outside_logging(monkeypatch, tiny, tmp_path):
    """Single process: the stop check is a host flag and the loss is read only at logging
    steps, so more steps between two logs must not mean more host reads."""
    base = [o for o in tiny if not o.startswith(("sched.", "engine.log_every", "data.n_max"))]
    base += ["sched.epochs=1", "sched.milestones=[1]", "sched.warmup_epochs=0",
             "eval.every_epochs=0", "engine.log_every=1000", "method.name=supervised"]
    few = _device_reads_in_training(monkeypatch, base + ["data.n_max=40",
                                                         f"run.out_dir={tmp_path}/a"])
    many = _device_reads_in_training(monkeypatch, base + ["data.n_max=120",
                                                          f"run.out_dir={tmp_path}/b"])
    assert many == few, (few, many)
