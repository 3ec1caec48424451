"""Render every figure, ``tables.md`` and ``REPORT.md`` from results and measurements, computing nothing.

``python -m ablations.figures [--results results/] [--out figures/] [--preset P]`` reads the run
directories of ``RESULTS/<preset>/`` (``config.json``, ``metrics.jsonl``, ``summary.json``; only
complete runs, see :mod:`ablations.results`) and the measurement files of
``RESULTS/<preset>/measurements/`` (written by ``python -m ablations.measure``, see
:mod:`ablations.measurements`), and writes:

- ``fig1_spiral.png``, ``fig1_theorem1.png``, ``spiral_metrics.json`` (the measured spiral experiment);
- one ``<study>.png`` per study with results, drawn by the study's kind: ``curves`` (Fig. 6a, 6b:
  test accuracy against step per variant, mean and 95% t band over seeds), ``width`` (Fig. 5: test
  accuracy against multiply-adds per width; the published checkpoints beside) and ``activations``
  (Fig. 7: positive channels after each expansion ReLU6 of the trained baseline and at step 0);
- ``appendix_a.png``: the Appendix A audit of the ``fig6a`` networks (Lemma 2 per expanded layer,
  active units against the threshold, block-input decoders, clipping), trained and at step 0;
- ``tables.md``: Table 2, Table 3 and the Table 4 analogue (with measured accuracy and latency);
- ``REPORT.md``: claims, our numbers with intervals, differences and verdicts, and where every
  measured number comes from.

Nothing here imports JAX, trains, loads a dataset or times anything: the same folder renders to the
same bytes on any machine. A study without results, or a measurement that is missing or older than
the runs, is skipped with a note in ``REPORT.md`` that says how to produce it.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from manifold_lab.atomic import atomic_savefig, atomic_write_json, atomic_write_text  # noqa: E402
from manifold_lab.cli import ArgumentParser, UsageError, command_name, run_main, writable_dir  # noqa: E402
from ablations import plots, readme, report, report_appendix_a  # noqa: E402
from ablations.activity import LayerActivity  # noqa: E402
from ablations.cli import (add_preset_arguments, check_readable_dir, check_results, open_results,  # noqa: E402
                           preset_from_args)
from ablations.measurements import (APPENDIX_A, APPENDIX_A_STUDY, MEASUREMENTS_DIR, SPIRAL, TABLES,  # noqa: E402
                                    Measurement, appendix_a_inputs, array_from_json, current, device_label,
                                    hardware, measurement_names, read_measurement, spiral_inputs, study_inputs,
                                    tables_inputs)
from ablations.plan import preset_dir  # noqa: E402
from ablations.results import VariantResults, load_study  # noqa: E402
from ablations.studies import ALL_STUDIES, STUDIES, Preset, Study  # noqa: E402
from ablations.tables import WidthTable, tables_markdown, tables_section, width_table  # noqa: E402

PROG = command_name("figures", "ablations.figures")

#: Verdict of a claim whose numbers have not been measured (or are out of date).
NOT_MEASURED = "skipped: not measured"
#: PNG metadata: no software version, so that equal figures are equal files on any machine.
PNG_METADATA = {"Software": None}


class Context:
    """Where to read and write, the preset, and the studies read once."""

    def __init__(self, root: Path, out: Path, preset: Preset, data_dir: str | None) -> None:
        self.root, self.out, self.preset, self.data_dir = root, out, preset, data_dir
        self.written: list[Path] = []
        self._studies: dict[str, list[VariantResults]] = {}

    def study(self, name: str) -> list[VariantResults]:
        """The completed runs of study ``name`` (read once)."""
        if name not in self._studies:
            self._studies[name] = load_study(self.root, STUDIES[name], self.preset, self.data_dir)
        return self._studies[name]

    def save(self, fig: Any, name: str, **kwargs: Any) -> str:
        """Save ``fig`` as ``out/name`` (deterministic PNG) and close it; returns ``name``."""
        path = self.out / name
        atomic_savefig(fig, path, metadata=PNG_METADATA, **{"dpi": 120, "bbox_inches": "tight", **kwargs})
        plt.close(fig)
        self.written.append(path)
        return name

    def measurement(self, name: str, inputs: dict[str, Any]) -> tuple[Measurement | None, str]:
        """:func:`ablations.measurements.current` for this preset."""
        return current(self.root, name, self.preset, inputs)


# --------------------------------------------------------------------------------------------- Fig. 1


def spiral_section(ctx: Context) -> report.Section:
    """Fig. 1 and Theorem 1 from the measured spiral experiment; verdicts with explicit rules."""
    from manifold_lab.spiral.plotting import plot_panels, plot_theorem

    measured, note = ctx.measurement(SPIRAL, spiral_inputs(ctx.preset))
    if measured is None:
        return report.spiral_skipped(note, NOT_MEASURED)
    metrics, theorem, panels = measured.data["metrics"], measured.data["theorem"], measured.data["figure"]
    try:
        back = {int(n): array_from_json(a)  # in the order of n (JSON keys sort as text)
                for n, a in sorted(panels["back_projections"].items(), key=lambda item: int(item[0]))}
        x, position = array_from_json(panels["x"]), array_from_json(panels["position"])
    except (KeyError, TypeError, ValueError) as exc:
        raise UsageError(f"corrupt measurement {MEASUREMENTS_DIR}/{SPIRAL}.json: {exc}") from None
    figure = ctx.save(plot_panels(x, position, back, metrics), "fig1_spiral.png", dpi=110, bbox_inches=None)
    theorem_figure = ctx.save(plot_theorem(theorem, metrics), "fig1_theorem1.png", dpi=110, bbox_inches=None)
    path = ctx.out / "spiral_metrics.json"
    atomic_write_json(path, metrics)
    ctx.written.append(path)
    return report.spiral_section(metrics, theorem, figure, theorem_figure, provenance=measured.cite())


# --------------------------------------------------------------------------------------------- studies


def curve_section(ctx: Context, study: Study) -> report.Section:
    """A ``curves`` study (Fig. 6): accuracy against step, and the paired comparisons."""
    results = ctx.study(study.name)
    figure = None
    if any(vr.runs for vr in results):
        dataset = next(vr.runs[0].config["dataset"] for vr in results if vr.runs)
        figure = ctx.save(plots.plot_curves(study, results, dataset), f"{study.name}.png")
    return report.accuracy_section(study, results, figure)


def width_measurement(ctx: Context, study: Study) -> tuple[WidthTable | None, str]:
    """The measured width table of ``study`` with its accuracies, or why there is none."""
    results = ctx.study(study.name)
    inputs = study_inputs(study, ctx.preset, results)
    if inputs is None:
        return None, f"no completed {study.name} runs in the results folder"
    measured, note = ctx.measurement(study.name, inputs)
    if measured is None:
        return None, note
    try:
        return width_table(measured, results), ""
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise UsageError(f"corrupt measurement {MEASUREMENTS_DIR}/{study.name}.json: "
                         f"{exc.__class__.__name__}: {exc}") from None


def width_section(ctx: Context, study: Study) -> report.Section:
    """A ``width`` study (Fig. 5): accuracy per width with its measured cost, against multiply-adds."""
    results = ctx.study(study.name)
    table, note = width_measurement(ctx, study)
    figure, extra = None, {"MAdds (M)": {}, "params": {}}
    if table is not None:
        for row in table.rows:
            if row.variant is not None:
                extra["MAdds (M)"][row.variant] = f"{row.madds / 1e6:.2f}"
                extra["params"][row.variant] = f"{row.params:,}"
        figure = ctx.save(plots.plot_width(table.rows, table.dataset, table.resolution), f"{study.name}.png")
        note = (f"Parameters and multiply-adds: the cost model at {table.resolution} px "
                f"(`{MEASUREMENTS_DIR}/{study.name}.json`); latency per width in [tables.md](tables.md).")
    elif any(vr.runs for vr in results):
        note = f"_Figure and costs skipped: {note}._"
    return report.accuracy_section(study, results, figure, extra if table is not None else None,
                                   paper_column="paper top-1 (published checkpoint, 224 px)", note=note)


def activations_section(ctx: Context, study: Study) -> report.Section:
    """An ``activations`` study (Fig. 7): the measured positive-channel statistics and their checks."""
    results = ctx.study(study.name)
    inputs = study_inputs(study, ctx.preset, results)
    if inputs is None:
        return report.fig7_section(study, None, None, None, "no completed baseline run (seed 0)")
    measured, note = ctx.measurement(study.name, inputs)
    if measured is None:
        return report.fig7_section(study, None, None, None, note, skipped=NOT_MEASURED)
    try:
        nets = {k: [LayerActivity.from_json(a) for a in v] for k, v in measured.data["networks"].items()}
        init, trained, running = nets["step0_batch"], nets["trained"], nets["step0_running"]
    except (KeyError, TypeError, ValueError) as exc:
        raise UsageError(f"corrupt measurement {MEASUREMENTS_DIR}/{study.name}.json: {exc}") from None
    figure = ctx.save(plots.plot_fig7(init, trained, running), f"{study.name}.png")
    return report.fig7_section(study, trained, init, figure, init_running=running,
                               provenance=f"Statistics {measured.cite()}.")


def appendix_a_section(ctx: Context) -> report.Section:
    """Appendix A in trained networks: the measured audits of the ``fig6a`` networks."""
    study = STUDIES[APPENDIX_A_STUDY]
    inputs = appendix_a_inputs(ctx.preset, ctx.study(study.name))
    if inputs is None:
        return report_appendix_a.appendix_a_section(
            study, None, None, f"no seed at which every {study.name} variant has a completed run",
            skipped="skipped: no results")
    measured, note = ctx.measurement(APPENDIX_A, inputs)
    if measured is None:
        return report_appendix_a.appendix_a_section(study, None, None, note, skipped=NOT_MEASURED)
    try:
        audits = report_appendix_a.read_audits(measured.data, report_appendix_a.variants(study))
    except (KeyError, TypeError, ValueError) as exc:
        raise UsageError(f"corrupt measurement {MEASUREMENTS_DIR}/{APPENDIX_A}.json: "
                         f"{exc.__class__.__name__}: {exc}") from None
    labels = report_appendix_a.network_labels(study)
    ref = report_appendix_a.variants(study)[0]
    fig = plots.plot_appendix_a({labels[k]: audits.networks[k] for k in labels},
                                labels[(ref, report_appendix_a.TRAINED)], labels[(ref, report_appendix_a.STEP0)])
    return report_appendix_a.appendix_a_section(study, audits, ctx.save(fig, "appendix_a.png"),
                                                provenance=f"Audits {measured.cite()}.")


#: The section of each study kind (:attr:`ablations.studies.Study.kind`).
SECTIONS: dict[str, Callable[[Context, Study], report.Section]] = {
    "curves": curve_section, "width": width_section, "activations": activations_section}


def report_studies(ctx: Context) -> list[Study]:
    """The studies of the report in order: the paper's ``curves`` studies, the studies beyond the
    paper that have every variant run, then the paper's other studies."""
    paper = [STUDIES[name] for name in ALL_STUDIES]
    extra = [s for s in STUDIES.values() if s.name not in ALL_STUDIES and all(vr.runs for vr in ctx.study(s.name))]
    return [s for s in paper if s.kind == "curves"] + extra + [s for s in paper if s.kind != "curves"]


