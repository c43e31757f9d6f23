"""Any timm model as a backbone: `model.name: timm/<name>` (e.g. timm/vit_small_patch16_224,
timm/convnext_tiny), with our linear or cosine head on its pooled features.

timm is optional (`pip install 'ltrainer[timm]'`) and imported only here, only when such a
name is used. Nothing is downloaded: the network starts from its own initialisation, and a
local `model.init` file (timm's own state dict, e.g. a .pth saved from timm.create_model(...,
pretrained=True) elsewhere) gives pretrained weights; its classifier is dropped unless
model.init_head asks for it. The backbone keeps timm's parameter names and records timm's
classifier name, so model_torchvision.pt of such a run loads into
timm.create_model(<name>, num_classes=C) with strict=True.
"""
from __future__ import annotations

import difflib

from torch import nn

PREFIX = "timm/"
INSTALL = "pip install timm (or pip install 'ltrainer[timm]'; tools/setup_env.sh installs it)"


def import_timm():
    try:
        import timm
    except ImportError as e:
        raise ImportError(f"model.name = 'timm/...' needs timm, which cannot be imported "
                          f"({e}): {INSTALL}") from None
    return timm


def unknown_name_problem(name: str) -> str | None:
    """Why `name` is not a timm model (None: it is); raises ImportError without timm."""
    timm = import_timm()
    if timm.is_model(name):
        return None
    close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(PREFIX + c for c in close)}?" if close else \
        "; timm.list_models() lists them"
    return f"model.name = '{PREFIX}{name}': timm {timm.__version__} has no model '{name}'{hint}"


def check_timm_name(cfg, fail):
    name = cfg.model.name[len(PREFIX):]
    try:
        problem = unknown_name_problem(name)
    except ImportError as e:
        problem = str(e)
    if problem:
        fail("model.name", problem)
    if cfg.model.small_input:
        fail("model.small_input", "model.small_input is read by the torchvision ResNets, not "
                                  f"by model.name = '{cfg.model.name}'")


def timm_backbone(name: str, in_channels: int = 3, image_size: int | None = None) -> nn.Module:
    """timm model `name` without its classifier (num_classes=0: pooled features), never
    downloading weights. Vision transformers are built for `image_size`; convolutional
    models take any size."""
    timm = import_timm()
    problem = unknown_name_problem(name)
    if problem:
        raise ValueError(problem)
    kw = dict(pretrained=False, num_classes=0, in_chans=in_channels)
    try:
        net = timm.create_model(name, img_size=image_size, **kw) if image_size else None
    except TypeError:               # a model without a fixed input size (CNNs)
        net = None
    net = net if net is not None else timm.create_model(name, **kw)
    net.out_dim = int(net.num_features)
    # timm's classifier of this architecture ('fc', 'head', 'head.fc', 'classifier'): where
    # transfer.py finds it in a timm file and heads.py writes ours on export
    classifier = net.pretrained_cfg.get("classifier", "fc")
    net.classifier_name = classifier[0] if isinstance(classifier, (list, tuple)) else classifier
    return net
