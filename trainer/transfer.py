"""Start a model from someone else's weights: an earlier stage of ours, the public MoCo
checkpoints (keys under `module.encoder_q.`), or a plain torchvision ResNet state dict.

Pre-training only provides the initialization (Section 4 of the paper): heads are dropped unless
asked for, and a mismatch in architecture is an error that lists the missing and unexpected keys
instead of a silent partial load.
"""
from __future__ import annotations

import os

import torch

from .checkpoint import safe_load

MOCO_PREFIXES = ("module.encoder_q.", "encoder_q.", "module.")
HEAD_KEYS = ("fc.",)  # torchvision's classifier / MoCo's MLP projection


def resolve_path(path: str) -> str:
    """A run folder means its final weights."""
    if os.path.isdir(path):
        for name in ("model_final.pt", "checkpoint_last.pt"):
            if os.path.isfile(os.path.join(path, name)):
                return os.path.join(path, name)
        raise FileNotFoundError(f"{path}: a run folder without model_final.pt or "
                                f"checkpoint_last.pt (did that run finish?)")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"model.init = {path!r}: no such file or run folder")
    return path


def split_state_dict(state: dict) -> tuple[dict, dict, str]:
    """(backbone weights, head weights, format name) from any supported checkpoint layout,
    backbone keys named as in torchvision (conv1.weight, layer1.0.bn1.weight, ...)."""
    if "model" in state and isinstance(state["model"], dict):      # our training checkpoint
        state = state["model"]
    elif "state_dict" in state and isinstance(state["state_dict"], dict):   # MoCo's files
        state = state["state_dict"]
    if any(k.startswith("backbone.") for k in state):               # our Classifier
        backbone = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
        head = {k[len("head."):]: v for k, v in state.items() if k.startswith("head.")}
        return backbone, head, "ours"
    fmt = "torchvision"
    for prefix in MOCO_PREFIXES:
        if any(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            fmt = "moco" if "encoder_q" in prefix else "torchvision (DataParallel)"
            break
    backbone = {k: v for k, v in state.items() if not k.startswith(HEAD_KEYS)}
    head = {k: v for k, v in state.items() if k.startswith(HEAD_KEYS)}
    return backbone, head, fmt


def load_pretrained(model, path: str, with_head: bool = False) -> str:
    """Load backbone (and optionally head) weights into a Classifier; returns a log line."""
    path = resolve_path(path)
    backbone, head, fmt = split_state_dict(safe_load(path))
    _load_strict(model.backbone, backbone, path, "backbone")
    msg = f"initialized the backbone from {path} ({fmt} format, {len(backbone)} tensors)"
    if with_head:
        if fmt != "ours":  # a torchvision/MoCo 'fc' is a head of another shape or kind
            head = {k[len("fc."):] if k.startswith("fc.") else k: v for k, v in head.items()}
            head = {("fc." + k if hasattr(model.head, "fc") else k): v for k, v in head.items()}
        _load_strict(model.head, head, path, "head")
        msg += " and the classifier"
    return msg


def _load_strict(module: torch.nn.Module, state: dict, path: str, what: str):
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: {tuple(state[k].shape)} in the file, {tuple(own[k].shape)} in the model"
              for k in sorted(set(own) & set(state)) if own[k].shape != state[k].shape]
    if missing or unexpected or shapes:
        def few(keys):
            return ", ".join(keys[:8]) + (f" ... ({len(keys)} in all)" if len(keys) > 8 else "")
        lines = [f"{path}: the {what} weights do not fit this model (is model.name right?)"]
        if missing:
            lines.append(f"  missing keys: {few(missing)}")
        if unexpected:
            lines.append(f"  unexpected keys: {few(unexpected)}")
        if shapes:
            lines.append(f"  shape mismatches: {few(shapes)}")
        raise ValueError("\n".join(lines))
    module.load_state_dict(state, strict=True)
