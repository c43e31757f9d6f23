"""Configs: YAML files with `_base_` inheritance, dotted overrides, and a declared schema.

Everything a run does is decided here, before any process starts, so that a typo costs a
second and not a cluster slot. Each key remembers the file (or the command line) that set it,
so errors can point there.
"""
from __future__ import annotations

import copy
import difflib
import os
from dataclasses import dataclass, field
from typing import Any

import yaml

REQUIRED = "???"  # a value that a config must set (e.g. the data root of ImageNet-LT)


FROZEN_BACKBONE_METHODS = ("crt", "lws", "linear_probe", "ncm", "tau_norm")
SEMI_METHODS = ("self_training", "mean_teacher", "vat")     # train on labels + the pool
POOL_METHODS = SEMI_METHODS + ("pseudo_label",)             # read the unlabeled pool
SOURCES = ("fashion_mnist", "cifar10", "cifar100", "svhn", "list", "folder")


class ConfigError(ValueError):
    """A config that cannot run; the message names the file and key."""


@dataclass
class Field:
    """One schema entry: a type ('int', 'float', 'bool', 'str', 'list', 'any'), a default,
    optionally the allowed values and whether None is allowed."""
    type: str
    default: Any
    choices: tuple | None = None
    nullable: bool = False
    help: str = ""
    item_type: str | None = None  # element type of a list


def F(type, default, *choices, nullable=False, help="", item=None):
    return Field(type, default, tuple(choices) or None, nullable, help, item)


