"""Appendix A in trained networks, in ``REPORT.md``: Lemma 2's invertibility condition per expanded
layer and how much of each block's input its output keeps, from the ``appendix_a`` measurement
(:mod:`ablations.measure`; blocks read as :class:`ablations.audit_records.BlockRecord`).

The audited networks are the ``fig6a`` runs (linear and ReLU6 bottleneck) at every seed where both
completed, trained and at step 0. Runs of one seed share initial weights and data order, so every
comparison is paired by seed (:func:`ablations.stats.holm_paired`, Holm-corrected across this
section). Pure text functions of already measured numbers: no JAX."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ablations import stats
from ablations.audit_records import HOLDS_SHARE, BlockRecord, expanded_blocks, mean_field, pooled_share, read_blocks
from ablations.markdown import Section, fmt_estimate, fmt_p, fmt_paired, markdown_table
from ablations.studies import Study

TITLE = "Appendix A in trained networks: invertibility and information per layer"
#: Network states audited per run.
TRAINED, STEP0 = "trained", "step0"
#: Verdicts of comparisons the paper states no direction for.
NO_CLAIM_RESOLVED = "no paper claim: interval excludes 0"
NO_CLAIM_UNRESOLVED = "no paper claim: not resolved at this scale"
#: The paper's "all but two layers" (Fig. 7), as the number of layers allowed to miss the condition.
LAYERS_ALLOWED_BELOW = 2

PAPER_CLAIM = (
    "Appendix A, Lemma 2: a ReLU layer y = ReLU(Bx) is invertible at x when the rows of B whose "
    "units are active there have rank n (the input dimension), which needs at least n active units; "
    "Fig. 7 reports that in a trained network all but two expanded layers stay above that count "
    "threshold, and Section 3.2 motivates linear bottlenecks with \"non-linearity destroys "
    "information in low-dimensional space\" (Fig. 6a).")
NOT_CLAIMED = (
    "What the paper does not claim: it counts active units (Fig. 7) but never measures the rank "
    "condition itself, the conditioning of the active rows, how well a block's input can be "
    "recovered from its output, or how many outputs a ReLU6 bottleneck clips; Lemma 2 concerns the "
    "expansion's ReLU6 alone (the t = 1 block has none) and says nothing about the depthwise and "
    "projection layers after it. Only the direction \"a ReLU6 bottleneck keeps less of the block "
    "input than a linear one\" and \"all but two layers above the threshold\" are the paper's; the "
    "other rows below are measured without a paper value to compare with.")


@dataclasses.dataclass(frozen=True)
class Audits:
    """The measured audits: per (variant, state), one block list per seed (seeds in order)."""

    seeds: tuple[int, ...]
    networks: Mapping[tuple[str, str], Sequence[Sequence[BlockRecord]]]
    images: int
    train_images: int
    dataset: str


def read_audits(data: Mapping[str, Any], variants: Sequence[str]) -> Audits:
    """The ``appendix_a`` measurement's data; ``ValueError`` when malformed or incomplete."""
    by_key: dict[tuple[str, str, int], list[BlockRecord]] = {}
    for net in data["networks"]:
        by_key[(str(net["variant"]), str(net["state"]), int(net["seed"]))] = read_blocks(net["blocks"])
    seeds = tuple(sorted({seed for _, _, seed in by_key}))
    try:
        networks = {(v, s): [by_key[(v, s, seed)] for seed in seeds] for v in variants for s in (TRAINED, STEP0)}
    except KeyError as exc:
        raise ValueError(f"no audit of {exc.args[0]}") from None
    if not seeds:
        raise ValueError("no audited network")
    return Audits(seeds, networks, int(data["images"]), int(data["train_images"]), str(data["dataset"]))


def variants(study: Study) -> tuple[str, str]:
    """(reference, other) variant names of the audited study: the linear bottleneck, then ReLU6."""
    return study.baseline, next(v.name for v in study.variants if v.name != study.baseline)


def network_labels(study: Study) -> dict[tuple[str, str], str]:
    """A short label per audited (variant, state), in report order (trained first)."""
    ref, other = variants(study)
    names = {ref: "linear", other: "ReLU6"}
    return {(v, s): f"{names[v]}, {'trained' if s == TRAINED else 'step 0'}" for s in (TRAINED, STEP0)
            for v in (ref, other)}


# ----------------------------------------------------------------------------------- Lemma 2