# --------------------------------------------------------------------------------------------- tables


def write_tables(ctx: Context, studies: Sequence[Study]) -> report.Section:
    """``tables.md`` (cost-model tables and the width study's Table 4 analogue) and its section."""
    cost, cost_note = ctx.measurement(TABLES, tables_inputs())
    width = next((s for s in studies if s.kind == "width"), None)
    table, note = width_measurement(ctx, width) if width is not None else (None, "no width study")
    path = ctx.out / "tables.md"
    atomic_write_text(path, tables_markdown(cost, cost_note, table, note))
    ctx.written.append(path)
    return tables_section(table)


def _provenance_row(name: str, m: Measurement | None) -> list[str]:
    """One row of the Measurements section."""
    if m is None:
        return [f"`{name}`", "–", "not measured", "–", "–", "–", "–"]
    p, host = m.provenance, m.provenance.get("host", {})
    return [f"`{name}`", m.what, m.status + (f" ({m.reason})" if m.reason else ""),
            f"{device_label(m)} ({hardware(m)}) of `{host.get('name', '?')}` ({host.get('platform', '?')}; "
            f"{host.get('usable_cpus', '?')} usable cores{_threads(host)})", p.get("measured_at", "?"),
            f"jax {p.get('versions', {}).get('jax', '?')}", f"`{p.get('git_commit') or '?'}`"]


