"""ImageNet-style ResNets built from torchvision, used as feature extractors.

We reuse torchvision's ResNet class (rather than re-implementing it) so that the module and
parameter names match torchvision exactly: checkpoints can then be exchanged with torchvision,
MoCo and classifier-balancing code without key renaming. The final `fc` is replaced by
`nn.Identity`, so the backbone returns the pooled feature vector; the classifier lives in a
separate head (see heads.py).
"""

from __future__ import annotations

from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from .pooling import GlobalAvgPool

# name -> (block type, blocks per stage). resnet10 is the small variant used by
# classifier-balancing for quick ImageNet-LT experiments.
_ARCHS = {
    "resnet10": (BasicBlock, [1, 1, 1, 1]),
    "resnet18": (BasicBlock, [2, 2, 2, 2]),
    "resnet50": (Bottleneck, [3, 4, 6, 3]),
}


def torchvision_resnet(
    name: str,
    in_channels: int = 3,
    small_input: bool = False,
    zero_init_residual: bool = False,
) -> ResNet:
    """Build a torchvision ResNet backbone that returns pooled features.

    Args:
        name: "resnet10", "resnet18" or "resnet50".
        in_channels: input channels; a value other than 3 replaces conv1 (same geometry).
        small_input: for 28/32-px images use a 3x3 stride-1 conv1 and drop the max-pool,
            otherwise the 7x7/2 stem plus max-pool shrinks such images to 1x1 too early.
        zero_init_residual: torchvision's option to start each residual branch at zero.

    The returned module has an `out_dim` attribute (512 or 2048). With the default stem
    (in_channels=3, small_input=False) its weights load into a stock torchvision ResNet.
    """
    if name not in _ARCHS:
        raise ValueError(f"unknown torchvision ResNet {name!r}; valid: {sorted(_ARCHS)}")
    block, layers = _ARCHS[name]
    net = ResNet(block, layers, zero_init_residual=zero_init_residual)
    if small_input:
        net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    elif in_channels != 3:
        net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    if small_input or in_channels != 3:
        # Same initialisation torchvision gives its own conv1.
        nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
    net.avgpool = GlobalAvgPool()   # AdaptiveAvgPool2d's CUDA backward is nondeterministic
    net.out_dim = net.fc.in_features
    net.fc = nn.Identity()
    return net
