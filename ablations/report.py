"""Markdown for ``REPORT.md``: the paper's claims and numbers next to ours.

Pure text functions of already computed numbers (no JAX, no plotting), so the wording and the
verdict logic are tested directly. Accuracies are in percent. Comparisons between variants use the
paired design of the runs (same seed: same initial weights and data order) with Holm's correction
within each figure; :mod:`ablations.stats` documents the intervals. This module holds the accuracy
figures (Fig. 5, 6), the second-run comparison and the report's frame; Fig. 1 and Fig. 7 live in
:mod:`ablations.report_spiral` and :mod:`ablations.report_fig7`, and are importable from here too.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from ablations import stats
from ablations.markdown import (GENERATED, Section, fmt_difference, fmt_estimate, fmt_num, fmt_p, fmt_paired,
                                markdown_table, protocol_label)
from ablations.report_fig7 import BELOW_TOLERANCE, DIRECTION_ONLY, DRAMATIC_GROWTH, fig7_section, spread_verdict
from ablations.report_spiral import spiral_section, spiral_skipped
from ablations.results import VariantResults, paired_accuracies, protocols
from ablations.studies import Study

__all__ = ["BELOW_TOLERANCE", "COMPARISON_HEADER", "Comparison", "DIRECTION_ONLY", "DRAMATIC_GROWTH", "GENERATED",
           "LATE_DROP_POINTS", "STATISTICS_NOTE", "Section", "accuracy_section", "compare", "comparison_rows",
           "fig7_section", "fmt_difference", "fmt_estimate", "fmt_num", "fmt_p", "fmt_paired", "late_drop_note",
           "markdown_table", "power_note", "protocol_label", "render_report", "replicate_section", "seeds_note",
           "spiral_section", "spiral_skipped", "spread_verdict"]


def _skipped_note(results: Sequence[VariantResults]) -> str:
    lines = [f"- `{rid}` ({vr.variant.name}): {status}, {reason}; not used"
             for vr in results for rid, status, reason in vr.skipped]
    return ("\nRun directories present but not used:\n\n" + "\n".join(lines) + "\n") if lines else ""


@dataclasses.dataclass(frozen=True)
class Comparison:
    """One (variant − reference) comparison of a figure under one BatchNorm protocol."""

    name: str
    reference: str
    label: str
    paper_diff: float | None
    paired: stats.PairedDifference | None  # Holm-corrected within the figure; None: no common seed
    welch: stats.Difference
    detectable: float | None  # smallest difference detected with 80% power at the paired test's level
    verdict: str

    @property
    def claim(self) -> str:
        if self.paper_diff is None:
            return f"{self.label} (no paper value)"
        return f"{self.label} ({'<' if self.paper_diff < 0 else '>'} 0 in the paper)"


def compare(study: Study, results: Sequence[VariantResults], protocol: str | None = None,
            alpha: float = 0.05) -> list[Comparison]:
    """The figure's comparisons under ``protocol``: paired t over the seeds both variants ran,
    Holm-corrected across the figure (family-wise ``alpha``), with Welch's interval beside it."""
    by_name = {vr.variant.name: vr for vr in results if vr.accuracies_for(protocol)}
    names = study.pairs(tuple(by_name))
    samples = [paired_accuracies(by_name[a], by_name[b], protocol) for a, b in names]
    testable = [i for i, (x, _) in enumerate(samples) if x]
    corrected = dict(zip(testable, stats.holm_paired([samples[i] for i in testable], alpha)))
    out = []
    for i, (name, ref) in enumerate(names):
        a, b = by_name[name], by_name[ref]
        pa, pb = a.variant.paper_top1, b.variant.paper_top1
        paper_diff = None if pa is None or pb is None else pa - pb
        diff = corrected.get(i)
        detectable = None if diff is None else stats.detectable_effect(diff.sd, diff.n, 1.0 - diff.confidence)
        verdict = stats.verdict(diff, paper_diff) if diff is not None and paper_diff is not None \
            else stats.NOT_RESOLVED
        out.append(Comparison(name, ref, f"{a.variant.label} − {b.variant.label}", paper_diff, diff,
                              stats.welch(a.accuracies_for(protocol), b.accuracies_for(protocol)),
                              detectable, verdict))
    return out