def _threads(host: dict) -> str:
    """``, N XLA threads`` where the measurement recorded its intra-op pool (older ones did not)."""
    threads = host.get("xla_cpu_threads")
    return "" if threads is None else f", {threads} XLA thread{'s' if threads != 1 else ''}"


def measurements_section(ctx: Context) -> report.Section:
    """Where each measured number comes from: every measurement file of the preset."""
    rows = [_provenance_row(name, read_measurement(ctx.root, name)) for name in measurement_names()]
    body = (f"Measured by `python -m ablations.measure --preset {ctx.preset.name}` into "
            f"`RESULTS/{ctx.preset.name}/{MEASUREMENTS_DIR}/<name>.json`; a section whose measurement is "
            "missing or was made from other runs than the results folder holds says so above.\n\n"
            + report.markdown_table(["measurement", "what", "status", "device and host", "measured at (UTC)",
                                     "versions", "commit"], rows))
    return report.Section("Measurements", body)


# --------------------------------------------------------------------------------------------- CLI


def replicate_section(ctx: Context, results: Path, note: str) -> report.Section:
    """The Fig. 6 comparisons of a second results folder of the same preset beside this one's."""
    check_readable_dir(results, "--replicate results folder")
    root = preset_dir(results, ctx.preset)
    check_readable_dir(root, "--replicate results folder")
    studies = []
    for study in (s for s in report_studies(ctx) if s.kind == "curves" and s.name in ALL_STUDIES):
        other = load_study(root, study, ctx.preset, ctx.data_dir)
        seeds = {v.variant.name: {r.seed for r in v.runs} for v in other}
        same_seeds = [dataclasses.replace(v, runs=tuple(r for r in v.runs if r.seed in seeds[v.variant.name]))
                      for v in ctx.study(study.name)]  # compare at equal seeds: only the rounding differs
        studies.append((study, same_seeds, other))
    return report.replicate_section(studies, note)


