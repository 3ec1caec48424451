"""Parameters and multiply-adds per layer, and the paper's tables.

Examples::

    python -m manifold_lab.costs                                  # MobileNetV2 1.0, 224 px
    python -m manifold_lab.costs --model mobilenet_v1 --json
    python -m manifold_lab.costs --table slim                     # authors' checkpoint table
    python -m manifold_lab.costs --table memory --json            # Table 3
    python -m manifold_lab.costs --table table2 --width 0.5       # Table 2 decoded from a config
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence

from manifold_lab.cli import ArgumentParser, Bounds, UsageError, command_name, run_main
from manifold_lab.costs.analytic import ModelCosts, model_costs
from manifold_lab.costs.model_count import abstract_param_count
from manifold_lab.costs.memory_bounds import memory_bounds
from manifold_lab.costs.tables import memory_table, slim_table, table2_rows
from manifold_lab.models import MODELS, MobileNetV2Config, model_config
from manifold_lab.models.config import LAYOUTS, NetworkOptions
from manifold_lab.options import field_bounds
from manifold_lab.train.config import BATCH, IMAGE_SIZE

PROG = command_name("costs", "manifold_lab.costs")

TABLES = ("slim", "memory", "table2", "bounds")


#: Bounds of the network flags: width and image size as training takes them, and as many classes
#: and input channels as a network's shapes can sensibly hold.
WIDTH = field_bounds(NetworkOptions, "width")
CLASSES = Bounds(1, 1_000_000, integral=True)
IN_CHANNELS = Bounds(1, 4096, integral=True)


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    network = parser.add_argument_group("network")
    network.add_argument("--model", choices=tuple(MODELS), default="mobilenet_v2", help="the architecture")
    network.add_argument("--width", type=WIDTH, default=1.0, help="width multiplier")
    network.add_argument("--image-size", "--resolution", dest="resolution", type=IMAGE_SIZE, default=224,
                        metavar="PIXELS", help="input size in pixels (--resolution is an alias)")
    network.add_argument("--classes", type=CLASSES, default=1000, help="number of classes")
    network.add_argument("--in-channels", type=IN_CHANNELS, default=3, help="input channels")
    network.add_argument("--layout", choices=LAYOUTS, default="imagenet", help="stride layout")
    output = parser.add_argument_group("output")
    output.add_argument("--table", choices=TABLES, default=None,
                        help="print one of the paper's tables instead of the per-layer costs "
                             "(slim and memory are fixed paper tables; memory and table2 use "
                             "--width/--image-size; bounds: Section 5's memory bounds at --batch)")
    output.add_argument("--batch", type=BATCH, default=1, help="--table bounds: images per batch")
    output.add_argument("--bytes-per-value", type=int, choices=(2, 4), default=4,
                        help="--table bounds: bytes per activation (Table 3 counts 2; float32 is 4)")
    output.add_argument("--json", action="store_true", help="print JSON instead of text")
    return parser


def _fmt_shape(shape: Sequence[int]) -> str:
    return "x".join(str(d) for d in shape)


def format_costs(costs: ModelCosts, params_model: int) -> str:
    """Per-layer table and totals as text."""
    lines = [f"{costs.model} width {costs.width:g}, {costs.resolution} px, {costs.num_classes} "
             f"classes, layout {costs.layout}",
             f"{'layer':<22}{'input':>14}{'output':>14}{'params':>12}{'multiply-adds':>16}"]
    for layer in costs.layers:
        lines.append(f"{layer.name:<22}{_fmt_shape(layer.input_shape):>14}"
                     f"{_fmt_shape(layer.output_shape):>14}{layer.params:>12,}{layer.madds:>16,}")
    lines += [
        f"trainable parameters       {costs.params:>14,}  (Flax model: {params_model:,})",
        f"  without BatchNorm        {costs.params_without_bn:>14,}",
        f"BatchNorm statistics       {costs.bn_statistics:>14,}",
        f"multiply-adds              {costs.madds:>14,}  (conv {costs.conv_madds:,} + "
        f"classifier {costs.classifier_madds:,})",
    ]
    return "\n".join(lines)


def format_slim(rows: list[dict]) -> str:
    lines = ["Authors' checkpoint table (1001 classes, params without BatchNorm, MACs truncated)",
             f"{'width':>6}{'res':>6}{'MACs (M)':>10}{'published':>11}{'params (M)':>12}"
             f"{'published':>11}  match"]
    for r in rows:
        lines.append(f"{r['width']:>6g}{r['resolution']:>6}{r['macs_millions']:>10}"
                     f"{r['published_macs_millions']:>11}{r['params_millions']:>12.2f}"
                     f"{r['published_params_millions']:>11.2f}  {'yes' if r['match'] else 'NO'}")
    lines.append(f"{sum(r['match'] for r in rows)}/{len(rows)} rows reproduced exactly")
    return "\n".join(lines)


def _cell(value, fmt: str = "") -> str:
    return "-" if value is None else format(value, fmt)


def format_memory(table: dict) -> str:
    lines = ["Table 3: largest materialised tensor per resolution, 16-bit activations, K = 1000 bytes",
             "(MobileNetV2 with the Section 5 evaluation: tensors inside a bottleneck, the stem output",
             " feeding the first depthwise and the head's 1x1-conv output are never materialised)"]
    for name, entry in table.items():
        lines.append(f"\n{name}")
        lines.append(f"{'res':>5}{'ch':>6}{'KB':>10}{'paper ch':>10}{'paper KB':>10}  "
                     f"{'match':<6}{'paper cell = res^2 x ch x 2 bytes':<40}tensor")
        for r in entry["rows"]:
            follows = r["follows_formula"]
            note = "-" if follows is None else ("yes" if follows else "NO")
            if r["published_channels_exist"] is False:
                note += " (paper ch absent at this res)"
            match = "-" if r["match"] is None else ("yes" if r["match"] else "NO")
            lines.append(f"{r['resolution']:>5}{r['channels']:>6}{r['kilobytes']:>10.1f}"
                         f"{_cell(r['published_channels']):>10}{_cell(r['published_kilobytes']):>10}  "
                         f"{match:<6}{note:<40}{r['tensor']}")
        m = entry["max"]
        match = "-" if m["match"] is None else ("yes" if m["match"] else "NO")
        lines.append(f"{'max':>5}{m['channels']:>6}{m['kilobytes']:>10.1f}{'':>10}"
                     f"{_cell(m['published_kilobytes']):>10}  {match:<6}{'':<40}{m['tensor']}")
    return "\n".join(lines)


def format_table2(rows: list[dict]) -> str:
    def cells(row: dict) -> str:
        return (f"{row['input']:<14}{row['operator']:<14}{_cell(row['t']):>3}{_cell(row['c']):>6}"
                f"{_cell(row['n']):>3}{_cell(row['s']):>3}")
    lines = ["Table 2 decoded from the config" + ("" if rows[0]["published"] is None
                                                else " | as printed"),
             f"{'input':<14}{'operator':<14}{'t':>3}{'c':>6}{'n':>3}{'s':>3}"]
    for row in rows:
        text = cells(row)
        if row["published"] is not None:
            text += f"   | {cells(row['published'])}  {'match' if row['match'] else 'DIFFERS'}"
        lines.append(text)
    return "\n".join(lines)


def print_bounds(config: object, args: argparse.Namespace) -> None:
    """``--table bounds``: Section 5's lower bounds on inference activation memory (the largest
    materialised tensor, Table 3's figure, and the largest block input + output pair) for
    ``--batch`` images at ``--bytes-per-value``; what ``benchmarks/fused_block.py --memory``
    measures the plain and fused forward passes against."""
    if not isinstance(config, MobileNetV2Config):
        raise UsageError("--table bounds describes mobilenet_v2 only")
    b = memory_bounds(config, args.resolution, args.batch, args.bytes_per_value)
    if args.json:
        print(json.dumps({"table": "bounds", "resolution": args.resolution, "batch": args.batch,
                          "bytes_per_value": args.bytes_per_value, **dataclasses.asdict(b)}, indent=1))
        return
    mib = 1 << 20
    print(f"Section 5 inference memory bounds, {args.resolution} px, batch {args.batch}, "
          f"{args.bytes_per_value}-byte activations")
    print(f"  largest materialised tensor  {b.largest_bytes / mib:10.2f} MiB  ({b.largest_tensor})")
    print(f"  largest block input+output   {b.pair_bytes / mib:10.2f} MiB  ({' + '.join(b.pair)})")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    fields = dict(width=args.width, num_classes=args.classes, in_channels=args.in_channels,
                  layout=args.layout)
    try:
        config = model_config(args.model, **fields)
    except ValueError as exc:
        raise UsageError(str(exc)) from None

    if args.table == "slim":
        rows = slim_table()
        print(json.dumps({"table": "slim", "rows": rows}, indent=1) if args.json else format_slim(rows))
        return 0
    if args.table == "memory":
        table = memory_table(resolution=args.resolution, width=args.width)
        print(json.dumps({"table": "memory", "unit": "1000 bytes", **table}, indent=1) if args.json
              else format_memory(table))
        return 0
    if args.table == "bounds":
        print_bounds(config, args)
        return 0
    if args.table == "table2":
        if not isinstance(config, MobileNetV2Config):
            raise UsageError("--table table2 describes mobilenet_v2 only")
        rows = table2_rows(config, args.resolution)
        print(json.dumps({"table": "table2", "rows": rows}, indent=1) if args.json
              else format_table2(rows))
        return 0

    costs = model_costs(config, args.resolution)
    counted = abstract_param_count(config)
    if args.json:
        print(json.dumps({**costs.as_dict(), "params_model": counted["params"],
                          "bn_statistics_model": counted["bn_statistics"]}, indent=1))
    else:
        print(format_costs(costs, counted["params"]))
    if (counted["params"], counted["bn_statistics"]) != (costs.params, costs.bn_statistics):
        print(f"error: the Flax model has {counted['params']:,} parameters and "
              f"{counted['bn_statistics']:,} BatchNorm statistics, the cost model "
              f"{costs.params:,} and {costs.bn_statistics:,}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main(main, prog=PROG))
