"""Regenerate every figure, ``tables.md`` and ``REPORT.md`` from results, without retraining.

``python -m ablations.figures [--results results/] [--out figures/] [--preset P]`` reads the run
directories of ``RESULTS/<preset>/`` (only complete ones; see :mod:`ablations.plan`) and writes:

- ``fig1_spiral.png``, ``fig1_theorem1.png``, ``spiral_metrics.json`` (the spiral module's experiment);
- ``fig6a.png``, ``fig6b.png``: test accuracy against step per variant, mean and 95% t band over seeds;
- ``fig5.png``: test accuracy against multiply-adds per width (ours; the published checkpoints beside);
- ``fig7.png``: positive channels after each expansion ReLU6 of the trained baseline and at step 0;
- ``tables.md``: Table 2, Table 3 and the Table 4 analogue (with measured accuracy and CPU latency);
- ``REPORT.md``: claims, our numbers with intervals, differences and verdicts.

A study without results is skipped with a note in ``REPORT.md``; nothing is trained.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from manifold_lab.atomic import atomic_savefig, atomic_write_text  # noqa: E402
from manifold_lab.cli import ArgumentParser, UsageError, run_main, writable_dir  # noqa: E402
from ablations import report, stats  # noqa: E402
from ablations.plan import preset_dir  # noqa: E402
from ablations.results import VariantResults, load_study  # noqa: E402
from ablations.run import check_readable_dir, resolve_preset  # noqa: E402
from ablations.studies import ALL_STUDIES, PAPER_WIDTH_CHECKPOINTS, PRESETS, STUDIES, Preset, Study  # noqa: E402

PAPER_TABLE4 = (  # (network, top-1, params M, MAdds M, Pixel 1 latency ms) as printed in Table 4
    ("MobileNetV1", 70.6, 4.2, 575, 113),
    ("MobileNetV2", 72.0, 3.4, 300, 75),
    ("MobileNetV2 (1.4)", 74.7, 6.9, 585, 143),
)


class Context:
    """Where to read and write, the preset, and caches shared by the figures."""

    def __init__(self, root: Path, out: Path, preset: Preset, data_dir: str | None) -> None:
        self.root, self.out, self.preset, self.data_dir = root, out, preset, data_dir
        self.written: list[Path] = []
        self._studies: dict[str, list[VariantResults]] = {}

    def study(self, name: str) -> list[VariantResults]:
        if name not in self._studies:
            self._studies[name] = load_study(self.root, STUDIES[name], self.preset, self.data_dir)
        return self._studies[name]

    def save(self, fig: Any, name: str) -> str:
        path = self.out / name
        atomic_savefig(fig, path, dpi=120, bbox_inches="tight")
        plt.close(fig)
        self.written.append(path)
        return name


@functools.lru_cache(maxsize=4)
def _test_split(dataset: str, data_dir: str | None, image_size: int | None) -> Any:
    from manifold_lab.data import load_dataset
    return load_dataset(dataset, data_dir=data_dir, image_size=image_size)[1]


def test_images(config: dict[str, Any], count: int) -> np.ndarray:
    """The first ``count`` test images of a run's dataset, normalised as in training (float32 NHWC)."""
    from manifold_lab.data import normalize
    test = _test_split(config["dataset"], config.get("data_dir"), config.get("image_size"))
    if not hasattr(test, "images"):
        raise UsageError(f"dataset {config['dataset']!r} is streamed; Fig. 7 needs an in-memory test split")
    return np.asarray(normalize(test.images[:count], test.mean, test.std))


def initial_model(run_dir: Path) -> Any:
    """The step-0 model of a run: the trainer's own initialisation for the run's config and seed."""
    from ablations.analysis import init_model
    from manifold_lab.train import TrainConfig, load_run
    from manifold_lab.train.loop import model_config_for

    config, _ = load_run(run_dir)
    cfg = TrainConfig.from_dict(config).resolved()
    resolved = config["resolved"]
    mcfg = model_config_for(cfg, int(resolved["num_classes"]), int(resolved["image_shape"][-1]))
    return init_model(mcfg, cfg.seed)


# --------------------------------------------------------------------------------------------- Fig. 1