COMPARISON_HEADER = ("comparison", "paper difference", "our paired difference [Holm-adjusted 95% CI]", "pairs",
                     "p (Holm)", "detectable at 80% power", "Welch [95% CI] (secondary)", "verdict")


def comparison_rows(study: Study, results: Sequence[VariantResults], protocol: str | None = None,
                    primary: bool = True) -> tuple[str, list[tuple[str, str]]]:
    """Markdown table of (variant − reference) differences under ``protocol`` (paired t, Holm-adjusted
    within the figure, Welch as a secondary column) and the (claim, verdict) entries of the summary;
    the claims name the protocol when it is known (``primary`` marks the reported one)."""
    comparisons = compare(study, results, protocol)
    if not comparisons:
        return "", []
    rows = [[c.label, fmt_num(c.paper_diff), fmt_paired(c.paired), c.paired.n if c.paired else 0,
             fmt_p(c.paired.p_adjusted if c.paired else None), fmt_num(c.detectable),
             fmt_difference(c.welch), f"**{c.verdict}**"] for c in comparisons]
    suffix = "" if protocol is None else f", {protocol_label(protocol)}" + (" (primary)" if primary else "")
    verdicts = [(f"{study.name}: {c.claim}{suffix}", c.verdict) for c in comparisons]
    return markdown_table(COMPARISON_HEADER, rows), verdicts


def _variant_table(results: Sequence[VariantResults], protos: Sequence[str | None], paper_column: str,
                   extra: Mapping[str, Mapping[str, str]]) -> str:
    """Per-variant final accuracy with its 95% interval under each protocol, and the seed count."""
    acc_cols = ["our final test accuracy, % [95% CI]" + (f" ({protocol_label(p)})" if p else "") for p in protos]
    head = ["variant", paper_column, *acc_cols, "seeds", *extra]
    rows = []
    for vr in results:
        cells: list[Any] = [vr.variant.label, fmt_num(vr.variant.paper_top1)]
        for p in protos:
            acc = vr.accuracies_for(p)
            cells.append(fmt_estimate(stats.mean_ci(acc)) if acc else "missing")
        cells += [str(len(vr.runs)), *(extra[col].get(vr.variant.name, "–") for col in extra)]
        rows.append(cells)
    return markdown_table(head, rows)


def power_note(study: Study, results: Sequence[VariantResults], protocol: str | None, alpha: float = 0.05) -> str:
    """In words, what the paired seeds of this figure can detect at 80% power."""
    tested = [c.paired for c in compare(study, results, protocol, alpha) if c.paired is not None and c.paired.n >= 2]
    if not tested:
        return ("With fewer than two seeds in common per comparison there is no interval: every "
                "comparison is not resolved at this scale.\n")
    n, m = min(d.n for d in tested), len(tested)
    first, last = stats.detectable_effect(1.0, n, alpha / m), stats.detectable_effect(1.0, n, alpha)
    scale = f"{last:.1f}" if m == 1 else f"{last:.1f} (last Holm step) to {first:.1f} (first step)"
    return (f"What {n} paired seeds can detect: with 80% power, only a true mean difference of at least "
            f"{scale} times the sd of the per-seed differences; smaller true differences are likely "
            "to come out not resolved. The detectable column puts the observed sd into this.\n")


