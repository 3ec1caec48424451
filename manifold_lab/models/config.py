"""Architectures as data: typed stage tables and their decoding into per-layer specs.

The model code (``mobilenet_v2.py``, ``mobilenet_v1.py``) and the analytic cost model (``costs``)
both read the decoded specs from here, so that the network that is counted is the network that
is built.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

BottleneckActivation = Literal["linear", "relu6", "relu"]
ResidualPlacement = Literal["bottleneck", "expansion", "expansion_preact", "inner", "none"]
DepthwiseImpl = Literal["auto", "xla", "shift", "native"]
Padding = Literal["same", "symmetric"]
Preset = Literal["imagenet", "small", "stem1", "bneck1"]

BOTTLENECK_ACTIVATIONS: tuple[str, ...] = ("linear", "relu6", "relu")
#: Shortcut placements (``residual``), defined in :mod:`manifold_lab.models.mobilenet_v2`.
RESIDUAL_PLACEMENTS: tuple[str, ...] = ("bottleneck", "expansion", "expansion_preact", "inner", "none")
#: Placements whose shortcuts join the expansions of consecutive blocks
#: (:meth:`MobileNetV2Config.expansion_shortcuts`).
EXPANSION_STREAMS: tuple[str, ...] = ("expansion", "expansion_preact")
DEPTHWISE_IMPLS: tuple[str, ...] = ("auto", "xla", "shift", "native")
PADDINGS: tuple[str, ...] = ("same", "symmetric")
#: Stride layouts, as (stem stride, stride of the first stride-2 stage): ``imagenet`` (Table 2),
#: ``small`` (both at 1: 32 or 28 px end at 4x4, 16x the activations of ``imagenet``), ``stem1``
#: (only the stem at 1: 28 px ends at 2x2) and ``bneck1`` (only the first stride-2 bottleneck stage
#: at 1: 28 px ends at 2x2, with the stem's 14x14 kept through that stage).
LAYOUT_STRIDES: dict[str, tuple[int, int]] = {
    "imagenet": (2, 2), "small": (1, 1), "stem1": (1, 2), "bneck1": (2, 1)}
PRESETS: tuple[str, ...] = tuple(LAYOUT_STRIDES)


def make_divisible(value: float, divisor: int = 8, min_value: int | None = None) -> int:
    """Round ``value`` to a multiple of ``divisor``, never more than 10% down (reference rule)."""
    min_value = divisor if min_value is None else min_value
    rounded = max(min_value, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


@dataclasses.dataclass(frozen=True)
class BottleneckStage:
    """One row of Table 2: expansion t, output channels c, repeats n, first stride s."""

    expansion: int
    channels: int
    repeats: int
    stride: int


#: Table 2 of the paper (after the 3x3 stride-2 stem with 32 channels).
MOBILENET_V2_STAGES: tuple[BottleneckStage, ...] = (
    BottleneckStage(1, 16, 1, 1),
    BottleneckStage(6, 24, 2, 2),
    BottleneckStage(6, 32, 3, 2),
    BottleneckStage(6, 64, 4, 2),
    BottleneckStage(6, 96, 3, 1),
    BottleneckStage(6, 160, 3, 2),
    BottleneckStage(6, 320, 1, 1),
)


@dataclasses.dataclass(frozen=True)
class BlockSpec:
    """A decoded bottleneck block (Table 1)."""

    index: int
    in_channels: int
    expanded_channels: int  # == in_channels when the block has no expansion conv
    out_channels: int
    stride: int
    has_expansion: bool
    bottleneck_shortcut: bool  # identity shortcut input -> output (stride 1, equal depths)


@dataclasses.dataclass(frozen=True)
class MobileNetV2Config:
    """Everything that defines a MobileNetV2 variant. Defaults are the paper's network."""

    width: float = 1.0
    num_classes: int = 1000
    in_channels: int = 3
    preset: Preset = "imagenet"
    bottleneck_activation: BottleneckActivation = "linear"
    residual: ResidualPlacement = "bottleneck"
    depthwise_impl: DepthwiseImpl = "auto"
    padding: Padding = "same"
    dropout_rate: float = 0.2  # probability of dropping a unit before the classifier
    bn_epsilon: float = 1e-3
    bn_momentum: float = 0.997  # running-average decay (TF-Slim)
    stem_channels: int = 32
    last_channels: int = 1280
    divisor: int = 8
    compute_dtype: str = "float32"  # activations; parameters and BatchNorm statistics stay float32
    stages: tuple[BottleneckStage, ...] = MOBILENET_V2_STAGES

    def __post_init__(self) -> None:
        _check_choice("bottleneck_activation", self.bottleneck_activation, BOTTLENECK_ACTIVATIONS)
        _check_choice("residual", self.residual, RESIDUAL_PLACEMENTS)
        _check_choice("depthwise_impl", self.depthwise_impl, DEPTHWISE_IMPLS)
        _check_choice("padding", self.padding, PADDINGS)
        _check_choice("preset", self.preset, PRESETS)
        if not self.width > 0:
            raise ValueError(f"width must be positive, got {self.width}")
        if self.num_classes < 1 or self.in_channels < 1:
            raise ValueError("num_classes and in_channels must be >= 1")
        if not 0.0 <= self.dropout_rate < 1.0:
            raise ValueError(f"dropout_rate must be in [0, 1), got {self.dropout_rate}")

    @property
    def stem_out(self) -> int:
        return make_divisible(self.stem_channels * self.width, self.divisor)

    @property
    def stem_stride(self) -> int:
        return LAYOUT_STRIDES[self.preset][0]

    @property
    def head_channels(self) -> int:
        """The last 1x1 conv: 1280 for widths <= 1, scaled above 1."""
        if self.width > 1.0:
            return make_divisible(self.last_channels * self.width, self.divisor)
        return self.last_channels

    def stage_strides(self) -> tuple[int, ...]:
        """First-block stride of each stage; ``small`` and ``bneck1`` run the first stride-2 stage at 1."""
        strides = [s.stride for s in self.stages]
        first = next(i for i, s in enumerate(strides) if s == 2)
        strides[first] = LAYOUT_STRIDES[self.preset][1]
        return tuple(strides)

    def blocks(self) -> tuple[BlockSpec, ...]:
        """Decode the stage table into one spec per bottleneck block."""
        specs: list[BlockSpec] = []
        in_ch = self.stem_out
        for stage, first_stride in zip(self.stages, self.stage_strides()):
            out_ch = make_divisible(stage.channels * self.width, self.divisor)
            for r in range(stage.repeats):
                stride = first_stride if r == 0 else 1
                expanded = in_ch * stage.expansion
                specs.append(
                    BlockSpec(
                        index=len(specs),
                        in_channels=in_ch,
                        expanded_channels=expanded,
                        out_channels=out_ch,
                        stride=stride,
                        has_expansion=expanded != in_ch,
                        bottleneck_shortcut=stride == 1 and in_ch == out_ch,
                    )
                )
                in_ch = out_ch
        return tuple(specs)

    def expansion_shortcuts(self) -> tuple[int, ...]:
        """Indices i of blocks whose expanded tensor receives a shortcut from block i-1's
        expanded tensor (``residual`` in :data:`EXPANSION_STREAMS`): both are depthwise inputs of
        equal shape, i.e. block i-1 has stride 1 and both expanded widths are equal."""
        blocks = self.blocks()
        return tuple(
            cur.index
            for prev, cur in zip(blocks, blocks[1:])
            if prev.stride == 1 and prev.expanded_channels == cur.expanded_channels
            and prev.has_expansion and cur.has_expansion
        )

    def inner_shortcuts(self) -> tuple[int, ...]:
        """Indices of blocks with a shortcut from the expansion output to the depthwise output
        (``residual='inner'``): stride 1 and an expansion conv, so that the depthwise output has
        the shape of its input (the depthwise keeps the channels, stride 1 the spatial size)."""
        return tuple(b.index for b in self.blocks() if b.stride == 1 and b.has_expansion)