def spiral_section(ctx: Context) -> report.Section:
    """Fig. 1 and Theorem 1 from the spiral module; verdicts with explicit rules."""
    from manifold_lab.spiral import run_experiment, write_outputs

    result = run_experiment(points=ctx.preset.spiral_points, trials=ctx.preset.spiral_trials, seed=0)
    paths = write_outputs(result, ctx.out, figure_name="fig1_spiral.png", theorem_name="fig1_theorem1.png",
                          metrics_name="spiral_metrics.json")
    ctx.written.extend(paths)
    return report.spiral_section(result.metrics, result.theorem, paths[0].name, paths[1].name)


# --------------------------------------------------------------------------------------------- Fig. 6


_PAPER_CAPTIONS = {"fig6a": "(a) Impact of non-linearity in the bottleneck layer.",
                   "fig6b": "(b) Impact of variations in residual blocks."}


def plot_curves(study: Study, results: Sequence[VariantResults], dataset: str) -> Any:
    """Fig. 6 panel: test accuracy against step, mean line and 95% band over seeds per variant."""
    fig, ax = plt.subplots(figsize=(6.0, 4.2))
    for vr in results:
        curves = vr.curves()
        if curves is None:
            continue
        steps, matrix = curves
        mean, lo, hi = stats.band(matrix)
        line, = ax.plot(steps, mean, lw=1.8, label=f"{vr.variant.label} (n={matrix.shape[0]})")
        if matrix.shape[0] > 1:
            ax.fill_between(steps, lo, hi, color=line.get_color(), alpha=0.2, lw=0)
    ax.set_xlabel("Step")
    ax.set_ylabel("Top 1 Accuracy (%)")
    ax.set_title(f"{_PAPER_CAPTIONS.get(study.name, study.title)}\n{dataset} test set; band: 95% CI over seeds",
                 fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right", fontsize=9)
    lows = [np.min(c[1]) for vr in results if (c := vr.curves()) is not None]
    highs = [np.max(c[1]) for vr in results if (c := vr.curves()) is not None]
    if lows:  # zoom on the end of training as the paper's panels do, keeping every curve's tail
        tails = [np.min(c[1][:, len(c[0]) // 2:]) for vr in results if (c := vr.curves()) is not None]
        ax.set_ylim(max(min(lows), min(tails) - 0.25 * (max(highs) - min(tails) + 1e-9)), max(highs) + 0.3)
    return fig


def curve_section(ctx: Context, name: str) -> report.Section:
    study = STUDIES[name]
    results = ctx.study(name)
    figure = None
    if any(vr.runs for vr in results):
        dataset = next(vr.runs[0].config["dataset"] for vr in results if vr.runs)
        figure = ctx.save(plot_curves(study, results, dataset), f"{name}.png")
    return report.accuracy_section(study, results, figure)


# --------------------------------------------------------------------------------------------- Fig. 5


class WidthRow:
    """Costs and measurements of one trained width (Fig. 5 and the Table 4 analogue)."""

    def __init__(self, label: str, width: float, params: int, madds: int, accuracy: stats.Estimate | None,
                 latency: tuple[float, float, float] | None) -> None:
        self.label, self.width, self.params, self.madds = label, width, params, madds
        self.accuracy, self.latency = accuracy, latency


def _model_costs(model: Any, image_shape: tuple[int, int, int]) -> tuple[int, int]:
    from manifold_lab.costs import model_costs
    costs = model_costs(model.config, image_shape[0])
    return costs.params, costs.madds


def width_rows(ctx: Context) -> list[WidthRow]:
    """One row per width with completed runs (costs from the cost model, latency from a jitted
    batch-1 forward of the restored model), plus MobileNetV1 (1.0) at the same geometry (costs and
    latency only, timed with constant weights: it is not trained by the sweep)."""
    from ablations.analysis import constant_model, latency_ms
    from manifold_lab.models import model_config
    from manifold_lab.train import TrainConfig, restore_model

    rows = []
    geometry = None
    for vr in ctx.study("fig5"):
        if not vr.runs:
            continue
        run = vr.runs[0]
        model = restore_model(run.run_dir)
        shape = tuple(int(d) for d in test_images(run.config, 1).shape[1:])
        params, madds = _model_costs(model, shape)
        rows.append(WidthRow(vr.variant.label, float(run.config["width"]), params, madds,
                             stats.mean_ci(vr.accuracies), latency_ms(model, shape, ctx.preset.latency_repeats)))
        geometry = geometry or (run.config, model.config, shape)
    if geometry is not None:
        config, v2cfg, shape = geometry
        resolved = TrainConfig.from_dict(config).resolved()
        v1 = constant_model(model_config("mobilenet_v1", width=1.0, preset=resolved.preset,
                                         num_classes=v2cfg.num_classes, in_channels=v2cfg.in_channels))
        params, madds = _model_costs(v1, shape)
        rows.append(WidthRow("MobileNetV1 (1.0), untrained", 1.0, params, madds, None,
                             latency_ms(v1, shape, ctx.preset.latency_repeats)))
    return rows


def _log_ticks(ax: Any, values: np.ndarray) -> None:
    """Log x axis labelled at ``values`` (plain numbers, no minor labels)."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(FixedLocator(sorted(set(np.round(values, 3).tolist()))))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.3g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())


def plot_width(rows: Sequence[WidthRow], dataset: str, resolution: int) -> Any:
    """Fig. 5 analogue: our accuracy against multiply-adds per width, the published checkpoints beside."""
    fig, (ax, ref) = plt.subplots(1, 2, figsize=(10.0, 4.0))
    trained = [r for r in rows if r.accuracy is not None]
    x = np.array([r.madds / 1e6 for r in trained])
    y = np.array([r.accuracy.mean for r in trained])
    err = np.array([[r.accuracy.mean - (r.accuracy.lo if r.accuracy.lo is not None else r.accuracy.mean),
                     (r.accuracy.hi if r.accuracy.hi is not None else r.accuracy.mean) - r.accuracy.mean]
                    for r in trained]).T
    ax.errorbar(x, y, yerr=err, fmt="o-", capsize=3, color="tab:red", label="MobileNetV2 (ours)")
    for r in trained:
        ax.annotate(f"{r.width:g}", (r.madds / 1e6, r.accuracy.mean), textcoords="offset points",
                    xytext=(4, -10), fontsize=8)
    _log_ticks(ax, x)
    ax.set_xlabel("Multiply-adds (millions)")
    ax.set_ylabel("Top 1 Accuracy (%)")
    ax.set_title(f"Ours: {dataset} test set, {resolution} px, widths", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right", fontsize=9)
    pw = np.array(PAPER_WIDTH_CHECKPOINTS, dtype=np.float64)
    ref.plot(pw[:, 1], pw[:, 2], "s-", color="tab:blue", label="MobileNetV2 (published checkpoints)")
    for w, m, a in PAPER_WIDTH_CHECKPOINTS:
        ref.annotate(f"{w:g}", (m, a), textcoords="offset points", xytext=(4, -10), fontsize=8)
    _log_ticks(ref, pw[:, 1][[0, 1, 2, 3, 5]])
    ref.set_xlabel("Multiply-adds (millions)")
    ref.set_ylabel("Top 1 Accuracy (%)")
    ref.set_title("Paper: ImageNet, 224 px, published width checkpoints", fontsize=10)
    ref.grid(True, which="both", alpha=0.3)
    ref.legend(loc="lower right", fontsize=9)
    fig.tight_layout()
    return fig


def width_section(ctx: Context, rows: Sequence[WidthRow]) -> report.Section:
    study = STUDIES["fig5"]
    results = ctx.study("fig5")
    figure = None
    extra: dict[str, dict[str, str]] = {"MAdds (M)": {}, "params": {}}
    by_width = {r.width: r for r in rows if r.accuracy is not None}
    for vr in results:
        row = by_width.get(float(vr.variant.overrides["width"]))
        if row is not None:
            extra["MAdds (M)"][vr.variant.name] = f"{row.madds / 1e6:.2f}"
            extra["params"][vr.variant.name] = f"{row.params:,}"
    if by_width:
        run = next(vr.runs[0] for vr in results if vr.runs)
        resolution = int(test_images(run.config, 1).shape[1])
        figure = ctx.save(plot_width(rows, run.config["dataset"], resolution), "fig5.png")
    return report.accuracy_section(study, results, figure, extra,
                                   paper_column="paper top-1 (published checkpoint, 224 px)")


# --------------------------------------------------------------------------------------------- Fig. 7


def _plot_distribution(ax: Any, acts: Sequence[Any], title: str) -> None:
    """Mean, ±1 sd band, interquartile band, min/max and threshold per layer (fractions)."""
    layers = np.arange(1, len(acts) + 1)
    mean = np.array([a.mean for a in acts])
    sd = np.array([a.std for a in acts])
    q = np.array([a.quartiles for a in acts])
    ax.fill_between(layers, mean - sd, mean + sd, color="tab:blue", alpha=0.15, lw=0, label="mean ± sd")
    ax.fill_between(layers, q[:, 0], q[:, 1], color="tab:blue", alpha=0.3, lw=0, label="interquartile range")
    ax.plot(layers, mean, "o-", color="tab:blue", ms=4, label="average")
    for key, style in (("min", "v:"), ("max", "^:")):
        ax.plot(layers, [getattr(a, key) / a.channels for a in acts], style, color="gray", ms=3, lw=0.8,
                label={"min": "minimum", "max": "maximum"}[key])
    ax.plot(layers, [a.threshold_fraction for a in acts], "k--", lw=1.2, label="threshold (1/6)")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("fraction of positive channels")
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)


def plot_fig7(init: Sequence[Any], trained: Sequence[Any], init_running: Sequence[Any]) -> Any:
    """Appendix A Fig. 7: (a) step 0 (batch statistics) and (b) trained, as distributions over
    pixels; (c) the standard deviation per layer; (d) the share of pixels below the threshold."""
    fig, axes = plt.subplots(2, 2, figsize=(11.0, 7.5), sharex=True)
    layers = np.arange(1, len(init) + 1)
    _plot_distribution(axes[0, 0], init, "(a) At step 0 (batch statistics)")
    _plot_distribution(axes[0, 1], trained, "(b) Fully trained")
    axes[0, 0].legend(fontsize=7, loc="lower left")
    ax = axes[1, 0]
    for acts, label, style in ((init, "step 0, batch statistics", "o-"),
                               (init_running, "step 0, running statistics (0 / 1)", "s--"),
                               (trained, "trained", "^-")):
        ax.plot(layers, [a.std for a in acts], style, ms=4, label=label)
    ax.set_ylabel("sd across pixels of the fraction")
    ax.set_title("(c) Spread: standard deviation per layer", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    ax = axes[1, 1]
    for acts, label, style in ((init, "step 0, batch statistics", "o-"), (trained, "trained", "^-")):
        ax.plot(layers, [100 * a.below_threshold for a in acts], style, ms=4, label=label)
    ax.set_ylabel("% of pixels below the threshold")
    ax.set_ylim(bottom=0.0)
    ax.set_title("(d) Pixels where Lemma 2's count condition fails", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    for ax in axes[1]:
        ax.set_xlabel("expanded layer (t = 6 bottleneck)")
    fig.tight_layout()
    return fig


def fig7_section(ctx: Context) -> report.Section:
    from ablations.analysis import positive_channel_stats
    from manifold_lab.train import restore_model

    study = STUDIES["fig7"]
    results = ctx.study("fig7")
    runs = results[0].runs if results else ()
    if not runs:
        return report.fig7_section(study, None, None, None, "no completed baseline run (seed 0)")
    run = runs[0]
    try:
        images = test_images(run.config, ctx.preset.fig7_images)
    except UsageError as exc:
        return report.fig7_section(study, None, None, None, str(exc))
    trained_model = restore_model(run.run_dir)
    init_model = initial_model(run.run_dir)
    trained = positive_channel_stats(trained_model, trained_model.config, images)
    init = positive_channel_stats(init_model, init_model.config, images, batch_statistics=True)
    init_running = positive_channel_stats(init_model, init_model.config, images)
    figure = ctx.save(plot_fig7(init, trained, init_running), "fig7.png")
    return report.fig7_section(study, trained, init, figure, init_running=init_running)


# --------------------------------------------------------------------------------------------- tables


def tables_markdown(rows: Sequence[WidthRow], dataset: str | None, resolution: int | None) -> str:
    """``tables.md``: Table 2 and Table 3 from the cost model, the Table 4 analogue from the results."""
    from manifold_lab.costs import memory_table, table2_rows
    from manifold_lab.models import MobileNetV2Config

    out = [report.GENERATED, "", "# Tables", ""]
    t2 = table2_rows(MobileNetV2Config(), 224)
    out.append("## Table 2: MobileNetV2 layers (224 px, width 1.0), decoded from the stage table\n")
    out.append(report.markdown_table(
        ["input", "operator", "t", "c", "n", "s", "matches the paper"],
        [[r["input"], r["operator"], r["t"], r["c"], r["n"], r["s"],
          {True: "yes", False: "no", None: "–"}[r["match"]]] for r in t2]))
    out.append(f"{sum(bool(r['match']) for r in t2)} of {len(t2)} rows equal the printed table.\n")
    memory = memory_table()
    out.append("## Table 3: largest materialised tensor per resolution (16-bit activations, Kb)\n")
    for name, label in (("mobilenet_v1", "MobileNetV1"), ("mobilenet_v2", "MobileNetV2 (Section 5: "
                                                                          "bottleneck interiors not materialised)")):
        table = memory[name]
        out.append(f"**{label}**\n")
        out.append(report.markdown_table(
            ["resolution", "channels", "Kb (ours)", "channels (paper)", "Kb (paper)", "match"],
            [[r["resolution"], r["channels"], f"{r['kilobytes']:.0f}", r["published_channels"],
              r["published_kilobytes"], {True: "yes", False: "no", None: "–"}[r["match"]]]
             for r in table["rows"]]
            + [["**max**", table["max"]["channels"], f"**{table['max']['kilobytes']:.0f}**", None,
                f"**{table['max']['published_kilobytes']}**",
                {True: "yes", False: "no", None: "–"}[table["max"]["match"]]]]))
    out.append("A printed cell that differs is listed as a mismatch: some printed V2 rows name the channels "
               "of a stage that only appears at half that resolution, and two printed 7x7 cells follow no "
               "single formula (see `manifold_lab.costs.memory_table`). The max rows (1600K for V1, 400K "
               "for V2) are the paper's point.\n")
    out.append("## Table 4 analogue: cost, measured accuracy and CPU latency\n")
    if not rows:
        out.append("_Skipped: no completed fig5 runs in the results folder._\n")
    else:
        out.append(f"Measured on {dataset} at {resolution} px: parameters and multiply-adds from the cost "
                   "model; accuracy = final test accuracy, mean [95% CI] over seeds; latency = jitted "
                   "batch-1 forward on this machine's CPU, median [interquartile range] after warm-up.\n")
        out.append(report.markdown_table(
            ["network", "params", "MAdds (M)", "top-1 % [95% CI] (seeds)", "CPU latency, ms"],
            [[r.label, f"{r.params:,}", f"{r.madds / 1e6:.2f}",
              "not trained" if r.accuracy is None else f"{report.fmt_estimate(r.accuracy)} ({r.accuracy.n})",
              "–" if r.latency is None else f"{r.latency[0]:.2f} [{r.latency[1]:.2f}, {r.latency[2]:.2f}]"]
             for r in rows]))
    out.append("Paper's Table 4 (ImageNet, 224 px; latency on one Pixel 1 core):\n")
    out.append(report.markdown_table(["network", "top-1 %", "params (M)", "MAdds (M)", "latency, ms"],
                                     [list(r) for r in PAPER_TABLE4]))
    return "\n".join(out).rstrip() + "\n"


def tables_section(rows: Sequence[WidthRow]) -> report.Section:
    body = ("Table 2 (layer shapes) and Table 3 (memory) are reproduced from the cost model; the Table 4 "
            "analogue adds our measured accuracy and CPU latency per width. See [tables.md](tables.md).\n")
    return report.Section("Tables 2-4", body, [])


# --------------------------------------------------------------------------------------------- CLI


def replicate_section(ctx: Context, results: Path, note: str) -> report.Section:
    """The Fig. 6 comparisons of a second results folder of the same preset beside this one's."""
    check_readable_dir(results, "--replicate results folder")
    root = preset_dir(results, ctx.preset)
    check_readable_dir(root, "--replicate results folder")
    studies = []
    for name in ("fig6a", "fig6b"):
        other = load_study(root, STUDIES[name], ctx.preset, ctx.data_dir)
        seeds = {v.variant.name: {r.seed for r in v.runs} for v in other}
        same_seeds = [dataclasses.replace(v, runs=tuple(r for r in v.runs if r.seed in seeds[v.variant.name]))
                      for v in ctx.study(name)]  # compare at equal seeds: only the rounding differs
        studies.append((STUDIES[name], same_seeds, other))
    return report.replicate_section(studies, note)


def pick_preset(results: Path, name: str | None) -> Preset:
    """``--preset``, or the only preset with a folder under ``results``."""
    if name is not None:
        return resolve_preset(name)
    found = sorted(p.name for p in results.iterdir() if p.is_dir() and p.name in PRESETS)
    if len(found) == 1:
        return resolve_preset(found[0])
    if not found:
        raise UsageError(f"no preset results under {str(results)!r}; run python -m ablations.run first "
                         f"or pass --preset")
    raise UsageError(f"results for several presets under {str(results)!r} ({', '.join(found)}); pass --preset")


def build_all(ctx: Context) -> list[report.Section]:
    """Every figure and section, in report order."""
    sections = [spiral_section(ctx), curve_section(ctx, "fig6a"), curve_section(ctx, "fig6b")]
    extra = [name for name in STUDIES if name not in ALL_STUDIES and all(vr.runs for vr in ctx.study(name))]
    sections += [curve_section(ctx, name) for name in extra]  # studies beyond the paper, once run
    rows = width_rows(ctx)
    sections.append(width_section(ctx, rows))
    sections.append(fig7_section(ctx))
    trained = [vr.runs[0].config for vr in ctx.study("fig5") if vr.runs]
    dataset = trained[0]["dataset"] if trained else None
    resolution = int(test_images(trained[0], 1).shape[1]) if trained else None
    path = ctx.out / "tables.md"
    atomic_write_text(path, tables_markdown(rows, dataset, resolution))
    ctx.written.append(path)
    sections.append(tables_section(rows))
    return sections


def main(argv: Sequence[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m ablations.figures", description=__doc__.splitlines()[0])
    parser.add_argument("--results", default="results", help="results folder (default results/)")
    parser.add_argument("--out", default="figures", help="output folder (default figures/)")
    parser.add_argument("--preset", default=None,
                        help=f"one of {', '.join(PRESETS)} (default: the only one present in --results)")
    parser.add_argument("--data-dir", default=None, help="dataset folder, if the runs used one")
    parser.add_argument("--replicate", default=None, metavar="RESULTS",
                        help="results folder of a second run of the same preset (for example with another "
                             "float rounding): its Fig. 6 verdicts are listed beside these")
    parser.add_argument("--replicate-note", default="a second run of the same preset",
                        help="how the --replicate run differs, for the report")
    args = parser.parse_args(argv)

    results = Path(args.results)
    if not results.exists():
        raise UsageError(f"results folder {str(results)!r} does not exist; run python -m ablations.run first")
    check_readable_dir(results, "results folder")
    preset = pick_preset(results, args.preset)
    root = preset_dir(results, preset)
    check_readable_dir(root, "results folder")
    ctx = Context(root, writable_dir(args.out), preset, args.data_dir)
    sections = build_all(ctx)
    if args.replicate is not None:
        sections.append(replicate_section(ctx, Path(args.replicate), args.replicate_note))
    path = ctx.out / "REPORT.md"
    atomic_write_text(path, report.render_report(preset.name, preset.doc, preset.train, sections))
    ctx.written.append(path)
    for p in ctx.written:
        print(f"wrote {p}")
    skipped = [s.title for s in sections if any(v.startswith("skipped") for _, v in s.verdicts)]
    if skipped:
        print(f"skipped (no results): {'; '.join(skipped)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main(main, prog="python -m ablations.figures"))
