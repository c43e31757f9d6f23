"""A run folder belongs to one config and to one process at a time.

* **Fingerprint.** The resolved config's result-affecting keys (everything but IGNORED), the
  number of processes and the fingerprints of the runs a stage starts from (model.init,
  semi.pseudo_labels) are recorded in `fingerprint.json`. A re-run resumes or skips only when
  they match; otherwise it stops before writing anything and lists each differing key. Keys in
  RESUMABLE may change when the user names them in `run.allow_change`.
* **Lock.** Rank 0 holds an fcntl lock on `run.lock` (pid and host inside) for the run's life.
  The kernel drops it when the holder dies, so a killed or requeued run takes over at once; a
  live holder makes a second process stop with its pid and host.
* **Stale temporary files** of killed saves are removed by the lock owner at start.

Run folders written before fingerprints existed are adopted when their config.yaml matches the
config (its keys only: the world size and upstream runs were not recorded then).
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import re
import socket
import time

import yaml

from .checkpoint import LAST, disk_errors, write_json_atomic
from .resume_rules import RESUMABLE
from .results import PER_CLASS, RESULTS  # noqa: F401  (its files)

FINGERPRINT = "fingerprint.json"
LOCK = "run.lock"
METRICS = "metrics.jsonl"
CONFIG_FILE = "config.yaml"

# Keys that cannot change what a run computes, so a re-run may differ in them. Why, per key:
IGNORED = (
    "run.name",            # the folder's name: the folder itself is the identity
    "run.out_dir",         # where the folder lives: a moved folder holds the same run
    "run.allow_change",    # the override below, not a setting of the run
    "engine.progress",     # display only
    "engine.log_every",    # how often train records are logged, not what a step computes
    "engine.threads",      # CPU threads per process: the same operations (Slurm jobs set it
                           # per task); on CPU, BLAS may round the last bit differently
    "data.workers",        # augmentation is seeded per sample, not per worker
    "data.dali_threads",   # as data.workers, for DALI
    "data.beton_dir",      # a cache of the same images
    "data.check_files",    # a check before training
    "checkpoint.",         # resume is exact from any step, so when checkpoints happen is free
    "slurm.",              # how the job is submitted, read by launchers/submit.py only
)
# data.loader is NOT ignored: the backends implement the same recipes but not bit-identical
# pixels (tests/test_loaders.py compares them within tolerances).

# Config keys naming files an earlier run wrote; their run's fingerprint is part of ours.
UPSTREAM = ("model.init", "semi.pseudo_labels")


class RunFolderError(Exception):
    """The run folder cannot be used as asked (another config, another owner); one line."""


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _ignored(key: str) -> bool:
    return any(key == p or (p.endswith(".") and key.startswith(p)) for p in IGNORED)


def _declared(config: dict) -> set[str]:
    return {f"{section}.{key}" for section, fields in config.items() for key in fields}


def unused_keys(cfg: dict) -> set[str]:
    """Keys of components this run does not use, so they cannot change its result: those
    declared only by registry members it did not choose (another loss's margin, MoCo's queue
    in a supervised run), and the unlabeled pool's keys when its method reads no pool (so
    pipelines may share a labels-only stage between cells that differ in the pool)."""
    from ltrainer.configspec import Registry
    from ltrainer.data_pipelines.unlabeled_pool import CONFIG as POOL

    from .components import PARTS
    from .methods import METHODS
    used, other = set(), set()
    for part in PARTS:
        if isinstance(part, Registry):
            chosen = (cfg.get(part.section) or {}).get(part.name_key)
            used |= _declared(part.common.config) | {part.key}
            for name, member in part.parts.items():
                (used if name == chosen else other).update(_declared(member.config))
        else:
            used |= _declared(part.config)
    unused = other - used
    method = METHODS.get((cfg.get("method") or {}).get("name"))
    if method is not None and not getattr(method, "reads_pool", True):
        unused |= _declared(POOL.config)
    return unused


def result_keys(cfg: dict) -> dict:
    """The config's result-affecting keys, dotted, JSON-normalised (tuples become lists)."""
    data = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
    skip = unused_keys(data)
    flat = _flatten(data)
    return json.loads(json.dumps({k: v for k, v in sorted(flat.items())
                                  if not _ignored(k) and k not in skip}, default=str))


def _upstream_folder(value) -> str | None:
    if not isinstance(value, str) or not value:
        return None
    folder = value if os.path.isdir(value) else os.path.dirname(value)
    return folder if os.path.isfile(os.path.join(folder, FINGERPRINT)) else None