def accuracy_section(study: Study, results: Sequence[VariantResults], figure: str | None,
                     extra_columns: Mapping[str, Mapping[str, str]] | None = None,
                     paper_column: str = "paper top-1 (ImageNet)", note: str = "") -> Section:
    """Fig. 6a/6b/5: per-variant final accuracy with CI and seeds, then the paired comparisons under
    every BatchNorm protocol the runs measured (primary first), side by side when there are two.
    ``note``: a paragraph after the figure (e.g. where its measured numbers come from, or why they
    are missing)."""
    body = [f"**Paper's claim.** {study.claim}\n"]
    if not any(vr.runs for vr in results):
        body.append(f"_Skipped: no completed runs for {study.name} in the results folder "
                    f"(run `python -m ablations.run {study.name} --preset ...` first)._\n")
        body.append(_skipped_note(results))
        return Section(study.title, "\n".join(body), [(study.name, "skipped: no results")])
    if figure:
        body.append(f"![{study.name}]({figure})\n")
    if note:
        body.append(note.rstrip() + "\n")
    protos = protocols(results)
    body.append(_variant_table(results, protos, paper_column, dict(extra_columns or {})))
    verdicts: list[tuple[str, str]] = []
    for k, protocol in enumerate(protos):
        table, entries = comparison_rows(study, results, protocol, primary=k == 0)
        if not table:
            continue
        where = f" with {protocol_label(protocol)}" + (" (primary)" if k == 0 else "") if protocol else ""
        body.append(f"Differences against the reference{where}: paired t over seeds (variants share "
                    "initial weights and data order at each seed), Holm-corrected within this figure; "
                    "Welch's unpaired interval as a secondary column:\n")
        body.append(table)
        verdicts += entries
    if len(protos) > 1 and verdicts:
        body.append(_verdicts_side_by_side(study, results, protos))
    if verdicts:
        body.append(power_note(study, results, protos[0]))
    body.append(late_drop_note(results))
    body.append(_skipped_note(results))
    return Section(study.title, "\n".join(body), verdicts)


#: A run whose final evaluation is more than this many points below its best one is flagged.
LATE_DROP_POINTS = 3.0


def late_drop_note(results: Sequence[VariantResults]) -> str:
    """Whether every run ends near its best evaluation (reported accuracy, percentage points): a
    run that ends far below its best collapsed late, and its final number says more about the
    recipe or the evaluation than about the variant."""
    drops = [(float(acc.max() - acc[-1]), vr.variant.label, run.seed)
             for vr in results for run in vr.runs if len(acc := run.curve()[1])]
    if not drops:
        return ""
    worst = max(drops)
    flagged = [f"{label} seed {seed} (−{drop:.2f})" for drop, label, seed in drops if drop > LATE_DROP_POINTS]
    if flagged:
        return (f"Runs that end more than {LATE_DROP_POINTS:g} points below their best evaluation: "
                f"{', '.join(flagged)}.\n")
    return (f"Every run ends within {LATE_DROP_POINTS:g} points of its best evaluation (largest drop "
            f"{worst[0]:.2f} points: {worst[1]}, seed {worst[2]}).\n")


def _verdicts_side_by_side(study: Study, results: Sequence[VariantResults], protos: Sequence[str | None]) -> str:
    """One row per comparison, one verdict column per BatchNorm protocol (primary first)."""
    per = [{(c.name, c.reference): c.verdict for c in compare(study, results, p)} for p in protos]
    keys = [(c.name, c.reference, c.label) for c in compare(study, results, protos[0])]
    head = ["comparison", *(f"verdict ({protocol_label(p)}{', primary' if k == 0 else ''})"
                            for k, p in enumerate(protos))]
    rows = [[label, *(f"**{v[(a, b)]}**" if (a, b) in v else "–" for v in per)] for a, b, label in keys]
    return "Verdicts under each BatchNorm protocol:\n\n" + markdown_table(head, rows)


STATISTICS_NOTE = (
    "Differences are paired: runs of two variants with the same seed start from bit-identical "
    "initial weights and see the training data in the same order, so the primary statistic is the "
    "paired t interval of the per-seed differences (variant − reference). The comparisons of one "
    "figure are Holm-corrected together (family-wise 5%): each comparison shows its Holm-adjusted p "
    "value and its interval at the level of the Holm step that decides it (1 − 0.05 / (m − i + 1) for "
    "the i-th smallest of m p values; the stopping step's level once the step-down stops), so an "
    "interval excludes 0 exactly when the adjusted p is below 0.05. Welch's unpaired 95% interval is "
    "shown as a secondary column. The detectable effect is the smallest true mean difference the "
    "paired test finds with 80% power at that level, given the observed sd of the per-seed "
    "differences and the number of pairs. Where runs measured BatchNorm under both evaluation "
    "protocols (precise statistics and running averages), each protocol gets its own comparisons and "
    "verdicts, the primary (reported) protocol first. Verdict rule: the corrected interval of a "
    "difference excludes 0 with the paper's sign → reproduced; with the opposite sign → contradicted; "
    "otherwise → not resolved at this scale.")