@dataclasses.dataclass(frozen=True)
class SeparableLayer:
    """One depthwise-separable layer of MobileNetV1: 3x3 depthwise (stride) then 1x1 to ``channels``."""

    channels: int
    stride: int


#: MobileNetV1 (Howard et al. 2017, Table 1) after the 3x3 stride-2 stem with 32 channels.
MOBILENET_V1_LAYERS: tuple[SeparableLayer, ...] = (
    SeparableLayer(64, 1),
    SeparableLayer(128, 2),
    SeparableLayer(128, 1),
    SeparableLayer(256, 2),
    SeparableLayer(256, 1),
    SeparableLayer(512, 2),
    *(SeparableLayer(512, 1),) * 5,
    SeparableLayer(1024, 2),
    SeparableLayer(1024, 1),
)


@dataclasses.dataclass(frozen=True)
class MobileNetV1Config:
    """MobileNetV1 baseline. Width rounding follows TF-Slim: ``max(int(c * width), 8)``."""

    width: float = 1.0
    num_classes: int = 1000
    in_channels: int = 3
    preset: Preset = "imagenet"
    depthwise_impl: DepthwiseImpl = "auto"
    padding: Padding = "same"
    dropout_rate: float = 0.2
    bn_epsilon: float = 1e-3
    bn_momentum: float = 0.997
    stem_channels: int = 32
    min_depth: int = 8
    compute_dtype: str = "float32"
    layers: tuple[SeparableLayer, ...] = MOBILENET_V1_LAYERS

    def __post_init__(self) -> None:
        _check_choice("depthwise_impl", self.depthwise_impl, DEPTHWISE_IMPLS)
        _check_choice("padding", self.padding, PADDINGS)
        _check_choice("preset", self.preset, PRESETS)
        if not self.width > 0:
            raise ValueError(f"width must be positive, got {self.width}")
        if not 0.0 <= self.dropout_rate < 1.0:
            raise ValueError(f"dropout_rate must be in [0, 1), got {self.dropout_rate}")

    def depth(self, channels: int) -> int:
        return max(int(channels * self.width), self.min_depth)

    @property
    def stem_out(self) -> int:
        return self.depth(self.stem_channels)

    @property
    def stem_stride(self) -> int:
        return LAYOUT_STRIDES[self.preset][0]

    def layer_strides(self) -> tuple[int, ...]:
        """Stride of each separable layer; ``small`` and ``bneck1`` run the first stride-2 layer at 1."""
        strides = [layer.stride for layer in self.layers]
        strides[strides.index(2)] = LAYOUT_STRIDES[self.preset][1]
        return tuple(strides)


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}; got {value!r}")