def fingerprint(cfg, world_size: int) -> dict:
    """{'keys': {dotted key: value}, 'digest': sha256 of them}; the keys include the number of
    processes and, for each upstream run, '<key> fingerprint' = that run's digest."""
    keys = result_keys(cfg)
    keys["dist.world_size"] = int(world_size)
    flat = _flatten(cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg))
    for key in UPSTREAM:
        folder = _upstream_folder(flat.get(key))
        if folder is not None:
            keys[f"{key} fingerprint"] = read_fingerprint(folder)["digest"]
    for key in [k for k in keys if k.endswith("_list")]:
        if isinstance(keys[key], str) and os.path.isfile(keys[key]):
            keys[f"{key} {CONTENT}"] = list_digest(keys[key])
    digest = hashlib.sha256(json.dumps(keys, sort_keys=True).encode()).hexdigest()
    return {"version": 1, "digest": digest, "keys": keys}


CONTENT = "content"   # '<key> content': the sha1 of a list file the config names


def list_digest(path: str) -> str:
    """sha1 of a list file's bytes: an edited or regenerated list under the same path is
    another data set (the 437,513 lines of iNat's train list hash in well under a second)."""
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def read_fingerprint(run_dir: str) -> dict | None:
    path = os.path.join(run_dir, FINGERPRINT)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            data = json.load(f)
        assert isinstance(data.get("keys"), dict) and isinstance(data.get("digest"), str)
        return data
    except (ValueError, AssertionError, AttributeError):
        raise RunFolderError(f"{path}: not a fingerprint written by this trainer (expected JSON "
                             f"with 'digest' and 'keys'); move the folder away or pick a new "
                             f"run.name") from None


def _fmt(v) -> str:
    return v if isinstance(v, str) else json.dumps(v)


def _default_of(key: str):
    """The schema default of a dotted key (a sentinel for keys the schema does not declare)."""
    from .config import schema
    section, _, name = key.partition(".")
    field = schema().sections.get(section, {}).get(name)
    return json.loads(json.dumps(field.default, default=str)) if field else _NO_DEFAULT


_NO_DEFAULT = object()


def _diff(old: dict, new: dict) -> dict:
    """Keys whose values differ. A key the old record lacks but whose new value is its
    default is not a change: it was added to the trainer after that run, and a new key's
    default keeps what the trainer did before (e.g. optim.ref_batch, model.sync_bn); nor is a
    list's content digest that a record written before digests existed lacks."""
    missing = "(not set)"
    return {k: (old.get(k, missing), new.get(k, missing)) for k in sorted(set(old) | set(new))
            if old.get(k, missing) != new.get(k, missing)
            and not (k not in old and (new[k] == _default_of(k)
                                       or k.endswith(f"_list {CONTENT}")))}


def _has_run(run_dir: str) -> bool:
    return any(os.path.exists(os.path.join(run_dir, n)) for n in (LAST, RESULTS))


