"""Start a model from someone else's weights: an earlier stage of ours, the public MoCo
checkpoints (keys under `module.encoder_q.`), a plain torchvision ResNet state dict, or the
CIFAR ResNets of LDAM-DRW (classifier `linear.*`) and imbalanced-semi-self (`fc.*`), whose
cosine classifier (NormedLinear) stores its weight as (in, out): renamed and transposed here.

Pre-training only provides the initialization (Section 4 of the paper): heads are dropped unless
asked for, and a mismatch in architecture is an error that lists the missing and unexpected keys
instead of a silent partial load.
"""
from __future__ import annotations

import os

import torch

from ltrainer.data_pipelines.sources import DataError

from .checkpoint import LAST, safe_load
from .validation import describe, finite_tensors, first_sentence

MOCO_PREFIXES = ("module.encoder_q.", "encoder_q.", "module.")
HEAD_KEYS = ("fc.",)  # torchvision's classifier / MoCo's MLP projection
LDAM_HEAD = "linear."  # LDAM-DRW's models/resnet_cifar.py names its classifier `linear`
FINAL = "model_final.pt"


def final_weights(run_dir: str, ask: str) -> str:
    """A run folder stands for its model_final.pt. An unfinished run's checkpoint_last.pt is
    used only when named explicitly, so that weights of a run stopped half-way are never taken
    for its result; `ask` is the option that names it (e.g. "model.init=")."""
    final = os.path.join(run_dir, FINAL)
    if os.path.isfile(final):
        return final
    last = os.path.join(run_dir, LAST)
    if os.path.isfile(last):
        raise DataError(f"{run_dir} has no {FINAL} (the run did not finish); to start from its "
                        f"last checkpoint pass {ask}{last}")
    raise DataError(f"{run_dir}: a folder without {FINAL} or {LAST}; expected a run folder "
                    f"written by launchers/train.py")


def resolve_path(path: str) -> str:
    """model.init: a weights file, or a finished run folder (its model_final.pt)."""
    if os.path.isdir(path):
        return final_weights(path, "model.init=")
    if not os.path.isfile(path):
        raise DataError(f"model.init = {path!r}: no such file or run folder")
    return path


def check_init(path: str) -> list[str]:
    """Config-time check of model.init (launchers' prepare, so --dry-run and submit.py refuse
    it before any job starts): the file or finished run exists and holds usable weights."""
    try:
        read_weights(resolve_path(path))
    except DataError as e:
        return [str(e)]
    return []


def read_weights(path: str) -> dict:
    """The model weights in a file: a state dict (ours, torchvision's), our training checkpoint
    ({"model": ...}) or MoCo's ({"state_dict": ...}); loaded with weights_only=True, and
    refused in one line when it is something else or holds NaN / inf."""
    try:
        obj = safe_load(path)
    except FileNotFoundError:
        raise DataError(f"{path}: weights file not found") from None
    except (RuntimeError, ValueError, OSError) as e:
        cause = first_sentence(e.__context__ or e)
        raise DataError(f"{path}: cannot be read as a PyTorch weights file (truncated, not "
                        f"written by torch.save, or holding objects weights_only loading "
                        f"refuses){': ' + cause if cause else ''}") from None
    state = obj
    for key in ("model", "state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            state = obj[key]
            break
    if not (isinstance(state, dict) and state and all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items())):
        raise DataError(f"{path}: not model weights: expected a state dict of named tensors or "
                        f"a training checkpoint holding one under 'model', found "
                        f"{describe(obj)}")
    finite_tensors(state, path)
    return state


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
    if any(k.startswith(LDAM_HEAD) for k in state):
        state = {("fc." + k[len(LDAM_HEAD):] if k.startswith(LDAM_HEAD) else k): v
                 for k, v in state.items()}
        fmt = "LDAM-DRW"
    backbone = {k: v for k, v in state.items() if not k.startswith(HEAD_KEYS)}
    head = {k: v for k, v in state.items() if k.startswith(HEAD_KEYS)}
    return backbone, head, fmt


def reference_head(head: dict, module: torch.nn.Module, fmt: str) -> tuple[dict, str]:
    """Another code's classifier ('fc.*' keys) as `module`'s state dict, and a note.

    A lone 'fc.weight' (no bias) shaped (in, out) for our cosine head's (out, in) is the
    reference CIFAR code's NormedLinear: transposed. Where in == out the shape cannot tell,
    and only LDAM-DRW's layout (its `linear.` keys say which code wrote it) is transposed;
    our own torchvision export of a cosine head is already (out, in)."""
    head = {k[len("fc."):] if k.startswith("fc.") else k: v for k, v in head.items()}
    own = module.state_dict().get("weight")
    w = head.get("weight")
    if (set(head) == {"weight"} and own is not None and w.dim() == 2
            and w.shape == own.shape[::-1] and (w.shape != own.shape or fmt == "LDAM-DRW")):
        return {"weight": w.t().contiguous()}, ", its NormedLinear (in, out) weight transposed"
    return {("fc." + k if hasattr(module, "fc") else k): v for k, v in head.items()}, ""


def load_pretrained(model, path: str, with_head: bool = False) -> str:
    """Load backbone (and optionally head) weights into a Classifier; returns a log line."""
    path = resolve_path(path)
    backbone, head, fmt = split_state_dict(read_weights(path))
    named = getattr(model.backbone, "classifier_name", None)    # a timm model's own file
    if named and fmt != "ours" and any(k.startswith(named + ".") for k in backbone):
        head = {"fc." + k[len(named) + 1:]: v for k, v in backbone.items()
                if k.startswith(named + ".")}
        backbone = {k: v for k, v in backbone.items() if not k.startswith(named + ".")}
        fmt = "timm"
    _load_strict(model.backbone, backbone, path, "backbone")
    msg = f"initialized the backbone from {path} ({fmt} format, {len(backbone)} tensors)"
    if with_head:
        note = ""
        if fmt != "ours":  # a torchvision/MoCo 'fc' is a head of another shape or kind
            head, note = reference_head(head, model.head, fmt)
        _load_strict(model.head, head, path, "head")
        msg += " and the classifier" + note
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
        raise DataError("\n".join(lines))
    module.load_state_dict(state, strict=True)
