"""Stop requests: a signal (SIGUSR2/SIGTERM from Slurm, submitit's checkpoint()) asks the running
Trainer to checkpoint at the next step boundary and raise Preempted; re-running the same
command resumes exactly. trainer/engine.py re-exports these names."""
from __future__ import annotations

import signal
import threading

_STOP = threading.Event()


class Preempted(Exception):
    """Raised after a requested stop has been checkpointed; re-running resumes exactly."""


STOP_SIGNALS = (signal.SIGUSR2, signal.SIGTERM)
STOP_EXIT_STATUS = 143   # launchers/train.py: a stop was checkpointed; re-run to resume


def request_stop(*_signal_args):
    """Ask the running Trainer to checkpoint at the next step boundary and raise Preempted.
    Safe to call from a signal handler."""
    _STOP.set()


def install_stop_signals(signals=STOP_SIGNALS):
    for s in signals:
        signal.signal(s, request_stop)
