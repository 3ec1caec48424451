"""Architectures as data: typed stage tables and their decoding into per-layer specs.

The model code (``mobilenet_v2.py``, ``mobilenet_v1.py``) and the analytic cost model (``costs``)
both read the decoded specs from here, so that the network that is counted is the network that
is built.
"""

from __future__ import annotations

import dataclasses

from manifold_lab.cli import Bounds
from manifold_lab.options import check_fields, option

BOTTLENECK_ACTIVATIONS: tuple[str, ...] = ("linear", "relu6", "relu")
#: Shortcut placements (``residual``), defined in :mod:`manifold_lab.models.mobilenet_v2`.
RESIDUAL_PLACEMENTS: tuple[str, ...] = ("bottleneck", "expansion", "expansion_preact", "inner", "none")
#: Placements whose shortcuts join the expansions of consecutive blocks
#: (:meth:`MobileNetV2Config.expansion_shortcuts`).
EXPANSION_STREAMS: tuple[str, ...] = ("expansion", "expansion_preact")
DEPTHWISE_IMPLS: tuple[str, ...] = ("auto", "xla", "shift", "native")
#: Inverted-residual blocks: layer by layer (``plain``), by the native fused block kernels
#: (``fused``: one call per block in inference, recomputing passes in training), or fused where
#: measured faster (``auto``); see :mod:`manifold_lab.models.backend`.
BLOCK_IMPLS: tuple[str, ...] = ("auto", "plain", "fused")
PADDINGS: tuple[str, ...] = ("same", "symmetric")
COMPUTE_DTYPES: tuple[str, ...] = ("float32", "bfloat16")
#: Stride layouts, as (stem stride, stride of the first stride-2 stage): ``imagenet`` (Table 2),
#: ``small`` (both at 1: 32 or 28 px end at 4x4, 16x the activations of ``imagenet``), ``stem1``
#: (only the stem at 1: 28 px ends at 2x2) and ``bneck1`` (only the first stride-2 bottleneck stage
#: at 1: 28 px ends at 2x2, with the stem's 14x14 kept through that stage).
LAYOUT_STRIDES: dict[str, tuple[int, int]] = {
    "imagenet": (2, 2), "small": (1, 1), "stem1": (1, 2), "bneck1": (2, 1)}
LAYOUTS: tuple[str, ...] = tuple(LAYOUT_STRIDES)


@dataclasses.dataclass(frozen=True)
class NetworkOptions:
    """The choices that define a network's architecture and arithmetic: the one place their
    defaults, choices and help are written. The model configs below extend it with what the data
    decides (classes, input channels) and the architecture tables; the training config holds it."""

    width: float = option(1.0, "width multiplier", bounds=Bounds(0.0, 16.0, open_low=True))
    layout: str = option("imagenet", "stride layout: imagenet (Table 2, 224 px), small (28-32 px: stem "
                         "and first stride-2 stage at 1), stem1 (stem at 1) or bneck1 (first stride-2 "
                         "stage at 1)", choices=LAYOUTS)
    bottleneck_activation: str = option("linear", "non-linearity after the projection (MobileNetV2)",
                                        choices=BOTTLENECK_ACTIVATIONS)
    residual: str = option("bottleneck", "shortcut placement (MobileNetV2)", choices=RESIDUAL_PLACEMENTS)
    depthwise_impl: str = option("auto", "depthwise kernels: auto (native on CPU), xla, shift, native",
                                 choices=DEPTHWISE_IMPLS)
    block_impl: str = option("auto", "MobileNetV2 blocks: auto (fused where faster on CPU), plain (layer by "
                             "layer) or fused (native kernels that keep the expanded tensor in cache-sized tiles)",
                             choices=BLOCK_IMPLS)
    padding: str = option("same", "convolution padding convention", choices=PADDINGS)
    dropout_rate: float = option(0.2, "drop probability before the classifier", flag="--dropout")
    bn_decay: float = option(0.997, "BatchNorm running-average decay (TF-Slim; zero-debiased in training)")
    compute_dtype: str = option("float32", "activations; parameters and BatchNorm statistics stay float32",
                                choices=COMPUTE_DTYPES)

    def __post_init__(self) -> None:
        check_fields(self)
        if not 0.0 <= self.dropout_rate < 1.0:
            raise ValueError(f"dropout_rate must be in [0, 1), got {self.dropout_rate}")
        if not 0.0 <= self.bn_decay < 1.0:
            raise ValueError(f"bn_decay must be in [0, 1), got {self.bn_decay}")

    def network_fields(self) -> dict[str, object]:
        """The :class:`NetworkOptions` fields of this config, by name."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(NetworkOptions)}


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
class MobileNetV2Config(NetworkOptions):
    """Everything that defines a MobileNetV2 variant. Defaults are the paper's network."""

    num_classes: int = 1000
    in_channels: int = 3
    bn_epsilon: float = 1e-3
    stem_channels: int = 32
    last_channels: int = 1280
    divisor: int = 8
    stages: tuple[BottleneckStage, ...] = MOBILENET_V2_STAGES

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_classes < 1 or self.in_channels < 1:
            raise ValueError("num_classes and in_channels must be >= 1")

    @property
    def stem_out(self) -> int:
        return make_divisible(self.stem_channels * self.width, self.divisor)

    @property
    def stem_stride(self) -> int:
        return LAYOUT_STRIDES[self.layout][0]

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
        strides[first] = LAYOUT_STRIDES[self.layout][1]
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
class MobileNetV1Config(NetworkOptions):
    """MobileNetV1 baseline. Width rounding follows TF-Slim: ``max(int(c * width), 8)``. It has no
    bottleneck and no shortcut: ``bottleneck_activation`` and ``residual`` keep their defaults."""

    num_classes: int = 1000
    in_channels: int = 3
    bn_epsilon: float = 1e-3
    stem_channels: int = 32
    min_depth: int = 8
    layers: tuple[SeparableLayer, ...] = MOBILENET_V1_LAYERS

    def __post_init__(self) -> None:
        super().__post_init__()
        if (self.bottleneck_activation, self.residual) != ("linear", "bottleneck"):
            raise ValueError("bottleneck_activation and residual apply to mobilenet_v2 only")

    def depth(self, channels: int) -> int:
        return max(int(channels * self.width), self.min_depth)

    @property
    def stem_out(self) -> int:
        return self.depth(self.stem_channels)

    @property
    def stem_stride(self) -> int:
        return LAYOUT_STRIDES[self.layout][0]

    def layer_strides(self) -> tuple[int, ...]:
        """Stride of each separable layer; ``small`` and ``bneck1`` run the first stride-2 layer at 1."""
        strides = [layer.stride for layer in self.layers]
        strides[strides.index(2)] = LAYOUT_STRIDES[self.layout][1]
        return tuple(strides)


def require_geometry(config: MobileNetV2Config, expected: dict[str, object], source: str) -> None:
    """Raise ``ValueError`` unless ``config`` has the ``expected`` field values and Table 2's stage
    table: the geometry of another framework's MobileNetV2 (``source``) whose weights are mapped."""
    wrong = [f"{k}={getattr(config, k)!r} ({source}: {v!r})" for k, v in expected.items()
             if getattr(config, k) != v]
    if config.stages != MobileNetV2Config().stages:
        wrong.append("a non-default stage table")
    if wrong:
        raise ValueError(f"config does not match {source}'s MobileNetV2: " + ", ".join(wrong))