def _holds_count(per_seed: Sequence[Sequence[BlockRecord]]) -> tuple[int, int, float, int]:
    """(layers where Lemma 2 holds at >= HOLDS_SHARE of the pixels pooled over seeds, layers,
    lowest pooled share, its block)."""
    shares = pooled_share(per_seed)
    blocks = [b.index for b in expanded_blocks(per_seed[0])]
    low = int(np.argmin(shares))
    return sum(s >= HOLDS_SHARE for s in shares), len(shares), shares[low], blocks[low]


def lemma2_claim(per_seed: Sequence[Sequence[BlockRecord]], label: str) -> tuple[str, str, str, str]:
    """(claim worded by what was measured, rule, measured, verdict) for Lemma 2 in ``per_seed``."""
    k, n, lowest, block = _holds_count(per_seed)
    seeds = len(per_seed)
    where = f"all {n}" if k == n else f"{k} of {n}"
    claim = (f"Lemma 2's condition holds at >= {100 * HOLDS_SHARE:g}% of pixels in {where} expanded layers "
             f"({label}, {seeds} seed{'s' if seeds > 1 else ''} pooled)")
    per_seed_counts = [sum(s >= HOLDS_SHARE for s in pooled_share([blocks])) for blocks in per_seed]
    count_ok = sum(s <= 1 - HOLDS_SHARE for s in pooled_share(per_seed, "below_threshold_share"))
    low = "at every pixel" if lowest == 1.0 else f"lowest {100 * lowest:.3f}% at block {block}"
    measured = (f"{k} of {n} layers ({low}; per seed {min(per_seed_counts)}-{max(per_seed_counts)} of {n}); "
                f"by the count alone (at least as many active units as "
                f"inputs at >= {100 * HOLDS_SHARE:g}% of pixels): {count_ok} of {n}")
    rule = (f"at least n − {LAYERS_ALLOWED_BELOW} of the n expanded layers hold the rank condition at "
            f">= {100 * HOLDS_SHARE:g}% of their pixels (Fig. 7's \"all but two layers\")")
    verdict = stats.REPRODUCED if k >= n - LAYERS_ALLOWED_BELOW else stats.CONTRADICTED
    return claim, rule, measured, verdict


def _pct(value: float | None, digits: int = 2) -> str:
    return "–" if value is None else f"{100 * value:.{digits}f}"


def lemma2_table(audits: Audits, labels: Mapping[tuple[str, str], str]) -> str:
    """Per expanded layer: the share of pixels where Lemma 2 holds in every network kind (pooled
    over seeds), and for the first (reference, trained) the share below the count threshold and
    the smallest singular value of the active rows (median over pixels, mean over seeds)."""
    keys = list(labels)
    shares = {key: pooled_share(audits.networks[key]) for key in keys}
    below = pooled_share(audits.networks[keys[0]], "below_threshold_share")
    ref = [expanded_blocks(blocks) for blocks in audits.networks[keys[0]]]
    rows = []
    for k, block in enumerate(ref[0]):
        sigma = np.mean([blocks[k].sigma_min_median for blocks in ref])
        rows.append([f"{block.index}", f"{block.in_channels} → {block.expanded_channels}",
                     *(_pct(shares[key][k], 3) for key in keys), _pct(below[k], 3), f"{sigma:.3f}"])
    head = ["block", "input → expanded width", *(f"Lemma 2 holds, % ({labels[key]})" for key in keys),
            f"% below the count threshold ({labels[keys[0]]})", f"σ_min / σ_max, median ({labels[keys[0]]})"]
    return markdown_table(head, rows)


# ----------------------------------------------------------------------------------- decoders


def _per_seed_mean(per_seed: Sequence[Sequence[BlockRecord]], field: str, indices: Sequence[int]) -> list[float]:
    """Per seed, the mean of ``field`` (percent) over the blocks ``indices``."""
    return [100 * mean_field(blocks, field, indices) for blocks in per_seed]


def decoded_blocks(audits: Audits) -> list[int]:
    """Blocks with a decoder in every audited network (same architecture: same blocks)."""
    sets = [{b.index for b in blocks if b.decoder_ev is not None}
            for per_seed in audits.networks.values() for blocks in per_seed]
    return sorted(set.intersection(*sets))


def clipped_blocks(per_seed: Sequence[Sequence[BlockRecord]]) -> list[int]:
    """Blocks with a clipped share in every seed of a network kind."""
    return sorted(set.intersection(*({b.index for b in blocks if b.clipped_share is not None}
                                     for blocks in per_seed)))


@dataclasses.dataclass(frozen=True)
class AuditComparison:
    """One paired comparison of the section: what it compares, the paper's sign (None: no paper
    claim) and the per-seed values of each side."""

    label: str
    paper_sign: float | None
    variant: Sequence[float]
    reference: Sequence[float]