SCHEMA: dict[str, dict[str, Field]] = {
    "run": {
        "name": F("str", "run", help="run folder name under out_dir"),
        "out_dir": F("str", "runs"),
        "seed": F("int", 0),
        "deterministic": F("bool", False, help="torch deterministic algorithms"),
    },
    "data": {
        "source": F("str", "fashion_mnist", *SOURCES),
        "root": F("str", None, nullable=True, help="data root; null = the source's default"),
        "train_list": F("str", None, nullable=True),
        "val_list": F("str", None, nullable=True),
        "test_list": F("str", None, nullable=True),
        "num_classes": F("int", None, nullable=True, help="for list/folder sources"),
        "imbalance": F("str", "exp", "exp", "step", "none"),
        "rho": F("float", 100.0),
        "n_max": F("int", None, nullable=True, help="null = len(train) / C"),
        "lt_seed": F("int", 0),
        "augment": F("str", "small", "small", "imagenet", "moco", "none"),
        "image_size": F("int", 28),
        "stats": F("str", None, nullable=True, help="normalization stats name; null = source"),
        "batch_size": F("int", 128, help="global batch, split over ranks"),
        "eval_batch_size": F("int", 512),
        "workers": F("int", 0, help="DataLoader workers per rank"),
        "loader": F("str", "torchvision", "torchvision", "dali", "ffcv", "auto",
                    help="auto = DALI on GPU if installed, else FFCV if installed and the "
                         "data set's .beton exists, else torchvision"),
        "beton_dir": F("str", None, nullable=True,
                       help="FFCV .beton folder (written on first use); null = data/betons"),
        "on_bad_image": F("str", "fail", "fail", "skip",
                          help="missing/corrupt image: stop with its path, or drop and count"),
        "dali_threads": F("int", 0, help="DALI threads per rank; 0 = data.workers or cores"),
        "dali_device": F("str", "auto", "auto", "cpu", "gpu",
                         help="DALI decoding/ops on the GPU when one is visible (auto)"),
        "check_files": F("bool", False, help="stat every listed image before training"),
        "val_per_class": F("int", 0, help="make a balanced 'val' split of this many unused "
                                          "train images per class (array sources)"),
        "classes": F("list", None, nullable=True, item="int",
                     help="a task of these source classes only, relabeled 0..k-1 in this "
                          "(head-to-tail) order; null = every class"),
    },
    "model": {
        "name": F("str", "resnet32"),
        "head": F("str", "linear", "linear", "cosine"),
        "small_input": F("bool", False, help="3x3 stem for torchvision ResNets on 28/32 px"),
        "channels_last": F("bool", False),
        "compile": F("bool", False, help="torch.compile the model"),
        "init": F("str", None, nullable=True,
                  help="weights to start from: a run folder, a checkpoint (ours, MoCo's "
                       "'module.encoder_q.' format or a torchvision state dict) or '@stage'"),
        "init_head": F("bool", False, help="also load the classifier (tau-norm, LWS)"),
    },
    "loss": {
        "name": F("str", "ce", "ce", "focal", "ldam"),
        "focal_gamma": F("float", 1.0),
        "ldam_max_m": F("float", 0.5),
        "ldam_s": F("float", 30.0),
        "label_smoothing": F("float", 0.0),
    },
    "train_rule": {
        "name": F("str", "none", "none", "reweight", "resample", "drw", "drs"),
        "start_epoch": F("int", 160, help="epoch at which DRW / DRS switch on"),
        "cb_beta": F("float", 0.9999),
        "sampler": F("str", "cb", "cb", "class_aware", "sqrt",
                     help="how resample / drs draw: CB weights, class-aware or square-root"),
    },
    "optim": {
        "name": F("str", "sgd", "sgd"),
        "lr": F("float", 0.1),
        "momentum": F("float", 0.9),
        "nesterov": F("bool", False),
        "weight_decay": F("float", 2e-4),
        "grad_clip": F("float", 0.0, help="max global grad norm; 0 = off"),
        "fused": F("bool", None, nullable=True, help="fused SGD; null = on GPU only"),
    },
    "sched": {
        "name": F("str", "step", "step", "cosine", "constant"),
        "epochs": F("int", 200),
        "warmup_epochs": F("float", 5.0),
        "milestones": F("list", [160, 180], item="int"),
        "gamma": F("float", 0.01, help="step: lr x gamma^k after the k-th milestone"),
        "min_lr": F("float", 0.0, help="cosine floor"),
    },
    "method": {
        "name": F("str", "supervised", help="supervised, moco, rotation, crt, lws, "
                  "linear_probe, ncm, tau_norm, pseudo_label, self_training, mean_teacher, vat"),
    },
    # Semi-supervised learning (paper, Sections 2-3): the unlabeled pool D_U, its pseudo-labels
    # and how training mixes it with the labeled set. Read by the methods in POOL_METHODS.
    "semi": {
        "size": F("float", 5.0, help="D_U@Nx: the pool holds N x the labeled images"),
        "rho_u": F("float", 1.0, help="imbalance of the pool's relevant images, in the labeled "
                                      "set's head-to-tail class order"),
        "relevance": F("float", 1.0, help="share of the pool from the task's classes; the rest "
                                          "comes evenly from classes outside the task"),
        "seed": F("int", 0, help="which images the pool draws"),
        "source": F("str", None, *SOURCES, nullable=True,
                    help="pool images; null = the labeled data set's unused train images"),
        "root": F("str", None, nullable=True, help="null = data.root for the same data set"),
        "split": F("str", "train", help="split of semi.source (e.g. 'extra' for SVHN)"),
        "list": F("str", None, nullable=True, help="'path label' list for semi.source: list "
                                                   "(labels in the task's class ids)"),
        "irrelevant_source": F("str", None, *SOURCES, nullable=True,
                               help="another data set for the irrelevant share; null = the "
                                    "pool source's classes outside data.classes"),
        "irrelevant_root": F("str", None, nullable=True),
        "irrelevant_split": F("str", "train"),
        "irrelevant_list": F("str", None, nullable=True),
        "pool_file": F("str", None, nullable=True,
                       help="pool.json of tools/make_unlabeled_pool.py instead of the keys above"),
        "pseudo_labels": F("str", None, nullable=True,
                           help="pseudo_labels.npz for self_training: '@stage' (a pseudo_label "
                                "stage) or a file of tools/pseudo_label.py"),
        "threshold": F("float", 0.0, help="pseudo_label: keep labels of at least this "
                                          "confidence (0 = all, as the reference)"),
        "top_k": F("int", 0, help="pseudo_label: keep the k most confident per class; 0 = all"),
        "save_probs": F("bool", False, help="pseudo_label: also store the probability vectors"),
        "omega": F("float", 1.0, help="loss = L(D_L) + omega * L(D_U)"),
        "unlabeled_ratio": F("float", None, nullable=True,
                             help="pool images per labeled image in each batch; null = "
                                  "semi.size, so an epoch (one pass over the labeled set) is "
                                  "also one pass over the pool"),
        "rampup_epochs": F("float", 0.0, help="omega grows as exp(-5 (1 - t/T)^2) over the "
                                              "first T epochs; 0 = constant"),
        "counts": F("str", "combined", "combined", "labeled",
                    help="class counts behind LDAM margins and CB weights in self-training: "
                         "labeled + pseudo-labeled, or the labeled set only"),
        "ema_decay": F("float", 0.99, help="mean_teacher: teacher = EMA of the student"),
        "noise": F("float", 0.15, help="mean_teacher: std of the Gaussian input noise, drawn "
                                       "separately for student and teacher"),
        "vat_xi": F("float", 1e-6, help="vat: step of the power iteration"),
        "vat_eps": F("float", 6.0, help="vat: L2 norm of the adversarial perturbation"),
    },
    "moco": {
        "dim": F("int", 128, help="projection (key) dimension"),
        "queue": F("int", 65536, help="K: queue length, a multiple of the global batch"),
        "momentum": F("float", 0.999, help="key encoder EMA momentum"),
        "temperature": F("float", 0.2),
        "bn_splits": F("int", 0, help="BatchNorm groups per global batch (shuffled BN); "
                                      "0 = one per process, or 4 for a single process"),
    },
    "knn": {
        "k": F("int", 20, help="neighbours of the kNN monitor of self-supervised methods"),
        "t": F("float", 0.1, help="temperature of the neighbours' weighted vote"),
    },
    "classifier": {
        "sampler": F("str", None, "uniform", "class_aware", "sqrt", nullable=True,
                     help="sampling of frozen-backbone methods; null = the method's own "
                          "(cRT, LWS: class_aware; linear_probe: uniform)"),
        "cache_features": F("bool", False, help="embed the training set once (needs "
                                                "data.augment: none)"),
        "reinit": F("bool", True, help="re-initialize the classifier (cRT, linear probe)"),
    },
    "tau_norm": {
        "tau": F("float", None, nullable=True, help="null = choose on eval.tau_split"),
        "grid": F("list", [0.0, 0.2, 0.4, 0.6, 0.8, 1.0, 1.2, 1.4, 1.6, 1.8, 2.0], item="float"),
        "split": F("str", "val", "val", "test", "train",
                   help="split that chooses tau (val; 'test' only to reproduce oracles)"),
    },
    "engine": {
        "device": F("str", "auto", "auto", "cpu", "cuda"),
        "amp": F("str", "none", "none", "bf16", "fp16"),
        "threads": F("int", 0, help="torch threads per process; 0 = cores / local ranks"),
        "log_every": F("int", 50, help="steps between log lines"),
        "progress": F("str", "auto", "auto", "bar", "lines", "none"),
        "max_steps": F("int", 0, help="stop after this many steps in total (smoke runs); 0 = off"),
    },
    "checkpoint": {
        "every_steps": F("int", 0, help="also save every N steps; 0 = each epoch only"),
    },
    "eval": {
        "every_epochs": F("int", 1, help="0 = only at the end"),
        "split": F("str", "test", "test", "val", "train"),
        "many": F("int", 100, help="many-shot: more than this many training images"),
        "few": F("int", 20, help="few-shot: fewer than this many training images"),
    },
    "dist": {
        "backend": F("str", "auto", "auto", "gloo", "nccl"),
    },
    # Read only by launchers/submit.py (the engine ignores it); its flags override these.
    "slurm": {
        "partition": F("str", None, nullable=True, help="null = the cluster's default partition"),
        "nodes": F("int", 1),
        "gpus_per_node": F("int", 0, help="0 = CPU: one task per node; G: one task per GPU"),
        "cpus_per_task": F("int", 0, help="0 = 1 on CPU (one thread per rank), else "
                                          "data.workers + 1 per GPU task"),
        "timeout_min": F("int", 60, help="time limit of one attempt; requeues get a new one"),
        "mem_gb": F("float", None, nullable=True, help="per node; null = partition default"),
        "signal_delay_s": F("int", 90, help="SIGUSR2 this long before the time limit: time "
                                            "to reach a step boundary and save"),
        "max_num_timeout": F("int", 3, help="requeues after time-outs (preemptions, node "
                                            "failures do not count)"),
        "peer_failure_wait_s": F("int", 360, help="when a peer rank dies, wait this long for "
                                                  "Slurm to requeue (over its SlurmdTimeout)"),
        "account": F("str", None, nullable=True),
        "qos": F("str", None, nullable=True),
        "constraint": F("str", None, nullable=True),
        "job_name": F("str", None, nullable=True, help="null = the run name"),
        "array_parallelism": F("int", 256, help="sweeps: array tasks running at once"),
        "setup": F("list", [], item="str", help="shell lines before srun (module load ...)"),
        "additional": F("any", None, nullable=True,
                        help="mapping of further sbatch options, e.g. {exclusive: true}"),
    },
}


