"""Fig. 7 in ``REPORT.md``: the Appendix A observations on the fraction of positive channels after
each expansion, each checked with an explicit rule, from the measured statistics
(:class:`ablations.activity.LayerActivity`)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ablations import stats
from ablations.activity import LayerActivity, bootstrap_weights, interval
from ablations.markdown import Section
from ablations.studies import Study

#: Fig. 7 verdict when the spread grows, but by less than the doubling that stands for "dramatically".
DIRECTION_ONLY = "direction only"
#: "Dramatically", as a number: the standard deviation across pixels at least doubles.
DRAMATIC_GROWTH = 2.0
#: A layer is above the invertibility threshold when at most this share of its pixels is below it.
BELOW_TOLERANCE = 0.01


#: Per-layer sd ratios, their geometric mean and its 95% bootstrap interval.
Spread = tuple[list[float], float, tuple[float, float]]


def _spread_ratio(trained: Sequence[LayerActivity], init: Sequence[LayerActivity]) -> Spread:
    """Per layer std(trained) / std(init); their geometric mean over layers and its 95% bootstrap
    interval (the same image resamples for both networks and every layer)."""
    weights = bootstrap_weights(trained[0].images)
    per_layer = [t.std / i.std for t, i in zip(trained, init)]
    logs = np.mean([np.log(t.bootstrap_moments(weights)[1] / i.bootstrap_moments(weights)[1])
                    for t, i in zip(trained, init)], axis=0)
    return per_layer, float(np.exp(np.mean(np.log(per_layer)))), tuple(np.exp(interval(logs)))


def spread_verdict(lo: float, hi: float) -> str:
    """At least doubled (the interval's low end >= 2): reproduced; grew but less: direction only;
    shrank: contradicted; otherwise not resolved."""
    if lo >= DRAMATIC_GROWTH:
        return stats.REPRODUCED
    if lo > 1.0:
        return DIRECTION_ONLY
    return stats.CONTRADICTED if hi < 1.0 else stats.NOT_RESOLVED


def _fig7_table(trained: Sequence[LayerActivity], batch0: Sequence[LayerActivity],
                running0: Sequence[LayerActivity], ratios: Sequence[float]) -> str:
    """One row per expanded layer: step-0 and trained statistics side by side."""
    lines = ["| layer (block) | width / threshold | step 0, batch stats: mean ± sd | step 0, running "
             "stats: mean ± sd | trained: mean ± sd [IQR] | sd ratio | below threshold (step 0 → "
             "trained) | trained min / max |", "|---|---|---|---|---|---|---|---|"]
    for k, (b, r, t, ratio) in enumerate(zip(batch0, running0, trained, ratios), start=1):
        q25, q75 = t.quartiles
        lines.append(f"| {k} (block{t.block:02d}) | {t.channels} / {t.threshold} | {b.mean:.3f} ± {b.std:.3f} | "
                     f"{r.mean:.3f} ± {r.std:.3f} | {t.mean:.3f} ± {t.std:.3f} [{q25:.3f}, {q75:.3f}] | "
                     f"×{ratio:.2f} | {100 * b.below_threshold:.2f}% → {100 * t.below_threshold:.2f}% | "
                     f"{t.min} / {t.max} |")
    return "\n".join(lines) + "\n"


def _fig7_checks(trained: Sequence[LayerActivity], init: Sequence[LayerActivity], spread: Spread,
                 spread_running: Spread) -> list[tuple[str, str, str]]:
    """(observation and rule, measured, verdict) of each Appendix A observation; ``spread`` and
    ``spread_running``: :func:`_spread_ratio` against step 0 with batch and running statistics."""
    _, geo, (lo, hi) = spread
    _, geo_running, (lo_r, hi_r) = spread_running
    n = len(trained)
    near_half = sum(0.4 <= a.mean <= 0.6 for a in init)
    avg_change = float(np.mean([abs(t.mean - a.mean) for t, a in zip(trained, init)]))
    above = sum(t.below_threshold <= BELOW_TOLERANCE for t in trained)
    above_min = sum(t.min >= t.threshold for t in trained)
    return [
        ("fig7 (a): step-0 average fraction of positive channels near 1/2 (rule: every layer's mean in "
         "[0.4, 0.6], batch statistics)", f"{near_half} of {n} layers (mean over layers "
         f"{np.mean([a.mean for a in init]):.3f})", stats.REPRODUCED if near_half == n else stats.CONTRADICTED),
        ("fig7 (b): trained average unchanged (rule: mean absolute change of the layer means < 0.1)",
         f"mean absolute change {avg_change:.3f}", stats.REPRODUCED if avg_change < 0.1 else stats.CONTRADICTED),
        (f"fig7 (b): the spread \"grew dramatically\" (rule: the standard deviation across pixels at least "
         f"doubles, ×{DRAMATIC_GROWTH:g}: geometric mean over layers of sd(trained) / sd(step 0, batch "
         f"statistics), 95% bootstrap interval over images; grows by less: {DIRECTION_ONLY})",
         f"×{geo:.2f} [{lo:.2f}, {hi:.2f}] (against step 0 with running statistics: ×{geo_running:.2f} "
         f"[{lo_r:.2f}, {hi_r:.2f}])", spread_verdict(lo, hi)),
        (f"fig7: all but two layers above the invertibility threshold (rule: >= n − 2 layers with at most "
         f"{100 * BELOW_TOLERANCE:g}% of pixels below the block's input width)",
         f"{above} of {n} layers (by the minimum over all pixels: {above_min} of {n})",
         stats.REPRODUCED if above >= n - 2 else stats.CONTRADICTED),
    ]


def fig7_section(study: Study, trained: Sequence[LayerActivity] | None,
                 init: Sequence[LayerActivity] | None, figure: str | None, note: str = "",
                 init_running: Sequence[LayerActivity] | None = None, provenance: str = "",
                 skipped: str = "skipped: no results") -> Section:
    """Fig. 7: the Appendix A observations on the fraction of positive channels after each
    expansion, each checked with an explicit rule. ``init``: step 0 with batch statistics (how the
    network runs at its first step); ``init_running``: step 0 with its running averages (0 / 1).
    Without statistics the section says why (``note``) and its verdict is ``skipped``;
    ``provenance`` says where and when the statistics were measured."""
    body = [f"**Paper's claim.** {study.claim}\n"]
    if trained is None or init is None:
        body.append(f"_Skipped: {note or 'no completed baseline run'}._\n")
        return Section(study.title, "\n".join(body), [(study.name, skipped)])
    running = init_running or init
    body.append(f"![{study.name}]({figure})\n")
    spread = _spread_ratio(trained, init)
    body.append(_fig7_table(trained, init, running, spread[0]))
    checks = _fig7_checks(trained, init, spread, _spread_ratio(trained, running))
    body.append("| observation and rule | measured | verdict |\n|---|---|---|\n"
                + "\n".join(f"| {c} | {m} | **{v}** |" for c, m, v in checks) + "\n")
    body.append(f"One trained network (seed 0) and its initialisation, over {trained[0].images} test "
                "images; intervals resample images. Minimum and maximum over all pixels grow with the number "
                "of pixels looked at, so the verdicts use the standard deviation and the share of pixels "
                "below the threshold." + (f" {provenance}" if provenance else "") + "\n")
    return Section(study.title, "\n".join(body), [(c, v) for c, _, v in checks])