def comparisons(audits: Audits, ref: str, other: str) -> list[AuditComparison]:
    """The section's comparisons (percentage points; the Holm family)."""
    net, decoded = audits.networks, decoded_blocks(audits)
    ev = {key: _per_seed_mean(per_seed, "decoder_ev", decoded) for key, per_seed in net.items()} if decoded else {}
    out = []
    if ev:
        out += [AuditComparison("decoder EV: ReLU6 − linear bottleneck, trained", -1.0, ev[(other, TRAINED)],
                                ev[(ref, TRAINED)]),
                AuditComparison("decoder EV: ReLU6 − linear bottleneck, step 0", None, ev[(other, STEP0)],
                                ev[(ref, STEP0)]),
                AuditComparison("decoder EV: trained − step 0, linear bottleneck", None, ev[(ref, TRAINED)],
                                ev[(ref, STEP0)]),
                AuditComparison("decoder EV: trained − step 0, ReLU6 bottleneck", None, ev[(other, TRAINED)],
                                ev[(other, STEP0)])]
    clipped = clipped_blocks(net[(other, TRAINED)])
    if clipped:
        out.append(AuditComparison("clipped share of the ReLU6 bottleneck: trained − step 0", None,
                                   _per_seed_mean(net[(other, TRAINED)], "clipped_share", clipped),
                                   _per_seed_mean(net[(other, STEP0)], "clipped_share", clipped)))
    lemma = [b.index for b in expanded_blocks(net[(ref, TRAINED)][0])]
    out.append(AuditComparison("Lemma 2 share of pixels: trained − step 0, linear bottleneck", None,
                               _per_seed_mean(net[(ref, TRAINED)], "invertible_share", lemma),
                               _per_seed_mean(net[(ref, STEP0)], "invertible_share", lemma)))
    return out


def comparison_verdict(diff: stats.PairedDifference, paper_sign: float | None) -> str:
    """The study's vocabulary where the paper gives a direction; else whether the interval excludes 0."""
    if paper_sign is not None:
        return stats.verdict(diff, paper_sign)
    resolved = diff.lo is not None and (diff.lo > 0 or diff.hi < 0)
    return NO_CLAIM_RESOLVED if resolved else NO_CLAIM_UNRESOLVED


def comparison_table(items: Sequence[AuditComparison]) -> tuple[str, list[tuple[str, str]],
                                                                list[stats.PairedDifference]]:
    """Markdown table of the paired, Holm-corrected comparisons, their (claim, verdict) entries and
    the differences (in ``items`` order)."""
    diffs = stats.holm_paired([(c.variant, c.reference) for c in items])
    rows, verdicts = [], []
    for c, d in zip(items, diffs):
        direction = "none stated" if c.paper_sign is None else ("< 0" if c.paper_sign < 0 else "> 0")
        verdict = comparison_verdict(d, c.paper_sign)
        rows.append([c.label, direction, f"{np.mean(c.reference):.2f}", f"{np.mean(c.variant):.2f}",
                     fmt_paired(d), d.n, fmt_p(d.p_adjusted), f"**{verdict}**"])
        verdicts.append((f"appendix_a: {c.label}" + ("" if c.paper_sign is None else
                                                     f" ({direction} in the paper's reading)"), verdict))
    head = ["comparison (percentage points)", "paper direction", "reference mean", "variant mean",
            "paired difference [Holm-adjusted 95% CI]", "pairs", "p (Holm)", "verdict"]
    return markdown_table(head, rows), verdicts, diffs


def decoder_table(audits: Audits, labels: Mapping[tuple[str, str], str]) -> str:
    """Per block: decoder explained variance of every network kind and the clipped share of the
    clipping ones (percent, mean over seeds)."""
    keys = list(labels)
    clip_keys = [k for k in keys if clipped_blocks(audits.networks[k])]
    rows = []
    for k, block in enumerate(audits.networks[keys[0]][0]):
        def mean(key: tuple[str, str], field: str) -> str:
            values = [getattr(blocks[k], field) for blocks in audits.networks[key]]
            return "–" if any(v is None for v in values) else f"{100 * np.mean(values):.2f}"
        rows.append([f"{block.index}", f"{block.in_channels} → {block.out_channels}, s{block.stride}",
                     *(mean(key, "decoder_ev") for key in keys), *(mean(key, "clipped_share") for key in clip_keys)])
    head = ["block", "input → output width, stride", *(f"decoder EV, % ({labels[k]})" for k in keys),
            *(f"clipped, % ({labels[k]})" for k in clip_keys)]
    return markdown_table(head, rows)


# ----------------------------------------------------------------------------------- section