class Config(dict):
    """A nested dict with attribute access (cfg.optim.lr); picklable, so it can travel to
    spawned processes and Slurm jobs."""

    def __getattr__(self, key):
        try:
            return self[key]
        except KeyError:
            raise AttributeError(key) from None

    def __setattr__(self, key, value):
        self[key] = value

    def __deepcopy__(self, memo):
        return Config({k: copy.deepcopy(v, memo) for k, v in self.items()})

    def __reduce__(self):
        return (Config, (dict(self),))

    def to_dict(self) -> dict:
        return {k: v.to_dict() if isinstance(v, Config) else v for k, v in self.items()}


def _wrap(d):
    return Config({k: _wrap(v) if isinstance(v, dict) else v for k, v in d.items()})


# --------------------------------------------------------------------------- loading

def _read_yaml(path: str) -> dict:
    if not os.path.isfile(path):
        raise ConfigError(f"{path}: config file not found")
    with open(path) as f:
        try:
            data = yaml.safe_load(f)
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    return data


def _merge(dst: dict, src: dict, origin: str, origins: dict, prefix=""):
    for key, value in src.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and isinstance(dst.get(key), dict):
            _merge(dst[key], value, origin, origins, dotted + ".")
        else:
            dst[key] = copy.deepcopy(value)
            origins[dotted] = origin
            if isinstance(value, dict):
                for sub in _flatten(value, dotted + "."):
                    origins[sub] = origin