def seeds_note(seed_counts: Sequence[int] = (3, 5, 10), alpha: float = 0.05) -> str:
    """In words, what a number of paired seeds can detect with one comparison at ``alpha``."""
    parts = [f"{stats.detectable_effect(1.0, n, alpha):.1f} sd with {n} seeds" for n in seed_counts]
    listed = ", ".join(parts[:-1]) + (" and " if len(parts) > 1 else "") + parts[-1]
    return (f"What the seed count can detect: to be found with 80% power by one comparison at "
            f"{100 * alpha:g}%, a true mean difference must be at least {listed} (sd: the standard "
            "deviation of the per-seed differences); smaller true differences are likely to come out "
            "not resolved, and more comparisons per figure raise these thresholds.")


def _prefixed(prefix: str, text: str) -> str:
    """``prefix`` then ``text`` starting lower-case (nothing when ``text`` is empty)."""
    return prefix + text[0].lower() + text[1:] if text else ""


def replicate_section(studies: Sequence[tuple[Study, Sequence[VariantResults], Sequence[VariantResults]]],
                      note: str) -> Section:
    """Each comparison's paired difference and verdict in these runs and in a second run of the same
    preset (``note`` says how it differs), under every BatchNorm protocol, and whether they agree."""
    rows, agree, total = [], 0, 0
    for study, main, other in studies:
        for protocol in protocols(main):
            theirs = {(c.name, c.reference): c for c in compare(study, other, protocol)}
            for c in compare(study, main, protocol):
                o = theirs.get((c.name, c.reference))
                same = o is not None and o.verdict == c.verdict
                agree, total = agree + same, total + 1
                rows.append([f"{study.name}: {c.label}", protocol_label(protocol) or "–", fmt_paired(c.paired),
                             f"**{c.verdict}**", fmt_paired(o.paired) if o else "missing",
                             f"**{o.verdict}**" if o else "–", "yes" if same else "**no**"])
    if not rows:
        return Section("Second run", "_No Fig. 6 comparisons to replicate._\n")
    seeds = sorted({r.seed for _, _, other in studies for vr in other for r in vr.runs})
    body = (f"The same comparisons in {note}, over the seeds it trained ({', '.join(map(str, seeds))}), "
            "in both runs. A verdict that differs between the two runs depends on "
            f"float rounding and should be read as not resolved. Verdicts agree in {agree} of {total}.\n\n"
            + markdown_table(["comparison", "BatchNorm statistics", "these runs: paired difference",
                              "verdict", "second run: paired difference", "verdict", "same"], rows)
            + _prefixed("\nIn the second run: ", late_drop_note([vr for _, _, other in studies for vr in other])))
    return Section("Second run with another float rounding", body)



def render_report(preset_name: str, preset_summary: str, train: Mapping[str, Any], sections: Sequence[Section]) -> str:
    """The whole REPORT.md: header, verdict summary, then every section. ``preset_summary``: one line
    saying what the preset is (its measured numbers come from the sections, never from here)."""
    out = [GENERATED, "", f"# Reproduction report: MobileNetV2 ablations (preset `{preset_name}`)", ""]
    out.append(f"Rendered by `python -m ablations.figures --preset {preset_name}` from the run directories "
               f"under `RESULTS/{preset_name}/` and what `python -m ablations.measure --preset {preset_name}` "
               f"recorded in `RESULTS/{preset_name}/measurements/` (RESULTS: the results folder); accuracies "
               "are final test accuracies in percent, intervals of a variant's accuracy are two-sided 95% "
               "Student-t intervals over seeds.\n")
    out.append(STATISTICS_NOTE + " " + seeds_note() + "\n")
    out.append("Shared training configuration: " + ", ".join(f"`{k}={v}`" for k, v in sorted(train.items())) + "\n")
    summary = " ".join(preset_summary.split())
    if summary:
        out.append(f"Preset: {summary}\n")
    out.append("## Summary of verdicts\n")
    out.append("| claim | verdict |\n|---|---|")
    for section in sections:
        for claim, verdict in section.verdicts:
            out.append(f"| {claim} | {verdict} |")
    out.append("")
    for section in sections:
        out.append(f"## {section.title}\n")
        out.append(section.body.rstrip() + "\n")
    return "\n".join(out).rstrip() + "\n"
