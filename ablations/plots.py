"""Plots of the ablation figures (Fig. 5, 6 and 7, the Appendix A audit) from numbers already read
or measured.

Pure matplotlib on the Agg backend: every function returns a Figure (the caller saves and closes
it) and nothing here imports JAX. Fig. 1's panels come from :mod:`manifold_lab.spiral.plotting`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ablations import stats  # noqa: E402
from ablations.activity import LayerActivity  # noqa: E402
from ablations.audit_records import BlockRecord, expanded_blocks, pooled_histogram, pooled_share  # noqa: E402
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


# --------------------------------------------------------------------------------- Appendix A audits


def _legend(ax: Any, **kwargs: Any) -> None:
    """A legend when the axes hold labelled artists (a panel may have nothing to show)."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(**kwargs)


def _blocks_axis(ax: Any, indices: Sequence[int]) -> None:
    """x axis labelled by block index."""
    ax.set_xticks(list(indices))
    ax.set_xlabel("bottleneck block")
    ax.grid(True, alpha=0.3)


def _plot_active(ax: Any, expanded: Sequence[BlockRecord], label: str, color: str) -> None:
    """Median fraction of active units per expanded layer with its 5-95% and interquartile bands."""
    x = [b.index for b in expanded]
    q = np.array([b.active_percentiles((5, 25, 50, 75, 95)) for b in expanded])
    ax.fill_between(x, q[:, 0], q[:, 4], color=color, alpha=0.12, lw=0)
    ax.fill_between(x, q[:, 1], q[:, 3], color=color, alpha=0.3, lw=0)
    ax.plot(x, q[:, 2], "o-", color=color, ms=3, label=f"{label}: median, IQR, 5-95%")


def _plot_threshold(ax: Any, expanded: Sequence[BlockRecord]) -> None:
    ax.plot([b.index for b in expanded], [b.threshold_fraction for b in expanded], "k--", lw=1.2,
            label="threshold: input width / expanded width")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("fraction of expanded units active (0 < z < 6)")


def plot_audit(blocks: Sequence[BlockRecord], title: str) -> Any:
    """One audited network: (a) where Lemma 2 holds, (b) active units against the threshold,
    (c) decoder explained variance and clipped share per block."""
    fig, axes = plt.subplots(3, 1, figsize=(8.0, 10.0))
    expanded = expanded_blocks(blocks)
    x = [b.index for b in expanded]
    ax = axes[0]
    ax.plot(x, [100 * b.invertible_share for b in expanded], "o-", ms=4, label="Lemma 2 holds (rank = input width)")
    ax.plot(x, [100 * b.below_threshold_share for b in expanded], "s--", ms=3,
            label="fewer active units than input width")
    ax.set_ylim(-3, 103)
    ax.set_ylabel("% of pixels")
    ax.set_title(f"(a) Lemma 2 per expanded layer: {title}", fontsize=10)
    ax.legend(fontsize=7)
    _plot_active(axes[1], expanded, "active units", "tab:blue")
    _plot_threshold(axes[1], expanded)
    axes[1].set_title("(b) Active units per pixel against the invertibility threshold", fontsize=10)
    axes[1].legend(fontsize=7, loc="lower left")
    ax = axes[2]
    for field, label, style in (("decoder_ev", "decoder explained variance (test)", "o-"),
                                ("clipped_share", "projection outputs clipped", "^:")):
        pts = [(b.index, 100 * getattr(b, field)) for b in blocks if getattr(b, field) is not None]
        if pts:
            ax.plot(*zip(*pts), style, ms=4, label=label)
    evs = [100 * b.decoder_ev for b in blocks if b.decoder_ev is not None]
    if not evs:
        ax.text(0.5, 0.5, "no decoder fitted (no training images, or feature maps too large)",
                transform=ax.transAxes, ha="center", fontsize=8, color="gray")
    ax.set_ylim(max(min(evs + [0.0]) - 3, -100), 103)  # far worse decoders (overfitted) are cut off
    ax.set_ylabel("%")
    ax.set_title("(c) Block input decoded linearly from the block output", fontsize=10)
    _legend(ax, fontsize=7)
    for ax in axes:
        _blocks_axis(ax, [b.index for b in blocks])
    fig.tight_layout()
    return fig


def _seed_band(ax: Any, per_seed: Sequence[Sequence[BlockRecord]], field: str, label: str, style: str) -> None:
    """Mean over seeds per block of ``field`` (percent) with its min-max band."""
    index = [b.index for b in per_seed[0] if getattr(b, field) is not None]
    if not index:
        return
    values = np.array([[100 * getattr(b, field) for b in blocks if b.index in index] for blocks in per_seed])
    line, = ax.plot(index, values.mean(axis=0), style, ms=4, label=f"{label} (n={len(per_seed)})")
    if len(per_seed) > 1:
        ax.fill_between(index, values.min(axis=0), values.max(axis=0), color=line.get_color(), alpha=0.15, lw=0)


def plot_appendix_a(networks: Mapping[str, Sequence[Sequence[BlockRecord]]], reference: str, step0: str) -> Any:
    """Appendix A in trained networks, one curve per network kind (``networks``: label -> per-seed
    audits): (a) Lemma 2 per expanded layer, pooled over seeds; (b) active units of ``reference``
    and ``step0``, pooled; (c) decoder explained variance and (d) clipped share, mean and min-max
    over seeds."""
    fig, axes = plt.subplots(2, 2, figsize=(12.0, 8.0))
    styles = ("o-", "^-", "s--", "v--")
    first = next(iter(networks.values()))[0]
    for (label, per_seed), style in zip(networks.items(), styles):
        x = [b.index for b in expanded_blocks(per_seed[0])]
        axes[0, 0].plot(x, [100 * s for s in pooled_share(per_seed)], style, ms=4, label=label)
        _seed_band(axes[1, 0], per_seed, "decoder_ev", label, style)
        _seed_band(axes[1, 1], per_seed, "clipped_share", label, style)
    lowest = min(min(pooled_share(per_seed)) for per_seed in networks.values())
    axes[0, 0].set_ylim(max(0.0, min(100 * lowest, 99.0) - 1.0), 100.5)
    axes[0, 0].set_ylabel("% of pixels where Lemma 2 holds")
    axes[0, 0].set_title("(a) Lemma 2's condition (rank = input width), pooled over seeds", fontsize=10)
    for label, color in ((reference, "tab:blue"), (step0, "tab:orange")):
        per_seed = networks[label]
        pooled = [pooled_histogram(per_seed, k) for k in range(len(expanded_blocks(per_seed[0])))]
        _plot_active(axes[0, 1], pooled, label, color)
    _plot_threshold(axes[0, 1], expanded_blocks(first))
    axes[0, 1].set_title("(b) Active units per pixel against the threshold, pooled over seeds", fontsize=10)
    evs = [100 * b.decoder_ev for per_seed in networks.values() for blocks in per_seed for b in blocks
           if b.decoder_ev is not None]
    axes[1, 0].set_ylim(max(min(evs + [0.0]) - 3, -100), 103)  # far worse decoders (overfitted) are cut off
    axes[1, 0].set_ylabel("explained variance of the block input, %")
    axes[1, 0].set_title("(c) Best linear decoder of the block input from its output (test)", fontsize=10)
    axes[1, 1].set_ylabel("% of projection outputs at a clip (<= 0 or >= 6)")
    axes[1, 1].set_title("(d) Outputs clipped by the ReLU6 bottleneck", fontsize=10)
    for ax in axes.ravel():
        _blocks_axis(ax, [b.index for b in first])
        _legend(ax, fontsize=7)
    fig.tight_layout()
    return fig