def _flatten(d: dict, prefix="") -> list[str]:
    out = []
    for k, v in d.items():
        out.append(prefix + k)
        if isinstance(v, dict):
            out += _flatten(v, f"{prefix}{k}.")
    return out


def _load_file(path: str, origins: dict, chain=()) -> dict:
    path = os.path.abspath(path)
    if path in chain:
        raise ConfigError(f"{path}: _base_ inheritance loops back to itself")
    data = _read_yaml(path)
    bases = data.pop("_base_", [])
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list):
        raise ConfigError(f"{path}: _base_ must be a file name or a list of file names")
    merged: dict = {}
    for base in bases:
        base_path = os.path.join(os.path.dirname(path), base)
        _merge(merged, _load_file(base_path, origins, chain + (path,)), None, {})
        # origins of the base were recorded by the recursive call; keep them
    _merge(merged, data, path, origins)
    return merged


def parse_override(text: str) -> tuple[str, Any]:
    """'optim.lr=0.05' -> ('optim.lr', 0.05); values are read as YAML scalars/lists."""
    if "=" not in text:
        raise ConfigError(f"command line: override '{text}' should look like section.key=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def load_config(path: str | None, overrides: list[str] = (), validate: bool = True) -> Config:
    """Load a YAML config (with its bases), apply dotted overrides, fill defaults, validate."""
    origins: dict[str, str] = {}
    data = _load_file(path, origins) if path else {}
    for text in overrides:
        key, value = parse_override(text)
        parts = key.split(".")
        node = data
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"command line: '{key}': '{p}' is not a section")
        node[parts[-1]] = value
        origins[key] = "command line"
    cfg = resolve(data, origins)
    if validate:
        check_required(cfg, origins)
        check_consistency(cfg, origins)
    return cfg


