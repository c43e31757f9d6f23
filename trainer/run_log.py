"""What a run tells its user: a log file, metrics as JSONL (and TensorBoard when installed), and
progress with rate and ETA. Only rank 0 writes; other ranks get a silent logger."""
from __future__ import annotations

import json
import os
import sys
import time

from .checkpoint import disk_errors


class RunLog:
    def __init__(self, run_dir: str, enabled: bool, progress: str = "auto"):
        self.enabled = enabled
        self.run_dir = run_dir
        self.progress = progress
        self.records = 0   # metrics records in metrics.jsonl (checkpoints store the count)
        if progress == "auto":
            self.progress = "bar" if sys.stderr.isatty() else "lines"
        self._log = open(os.path.join(run_dir, "run.log"), "a") if enabled else None
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
        line = f"[{time.strftime('%H:%M:%S')}] {msg}"
        print(line, flush=True)
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
        if self._log:
            self._log.close()
        if self._tb is not None:
            self._tb.close()


class Progress:
    """A tqdm bar on a terminal, periodic 'step i/n, img/s, ETA' lines otherwise."""

    def __init__(self, log: RunLog, total: int, start: int, desc: str, every: int, batch: int):
        self.log, self.total, self.done, self.every, self.batch = log, total, start, every, batch
        self.t0, self.start = time.time(), start
        self.bar = None
        if log.enabled and log.progress == "bar":
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=start, desc=desc, dynamic_ncols=True, leave=False)
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
            self.log.info(f"{self.desc} step {self.done}/{self.total} {stats} "
                          f"{rate * self.batch:.0f} img/s ETA {eta:.0f}s")

    def close(self):
        if self.bar is not None:
            self.bar.close()
