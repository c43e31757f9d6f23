"""Test-only kill points: patch the engine so that this process kills (or signals) itself at a
chosen point, so tests can interrupt runs anywhere without hooks in production code.

A spec is `ACTION:POINT:N[:STAGE]`:
  ACTION  kill (SIGKILL this process), term (SIGTERM this process), term-parent (SIGTERM the
          parent, e.g. the launcher of --nproc children)
  POINT   step   at the step boundary after global step N (checkpoints of that step written)
          eval   during the N-th evaluation of this process, after its record was written
          save   during the N-th save of checkpoint_last.pt, half-way through writing it
          final  in the N-th finish(), after model_final.pt and before results.json
          chunk  after the N-th chunk file this process wrote (trainer/extraction.py: feature
                 banks, pseudo-label rows)
  STAGE   only in the run folder of this name (a pipeline stage), else anywhere.
Installed in a child process by the test, or at interpreter start by tests/plugins/
sitecustomize.py from the environment (LTT_TEST_KILL=spec, or LTT_KILL_AT_STEP=N for
kill:step:N), for runs started as commands.
"""
from __future__ import annotations

import os
import signal


def _act(action: str):
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "term":
        os.kill(os.getpid(), signal.SIGTERM)
    elif action == "term-parent":
        os.kill(os.getppid(), signal.SIGTERM)
    else:
        raise ValueError(f"kill point action {action!r}: expected kill, term or term-parent")


def install(spec: str):
    """Patch trainer.engine / trainer.checkpoint / trainer.run_log for one kill point."""
    from ltrainer.trainer import checkpoint as ckpt
    from ltrainer.trainer import engine, run_log

    parts = spec.split(":")
    action, point, n = parts[0], parts[1], int(parts[2])
    stage = parts[3] if len(parts) > 3 else None
    here = lambda run_dir: stage is None or os.path.basename(os.path.normpath(run_dir)) == stage
    count = [0]

    def hit(run_dir) -> bool:
        if not here(run_dir):
            return False
        count[0] += 1
        return count[0] == n

    if point == "step":
        original = engine.Trainer.stop_requested

        def stop_requested(self, steps=None):
            if steps is not None and self.global_step == n and here(self.run_dir):
                _act(action)
            return original(self, steps)
        engine.Trainer.stop_requested = stop_requested
    elif point == "eval":
        original = run_log.RunLog.metrics

        def metrics(self, record):
            original(self, record)
            if str(record.get("kind", "")).startswith("eval") and hit(self.run_dir):
                _act(action)
        run_log.RunLog.metrics = metrics
    elif point == "save":
        original = ckpt.atomic_save

        def atomic_save(obj, path):
            if os.path.basename(path) == ckpt.LAST and hit(os.path.dirname(path)):
                with open(f"{path}.tmp.{os.getpid()}", "wb") as f:   # a save cut short
                    f.write(b"PK\x03\x04 half a checkpoint")
                    f.flush()
                _act(action)
            return original(obj, path)
        ckpt.atomic_save = atomic_save
    elif point == "chunk":
        from ltrainer.trainer import extraction
        original = extraction._save_chunk

        def save_chunk(path, *args, **kw):
            original(path, *args, **kw)
            if hit(path):
                _act(action)
        extraction._save_chunk = save_chunk
    elif point == "final":
        original = engine.plot_per_class_accuracy

        def plot(acc, counts, path, **kw):
            if hit(os.path.dirname(path)):
                _act(action)
            return original(acc, counts, path, **kw)
        engine.plot_per_class_accuracy = plot
    else:
        raise ValueError(f"kill point {point!r}: expected step, eval, save, final or chunk")


def from_environment():
    spec = os.environ.get("LTT_TEST_KILL")
    if not spec and os.environ.get("LTT_KILL_AT_STEP"):
        spec = f"kill:step:{int(os.environ['LTT_KILL_AT_STEP'])}"
    if spec:
        install(spec)