def _loss_sentence(items: Sequence[AuditComparison], diffs: Sequence[stats.PairedDifference],
                   blocks: int) -> str:
    """The headline decoder comparison (the first item) in words: the points a ReLU6 bottleneck
    loses (or gains) when its interval excludes 0, else the difference and "not resolved"."""
    if not items or items[0].paper_sign is None:
        return ""
    d = diffs[0]
    level = "" if np.isclose(d.confidence, 0.95) else f" at {100 * d.confidence:.1f}%"
    where = (f"mean over the {blocks} blocks with a decoder, paired over {d.n} seed{'s' if d.n != 1 else ''}, "
             "Holm-adjusted across this section")
    if d.lo is None:
        return (f"Trained, the explained variance of a ReLU6 bottleneck differs from a linear one's by "
                f"{d.diff:+.2f} points (no interval: one seed; {where}): not resolved at this scale.\n")
    if d.lo <= 0 <= d.hi:
        return (f"Trained, the explained variance of a ReLU6 bottleneck differs from a linear one's by "
                f"{d.diff:+.2f} points ([{d.lo:+.2f}, {d.hi:+.2f}]{level}; {where}): not resolved at this scale.\n")
    lo, hi = sorted((abs(d.lo), abs(d.hi)))
    return (f"Trained, a ReLU6 bottleneck {'loses' if d.diff < 0 else 'gains'} {abs(d.diff):.2f} points "
            f"[{lo:.2f}, {hi:.2f}]{level} of explained variance against a linear one ({where}).\n")


def _clipped_sentence(audits: Audits, other: str, label: str) -> str:
    clipped = clipped_blocks(audits.networks[(other, TRAINED)])
    if not clipped:
        return ""
    est = {s: stats.mean_ci(_per_seed_mean(audits.networks[(other, s)], "clipped_share", clipped))
           for s in (TRAINED, STEP0)}
    return (f"The {label} clips {fmt_estimate(est[TRAINED])}% of its projection outputs (at <= 0 or >= 6, "
            f"before the shortcut; mean over its {len(clipped)} blocks, 95% t interval over seeds) trained, "
            f"{fmt_estimate(est[STEP0])}% at step 0.\n")


def appendix_a_section(study: Study, audits: Audits | None, figure: str | None, note: str = "",
                       provenance: str = "", skipped: str = "skipped: not measured") -> Section:
    """The section: the paper's claim, the figure, Lemma 2 per layer with its verdict, the paired
    comparisons of decoders, clipping and Lemma 2 (Holm across the section) and what the paper
    does not claim. Without audits it says why (``note``) and its verdict is ``skipped``."""
    body = [f"**Paper's claim.** {PAPER_CLAIM}\n"]
    if audits is None:
        body.append(f"_Skipped: {note}._\n")
        return Section(TITLE, "\n".join(body), [("appendix_a", skipped)])
    ref, other = variants(study)
    labels = network_labels(study)
    body.append(f"![appendix_a]({figure})\n" if figure else "")
    claim, rule, measured, verdict = lemma2_claim(audits.networks[(ref, TRAINED)], "trained, linear bottleneck")
    body.append(markdown_table(["claim", "rule", "measured", "verdict"], [[claim, rule, measured, f"**{verdict}**"]]))
    body.append(lemma2_table(audits, labels))
    items = comparisons(audits, ref, other)
    table, verdicts, diffs = comparison_table(items)
    body.append(_loss_sentence(items, diffs, len(decoded_blocks(audits))) + _clipped_sentence(
        audits, other, "ReLU6 bottleneck"))
    body.append(table)
    body.append(decoder_table(audits, labels))
    body.append(f"{NOT_CLAIMED}\n\nAudited: the `{study.name}` runs at {len(audits.seeds)} seed"
                f"{'s' if len(audits.seeds) != 1 else ''} where both variants completed, trained (checkpoint "
                f"weights and BatchNorm running averages) and at step 0 (the trainer's initialisation with the "
                f"population BatchNorm statistics of the training images), on the first {audits.images} "
                f"{audits.dataset} test images; decoders (ridge, block input from block output over the whole "
                f"feature map) fitted on the first {audits.train_images} training images and scored on the test "
                "images. Lemma 2 shares are pooled over the pixels of every seed; decoder and clipping numbers "
                "are per-seed means over blocks, compared pairwise by seed (paired t, Holm-corrected across "
                "this section's comparisons)." + (f" {provenance}" if provenance else "") + "\n")
    return Section(TITLE, "\n".join(part for part in body if part), [(f"appendix_a: {claim}", verdict), *verdicts])
