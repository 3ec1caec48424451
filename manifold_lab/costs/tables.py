"""The paper's tables measured from the decoded configs, next to the published values.

- :func:`slim_table`: the authors' checkpoint table (MACs and parameters per width x resolution).
- :func:`memory_table`: Table 3, the largest tensor that must be materialised per resolution.
- :func:`table2_rows`: Table 2, the stage table (input shape, operator, t, c, n, s).
"""

from __future__ import annotations

import dataclasses
import math
from fractions import Fraction

from manifold_lab.costs import published
from manifold_lab.costs.analytic import conv_output_size, model_costs
from manifold_lab.models.config import MobileNetV1Config, MobileNetV2Config

# ---------------------------------------------------------------------------------------------
# The authors' checkpoint table


def slim_table() -> list[dict]:
    """Every row of the authors' checkpoint table, measured and published.

    Measured as that table counts: 1001 classes, parameters without BatchNorm (kernels and the
    classifier's bias), MACs truncated to integer millions, parameters rounded to two decimals.
    """
    rows = []
    for (width, resolution), (pub_macs, pub_params) in published.SLIM_CHECKPOINTS.items():
        costs = model_costs(MobileNetV2Config(width=width, num_classes=published.SLIM_NUM_CLASSES),
                            resolution)
        macs_m = costs.madds // 1_000_000
        params_m = round(costs.params_without_bn / 1e6, 2)
        rows.append({
            "width": width,
            "resolution": resolution,
            "madds": costs.madds,
            "params_without_bn": costs.params_without_bn,
            "macs_millions": macs_m,
            "params_millions": params_m,
            "published_macs_millions": pub_macs,
            "published_params_millions": pub_params,
            "match": macs_m == pub_macs and params_m == pub_params,
        })
    return rows


# ---------------------------------------------------------------------------------------------
# Table 3: memory


@dataclasses.dataclass(frozen=True)
class Tensor:
    """A tensor that must be held in memory at some point of the inference."""

    name: str
    resolution: int
    channels: int

    @property
    def elements(self) -> int:
        return self.resolution * self.resolution * self.channels


def materialised_tensors_v2(config: MobileNetV2Config, resolution: int) -> list[Tensor]:
    """Tensors MobileNetV2 must materialise with the Section 5 evaluation.

    Inside a bottleneck the expansion, its activation and the depthwise output are computed
    slice by slice and never held whole; only bottleneck tensors (block inputs and outputs) are.
    The stem output feeds the first block's depthwise directly (that block has no expansion), so it
    is an inner tensor of the first bottleneck. The head (1x1 conv, BatchNorm, ReLU6, global pool)
    is per-channel after its convolution, so it is evaluated slice by slice the same way and only
    the pooled vector is held.
    """
    tensors = [Tensor("input", resolution, config.in_channels)]
    size = conv_output_size(resolution, config.stem_stride)
    for spec in config.blocks():
        size = conv_output_size(size, spec.stride)
        tensors.append(Tensor(f"block{spec.index:02d}/output", size, spec.out_channels))
    tensors.append(Tensor("pooled", 1, config.head_channels))
    tensors.append(Tensor("logits", 1, config.num_classes))
    return tensors


def materialised_tensors_v1(config: MobileNetV1Config, resolution: int) -> list[Tensor]:
    """Tensors MobileNetV1 materialises: every layer output (no Section 5 trick applies)."""
    costs = model_costs(config, resolution)
    tensors = [Tensor("input", resolution, config.in_channels)]
    for layer in costs.layers:
        h, _, c = layer.output_shape
        tensors.append(Tensor(layer.name if layer.kind != "dense" else "logits", h, c))
    features = costs.layers[-1].input_shape[2]
    tensors.insert(-1, Tensor("pooled", 1, features))
    return tensors


def kilobytes(elements: int, bytes_per_activation: int = published.TABLE3_BYTES_PER_ACTIVATION
              ) -> Fraction:
    """Memory in the unit that reproduces Table 3: K = 1000 bytes (1024 gives 1568K, not 1600K,
    for MobileNetV1's 112 x 112 x 64 tensor)."""
    return Fraction(elements * bytes_per_activation, 1000)


def truncate_like(value: Fraction, printed: int) -> int:
    """``value`` truncated to as many significant digits as the printed integer shows
    (1605.6 -> 1600 against "1600", 62.7 -> 62 against "62", 2.56 -> 2 against "2")."""
    if value < 1:
        return 0
    digits = len(str(printed).rstrip("0")) or 1
    magnitude = math.floor(math.log10(value))
    step = Fraction(10) ** (magnitude - digits + 1)
    return int(math.floor(value / step) * step)


