"""The one training engine. Every method runs through `Trainer`; a method only plugs in its model
and its step (see methods/base.py).

The loop is written so that a run killed at any step and started again with the same command
ends with the same weights: the sampler and the lr schedule are pure functions of
(seed, epoch, step), augmentation is seeded per sample, and checkpoints carry the optimizer,
scaler, method and RNG states.
"""
from __future__ import annotations

import contextlib
import os
import random
import time

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from ltrainer.data_pipelines.build import build_data
from ltrainer.data_pipelines.cpus import cpus_per_process

from . import checkpoint as ckpt
from . import distributed as dist_utils
from .accumulate import accumulated_step
from .config import Config, save_config
from .divergence import check_loss
from .extraction import heap_bounded
from .methods.base import Batch
from .metrics import metrics_from_confusion, plot_per_class_accuracy
from .models import export_torchvision_state_dict
from .optim import build_optimizer, describe_lr, scaled_lr
from .protocol import EpochSelection
from .run_folder import RunFolder
from .results import (PER_CLASS, describe_class_counts, finished_message, split_results,
                      write_results)
from .run_log import PlanPosition, Progress, RunLog
from .schedules import lr_factor
from .serving import build_method
from .step_context import StepContext
from .stops import (_STOP, STOP_EXIT_STATUS, STOP_SIGNALS, Preempted,  # noqa: F401 (re-exported)
                    install_stop_signals, request_stop)

# With several processes the ranks agree on a stop request (one all-reduce and a host sync)
# every this many steps and at each epoch's end, at the same steps on every rank; one process
# checks its flag at every step boundary.
STOP_CHECK_EVERY = 10


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def configure_runtime(cfg: Config, info: dist_utils.DistInfo):
    """Threads, determinism and seeds, before any model or data exists."""
    if info.device.type == "cpu":
        threads = cfg.engine.threads or cpus_per_process(info.local_world_size)
        torch.set_num_threads(threads)
    if cfg.run.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    elif info.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    seed_everything(cfg.run.seed)