# --------------------------------------------------------------------------- validation

def _type_ok(field: Field, value) -> tuple[bool, Any]:
    if value is None:
        return field.nullable, value
    t = field.type
    if t == "any":
        return True, value
    if t == "bool":
        return isinstance(value, bool), value
    if t == "int":
        return isinstance(value, int) and not isinstance(value, bool), value
    if t == "float":
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return True, float(value)
        return False, value
    if t == "str":
        return isinstance(value, str), value
    if t == "list":
        if not isinstance(value, list):
            return False, value
        if field.item_type:
            sub = Field(field.item_type, None)
            ok_items = [_type_ok(sub, v) for v in value]
            if not all(ok for ok, _ in ok_items):
                return False, value
            return True, [v for _, v in ok_items]
        return True, value
    raise AssertionError(f"unknown schema type {t}")


def _describe(field: Field) -> str:
    kind = {"int": "an integer", "float": "a number", "bool": "true or false",
            "str": "a string", "list": "a list", "any": "any value"}[field.type]
    if field.type == "list" and field.item_type:
        kind = f"a list of {field.item_type}s"
    if field.choices:
        kind = "one of " + ", ".join(repr(c) for c in field.choices)
    if field.nullable:
        kind += " (or null)"
    return kind


def _where(origins: dict, key: str) -> str:
    return origins.get(key) or "config"


def _unknown(origins, dotted, candidates) -> ConfigError:
    close = difflib.get_close_matches(dotted, candidates, n=1, cutoff=0.5)
    if not close:  # compare the last component too: 'optim.lrr' -> 'optim.lr'
        last = dotted.rsplit(".", 1)[-1]
        by_last = {c.rsplit(".", 1)[-1]: c for c in candidates}
        hit = difflib.get_close_matches(last, list(by_last), n=1, cutoff=0.5)
        close = [by_last[hit[0]]] if hit else []
    hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(candidates)}"
    return ConfigError(f"{_where(origins, dotted)}: unknown key '{dotted}'{hint}")


def resolve(data: dict, origins: dict | None = None, schema=None) -> Config:
    """Check every key and type against the schema and fill in defaults."""
    origins = origins or {}
    schema = schema or SCHEMA
    out = {}
    sections = list(schema)
    for section, values in data.items():
        if section not in schema:
            raise _unknown(origins, section, sections)
        if not isinstance(values, dict):
            raise ConfigError(f"{_where(origins, section)}: '{section}' must be a section "
                              f"(a mapping of keys), got {values!r}")
    for section, fields in schema.items():
        given = data.get(section) or {}
        sec = {}
        for key, value in given.items():
            dotted = f"{section}.{key}"
            if key not in fields:
                raise _unknown(origins, dotted, [f"{section}.{k}" for k in fields])
        for key, field in fields.items():
            dotted = f"{section}.{key}"
            value = given.get(key, copy.deepcopy(field.default))
            if value == REQUIRED:
                sec[key] = REQUIRED
                continue
            ok, value = _type_ok(field, value)
            if ok and field.choices and value is not None and value not in field.choices:
                ok = False
            if not ok:
                raise ConfigError(f"{_where(origins, dotted)}: {dotted} = {given.get(key)!r} "
                                  f"is not allowed; expected {_describe(field)}")
            sec[key] = value
        out[section] = sec
    return _wrap(out)