def build_all(ctx: Context) -> list[report.Section]:
    """Every figure and section, in report order (``tables.md`` written on the way)."""
    studies = report_studies(ctx)
    sections = [spiral_section(ctx)] + [SECTIONS[s.kind](ctx, s) for s in studies]
    sections.append(appendix_a_section(ctx))
    sections.append(write_tables(ctx, studies))
    return sections


def build_parser() -> ArgumentParser:
    """The command line of ``python -m ablations.figures`` (``manifold-lab figures``)."""
    parser = ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    add_preset_arguments(parser, None)
    where = parser.add_argument_group("data and results")
    where.add_argument("--results", default="results", help="results folder")
    where.add_argument("--out", default="figures", help="output folder")
    where.add_argument("--data-dir", default=None, help="dataset folder, if the runs used one")
    where.add_argument("--readme", type=Path, default=None, metavar="README",
                       help="also write the Fig. 6 comparisons into this file's results block")
    second = parser.add_argument_group("second run")
    second.add_argument("--replicate", default=None, metavar="RESULTS",
                        help="results folder of a second run of the same preset (for example with another "
                             "float rounding): its Fig. 6 verdicts are listed beside these")
    second.add_argument("--replicate-note", default="a second run of the same preset",
                        help="how the --replicate run differs, for the report")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m ablations.figures``: render the preset's figures, tables.md and REPORT.md."""
    args = build_parser().parse_args(argv)
    check_results(Path(args.results))
    preset, root = open_results(Path(args.results), preset_from_args(args, Path(args.results)))
    ctx = Context(root, writable_dir(args.out), preset, args.data_dir)
    sections = build_all(ctx)
    if args.replicate is not None:
        sections.append(replicate_section(ctx, Path(args.replicate), args.replicate_note))
    sections.append(measurements_section(ctx))
    path = ctx.out / "REPORT.md"
    atomic_write_text(path, report.render_report(preset.name, preset.summary, preset.train, sections))
    ctx.written.append(path)
    if args.readme is not None:
        curves = [(s, ctx.study(s.name)) for s in report_studies(ctx) if s.kind == "curves"]
        readme.update_readme(args.readme, readme.results_block(preset, curves))
        ctx.written.append(args.readme)
    for p in ctx.written:
        print(f"wrote {p}")
    skipped = sorted({f"{s.title} ({v})" for s in sections for _, v in s.verdicts if v.startswith("skipped")})
    if skipped:
        print(f"skipped: {'; '.join(skipped)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main(main, prog=PROG))
