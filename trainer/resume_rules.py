"""Which keys may change on resume (`run.allow_change`) and what that means. Declared apart
from trainer/run_folder.py, which reads the composed schema (every part's keys), so that
trainer/components.py can list this part without an import cycle."""
from __future__ import annotations

from ltrainer.configspec import F, Part

# Keys a user may change on resume by naming them in run.allow_change, and what that means.
RESUMABLE = {
    "sched.epochs": "training continues from the checkpoint to the new number of epochs (the "
                    "lr schedule follows the new length from there on)",
    "engine.max_steps": "a smoke run continues to the new budget (0 = the whole schedule)",
}
# Every other key is refused: the checkpoint's optimizer keeps its own lr, momentum and decay,
# the weights their architecture, and the records before the checkpoint the old data and loss.


def _check_allow_change(cfg, fail):
    bad = [k for k in cfg.run.allow_change if k not in RESUMABLE]
    if bad:
        fail("run.allow_change", f"run.allow_change: {', '.join(map(str, bad))} cannot change "
                                 f"on resume (allowed: {', '.join(RESUMABLE)}); start a new "
                                 f"run.name instead")


CONFIG = Part({"run": {"allow_change": F(
    "list", [], item="str", help="keys that may differ from the run folder's fingerprint on "
                                 "resume: " + ", ".join(RESUMABLE))}},
    _check_allow_change, owner=__name__)
