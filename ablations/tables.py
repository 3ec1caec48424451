"""``tables.md``: Tables 2 and 3 from the cost model and the Table 4 analogue (cost, accuracy and
latency per width), from the measurement files and the runs' accuracies. Pure text (no JAX)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from ablations import stats
from ablations.markdown import GENERATED, Section, fmt_estimate, markdown_table
from ablations.measurements import Measurement, device_label
from ablations.results import VariantResults

PAPER_TABLE4 = (  # (network, top-1, params M, MAdds M, Pixel 1 latency ms) as printed in Table 4
    ("MobileNetV1", 70.6, 4.2, 575, 113),
    ("MobileNetV2", 72.0, 3.4, 300, 75),
    ("MobileNetV2 (1.4)", 74.7, 6.9, 585, 143),
)
_MATCH = {True: "yes", False: "no", None: "–"}


@dataclasses.dataclass(frozen=True)
class WidthRow:
    """Costs and measurements of one network of the width study (Fig. 5 and the Table 4 analogue);
    ``variant`` is None for a network the sweep does not train (MobileNetV1)."""

    variant: str | None
    label: str
    width: float
    params: int
    madds: int
    accuracy: stats.Estimate | None
    latency: tuple[float, float, float] | None  # median, 25th, 75th percentile (ms)


@dataclasses.dataclass(frozen=True)
class WidthTable:
    """The width rows and how they were measured."""

    rows: tuple[WidthRow, ...]
    dataset: str
    resolution: int
    device: str  # backend of the latency, as the report names it
    latency_method: str
    cite: str


def width_table(measurement: Measurement, results: Sequence[VariantResults]) -> WidthTable:
    """The measured costs and latencies of a width study, with each trained width's accuracy
    (mean and 95% interval over its seeds) from ``results``."""
    by_name = {vr.variant.name: vr for vr in results}
    rows = []
    for r in measurement.data["rows"]:
        vr = by_name.get(r["variant"]) if r["variant"] is not None else None
        accuracy = stats.mean_ci(vr.accuracies) if vr is not None and vr.runs else None
        lat = r["latency_ms"]
        rows.append(WidthRow(r["variant"], r["label"], float(r["width"]), int(r["params"]), int(r["madds"]),
                             accuracy, (float(lat["median"]), float(lat["q25"]), float(lat["q75"]))))
    latency = measurement.data["latency"]
    method = (f"{latency['what']}, median [interquartile range] of {latency['repeats']} calls after "
              f"{latency['warmup']} warm-up calls")
    return WidthTable(tuple(rows), str(measurement.data["dataset"]), int(measurement.data["image_shape"][0]),
                      device_label(measurement), method, measurement.cite())


def _table2(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    out = ["## Table 2: MobileNetV2 layers (224 px, width 1.0), decoded from the stage table\n"]
    out.append(markdown_table(["input", "operator", "t", "c", "n", "s", "matches the paper"],
                              [[r["input"], r["operator"], r["t"], r["c"], r["n"], r["s"], _MATCH[r["match"]]]
                               for r in rows]))
    out.append(f"{sum(bool(r['match']) for r in rows)} of {len(rows)} rows equal the printed table.\n")
    return out


def _table3(memory: Mapping[str, Any]) -> list[str]:
    out = ["## Table 3: largest materialised tensor per resolution (16-bit activations, Kb)\n"]
    for name, label in (("mobilenet_v1", "MobileNetV1"), ("mobilenet_v2", "MobileNetV2 (Section 5: "
                                                                          "bottleneck interiors not materialised)")):
        table = memory[name]
        out.append(f"**{label}**\n")
        out.append(markdown_table(
            ["resolution", "channels", "Kb (ours)", "channels (paper)", "Kb (paper)", "match"],
            [[r["resolution"], r["channels"], f"{r['kilobytes']:.0f}", r["published_channels"],
              r["published_kilobytes"], _MATCH[r["match"]]] for r in table["rows"]]
            + [["**max**", table["max"]["channels"], f"**{table['max']['kilobytes']:.0f}**", None,
                f"**{table['max']['published_kilobytes']}**", _MATCH[table["max"]["match"]]]]))
    out.append("A printed cell that differs is listed as a mismatch: some printed V2 rows name the channels "
               "of a stage that only appears at half that resolution, and two printed 7x7 cells follow no "
               "single formula (see `manifold_lab.costs.memory_table`). The max rows (1600K for V1, 400K "
               "for V2) are the paper's point.\n")
    return out


def _table4(width: WidthTable | None, note: str) -> list[str]:
    device = width.device if width is not None else "measured"
    out = [f"## Table 4 analogue: cost, measured accuracy and {device} latency\n"]
    if width is None:
        out.append(f"_Skipped: {note}._\n")
    else:
        out.append(f"Measured on {width.dataset} at {width.resolution} px: parameters and multiply-adds from "
                   "the cost model; accuracy = final test accuracy, mean [95% CI] over seeds; latency = "
                   f"{width.latency_method} ({width.cite}).\n")
        out.append(markdown_table(
            ["network", "params", "MAdds (M)", "top-1 % [95% CI] (seeds)", f"{width.device} latency, ms"],
            [[r.label, f"{r.params:,}", f"{r.madds / 1e6:.2f}",
              "not trained" if r.accuracy is None else f"{fmt_estimate(r.accuracy)} ({r.accuracy.n})",
              "–" if r.latency is None else f"{r.latency[0]:.2f} [{r.latency[1]:.2f}, {r.latency[2]:.2f}]"]
             for r in width.rows]))
    out.append("Paper's Table 4 (ImageNet, 224 px; latency on one Pixel 1 core):\n")
    out.append(markdown_table(["network", "top-1 %", "params (M)", "MAdds (M)", "latency, ms"],
                              [list(r) for r in PAPER_TABLE4]))
    return out


def tables_markdown(cost: Measurement | None, cost_note: str, width: WidthTable | None, width_note: str) -> str:
    """``tables.md``: Tables 2 and 3 from the ``cost`` measurement, the Table 4 analogue from
    ``width``; a missing one is replaced by its note (why, and how to produce it)."""
    out = [GENERATED, "", "# Tables", ""]
    if cost is None:
        out.append(f"## Tables 2 and 3\n\n_Skipped: {cost_note}._\n")
    else:
        out += _table2(cost.data["table2"]) + _table3(cost.data["table3"])
    out += _table4(width, width_note)
    return "\n".join(out).rstrip() + "\n"


def tables_section(width: WidthTable | None) -> Section:
    """The report's pointer to ``tables.md``."""
    latency = f"{width.device} latency" if width is not None else "latency"
    body = ("Table 2 (layer shapes) and Table 3 (memory) are reproduced from the cost model; the Table 4 "
            f"analogue adds our measured accuracy and {latency} per width. See [tables.md](tables.md).\n")
    return Section("Tables 2-4", body, [])
