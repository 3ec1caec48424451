"""Plots of the ablation figures (Fig. 5, 6 and 7) from numbers already read or measured.

Pure matplotlib on the Agg backend: every function returns a Figure (the caller saves and closes
it) and nothing here imports JAX. Fig. 1's panels come from :mod:`manifold_lab.spiral.plotting`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ablations import stats  # noqa: E402
from ablations.activity import LayerActivity  # noqa: E402
from ablations.results import VariantResults  # noqa: E402
from ablations.studies import PAPER_WIDTH_CHECKPOINTS, Study  # noqa: E402
from ablations.tables import WidthRow  # noqa: E402


#: The paper's panel captions of Fig. 6, by study.
PAPER_CAPTIONS = {"fig6a": "(a) Impact of non-linearity in the bottleneck layer.",
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
    ax.set_title(f"{PAPER_CAPTIONS.get(study.name, study.title)}\n{dataset} test set; band: 95% CI over seeds",
                 fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right", fontsize=9)
    lows = [np.min(c[1]) for vr in results if (c := vr.curves()) is not None]
    highs = [np.max(c[1]) for vr in results if (c := vr.curves()) is not None]
    if lows:  # zoom on the end of training as the paper's panels do, keeping every curve's tail
        tails = [np.min(c[1][:, len(c[0]) // 2:]) for vr in results if (c := vr.curves()) is not None]
        ax.set_ylim(max(min(lows), min(tails) - 0.25 * (max(highs) - min(tails) + 1e-9)), max(highs) + 0.3)
    return fig



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



def _plot_distribution(ax: Any, acts: Sequence[LayerActivity], title: str) -> None:
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


def plot_fig7(init: Sequence[LayerActivity], trained: Sequence[LayerActivity],
              init_running: Sequence[LayerActivity]) -> Any:
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
