"""Fig. 1 and Theorem 1 in ``REPORT.md``: the spiral experiment's measured collapsed fractions
against the formula, the negative control and Fig. 1's small-n rule, each with an explicit rule."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from ablations import stats
from ablations.markdown import Section, markdown_table


def _sampling_bound(expected: Sequence[float], points: int, trials: int) -> list[float]:
    """Per n, how far a measured mean may stray from its expected fraction p by sampling alone.

    Each point is collapsed with probability p in every draw, so a draw's collapsed fraction has
    variance <= p (1 - p) however the points correlate: 1.96 sqrt(p (1 - p) / draws) plus one point in
    one draw, a bound that cannot be fooled by the rare-event undercoverage of the measured interval
    at few draws."""
    return [1.959963984540054 * math.sqrt(p * (1.0 - p) / trials) + 1.0 / (points * trials) for p in expected]


def _control_row(theorem: Mapping[str, Any], points: int, trials: int) -> tuple[str, str]:
    """The negative control's row and verdict: reproduced (the sign-symmetry condition matters) when
    the measured fraction for positive-mean T departs from the formula by more than the sampling bound
    at >= 75% of n. It cannot depart below n = d (both are 1) and departs little near n = 2d - 1
    (a mixture of p and 1 - p for every unit gives 1/2 there, like the formula)."""
    claim = ("negative control: sign symmetry broken → the formula no longer holds (rule: with T entries "
             f"{theorem.get('control_law', 'of positive mean')}, abs(measured − formula) exceeds the same "
             "bound for >= 75% of n)")
    if "control_mean" not in theorem:
        return f"| {claim} | not measured | **{stats.NOT_RESOLVED}** |", stats.NOT_RESOLVED
    control, formula = theorem["control_mean"], theorem["theory"]
    departs = [abs(c - p) > b for c, p, b in zip(control, formula, _sampling_bound(formula, points, trials))]
    gaps = [abs(c - p) for c, p in zip(control, formula)]
    worst = max(range(len(gaps)), key=gaps.__getitem__)
    verdict = stats.REPRODUCED if sum(departs) >= 0.75 * len(departs) else stats.CONTRADICTED
    text = (f"departs at {sum(departs)} of {len(departs)} n; largest gap {gaps[worst]:.2g} at n = "
            f"{theorem['dims'][worst]} (measured {control[worst]:.3g}, formula {formula[worst]:.2g})")
    if "control_theory" in theorem:
        exact = theorem["control_theory"]
        fits = sum(abs(c - e) <= b for c, e, b in zip(control, exact, _sampling_bound(exact, points, trials)))
        text += f"; within the bound of that law's exact expectation (binomial mixture) for {fits} of {len(exact)}"
    return f"| {claim} | {text} | **{verdict}** |", verdict


SPIRAL_TITLE = "Fig. 1 and Theorem 1: ReLU on a low-dimensional manifold"
#: The section's claims, in the order of its verdicts.
SPIRAL_CLAIMS = ("Theorem 1: expected collapsed fraction",
                 "Theorem 1 needs sign-symmetric T: positive-mean control departs from the formula",
                 "Fig. 1: information loss for small n only")
_PAPER_CLAIMS = ("**Paper's claims.** Fig. 1: a 2-D spiral embedded by a random T and a ReLU, then projected "
                 "back with T⁺, collapses (loses information) for n = 2, 3 and is preserved for n = 15 to 30. "
                 "Theorem 1 (Appendix A): for a law of T invariant under sign flips of its rows, the expected "
                 "collapsed fraction is Σ_{k<d} C(n, k) / 2ⁿ ((n + 1) / 2ⁿ for d = 2).\n")


def spiral_skipped(note: str, verdict: str) -> Section:
    """The section when the experiment's numbers are not available: ``note`` says why and how to get
    them; every claim gets ``verdict``."""
    return Section(SPIRAL_TITLE, "\n".join([_PAPER_CLAIMS, f"_Skipped: {note}._\n"]),
                   [(claim, verdict) for claim in SPIRAL_CLAIMS])


def spiral_section(metrics: Mapping[str, Any], theorem: Mapping[str, Any], figure: str,
                   theorem_figure: str, provenance: str = "") -> Section:
    """Fig. 1 and Appendix A Theorem 1 (spiral experiment) with explicit rules, and the negative
    control (T with positive-mean entries, ``theorem["control_*"]``) that breaks the theorem's
    sign-symmetry condition. ``provenance`` says where and when the experiment ran."""
    points, trials = int(metrics["points"]), int(metrics["trials"])
    body = [_PAPER_CLAIMS,
            "A point counts as collapsed when fewer than d units of ReLU(T x) are active: the map's "
            "Jacobian there has rank < d, so the point's d-dimensional neighbourhood is squeezed onto a "
            "lower-dimensional set (Lemma 2's condition fails). That is the theorem's quantity; it is "
            "about the neighbourhood in R^d, and a collapsed point of the 1-D spiral may still keep its "
            "tangent. The negative control draws T with positive-mean entries, which breaks the sign "
            "symmetry: the formula should then fail.\n",
            f"![Fig. 1]({figure})\n", f"![Theorem 1]({theorem_figure})\n",
            f"{metrics['manifold']} (d = {metrics['input_dim']}), {metrics['activation']}, {points} points × "
            f"{trials} draws of T, seed {metrics['seed']}" + (f" ({provenance})" if provenance else "") + ":\n"]
    rows = [[r["dim"], f"{r['collapsed_fraction']:.4g}",
             f"[{r['collapsed_fraction_ci95'][0]:.4g}, {r['collapsed_fraction_ci95'][1]:.4g}]",
             f"{r['theory_collapsed_fraction']:.4g}", f"{r['naive_error']:.3g}", f"{r['trustworthiness']:.3f}"]
            for r in metrics["results"]]
    body.append(markdown_table(["n", "collapsed fraction", "95% CI", "Theorem 1", "‖T⁺ReLU(Tx) − x‖/‖x‖",
                                "trustworthiness"], rows))
    dims = list(theorem["dims"])
    consistent = [abs(m - th) <= b for m, th, b in
                  zip(theorem["mean"], theorem["theory"], _sampling_bound(theorem["theory"], points, trials))]
    inside_ci = sum(lo <= th <= hi for th, (lo, hi) in zip(theorem["theory"], theorem["ci95"]))
    worst = max(abs(m - th) for m, th in zip(theorem["mean"], theorem["theory"]))
    theorem_verdict = stats.REPRODUCED if sum(consistent) >= 0.9 * len(dims) else stats.CONTRADICTED
    fig1_verdict, fig1_text, rule = _fig1_check(metrics)
    control_row, control_verdict = _control_row(theorem, points, trials)
    body.append("| claim and rule | measured | verdict |\n|---|---|---|\n"
                f"| Theorem 1 holds (rule: abs(measured − formula p) <= 1.96 sqrt(p (1 − p) / draws) + one "
                f"point in one draw, for >= 90% of n = {dims[0]}..{dims[-1]}) | within for {sum(consistent)} "
                f"of {len(dims)} (formula inside the measured 95% CI for {inside_ci}); largest "
                f"abs(measured − formula) {worst:.2g} | **{theorem_verdict}** |\n"
                f"{control_row}\n"
                f"| Fig. 1: information loss for small n only (rule: {rule}) | {fig1_text} | **{fig1_verdict}** |\n")
    return Section(SPIRAL_TITLE, "\n".join(body),
                   list(zip(SPIRAL_CLAIMS, (theorem_verdict, control_verdict, fig1_verdict))))


def _fig1_check(metrics: Mapping[str, Any]) -> tuple[str, str, str]:
    """Fig. 1's rule on the per-n results: (verdict, measured text, rule)."""
    by_dim = {r["dim"]: r["collapsed_fraction"] for r in metrics["results"]}
    low = [by_dim[n] for n in by_dim if n <= metrics["input_dim"] + 1]
    high = [by_dim[n] for n in by_dim if n >= 15]
    rule = "collapsed fraction >= 0.1 at every n <= d + 1 and <= 0.01 at every n >= 15"
    if not (low and high):
        return stats.NOT_RESOLVED, "the dims run do not cover both ranges", rule
    verdict = stats.REPRODUCED if min(low) >= 0.1 and max(high) <= 0.01 else stats.CONTRADICTED
    return verdict, f"smallest at n <= d + 1: {min(low):.3g}; largest at n >= 15: {max(high):.3g}", rule
