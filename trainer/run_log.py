"""What a run tells its user: a log file, metrics as JSONL (and TensorBoard when installed), and
progress with rate and ETA. Only rank 0 writes; other ranks get a silent logger."""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import dataclass

from .checkpoint import disk_errors


@dataclass
class PlanPosition:
    """Where a stage stands in its pipeline, for its log lines ("stage 2/4 (ce): ...") and the
    pipeline's ETA. `later`: (epochs, engine.max_steps) of each stage after this one."""
    index: int
    total: int
    name: str
    later: tuple = ()

    @property
    def label(self) -> str:
        return f"stage {self.index}/{self.total} ({self.name})"

    def steps_after(self, steps_per_epoch: int, epochs_left: int, max_steps_left: int) -> int:
        """Training steps after the current epoch: the rest of this stage (capped by its
        max_steps) and the later stages, each guessed at this stage's steps per epoch (the
        same training set; a class-aware cRT epoch can be longer, NCM/tau-norm train none)."""
        mine = epochs_left * steps_per_epoch
        if max_steps_left is not None:
            mine = max(0, min(mine, max_steps_left))
        return mine + sum(min(e * steps_per_epoch, m) if m else e * steps_per_epoch
                          for e, m in self.later)


# The project's `logging` loggers (data_pipelines logs skipped images, DALI rebuilds, .beton
# writes there): while a run is open on rank 0, their records go to its run.log and console
# too. The one logging set-up of the project; other ranks keep logging's default (stderr).
LIBRARY_LOGGERS = ("data_pipelines", "trainer")


class _ToRunLog(logging.Handler):
    def __init__(self, run_log: "RunLog"):
        super().__init__(logging.INFO)
        self.run_log = run_log

    def emit(self, record: logging.LogRecord):
        try:
            self.run_log.info(f"{record.levelname.lower()} ({record.name}): {record.getMessage()}")
        except Exception:   # a log line must never stop a run
            self.handleError(record)


_attached: list[_ToRunLog] = []   # at most one: the run that opened last


def _attach(handler: _ToRunLog | None):
    """Route the library loggers to `handler` alone (None: to nobody, logging's default)."""
    for old in _attached:
        for name in LIBRARY_LOGGERS:
            logging.getLogger(name).removeHandler(old)
    _attached[:] = [handler] if handler else []
    for name in LIBRARY_LOGGERS if handler else ():
        logging.getLogger(name).addHandler(handler)


class RunLog:
    def __init__(self, run_dir: str, enabled: bool, progress: str = "auto", prefix: str = ""):
        self.enabled = enabled
        self.prefix = f"{prefix}: " if prefix else ""   # a pipeline's "stage 2/4 (ce)"
        self.run_dir = run_dir
        self.progress = progress
        self.records = 0   # metrics records in metrics.jsonl (checkpoints store the count)
        if progress == "auto":
            self.progress = "bar" if sys.stderr.isatty() else "lines"
        self._log = open(os.path.join(run_dir, "run.log"), "a") if enabled else None
        self._handler = _ToRunLog(self) if enabled else None
        if enabled:
            _attach(self._handler)
        self._tb = None
        if enabled:
            try:  # optional: TensorBoard event files when the package is installed
                from torch.utils.tensorboard import SummaryWriter
                self._tb = SummaryWriter(os.path.join(run_dir, "tb"))
            except Exception:
                self._tb = None

    def info(self, msg: str):
        if not self.enabled:
            return
        line = f"[{time.strftime('%H:%M:%S')}] {self.prefix}{msg}"
        print(line, flush=True)
        if self._log is not None:   # None once closed
            self._log.write(line + "\n")
            self._log.flush()

    def metrics(self, record: dict):
        """Append one JSON line to metrics.jsonl (and scalars to TensorBoard)."""
        if not self.enabled:
            return
        path = os.path.join(self.run_dir, "metrics.jsonl")
        with disk_errors(path), open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
        self.records += 1
        if self._tb is not None:
            step = record.get("step", 0)
            for k, v in record.items():
                if isinstance(v, (int, float)) and k not in ("step", "epoch"):
                    self._tb.add_scalar(f"{record.get('kind', 'train')}/{k}", v, step)

    def truncate_metrics(self, keep: int | None = None, last_step: int = 0):
        """On resume, forget the records written after the checkpoint (they will be redone):
        keep the first `keep` records, the count the checkpoint stored (so an evaluation or
        a final record written after it goes too), or, for checkpoints without that count,
        the records up to `last_step`."""
        path = os.path.join(self.run_dir, "metrics.jsonl")
        if not self.enabled or not os.path.exists(path):
            return
        with open(path) as f:
            lines = [line for line in f if line.endswith("\n")]   # a torn last line goes
        if keep is not None:
            lines = lines[:keep]
        else:
            lines = [line for line in lines if json.loads(line).get("step", 0) <= last_step]
        with disk_errors(path):
            with open(path + ".tmp", "w") as f:
                f.writelines(lines)
            os.replace(path + ".tmp", path)
        self.records = len(lines)

    def close(self):
        if self._handler is not None and self._handler in _attached:
            _attach(None)
        if self._log:
            self._log.close()
            self._log = None
        if self._tb is not None:
            self._tb.close()


class Progress:
    """A tqdm bar on a terminal, periodic 'step i/n, img/s, ETA' lines otherwise. In a
    pipeline (`after`: the steps still to come after this epoch, see PlanPosition) the lines
    add the pipeline's ETA: all remaining steps at this epoch's rate, evaluations not counted."""

    def __init__(self, log: RunLog, total: int, start: int, desc: str, every: int, batch: int,
                 after: int | None = None):
        self.log, self.total, self.done, self.every, self.batch = log, total, start, every, batch
        self.after = after
        self.t0, self.start = time.time(), start
        self.bar = None
        if log.enabled and log.progress == "bar":
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=start, desc=log.prefix + desc,
                            dynamic_ncols=True, leave=False)
        self.desc = desc

    def update(self, postfix: dict):
        self.done += 1
        if self.bar is not None:
            self.bar.update(1)
            if self.done % max(1, self.every // 5) == 0:
                self.bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=False)
        elif self.log.enabled and self.log.progress == "lines" and (
                self.done % self.every == 0 or self.done == self.total):
            elapsed = max(time.time() - self.t0, 1e-9)
            rate = (self.done - self.start) / elapsed
            eta = (self.total - self.done) / max(rate, 1e-9)
            stats = " ".join(f"{k} {v:.4g}" for k, v in postfix.items())
            overall = ("" if self.after is None else
                       f", pipeline ETA {(self.total - self.done + self.after) / max(rate, 1e-9):.0f}s")
            self.log.info(f"{self.desc} step {self.done}/{self.total} {stats} "
                          f"{rate * self.batch:.0f} img/s ETA {eta:.0f}s{overall}")

    def close(self):
        if self.bar is not None:
            self.bar.close()
