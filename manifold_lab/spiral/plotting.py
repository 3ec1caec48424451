"""Figures: the Fig. 1 panels (``spiral.png``) and collapsed fraction against n (``spiral_theorem.png``).
Both functions take plain arrays and dicts (the fields of a ``SpiralResult``) and return the matplotlib
Figure (the caller saves and closes it)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

CMAP = "viridis"


def _scatter(fig: Figure, index: int, count: int, points: np.ndarray, colour: np.ndarray,
             title: str) -> Axes:
    if points.shape[1] == 3:
        ax = fig.add_subplot(1, count, index, projection="3d")
        ax.scatter(points[:, 0], points[:, 1], points[:, 2], c=colour, cmap=CMAP, s=2, linewidths=0)
        ax.view_init(elev=20, azim=-70)
    else:
        ax = fig.add_subplot(1, count, index)
        ax.scatter(points[:, 0], points[:, 1], c=colour, cmap=CMAP, s=2, linewidths=0)
        ax.set_aspect("equal", adjustable="datalim")
    ax.set_title(title)
    ax.set_xticks([])
    ax.set_yticks([])
    return ax


def plot_panels(x: np.ndarray, position: np.ndarray, back_projections: Mapping[int, np.ndarray],
                metrics: Mapping[str, Any]) -> Figure:
    """``Input`` then one ``Output/dim=n`` panel per n: the back-projection ``T^+ act(T x)`` of one
    draw, points coloured by their position along the manifold (as in the paper's Fig. 1)."""
    dims = list(back_projections)
    count = len(dims) + 1
    fig = Figure(figsize=(2.6 * count, 3.0), layout="constrained")
    _scatter(fig, 1, count, x, position, "Input")
    for i, n in enumerate(dims, start=2):
        _scatter(fig, i, count, back_projections[n], position, f"Output/dim={n}")
    m = metrics
    law = m["matrix"]["entries"] + ("" if m["matrix"]["sign_symmetric"] else ", negative control")
    fig.suptitle(f"{m['manifold']} through {m['activation']}(T x), back-projected with T$^+$ "
                 f"(T {law}, seed {m['seed']})", fontsize=9)
    return fig


def _errorbars(ax: Axes, dims: np.ndarray, mean: list, ci95: list, log: bool, fmt: str = "o",
               **style: Any) -> None:
    """Measured means with their 95% intervals (zeros left out on a log axis)."""
    mean = np.asarray(mean)
    lo, hi = np.asarray(ci95).T
    shown = mean > 0 if log else np.ones_like(mean, bool)
    ax.errorbar(dims[shown], mean[shown], yerr=[mean[shown] - lo[shown], hi[shown] - mean[shown]],
                fmt=fmt, ms=3, capsize=2, **style)


def _theorem_axis(ax: Axes, theorem: Mapping[str, Any], metrics: Mapping[str, Any], log: bool) -> None:
    """One panel of :func:`plot_theorem`: formula, Gaussian measurement, control and its expectation."""
    dims = np.asarray(theorem["dims"])
    theory = np.asarray(theorem["theory"])
    relu = metrics["activation"] == "relu"
    ax.plot(dims, theory, "-", color="tab:orange",
            label="Theorem 1: $\\sum_{k<d} C(n,k)/2^n$" if relu else "expected for N(0, 1) T (binomial)")
    _errorbars(ax, dims, theorem["mean"], theorem["ci95"], log, color="tab:blue",
               label=f"N(0, 1) T, measured (95% CI, {metrics['trials']} trials)")
    if "control_mean" in theorem:
        ax.plot(dims, theorem["control_theory"], "--", color="tab:red", lw=1,
                label=f"exact for {theorem['control_law']} entries (binomial mixture)")
        _errorbars(ax, dims, theorem["control_mean"], theorem["control_ci95"], log, color="tab:red",
                   fmt="s", label="positive-mean T (control: sign symmetry broken)")
    ax.set_xlabel("n (width of the expansion)")
    ax.set_ylabel("collapsed fraction (fewer than d active units)")
    if log:
        ax.set_yscale("log")
        ax.set_ylim(max(theory[theory > 0].min(), 1e-9) / 2, 2)
    ax.set_title(("log scale" if log else "linear scale"), fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)


def plot_theorem(theorem: Mapping[str, Any], metrics: Mapping[str, Any]) -> Figure:
    """Collapsed fraction against n (``theorem``: ``SpiralResult.theorem``): measured for N(0, 1) T
    (mean over trials, 95% CI) with Theorem 1, and the positive-mean control with its exact
    expectation; linear and logarithmic y axes side by side (trials with no collapse at all have no
    point on the log axis)."""
    fig = Figure(figsize=(10, 4.5), layout="constrained")
    for i, log in enumerate((False, True)):
        _theorem_axis(fig.add_subplot(1, 2, i + 1), theorem, metrics, log)
    m = metrics
    fig.suptitle(f"Collapsed fraction vs n: {m['manifold']} (d={m['input_dim']}), {m['activation']}, "
                 f"{m['points']} points", fontsize=10)
    return fig