class RunFolder:
    """What a run may do in its folder: decided by open() on every rank (read-only, from the
    same files, so all ranks decide alike), acted on by prepare() on rank 0."""

    def __init__(self, run_dir: str, cfg, world_size: int = 1, is_main: bool = True):
        self.run_dir, self.cfg, self.is_main = run_dir, cfg, is_main
        self.fp = fingerprint(cfg, world_size)
        self.finished = self.reopen = self.adopted = self.restart = False
        self.changes: dict = {}
        self._lock_fd = None

    # ------------------------------------------------------------------ deciding
    def open(self) -> "RunFolder":
        """Lock (rank 0) and compare fingerprints; raises RunFolderError, having written
        nothing, when the folder holds another config's run or another live process."""
        with disk_errors(self.run_dir):
            os.makedirs(self.run_dir, exist_ok=True)
        if self.is_main:
            self._lock()
        try:
            self._check()
        except BaseException:
            self.close()
            raise
        return self

    def _check(self):
        allow = [k for k in self.cfg.run.get("allow_change") or [] if k in RESUMABLE]
        recorded = read_fingerprint(self.run_dir)
        if recorded is None:
            old = self._legacy_keys()
            if old is None:
                return                                        # a fresh folder
            new = {k: v for k, v in self.fp["keys"].items() if k in old}
            self.adopted = True
        else:
            old, new = recorded["keys"], self.fp["keys"]
        self.changes = _diff(old, new)
        refused = {k: v for k, v in self.changes.items() if k not in allow}
        if refused and "engine.max_steps" in allow and self._partial() and all(
                k.endswith(" fingerprint") for k in refused):
            # A smoke stage whose upstream stage was continued to a larger budget: its start
            # weights changed, so it starts over from them (prepare() clears the old attempt)
            self.restart, refused = True, {}
        if refused:
            listed = "; ".join(f"{k}: {_fmt(a)} -> {_fmt(b)}" for k, (a, b) in refused.items())
            resumable = [k for k in refused if k in RESUMABLE]
            hint = (f", or run.allow_change=[{','.join(resumable)}] to continue this run "
                    f"with the new value" if resumable else "")
            raise RunFolderError(
                f"{self.run_dir} holds a run of another config ({listed}); nothing was written. "
                f"Start a new run with another run.name{hint} (keys that may change on "
                f"resume: {', '.join(RESUMABLE)})")
        done = os.path.isfile(os.path.join(self.run_dir, RESULTS))
        self.finished = done and not self.changes
        self.reopen = done and bool(self.changes) and not self.restart

    def _legacy_keys(self) -> dict | None:
        """A folder without fingerprint.json: None when it holds no run yet; else the keys of
        its config.yaml (refused when there is none to compare with)."""
        if not _has_run(self.run_dir):
            return None
        path = os.path.join(self.run_dir, CONFIG_FILE)
        if not os.path.isfile(path):
            raise RunFolderError(f"{self.run_dir} holds a checkpoint or results but neither "
                                 f"{FINGERPRINT} nor {CONFIG_FILE}: cannot tell which config made "
                                 f"it; start a new run with another run.name")
        with open(path) as f:
            data = yaml.safe_load(f) or {}
        return result_keys(data)

    def _partial(self) -> bool:
        """The folder holds results of a run that engine.max_steps stopped early."""
        path = os.path.join(self.run_dir, RESULTS)
        try:
            with open(path) as f:
                return json.load(f).get("partial") is True
        except (OSError, ValueError, AttributeError):
            return False

    def results(self) -> dict:
        with open(os.path.join(self.run_dir, RESULTS)) as f:
            return json.load(f)

    # ------------------------------------------------------------------ acting (rank 0)
    def prepare(self, save_config) -> list[str]:
        """After a passed check: remove stale temporary files and, when continuing a finished
        run with an allowed change, its results; then record the fingerprint and config.yaml.
        Returns log lines saying what was done."""
        notes = []
        removed = remove_stale_temps(self.run_dir)
        if removed:
            notes.append(f"removed temporary files of an interrupted save: {', '.join(removed)}")
        if self.restart:  # results first: a rank reading the folder never sees it done
            for name in (RESULTS, PER_CLASS, LAST, METRICS):
                if os.path.exists(os.path.join(self.run_dir, name)):
                    os.remove(os.path.join(self.run_dir, name))
            notes.append("the stage this partial run starts from was continued: starting over "
                         f"from its new weights ({RESULTS}, {LAST} and {METRICS} removed)")
        elif self.reopen:  # before the new fingerprint: a rank reading both never sees it done
            os.remove(os.path.join(self.run_dir, RESULTS))
            notes.append(f"continuing the finished run; {RESULTS} removed")
        if self.changes:
            notes.append("allowed changes on resume: " + "; ".join(
                f"{k}: {_fmt(a)} -> {_fmt(b)}" for k, (a, b) in self.changes.items()))
        if self.adopted:
            notes.append(f"adopted a run folder without {FINGERPRINT} (its {CONFIG_FILE} matches)")
        write_json_atomic(os.path.join(self.run_dir, FINGERPRINT), self.fp)
        save_config(self.cfg, os.path.join(self.run_dir, CONFIG_FILE))
        return notes

    # ------------------------------------------------------------------ the lock
    def _lock(self):
        path = os.path.join(self.run_dir, LOCK)
        earlier = _HELD.get(os.path.realpath(path))
        if earlier is not None:   # an earlier Trainer of this process never closed (a tool)
            earlier.close()
        with disk_errors(path):   # a read-only folder fails here, first
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = _read_holder(fd)
            os.close(fd)
            if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise RunFolderError(f"{path}: cannot lock the run folder ({e.strerror}); "
                                     f"the file system must support flock") from None
            raise RunFolderError(
                f"{self.run_dir} is in use by pid {holder.get('pid', '?')} on host "
                f"{holder.get('host', '?')} (since {holder.get('since', '?')}); wait for it "
                f"to end, stop it, or start this run with another run.name") from None
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "since": time.strftime("%Y-%m-%d %H:%M:%S"),
                "slurm_job": os.environ.get("SLURM_JOB_ID")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        self._lock_fd = fd
        _HELD[os.path.realpath(path)] = self

    def close(self):
        """Release the lock (the file stays; an empty one means nobody holds it)."""
        if self._lock_fd is not None:
            _HELD.pop(os.path.realpath(os.path.join(self.run_dir, LOCK)), None)
            try:
                os.ftruncate(self._lock_fd, 0)
            except OSError:
                pass
            os.close(self._lock_fd)   # closing drops the flock
            self._lock_fd = None


# Locks this process holds, by lock file: a second RunFolder of the same process on the same
# folder (sequential use by a tool or test) takes the lock over instead of refusing itself.
_HELD: dict[str, RunFolder] = {}


def _read_holder(fd: int) -> dict:
    try:
        return json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        return {}


# Temporary files our writers leave when killed: NAME.tmp or NAME.tmp.<pid>.
_TEMP = re.compile(r".+\.tmp(\.\d+)?$")


def remove_stale_temps(run_dir: str) -> list[str]:
    """Delete temporary files left in the folder by killed saves (only the lock owner may:
    nobody else writes here while it holds the lock)."""
    removed = []
    for name in sorted(os.listdir(run_dir)):
        path = os.path.join(run_dir, name)
        if _TEMP.fullmatch(name) and os.path.isfile(path):
            os.remove(path)
            removed.append(name)
    return removed


