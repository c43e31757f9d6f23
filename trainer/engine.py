"""The one training engine. Every method runs through `Trainer`; a method only plugs in its model
and its step (see methods/base.py).

The loop is written so that a run killed at any step and started again with the same command
ends with the same weights: the sampler and the lr schedule are pure functions of
(seed, epoch, step), augmentation is seeded per sample, and checkpoints carry the optimizer,
scaler, method and RNG states.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import random
import signal
import threading
import time

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from data_pipelines.build import build_data

from . import checkpoint as ckpt
from . import distributed as dist_utils
from .config import Config, save_config
from .methods import create_method
from .metrics import evaluate_predictions, plot_per_class_accuracy
from .models import export_torchvision_state_dict
from .optim import build_optimizer
from .run_folder import RunFolder
from .run_log import Progress, RunLog
from .schedules import lr_factor

_STOP = threading.Event()
# With several processes the ranks agree on a stop request (one all-reduce and a host sync)
# every this many steps and at each epoch's end, at the same steps on every rank; one process
# checks its flag at every step boundary.
STOP_CHECK_EVERY = 10


class Preempted(Exception):
    """Raised after a requested stop has been checkpointed; re-running resumes exactly."""


STOP_SIGNALS = (signal.SIGUSR2, signal.SIGTERM)
STOP_EXIT_STATUS = 143   # launchers/train.py: a stop was checkpointed; re-run to resume


def request_stop(*_signal_args):
    """Ask the running Trainer to checkpoint at the next step boundary and raise Preempted.
    Safe to call from a signal handler (SIGUSR2/SIGTERM from Slurm, submitit's checkpoint())."""
    _STOP.set()


def install_stop_signals(signals=STOP_SIGNALS):
    for s in signals:
        signal.signal(s, request_stop)


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def configure_runtime(cfg: Config, info: dist_utils.DistInfo):
    """Threads, determinism and seeds, before any model or data exists."""
    if info.device.type == "cpu":
        threads = cfg.engine.threads or max(1, (os.cpu_count() or 1) // info.local_world_size)
        torch.set_num_threads(threads)
    if cfg.run.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    elif info.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    seed_everything(cfg.run.seed)


class Trainer:
    def __init__(self, cfg: Config, run_dir: str | None = None, folder: RunFolder | None = None):
        self.cfg = cfg
        self.info = dist_utils.setup(cfg.engine.device, cfg.dist.backend)
        self.device = self.info.device
        self.run_dir = run_dir or os.path.join(cfg.run.out_dir, cfg.run.name)
        self._own_folder = folder is None   # else train() opened it and closes it
        self.folder = folder or RunFolder(self.run_dir, cfg, self.info.world_size,
                                          self.info.is_main).open()
        configure_runtime(cfg, self.info)
        self.log = RunLog(self.run_dir, self.info.is_main, cfg.engine.progress)
        if self.info.is_main and not self.folder.finished:
            for note in self.folder.prepare(save_config):
                self.log.info(note)

        world = self.info.world_size
        if cfg.data.batch_size % world:
            raise ValueError(f"data.batch_size = {cfg.data.batch_size} (global) must be divisible "
                             f"by the number of processes ({world})")
        self.data = build_data(cfg.data, rank=self.info.rank, world_size=world,
                               seed=cfg.run.seed, eval_splits=(cfg.eval.split,))
        self.method = create_method(cfg, self.data, self.device)
        self.method.trainer = self
        if self.method.init_message:
            self.log.info(self.method.init_message)
        self.model = self.method.model.to(self.device)
        self.memory_format = (torch.channels_last if cfg.model.channels_last
                              else torch.contiguous_format)
        self.model = self.model.to(memory_format=self.memory_format)
        module = self.method.train_module()
        train_model = torch.compile(module) if cfg.model.compile else module
        if self.info.enabled:
            train_model = DDP(train_model, device_ids=[self.device.index]
                              if self.device.type == "cuda" else None)
            if cfg.run.deterministic and self.device.type == "cpu":
                train_model.register_comm_hook(None, dist_utils.rank_ordered_mean_hook)
        self.train_model = train_model
        self.optimizer = build_optimizer(cfg.optim, self.method.param_groups(), self.device)
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.engine.amp)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.engine.amp == "fp16")

        self.epoch = self.step_in_epoch = self.global_step = 0
        self.eval_pending = False            # the evaluation after self.epoch is still to do
        self.seconds_before = 0.0            # training time of earlier attempts
        self._t0 = None
        self.results_path = os.path.join(self.run_dir, "results.json")
        if not self.folder.finished:
            self._resume()

    # ------------------------------------------------------------------ state
    def state_dict(self, rng: list | None = None) -> dict:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "method": self.method.state_dict(),
            "progress": {"epoch": self.epoch, "step_in_epoch": self.step_in_epoch,
                         "global_step": self.global_step, "eval_pending": self.eval_pending,
                         "metrics_records": self.log.records,
                         "train_seconds": self.train_seconds()},
            "rng": rng if rng is not None else [ckpt.rng_state()],   # one state per rank
        }

    def train_seconds(self) -> float:
        return self.seconds_before + (time.time() - self._t0 if self._t0 is not None else 0.0)

    def synced_modules(self) -> list[torch.nn.Module]:
        """The model and the method's other modules (key encoder, teacher): their buffers are
        made rank 0's before evaluation and saving."""
        mods = [self.model] + [m for m in vars(self.method).values()
                               if isinstance(m, torch.nn.Module) and m is not self.model]
        return mods

    def save_checkpoint(self):
        dist_utils.broadcast_buffers(self.synced_modules())
        rng = dist_utils.all_gather_object(ckpt.rng_state())
        if self.info.is_main:
            ckpt.atomic_save(self.state_dict(rng), os.path.join(self.run_dir, ckpt.LAST))
        dist_utils.barrier()

    def _resume(self):
        path = ckpt.last_checkpoint(self.run_dir)
        if path is None:   # records of an attempt killed before its first checkpoint go
            self.log.truncate_metrics(keep=0)
            return
        # On the CPU: RNG states must come back as CPU tensors; load_state_dict moves the rest
        state = ckpt.safe_load(path, map_location="cpu")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.method.load_state_dict(state["method"])
        p = state["progress"]
        self.epoch, self.step_in_epoch, self.global_step = (
            p["epoch"], p["step_in_epoch"], p["global_step"])
        self.eval_pending = p.get("eval_pending", False)
        if self.folder.reopen:   # a finished run continued: its final evaluation is an epoch's
            self.eval_pending = self.step_in_epoch == 0 and self._eval_due()
        self.seconds_before = p.get("train_seconds", 0.0)
        ckpt.set_rng_state(ckpt.rank_rng_state(state["rng"], self.info.rank))
        self.log.truncate_metrics(keep=p.get("metrics_records"), last_step=self.global_step)
        self.log.info(f"resumed from {path}: epoch {self.epoch}, step {self.step_in_epoch} "
                      f"of the epoch, global step {self.global_step}")

    # ------------------------------------------------------------------ loop
    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _to_device(self, batch):
        return dist_utils.batch_to_device(batch, self.device, self.memory_format)

    def _set_lr(self, step: int, steps: int):
        f = lr_factor(self.cfg.sched, self.cfg.optim.lr, self.epoch, step, steps)
        for g in self.optimizer.param_groups:
            g["lr"] = g["base_lr"] * f
        return self.cfg.optim.lr * f

    def _optimizer_step(self, loss: torch.Tensor):
        self.scaler.scale(loss).backward()
        if self.cfg.optim.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.train_model.parameters(), self.cfg.optim.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)

    def _steps_left(self) -> bool:
        return not (self.cfg.engine.max_steps and self.global_step >= self.cfg.engine.max_steps)

    def train_epoch(self) -> bool:
        """Run (the rest of) one epoch; return False when max_steps cut it short."""
        cfg = self.cfg
        choice = self.method.on_epoch_start(self.epoch)
        loader, sampler = self.data.train_loader(choice.kind, self.epoch, self.step_in_epoch,
                                                 class_weights=choice.class_weights)
        steps = sampler.num_batches
        if steps == 0:
            raise ValueError(f"data.batch_size = {cfg.data.batch_size} is larger than one epoch "
                             f"of {len(self.data.train)} training samples on {self.info.world_size} process(es)")
        self.train_model.train()
        progress = Progress(self.log, steps, self.step_in_epoch,
                            f"epoch {self.epoch + 1}/{cfg.sched.epochs}",
                            cfg.engine.log_every, cfg.data.batch_size)
        for batch in loader:
            lr = self._set_lr(self.step_in_epoch, steps)
            images, labels = self._to_device(batch)
            self.method.global_step = self.global_step
            with self.autocast():
                loss, logs = self.method.training_step(self.train_model, (images, labels))
            self._optimizer_step(loss)
            self.method.on_step_end(self.train_model, self.global_step)
            self.global_step += 1
            self.step_in_epoch += 1
            if self.global_step % cfg.engine.log_every == 0 or self.step_in_epoch == steps:
                values = {k: float(v) for k, v in logs.items()}
                if not math.isfinite(values.get("loss", 0.0)):
                    raise FloatingPointError(
                        f"loss is {values['loss']} at epoch {self.epoch}, step "
                        f"{self.step_in_epoch}: lower optim.lr or set optim.grad_clip")
                self.log.metrics({"kind": "train", "step": self.global_step,
                                  "epoch": self.epoch, "lr": lr, **values})
                progress.update(values)
            else:
                progress.update({})
            if cfg.checkpoint.every_steps and self.global_step % cfg.checkpoint.every_steps == 0:
                self.save_checkpoint()
            if self.stop_requested(steps):
                self._stop()
            if not self._steps_left():
                break
        progress.close()
        finished = self.step_in_epoch >= steps
        if finished:
            self.epoch += 1
            self.step_in_epoch = 0
        return finished

    def stop_requested(self, steps: int | None = None) -> bool:
        """At a step boundary: has any rank been asked to stop? Several processes agree only
        every STOP_CHECK_EVERY steps and at an epoch's end (or anywhere, with steps=None),
        the same steps on every rank, so other steps carry no host sync."""
        if not self.info.enabled:
            return _STOP.is_set()
        if steps is not None and self.global_step % STOP_CHECK_EVERY and self.step_in_epoch != steps:
            return False
        return dist_utils.any_rank(_STOP.is_set())

    def _stop(self):
        self.save_checkpoint()
        self.log.info(f"stop requested: checkpoint written at epoch {self.epoch}, step "
                      f"{self.step_in_epoch} (global step {self.global_step})")
        raise Preempted(self.run_dir)

    def _eval_due(self) -> bool:
        every = self.cfg.eval.every_epochs
        return bool(every and self.epoch % every == 0 and self.epoch < self.cfg.sched.epochs)

    def fit(self) -> dict:
        try:
            return self._fit()
        finally:
            if self._own_folder:
                self.folder.close()

    def _fit(self) -> dict:
        if self.folder.finished:
            self.log.info(f"{self.results_path} exists: this run is complete")
            return self.folder.results()
        cfg = self.cfg
        self.log.info(f"training {cfg.method.name} / {cfg.model.name} on {cfg.data.source} "
                      f"({len(self.data.train)} images, {self.data.num_classes} classes, "
                      f"counts {self.data.class_counts}) with {self.info.world_size} process(es) "
                      f"on {self.device}; run folder {self.run_dir}")
        self._t0 = time.time()
        while True:
            if self.eval_pending:          # after an epoch, or resumed before its evaluation
                self.evaluate()
                self.eval_pending = False
                if self.stop_requested():  # asked during the evaluation: keep it
                    self._stop()
            if not (self.epoch < cfg.sched.epochs and self._steps_left()):
                break
            if not self.train_epoch():
                break
            self.eval_pending = self._eval_due()
            self.save_checkpoint()         # before the evaluation: a stop there keeps the epoch
        self.save_checkpoint()
        return self.finish(self.train_seconds())

    # ------------------------------------------------------------------ evaluation
    def predict(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """Predicted and true labels of a whole split, in dataset order."""
        self.method.prepare_eval(self)
        pred, true = self.embed(split, lambda x: self.method.predict(self.model, x).argmax(1))
        return pred.long().cpu().numpy(), true.cpu().numpy()

    @torch.no_grad()
    def embed(self, split: str, fn, gather: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """fn(images) for every sample of a split, in dataset order, on every rank (float32);
        an image the loader skipped (data.on_bad_image: skip) has no row. gather=False: this
        rank's shard only, in its loader's order. Every rank calls fn equally often (with an
        empty batch where its shard ends early), so fn may use collectives."""
        was_training = self.model.training
        self.model.eval()
        loader = self.data.eval_loader(split)
        counts = dist_utils.gather_sizes(len(loader), self.device)
        feats, labels, index, images = [], [], [], None
        for batch in loader:
            images, y = self._to_device(batch)
            with self.autocast():
                feats.append(fn(images).float())
            labels.append(y)
            ids = getattr(loader, "batch_indices", None)   # the items it delivered, if told
            index.append(None if ids is None else torch.as_tensor(ids, dtype=torch.long))
        if max(counts) > len(feats):
            if min(counts) == 0:     # no batch here: take the image shape from a rank with one
                shape = dist_utils.broadcast_object(None if images is None else images.shape,
                                                    src=counts.index(max(counts)))
                images = torch.empty((0, *shape[1:]), device=self.device)
                y = torch.empty(0, dtype=torch.long, device=self.device)
            for _ in range(max(counts) - len(feats)):
                with self.autocast():
                    feats.append(fn(images[:0]).float())
                labels.append(y[:0])
        if was_training:
            self.train_model.train()
        feats, labels = torch.cat(feats), torch.cat(labels)
        if not gather:
            return feats, labels
        w, r = self.info.world_size, self.info.rank
        if any(i is None for i in index):   # no skips possible: rank r held r, r+w, ...
            order = torch.arange(len(labels)) * w + r
        else:
            order = torch.cat(index) if index else torch.zeros(0, dtype=torch.long)
        sizes = dist_utils.gather_sizes(len(labels), self.device)
        order = dist_utils.all_gather_cat(order.to(self.device), sizes).argsort()
        return (dist_utils.all_gather_cat(feats, sizes)[order],
                dist_utils.all_gather_cat(labels, sizes)[order])

    def evaluate(self, split: str | None = None) -> dict:
        split = split or self.cfg.eval.split
        dist_utils.broadcast_buffers(self.synced_modules())   # every rank evaluates rank 0's
        pred, true = self.predict(split)
        m = evaluate_predictions(pred, true, self.data.num_classes, self.data.class_counts,
                                 many=self.cfg.eval.many, few=self.cfg.eval.few)
        summary = {k: m[k] for k in ("top1", "balanced_top1", "balanced_error",
                                     "many", "medium", "few")}
        self.log.metrics({"kind": f"eval_{split}", "step": self.global_step,
                          "epoch": self.epoch, **summary})
        shots = " ".join(f"{k} {summary[k]:.2f}" for k in ("many", "medium", "few")
                         if summary[k] is not None)
        self.log.info(f"eval {split} after epoch {self.epoch}: balanced error "
                      f"{m['balanced_error']:.2f}% (top-1 {m['top1']:.2f}%) {shots}")
        return m

    def finish(self, seconds: float) -> dict:
        m = self.evaluate()
        results = {"name": self.cfg.run.name, "method": self.cfg.method.name,
                   "loss": self.cfg.loss.name, "train_rule": self.cfg.train_rule.name,
                   "model": self.cfg.model.name, "seed": self.cfg.run.seed,
                   "split": self.cfg.eval.split, "epochs": self.epoch,
                   "global_step": self.global_step, "world_size": self.info.world_size,
                   "train_seconds": round(seconds, 1), "class_counts": self.data.class_counts,
                   **self.method.summary(), **m}
        if self.info.is_main:
            d = self.run_dir
            final = self.method.final_model()
            ckpt.atomic_save(final.state_dict(), os.path.join(d, "model_final.pt"))
            ckpt.atomic_save(export_torchvision_state_dict(final),
                             os.path.join(d, "model_torchvision.pt"))
            plot_per_class_accuracy(m["per_class_acc"], self.data.class_counts,
                                    os.path.join(d, "per_class_accuracy.png"),
                                    title=f"{self.cfg.run.name}: balanced error "
                                          f"{m['balanced_error']:.2f}%")
            with ckpt.disk_errors(self.results_path):
                with open(self.results_path + ".tmp", "w") as f:
                    json.dump(results, f, indent=1)
                os.replace(self.results_path + ".tmp", self.results_path)
            self.log.info(f"results in {self.results_path}")
        dist_utils.barrier()
        return results


def train(cfg: Config, run_dir: str | None = None) -> dict:
    """Run one config to the end (or resume it) in this process; returns results.json.
    The process group stays up, so that a pipeline can run its next stage in it.
    The run folder is checked first (trainer/run_folder.py: same config, no other owner); a
    finished run of this config returns at once, without building data or model: a requeued
    pipeline skips its done stages in seconds."""
    run_dir = run_dir or os.path.join(cfg.run.out_dir, cfg.run.name)
    rank, world = dist_utils.env_ranks()[:2]
    folder = RunFolder(run_dir, cfg, world, rank == 0).open()
    try:
        if folder.finished:
            if rank == 0:
                print(f"{os.path.join(run_dir, 'results.json')} exists: this run is complete",
                      flush=True)
            return folder.results()
        trainer = Trainer(cfg, run_dir, folder)
        try:
            return trainer.fit()
        finally:
            trainer.log.close()
    finally:
        folder.close()