def check_required(cfg: Config, origins: dict | None = None):
    for section, values in cfg.items():
        if not isinstance(values, dict):
            continue
        for key, value in values.items():
            if value == REQUIRED:
                dotted = f"{section}.{key}"
                raise ConfigError(f"{_where(origins or {}, dotted)}: {dotted} is required; set it "
                                  f"in the config or on the command line ({dotted}=...)")


def check_consistency(cfg: Config, origins: dict | None = None):
    """Rules that tie keys together; each error names the keys involved."""
    o = origins or {}
    if cfg.loss.name == "ldam" and cfg.model.head != "cosine":
        raise ConfigError(f"{_where(o, 'loss.name')}: loss.name = 'ldam' needs a cosine "
                          f"classifier; set model.head: cosine")
    if cfg.data.source == "list":
        for key in ("train_list", "test_list" if cfg.eval.split == "test" else "val_list"):
            if not cfg.data[key]:
                raise ConfigError(f"{_where(o, 'data.source')}: data.source = 'list' needs "
                                  f"data.{key} (a file of 'relative/path label' lines)")
    if cfg.data.source in ("list", "folder") and cfg.data.root is None:
        raise ConfigError(f"{_where(o, 'data.source')}: data.source = '{cfg.data.source}' "
                          f"needs data.root")
    if cfg.sched.warmup_epochs > cfg.sched.epochs:
        raise ConfigError(f"{_where(o, 'sched.warmup_epochs')}: sched.warmup_epochs "
                          f"({cfg.sched.warmup_epochs}) exceeds sched.epochs ({cfg.sched.epochs})")
    if cfg.sched.milestones != sorted(cfg.sched.milestones):
        raise ConfigError(f"{_where(o, 'sched.milestones')}: sched.milestones must be increasing")
    for key in ("batch_size", "eval_batch_size"):
        if cfg.data[key] < 1:
            raise ConfigError(f"{_where(o, 'data.' + key)}: data.{key} must be >= 1")
    if cfg.method.name == "moco" and cfg.moco.queue % cfg.data.batch_size:
        raise ConfigError(f"{_where(o, 'moco.queue')}: moco.queue = {cfg.moco.queue} must be a "
                          f"multiple of the global batch data.batch_size = {cfg.data.batch_size}")
    if cfg.method.name == "moco" and cfg.data.augment != "moco":
        raise ConfigError(f"{_where(o, 'method.name')}: method 'moco' needs two views per "
                          f"image: set data.augment: moco")
    if cfg.method.name in FROZEN_BACKBONE_METHODS and not cfg.model.init:
        raise ConfigError(f"{_where(o, 'method.name')}: method '{cfg.method.name}' trains on a "
                          f"fixed representation: set model.init (a run folder, a checkpoint or "
                          f"'@stage')")
    if cfg.method.name in ("lws", "tau_norm") and not cfg.model.init_head:
        raise ConfigError(f"{_where(o, 'method.name')}: method '{cfg.method.name}' adjusts a "
                          f"trained classifier: set model.init_head: true")
    if cfg.method.name in ("ncm", "tau_norm") and cfg.sched.epochs != 0:
        raise ConfigError(f"{_where(o, 'sched.epochs')}: method '{cfg.method.name}' does not "
                          f"train: set sched.epochs: 0 (and sched.warmup_epochs: 0)")
    if cfg.classifier.cache_features and cfg.data.augment != "none":
        raise ConfigError(f"{_where(o, 'classifier.cache_features')}: cached features are "
                          f"only exact without augmentation; set data.augment: none")
    if cfg.data.rho < 1:
        raise ConfigError(f"{_where(o, 'data.rho')}: data.rho = {cfg.data.rho} must be >= 1 "
                          f"(rho = n_max / n_min)")
    classes = cfg.data.classes
    if classes is not None and (len(classes) < 2 or len(set(classes)) != len(classes)
                                or min(classes) < 0):
        raise ConfigError(f"{_where(o, 'data.classes')}: data.classes = {classes} must list at "
                          f"least two distinct class ids >= 0")
    _check_semi(cfg, o)