def memory_table(resolution: int = 224, width: float = 1.0) -> dict[str, dict]:
    """Table 3 for MobileNetV1 and MobileNetV2 (Section 5 evaluation), 16-bit activations.

    For each network and each spatial resolution: the largest materialised tensor (channels, KB),
    next to the printed cell when the configuration is the paper's (224 px, width 1.0).
    ``published_channels_exist`` says whether any tensor of the network (inner ones included)
    has the printed channel count at that resolution: MobileNetV2's printed 56, 28 and 14 rows
    name the channels of the stage that *starts* at that resolution but outputs at half of it
    (32 channels first appear at 28 px), so they cannot be reproduced. ``follows_formula`` says
    whether the printed KB equals resolution^2 x printed channels x 2 bytes, truncated to the
    printed digits: the printed cells that do not are MobileNetV1 at 7 (199 for 7 x 7 x 1024)
    and MobileNetV2 at 7 (32 for 7 x 7 x 320). The max rows (1600K, 400K) are reproduced.
    """
    paper_geometry = resolution == 224 and width == 1.0
    v1, v2 = MobileNetV1Config(width=width), MobileNetV2Config(width=width)
    networks = {
        "mobilenet_v1": (materialised_tensors_v1(v1, resolution), model_costs(v1, resolution),
                         published.TABLE3_MOBILENET_V1),
        "mobilenet_v2": (materialised_tensors_v2(v2, resolution), model_costs(v2, resolution),
                         published.TABLE3_MOBILENET_V2),
    }
    result = {}
    for name, (tensors, costs, printed) in networks.items():
        channels_at = _channels_by_resolution(costs, tensors)
        by_resolution: dict[int, Tensor] = {}
        for tensor in tensors:
            best = by_resolution.get(tensor.resolution)
            if best is None or tensor.elements > best.elements:
                by_resolution[tensor.resolution] = tensor
        rows = []
        for res in sorted(by_resolution, reverse=True):
            tensor = by_resolution[res]
            kb = kilobytes(tensor.elements)
            row = {"resolution": res, "channels": tensor.channels, "tensor": tensor.name,
                   "kilobytes": float(kb), "published_channels": None, "published_kilobytes": None,
                   "match": None, "follows_formula": None, "published_channels_exist": None}
            if paper_geometry and res in printed:
                pub_c, pub_kb = printed[res]
                row.update(published_channels=pub_c, published_kilobytes=pub_kb,
                           match=tensor.channels == pub_c and truncate_like(kb, pub_kb) == pub_kb,
                           follows_formula=truncate_like(kilobytes(res * res * pub_c),
                                                         pub_kb) == pub_kb,
                           published_channels_exist=pub_c in channels_at.get(res, set()))
            rows.append(row)
        largest = max(tensors, key=lambda t: t.elements)
        max_kb = kilobytes(largest.elements)
        pub_max = published.TABLE3_MAX_KB[name] if paper_geometry else None
        result[name] = {
            "rows": rows,
            "max": {"tensor": largest.name, "resolution": largest.resolution,
                    "channels": largest.channels, "kilobytes": float(max_kb),
                    "published_kilobytes": pub_max,
                    "match": None if pub_max is None else truncate_like(max_kb, pub_max) == pub_max},
        }
    return result


def _channels_by_resolution(costs, tensors: list[Tensor]) -> dict[int, set[int]]:
    """Every channel count any tensor of the network has at each resolution (inner ones too)."""
    found: dict[int, set[int]] = {}
    for layer in costs.layers:
        for h, _, c in (layer.input_shape, layer.output_shape):
            found.setdefault(h, set()).add(c)
    for tensor in tensors:
        found.setdefault(tensor.resolution, set()).add(tensor.channels)
    return found


# ---------------------------------------------------------------------------------------------
# Table 2


def _shape_text(height: int, channels: int) -> str:
    return f"{height}^2 x {channels}" if height > 1 else f"1 x 1 x {channels}"


def table2_rows(config: MobileNetV2Config, resolution: int) -> list[dict]:
    """Table 2 decoded from ``config``: one row per operator sequence (input shape, operator,
    t, c, n, s), with the printed row alongside when ``config`` is the paper's network at 224 px."""
    costs = model_costs(config, resolution)
    by_name = {layer.name: layer for layer in costs.layers}
    stem = by_name["stem"]
    rows = [(_shape_text(resolution, config.in_channels), "conv2d", None, stem.output_shape[2], 1,
             stem.stride)]
    blocks = config.blocks()
    first = 0
    for stage, stride in zip(config.stages, config.stage_strides()):
        spec = blocks[first]
        first_layer = by_name[f"block{spec.index:02d}/" + ("expansion" if spec.has_expansion
                                                           else "depthwise")]
        h, _, c = first_layer.input_shape
        rows.append((_shape_text(h, c), "bottleneck", stage.expansion, spec.out_channels,
                     stage.repeats, stride))
        first += stage.repeats
    head = by_name["head"]
    h = head.input_shape[0]
    rows.append((_shape_text(h, head.input_shape[2]), "conv2d 1x1", None, head.output_shape[2], 1, 1))
    rows.append((_shape_text(h, head.output_shape[2]), f"avgpool {h}x{h}", None, None, 1, None))
    rows.append((_shape_text(1, head.output_shape[2]), "conv2d 1x1", None, config.num_classes,
                 None, None))

    paper = (resolution == 224 and config.stages == MobileNetV2Config().stages
             and config.width == 1.0 and config.layout == "imagenet" and config.in_channels == 3)
    keys = ("input", "operator", "t", "c", "n", "s")
    out = []
    for i, row in enumerate(rows):
        entry = dict(zip(keys, row))
        pub = published.TABLE2[i] if paper and len(rows) == len(published.TABLE2) else None
        entry["published"] = None if pub is None else dict(zip(keys, pub))
        if pub is not None:
            entry["match"] = all(m == p or (k == "c" and p == "k")
                                 for k, m, p in zip(keys, row, pub))
        else:
            entry["match"] = None
        out.append(entry)
    return out