class Trainer:
    def __init__(self, cfg: Config, run_dir: str | None = None, folder: RunFolder | None = None,
                 position: PlanPosition | None = None):
        self.cfg, self.position = cfg, position   # position: the stage's place in a pipeline
        self.info = dist_utils.setup(cfg.engine.device, cfg.dist.backend)
        self.device = self.info.device
        self.run_dir = run_dir or os.path.join(cfg.run.out_dir, cfg.run.name)
        self._own_folder = folder is None   # else train() opened it and closes it
        self.folder = folder or RunFolder(self.run_dir, cfg, self.info.world_size,
                                          self.info.is_main).open()
        configure_runtime(cfg, self.info)
        self.log = RunLog(self.run_dir, self.info.is_main, cfg.engine.progress,
                          position.label if position else "")
        if self.info.is_main and not self.folder.finished:
            for note in self.folder.prepare(save_config):
                self.log.info(note)

        world = self.info.world_size
        if cfg.data.batch_size % world:
            raise ValueError(f"data.batch_size = {cfg.data.batch_size} (global) must be divisible "
                             f"by the number of processes ({world})")
        self.data = build_data(cfg.data, rank=self.info.rank, world_size=world,
                               seed=cfg.run.seed, eval_splits=(cfg.eval.split,))
        self.selection = EpochSelection(cfg, self.data.class_counts)   # last / best-val epoch
        self.memory_format = (torch.channels_last if cfg.model.channels_last
                              else torch.contiguous_format)
        # the method, and what it declared it needs served (unlabeled batches, a feature cache)
        self.method, self.supply = build_method(cfg, self.data, self.device, self.memory_format)
        if self.method.init_message:
            self.log.info(self.method.init_message)
        self.model = self.method.model.to(self.device)
        self.model = self.model.to(memory_format=self.memory_format)
        # what every method call gets instead of a reference to this Trainer
        self.ctx = StepContext(seed=cfg.run.seed, info=self.info, embed=self.embed,
                               autocast=self.autocast, log=self.log, run_dir=self.run_dir)
        module, note = dist_utils.sync_batchnorm(self.method.train_module(),
                                                 cfg.model.sync_bn, self.info)
        if note:
            self.log.info(note)
        train_model = torch.compile(module) if cfg.model.compile else module
        if self.info.enabled:
            train_model = DDP(train_model, device_ids=[self.device.index]
                              if self.device.type == "cuda" else None)
            if cfg.run.deterministic and self.device.type == "cpu":
                train_model.register_comm_hook(None, dist_utils.rank_ordered_mean_hook)
        self.train_model = train_model
        self.optimizer = build_optimizer(cfg.optim, self.method.param_groups(), self.device,
                                         cfg.data.batch_size)
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.engine.amp)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.engine.amp == "fp16")

        self.epoch = self.step_in_epoch = self.global_step = 0
        self.eval_pending = False            # the evaluation after self.epoch is still to do
        self.seconds_before = 0.0            # training time of earlier attempts
        self.first_loss = None               # the first logged loss (divergence check)
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
            "method": ckpt.method_state(self.method),
            **({"unlabeled": self.supply.stream.state_dict()} if self.supply.stream else {}),
            "progress": {"epoch": self.epoch, "step_in_epoch": self.step_in_epoch,
                         "global_step": self.global_step, "eval_pending": self.eval_pending,
                         "metrics_records": self.log.records, "first_loss": self.first_loss,
                         "train_seconds": self.train_seconds(),
                         "selection": self.selection.state_dict()},
            "rng": rng if rng is not None else [ckpt.rng_state()],   # one state per rank
        }

    def train_seconds(self) -> float:
        return self.seconds_before + (time.time() - self._t0 if self._t0 is not None else 0.0)

    def synced_modules(self) -> list[torch.nn.Module]:
        """The model and the method's other modules (key encoder, teacher): their buffers are
        made rank 0's before evaluation and saving."""
        return [self.model, self.method]    # the method's submodules and buffers

    def save_checkpoint(self):
        dist_utils.broadcast_buffers(self.synced_modules())
        rng = dist_utils.all_gather_object(ckpt.rng_state())
        if self.info.is_main:
            ckpt.atomic_save(self.state_dict(rng), os.path.join(self.run_dir, ckpt.LAST))
        dist_utils.barrier()

    def _resume(self):
        # a restarted partial stage starts fresh on every rank, whenever rank 0 cleared it
        path = None if self.folder.restart else ckpt.last_checkpoint(self.run_dir)
        if path is None:   # records of an attempt killed before its first checkpoint go
            self.log.truncate_metrics(keep=0)
            return
        # On the CPU: RNG states must come back as CPU tensors; load_state_dict moves the rest
        state = ckpt.safe_load(path, map_location="cpu")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        unlabeled = ckpt.load_method_state(self.method, state, path)
        if self.supply.stream is not None:
            self.supply.stream.load_state_dict(unlabeled)
        p = state["progress"]
        self.epoch, self.step_in_epoch, self.global_step = (
            p["epoch"], p["step_in_epoch"], p["global_step"])
        self.eval_pending = p.get("eval_pending", False)
        if self.folder.reopen:   # a finished run continued: its final evaluation is an epoch's
            self.eval_pending = self.step_in_epoch == 0 and self._eval_due()
        self.seconds_before = p.get("train_seconds", 0.0)
        self.first_loss = p.get("first_loss")
        self.selection.load_state_dict(p.get("selection", {}))
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
        base = scaled_lr(self.cfg.optim, self.cfg.data.batch_size)   # optim.ref_batch
        f = lr_factor(self.cfg.sched, base, self.epoch, step, steps)
        for g in self.optimizer.param_groups:
            g["lr"] = g["base_lr"] * f
        return base * f

    def _forward(self, batch: Batch, ctx: StepContext):
        with self.autocast():
            return self.method.training_step(self.train_model, batch, ctx)

    def _optimizer_step(self):
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
        # DataNeeds.feature_cache, once: a float16 file of the train split's features
        self.supply.before_epoch(self.embed, os.path.join(self.run_dir, "feature_cache"))
        choice = self.method.on_epoch_start(self.epoch)
        loader, sampler = self.data.train_loader(choice.kind, self.epoch, self.step_in_epoch,
                                                 choice.class_weights, choice.num_epochs)
        steps = sampler.num_batches
        if steps == 0:
            raise ValueError(f"data.batch_size = {cfg.data.batch_size} is larger than one epoch "
                             f"of {len(self.data.train)} training samples on {self.info.world_size} process(es)")
        self.train_model.train()
        progress = Progress(self.log, steps, self.step_in_epoch,
                            f"epoch {self.epoch + 1}/{cfg.sched.epochs}",
                            cfg.engine.log_every, cfg.data.batch_size, self._steps_after(steps))
        for batch in loader:
            lr = self._set_lr(self.step_in_epoch, steps)
            images, labels = self._to_device(batch)
            ctx = self.ctx.at(self.global_step, self.epoch)
            batch = Batch(images, labels, *self.supply.unlabeled())
            loss, logs = accumulated_step(   # optim.accum_steps micro-batches (accumulate.py)
                lambda b: self._forward(b, ctx), lambda l: self.scaler.scale(l).backward(),
                batch, cfg.optim.accum_steps, getattr(self.train_model, "no_sync", None))
            self._optimizer_step()
            self.method.on_step_end(self.train_model, ctx)
            self.global_step += 1
            self.step_in_epoch += 1
            if self.global_step % cfg.engine.log_every == 0 or self.step_in_epoch == steps:
                values = {k: float(v) for k, v in logs.items()}
                self._check_divergence(values.get("loss"), lr)
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

    def _check_divergence(self, loss: float | None, lr: float):
        """Stop on a runaway loss (trainer/divergence.py); ranks agree at each log step."""
        if loss is not None:
            self.first_loss = check_loss(
                loss, self.first_loss, lr=lr, optim_lr=self.cfg.optim.lr,
                batch_size=self.cfg.data.batch_size, agree=dist_utils.any_rank
                if self.info.enabled else None, where=f"epoch {self.epoch + 1}, step "
                f"{self.step_in_epoch} (global step {self.global_step})")

    def _steps_after(self, steps: int) -> int | None:
        """Pipeline steps after this epoch, for the pipeline ETA (None outside a pipeline)."""
        if self.position is None:
            return None
        budget = self.cfg.engine.max_steps
        left = budget - self.global_step - (steps - self.step_in_epoch) if budget else None
        return self.position.steps_after(steps, self.cfg.sched.epochs - self.epoch - 1, left)

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
            results = self.folder.results()
            self.log.info(finished_message(self.results_path, results))
            return results
        cfg = self.cfg
        counts = describe_class_counts(self.data.class_counts, cfg.eval.many, cfg.eval.few)
        self.log.info(f"training {cfg.method.name} / {cfg.model.name} on {cfg.data.source} "
                      f"({counts}) with {self.info.world_size} process(es) "
                      f"on {self.device}, batch {cfg.data.batch_size}, "
                      f"{describe_lr(cfg.optim, cfg.data.batch_size)}; run folder {self.run_dir}")
        self._t0 = time.time()
        while True:
            if self.eval_pending:          # after an epoch, or resumed before its evaluation
                self.selection.evaluate(self.epoch, self.evaluate)
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
    def predict(self, split: str, prepare: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Predicted and true labels of this rank's shard of a split (nothing is gathered:
        evaluate() merges the ranks' confusion counts); prepare=False: the method's
        prepare_eval of this round already ran (a second split of one evaluation round)."""
        if prepare:
            self.method.prepare_eval(self.ctx.at(self.global_step, self.epoch))
        pred, true = self.embed(split, lambda x: self.method.predict(self.model, x).argmax(1),
                                gather=False)
        return pred.long().cpu().numpy(), true.cpu().numpy()

    @torch.no_grad()
    @heap_bounded   # freed batch buffers go back to the system (extraction.bounded_heap)
    def embed(self, split: str, fn, gather: bool = True, indices: bool = False,
              on_batch=None) -> tuple:
        """fn(images) for every sample of a split, in dataset order, on every rank (float32);
        an image the loader skipped (data.on_bad_image: skip) has no row. gather=False: this
        rank's shard only, in its loader's order. indices=True: also each row's dataset index
        (the only way to place rows when images were skipped). Every rank calls fn equally
        often (with an empty batch where its shard ends early), so fn may use collectives.
        on_batch(out, labels), or on_batch(out, labels, dataset_indices) with indices=True:
        called with each real batch's rows instead of keeping them (memory independent of the
        split: trainer/extraction.py's sinks); the rows returned are then empty."""
        was_training = self.model.training
        self.model.eval()
        loader = self.data.eval_loader(split)
        counts = dist_utils.gather_sizes(len(loader), self.device)
        feats, labels, index, images, seen = [], [], [], None, 0
        for batch in loader:
            images, y = self._to_device(batch)
            with self.autocast():
                out = fn(images).float()
            ids = getattr(loader, "batch_indices", None)   # the items it delivered, if told
            ids = None if ids is None else torch.as_tensor(ids, dtype=torch.long)
            if on_batch is not None:
                if indices:   # without the loader's indices: rank r held r, r + w, ...
                    pos = ids if ids is not None else (seen + torch.arange(len(y))) * \
                        self.info.world_size + self.info.rank
                    on_batch(out, y, pos)
                else:
                    on_batch(out, y)
                seen += len(y)
                # new empty rows, not views (out[:0] would keep each batch's storage alive)
                out, y = out.new_empty((0, *out.shape[1:])), y.new_empty((0, *y.shape[1:]))
                ids = None if ids is None else ids.new_empty(0)
            feats.append(out)
            labels.append(y)
            index.append(ids)
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
        w, r = self.info.world_size, self.info.rank
        if any(i is None for i in index):   # no skips possible: rank r held r, r+w, ...
            ids = torch.arange(len(labels)) * w + r
        else:
            ids = torch.cat(index) if index else torch.zeros(0, dtype=torch.long)
        if not gather:
            return (feats, labels, ids.to(self.device)) if indices else (feats, labels)
        sizes = dist_utils.gather_sizes(len(labels), self.device)
        ids = dist_utils.all_gather_cat(ids.to(self.device), sizes)
        order = ids.argsort()
        out = (dist_utils.all_gather_cat(feats, sizes)[order],
               dist_utils.all_gather_cat(labels, sizes)[order])
        return (*out, ids[order]) if indices else out

    def evaluate(self, split: str | None = None, prepare: bool = True) -> dict:
        split = split or self.cfg.eval.split
        dist_utils.broadcast_buffers(self.synced_modules())   # every rank evaluates rank 0's
        pred, true = self.predict(split, prepare)
        c = self.data.num_classes   # sparse confusion counts per rank, summed over the ranks
        codes, counts = np.unique(true.astype(np.int64) * c + pred, return_counts=True)
        codes, counts = dist_utils.merge_counts(codes, counts, self.device)
        m = metrics_from_confusion(codes, counts, c, self.data.class_counts,
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
        """Final evaluation, weights and results; returns what results.json holds (the per-class
        arrays go to results_per_class.npz). A run that engine.max_steps stopped before its
        schedule's end is marked "partial"; raising the budget continues it (run_folder)."""
        m = self.selection.evaluate(self.epoch, self.evaluate)
        partial = self.epoch < self.cfg.sched.epochs
        results = {"partial": partial, "max_steps": self.cfg.engine.max_steps, "name": self.cfg.run.name, "method": self.cfg.method.name,
                   "loss": self.cfg.loss.name, "train_rule": self.cfg.train_rule.name,
                   "model": self.cfg.model.name, "seed": self.cfg.run.seed,
                   "split": self.cfg.eval.split, "epochs": self.epoch,
                   "global_step": self.global_step, "world_size": self.info.world_size,
                   "train_seconds": round(seconds, 1), "class_counts": self.data.class_counts,
                   **self.method.summary(), **m, **self.selection.results(self.epoch, m)}
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
            write_results(d, results)
            self.log.info(f"results in {self.results_path} (per class: {PER_CLASS}), figure "
                          f"{os.path.join(d, 'per_class_accuracy.png')}"
                          + (f"; partial: stopped at engine.max_steps = "
                             f"{self.cfg.engine.max_steps}" if partial else ""))
        dist_utils.barrier()
        return split_results(results)[0]


def train(cfg: Config, run_dir: str | None = None, position: PlanPosition | None = None) -> dict:
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
            results = folder.results()
            if rank == 0:
                print((f"{position.label}: " if position else "") + finished_message(os.path.join(run_dir, "results.json"), results),
                      flush=True)
            return results
        trainer = Trainer(cfg, run_dir, folder, position)
        try:
            return trainer.fit()
        finally:
            trainer.log.close()
    finally:
        folder.close()
