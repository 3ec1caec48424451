"""A PyTorch MobileNetV2 equivalent to manifold_lab's (same blocks, widths and strides, read from the
same :class:`~manifold_lab.models.MobileNetV2Config`), used only as a benchmark peer.

Convolutions without bias + BatchNorm (eps 1e-3) + ReLU6, the linear bottleneck, identity shortcuts
where the stride is 1 and the depths match, global average pool, dropout, linear classifier.
Padding is torchvision's symmetric ``k // 2`` (the same work as TF 'SAME').
"""

from __future__ import annotations

import torch
from torch import nn

from manifold_lab.models import MobileNetV2Config


def conv_bn(cin: int, cout: int, kernel: int = 1, stride: int = 1, groups: int = 1, act: bool = True) -> nn.Sequential:
    """Conv (no bias) + BatchNorm (+ ReLU6)."""
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
                               nn.BatchNorm2d(cout, eps=1e-3, momentum=0.003)]
    if act:
        layers.append(nn.ReLU6(inplace=True))
    return nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    """Expansion 1x1 (when t > 1), depthwise 3x3, linear projection 1x1, optional shortcut."""

    def __init__(self, cin: int, expanded: int, cout: int, stride: int, expand: bool) -> None:
        super().__init__()
        layers = [conv_bn(cin, expanded)] if expand else []
        layers += [conv_bn(expanded, expanded, 3, stride, groups=expanded), conv_bn(expanded, cout, act=False)]
        self.body = nn.Sequential(*layers)
        self.shortcut = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x)
        return x + y if self.shortcut else y


class TorchMobileNetV2(nn.Module):
    """MobileNetV2 of ``config`` (NCHW input; use ``channels_last`` memory format for NHWC speed)."""

    def __init__(self, config: MobileNetV2Config) -> None:
        super().__init__()
        blocks = config.blocks()
        layers: list[nn.Module] = [conv_bn(config.in_channels, config.stem_out, 3, config.stem_stride)]
        layers += [InvertedResidual(b.in_channels, b.expanded_channels, b.out_channels, b.stride, b.has_expansion)
                   for b in blocks]
        layers.append(conv_bn(blocks[-1].out_channels, config.head_channels))
        self.features = nn.Sequential(*layers)
        self.dropout = nn.Dropout(config.dropout_rate)
        self.classifier = nn.Linear(config.head_channels, config.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x).mean((2, 3))
        return self.classifier(self.dropout(x))