def unlabeled_batch(cfg) -> int:
    """Pool images in each global batch (semi.unlabeled_ratio, or semi.size, x the batch)."""
    ratio = cfg.semi.unlabeled_ratio if cfg.semi.unlabeled_ratio is not None else cfg.semi.size
    return int(round(ratio * cfg.data.batch_size))


def _check_semi(cfg: Config, o: dict):
    s, method = cfg.semi, cfg.method.name

    def fail(key, why):
        raise ConfigError(f"{_where(o, 'semi.' + key)}: semi.{key} = {s[key]!r} {why}")

    if method == "self_training" and not s.pseudo_labels:
        fail("pseudo_labels", "is not set: method 'self_training' trains on pseudo-labels; "
                              "set it to '@stage' of a pseudo_label stage or to a "
                              "pseudo_labels.npz of tools/pseudo_label.py")
    if s.pseudo_labels and method != "self_training":
        fail("pseudo_labels", f"is only read by method 'self_training' (method.name is "
                              f"'{method}'); set it in that stage only")
    checks = [("size", s.size > 0, "must be > 0"), ("rho_u", s.rho_u >= 1, "must be >= 1"),
              ("relevance", 0 <= s.relevance <= 1, "must lie in [0, 1]"),
              ("threshold", 0 <= s.threshold < 1, "must lie in [0, 1)"),
              ("top_k", s.top_k >= 0, "must be >= 0 (0 = keep every label)"),
              ("omega", s.omega >= 0, "must be >= 0"),
              ("unlabeled_ratio", s.unlabeled_ratio is None or s.unlabeled_ratio > 0,
               "must be > 0 (or null)"),
              ("rampup_epochs", s.rampup_epochs >= 0, "must be >= 0"),
              ("ema_decay", 0 <= s.ema_decay < 1, "must lie in [0, 1)"),
              ("noise", s.noise >= 0, "must be >= 0"),
              ("vat_xi", s.vat_xi > 0, "must be > 0"), ("vat_eps", s.vat_eps > 0, "must be > 0")]
    for key, ok, why in checks:
        if not ok:
            fail(key, why)
    if method not in POOL_METHODS:
        return
    for prefix in ("", "irrelevant_"):
        if s[prefix + "source"] == "list" and not s[prefix + "list"]:
            fail(prefix + "source", f"needs semi.{prefix}list (a file of 'relative/path "
                                    f"label' lines)")
    if s.pool_file is None and s.relevance < 1 and s.irrelevant_source is None \
            and not cfg.data.classes and s.source in (None, cfg.data.source):
        fail("relevance", "draws part of the pool from classes outside the task, but the task "
                          "has every class of its data set: set data.classes to a subset, or "
                          "semi.irrelevant_source to another data set")
    if method in SEMI_METHODS and unlabeled_batch(cfg) < 1:
        fail("unlabeled_ratio", f"gives no pool image per batch of data.batch_size = "
                                f"{cfg.data.batch_size}; raise it")
    if method == "pseudo_label":
        if not cfg.model.init or not cfg.model.init_head:
            raise ConfigError(f"{_where(o, 'method.name')}: method 'pseudo_label' labels the "
                              f"pool with a trained classifier: set model.init (a run folder, "
                              f"a checkpoint or '@stage') and model.init_head: true")
        if cfg.sched.epochs != 0:
            raise ConfigError(f"{_where(o, 'sched.epochs')}: method 'pseudo_label' does not "
                              f"train: set sched.epochs: 0 (and sched.warmup_epochs: 0)")


def extend_schema(section: str, fields: dict[str, Field]):
    """Let a method declare its own config section (e.g. 'moco')."""
    SCHEMA.setdefault(section, {}).update(fields)


def save_config(cfg: Config, path: str):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)
    os.replace(tmp, path)
