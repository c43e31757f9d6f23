"""A finished run as the bank tools see it: its config, its checkpoint (resolved as every
weight import is, trainer/transfer.py), its model rebuilt through its method, its splits
opened with the run's own evaluation transform (data_pipelines/build.py), and the function
that maps images to one layer's features.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import numpy as np
import torch

from ltrainer.data_pipelines.build import build_data
from ltrainer.data_pipelines.sources import SubsetSource, open_source

from ..config import load_config
from ..extraction import read_json
from ..results import PER_CLASS, load_per_class
from ..serving import create_declared
from ..transfer import final_weights, read_weights
from .files import BankError

def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_model_state(path: str) -> dict:
    """A model state_dict from model_final.pt, a trainer checkpoint ({"model": ...}) or a
    DDP/compiled model's dict; checked as every weight import is (transfer.read_weights)."""
    out = {}
    for k, v in read_weights(path).items():
        for prefix in ("module.", "_orig_mod."):
            k = k[len(prefix):] if k.startswith(prefix) else k
        out[k] = v
    return out


def default_checkpoint(run_dir: str) -> str:
    """The run's model_final.pt; an unfinished run only through --checkpoint."""
    return final_weights(run_dir, "--checkpoint=")


def run_config(run_dir: str, overrides=()):
    path = os.path.join(run_dir, "config.yaml")
    if not os.path.isfile(path):
        raise BankError(f"{run_dir}: no config.yaml; expected a run folder written by "
                        f"launchers/train.py")
    return load_config(path, list(overrides))


def run_class_counts(run_dir: str) -> list[int]:
    """Training-set class counts of a run: from results_per_class.npz (results.json in
    folders written before it existed), else by opening its data."""
    if os.path.isfile(os.path.join(run_dir, PER_CLASS)):
        return [int(c) for c in load_per_class(run_dir)["class_counts"]]
    path = os.path.join(run_dir, "results.json")
    if os.path.isfile(path):
        counts = read_json(path).get("class_counts")
        if counts:
            return [int(c) for c in counts]
    return list(build_data(run_config(run_dir).data, eval_splits=()).class_counts)


@dataclass
class RunModel:
    cfg: object
    method: object
    model: object
    checkpoint: str
    class_counts: list
    device: object = None
    data: object = None   # the run's DataBundle (its long-tailed train split)


def load_run_model(run_dir: str, checkpoint: str | None = None, device="cpu") -> RunModel:
    """Rebuild the run's model through its method (so any method works, the semi-supervised
    ones with their unlabeled pool: serving.create_declared) and load weights."""
    cfg = run_config(run_dir)
    ckpt = os.path.abspath(checkpoint or default_checkpoint(run_dir))
    data = build_data(cfg.data, eval_splits=())
    device = torch.device(device)
    method = create_declared(cfg, data, device)
    model = method.model
    try:
        model.load_state_dict(load_model_state(ckpt))
    except RuntimeError as e:
        raise BankError(f"{ckpt}: does not fit the model of {run_dir}/config.yaml "
                        f"({cfg.method.name} / {cfg.model.name}): {str(e)[:400]}") from None
    model.to(device).eval()
    return RunModel(cfg, method, model, ckpt, list(data.class_counts), device, data)


def open_split(data_cfg, split: str, list_file: str | None = None, bundle=None):
    """The split as a dataset with the run's *evaluation* transform (also for train; the
    DataBundle's own make_dataset / open_eval, so banks see what evaluation sees), plus a
    spec of where it came from. Train without a list is the run's long-tailed subset;
    `bundle` is a DataBundle of the same data config, when one is at hand."""
    bundle = bundle or build_data(data_cfg, eval_splits=())
    if list_file:
        src = open_source(data_cfg["source"], data_cfg["root"], split, list_file,
                          num_classes=data_cfg.get("num_classes"))
        dataset = bundle.make_dataset(src, False)
    else:
        dataset = bundle.open_eval(split)
    return dataset, dataset_spec(data_cfg, split, list_file)


def dataset_spec(data_cfg, split: str, list_file: str | None) -> dict:
    """What decides which images, in which order and how preprocessed (not loader knobs)."""
    keep = ("source", "root", "imbalance", "rho", "n_max", "lt_seed", "augment", "image_size",
            "stats", "num_classes")
    spec = {k: data_cfg.get(k) for k in keep}
    lst = list_file or (None if split == "train" else data_cfg.get(f"{split}_list"))
    spec.update(split=split, list=os.path.abspath(lst) if lst else None)
    if split != "train" or list_file:
        for k in ("imbalance", "rho", "n_max", "lt_seed"):
            spec.pop(k)  # the long-tail subsetting only applies to the run's own train split
    return spec


def sample_paths(src) -> np.ndarray:
    """Image path (file sources) or "name[index]" (array sources) of every sample."""
    idx = np.arange(len(src))
    base = src
    while isinstance(base, SubsetSource):
        idx, base = base.indices[idx], base.base
    if hasattr(base, "full_path"):
        return np.asarray([base.full_path(int(i)) for i in idx], dtype=str)
    return np.asarray([f"{base.name}[{int(i)}]" for i in idx], dtype=str)


def feature_fn(run: RunModel, layer: str = "features"):
    """images -> (B, D) float32 CPU features of `layer`: "features" (the pooled backbone
    output the head sees), "logits" (the method's prediction, e.g. tau-normalized), "head"
    (the model's raw output, e.g. an SSL projection), or any module name (its output,
    spatially averaged)."""
    model = run.model
    if layer == "features":
        if hasattr(model, "features"):
            f = model.features
        elif hasattr(model, "backbone"):
            f = model.backbone
        else:
            raise BankError(f"{type(model).__name__} has neither .features nor .backbone; "
                            f"name a layer instead")
    elif layer == "logits":
        def f(x):
            try:
                return run.method.predict(model, x)
            except AttributeError as e:  # e.g. a kNN-evaluated SSL method without its bank
                raise BankError(f"method {run.cfg.method.name!r} cannot predict outside "
                                f"training ({e}); use layer 'features' or 'head'") from None
    elif layer == "head":
        f = model
    else:
        f = _hooked(model, layer)
    channels_last = bool(getattr(run.cfg.model, "channels_last", False))

    @torch.no_grad()
    def forward(images):
        x = images.to(run.device)
        if channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return f(x).float().flatten(1).cpu()

    return forward


def _hooked(model, layer: str):
    modules = dict(model.named_modules())
    if layer not in modules:
        names = [n for n in modules if n][:30]
        raise BankError(f"layer {layer!r} not in the model; use 'features', 'logits' or a "
                        f"module name such as {', '.join(names)}")

    def f(x):
        box = {}
        handle = modules[layer].register_forward_hook(lambda m, i, o: box.setdefault("y", o))
        try:
            model(x)
        finally:
            handle.remove()
        y = box["y"][0] if isinstance(box["y"], (tuple, list)) else box["y"]
        return y.mean(dim=(2, 3)) if y.dim() == 4 else y

    return f
