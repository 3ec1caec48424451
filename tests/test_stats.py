"""Paired statistics of the ablation report: the paired t test, Holm's correction and its intervals,
the detectable effect, per-protocol results, the report's comparison tables, and a check that the
design really is paired (same seed: same initial weights and data order across variants)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from scipy import stats as sps

from ablations import report, stats
from ablations.results import SeedRun, VariantResults, paired_accuracies, protocols
from ablations.studies import STUDIES

# ------------------------------------------------------------------------------------------ paired t

A = [71.2, 70.1, 70.8, 71.5, 70.9]
B = [70.1, 69.8, 69.7, 70.6, 70.4]


def test_paired_matches_scipy_ttest_rel_and_a_hand_interval():
    d = np.subtract(A, B)
    res = stats.paired(A, B)
    ref = sps.ttest_rel(A, B)
    assert res.n == 5 and res.df == 4 and res.confidence == 0.95
    assert res.diff == pytest.approx(d.mean(), rel=1e-12)
    assert res.sd == pytest.approx(d.std(ddof=1), rel=1e-12)
    assert res.t == pytest.approx(ref.statistic, rel=1e-12)
    assert res.p == pytest.approx(ref.pvalue, rel=1e-10)
    half = sps.t.ppf(0.975, 4) * d.std(ddof=1) / math.sqrt(5)
    assert (res.lo, res.hi) == (pytest.approx(d.mean() - half, rel=1e-12), pytest.approx(d.mean() + half, rel=1e-12))
    wide = stats.paired(A, B, confidence=0.99)
    assert wide.lo < res.lo and wide.hi > res.hi and wide.p == res.p
    assert res.p_adjusted is None


def test_paired_degenerate_cases():
    with pytest.raises(ValueError):
        stats.paired([1.0, 2.0], [1.0])
    with pytest.raises(ValueError):
        stats.paired([], [])
    one = stats.paired([71.0], [70.0])
    assert (one.diff, one.lo, one.hi, one.sd, one.p, one.t, one.df) == (1.0, None, None, None, None, None, None)
    shift = stats.paired([1.0, 2.0, 3.0], [0.0, 1.0, 2.0])  # every seed exactly 1 higher
    assert (shift.lo, shift.hi, shift.sd, shift.p, shift.t) == (1.0, 1.0, 0.0, 0.0, math.inf)
    assert stats.verdict(shift, 0.5) == stats.REPRODUCED and stats.verdict(shift, -0.5) == stats.CONTRADICTED
    same = stats.paired([1.0, 2.0, 3.0], [1.0, 2.0, 3.0])
    assert (same.lo, same.hi, same.p) == (0.0, 0.0, 1.0)
    assert stats.verdict(same, 0.5) == stats.NOT_RESOLVED
    assert stats.verdict(one, 0.5) == stats.NOT_RESOLVED


def test_paired_is_sharper_than_welch_when_seeds_share_variation():
    rng = np.random.default_rng(0)
    seed_effect = rng.normal(0, 1.0, 5)  # shared by both variants at a seed
    ref = 70 + seed_effect + rng.normal(0, 0.05, 5)
    var = ref - 0.3 + rng.normal(0, 0.05, 5)
    p, w = stats.paired(var, ref), stats.welch(var, ref)
    assert p.hi < 0 < w.hi  # the paired interval resolves what the unpaired one cannot
    assert stats.verdict(p, -0.65) == stats.REPRODUCED and stats.verdict(w, -0.65) == stats.NOT_RESOLVED


# ------------------------------------------------------------------------------------------ Holm


def test_holm_against_a_hand_example():
    # sorted: 0.005 x4 = 0.02; 0.01 x3 = 0.03; 0.03 x2 = 0.06; 0.04 x1 = 0.04 -> monotone 0.06
    adjusted = stats.holm([0.01, 0.04, None, 0.03, 0.005])
    assert adjusted[2] is None
    assert adjusted[0] == pytest.approx(0.03) and adjusted[1] == pytest.approx(0.06)
    assert adjusted[3] == pytest.approx(0.06) and adjusted[4] == pytest.approx(0.02)
    assert stats.holm([0.5, 0.6, 0.2]) == [1.0, 1.0, pytest.approx(0.6)]  # capped at 1, monotone
    assert stats.holm([0.02]) == [0.02] and stats.holm([]) == [] and stats.holm([None]) == [None]


def test_holm_levels_follow_the_step_down():
    # ranks: 0.005 (step 0.05/4), 0.01 (0.05/3), then 0.03 > 0.05/2: stop; 0.04 keeps the stop level
    levels = stats.holm_levels([0.01, 0.04, None, 0.03, 0.005])
    assert levels[2] is None
    assert levels[4] == pytest.approx(1 - 0.05 / 4) and levels[0] == pytest.approx(1 - 0.05 / 3)
    assert levels[3] == pytest.approx(1 - 0.05 / 2) and levels[1] == pytest.approx(1 - 0.05 / 2)
    assert stats.holm_levels([0.3]) == [pytest.approx(0.95)]


def test_holm_paired_intervals_agree_with_adjusted_p_values():
    rng = np.random.default_rng(1)
    for _ in range(200):
        m, n = int(rng.integers(1, 5)), int(rng.integers(2, 7))
        family = [(rng.normal(rng.normal(0, 1.5), 1.0, n), rng.normal(0, 1.0, n)) for _ in range(m)]
        out = stats.holm_paired(family)
        raw = [stats.paired(v, r) for v, r in family]
        assert [d.p for d in out] == pytest.approx([d.p for d in raw])
        assert [d.p_adjusted for d in out] == pytest.approx(stats.holm([d.p for d in raw]))
        for d in out:
            assert (d.lo > 0 or d.hi < 0) == (d.p_adjusted < 0.05)
            assert d.confidence >= 0.95 - 1e-12
    single = stats.holm_paired([(A, B)])[0]
    plain = stats.paired(A, B)
    assert (single.lo, single.hi, single.p_adjusted) == (plain.lo, plain.hi, plain.p)
    few = stats.holm_paired([([1.0], [0.0]), (A, B)])  # one pair: no test, not counted in m
    assert few[0].p_adjusted is None and few[0].lo is None and few[1].p_adjusted == pytest.approx(plain.p)


# ------------------------------------------------------------------------------------------ power


def test_detectable_effect_matches_the_normal_approximation_for_many_pairs():
    z = sps.norm.ppf(0.975) + sps.norm.ppf(0.8)
    for n in (200, 1000):
        assert stats.detectable_effect(2.0, n, 0.05) == pytest.approx(z * 2.0 / math.sqrt(n), rel=0.02)
    sizes = [stats.detectable_effect(1.0, n, 0.05) for n in (2, 3, 4, 5, 10, 30, 100)]
    assert all(a > b for a, b in zip(sizes, sizes[1:]))
    assert stats.detectable_effect(3.0, 5) == pytest.approx(3.0 * stats.detectable_effect(1.0, 5))
    assert stats.detectable_effect(1.0, 5, 0.01) > stats.detectable_effect(1.0, 5, 0.05)
    assert stats.detectable_effect(None, 5) is None and stats.detectable_effect(1.0, 1) is None
    assert stats.detectable_effect(0.0, 3) == 0.0


def test_detectable_effect_has_the_requested_power_by_simulation():
    """Simulated paired t tests at the detectable effect reject in about 80% of the draws."""
    n, sd = 5, 0.7
    delta = stats.detectable_effect(sd, n, 0.05)
    d = np.random.default_rng(2).normal(delta, sd, size=(40000, n))
    t = d.mean(axis=1) / (d.std(axis=1, ddof=1) / math.sqrt(n))
    power = float(np.mean(np.abs(t) > sps.t.ppf(0.975, n - 1)))
    assert power == pytest.approx(0.8, abs=0.01)


# ------------------------------------------------------------------------------------------ results


def _run(seed: int, primary: float, **extra) -> SeedRun:
    summary = {"final_test_accuracy": primary, **extra}
    return SeedRun(seed, Path(f"run-s{seed}"), {}, [], summary)


def _variant(study: str, name: str, runs) -> VariantResults:
    return VariantResults(study, STUDIES[study].variant(name), tuple(runs), ())


def test_seed_runs_expose_each_protocol_and_old_summaries_keep_working():
    new = _run(0, 0.9, eval_bn="precise", final_test_accuracy_precise=0.9, final_test_accuracy_running=0.85)
    assert new.final_accuracy_for(None) == pytest.approx(90.0)
    assert new.final_accuracy_for("precise") == pytest.approx(90.0)
    assert new.final_accuracy_for("running") == pytest.approx(85.0)
    primary_only = _run(0, 0.8, eval_bn="running")
    assert primary_only.final_accuracy_for("running") == pytest.approx(80.0)
    assert primary_only.final_accuracy_for("precise") is None
    old = _run(0, 0.7)
    assert old.eval_bn is None and old.final_accuracy_for(None) == pytest.approx(70.0)
    assert old.final_accuracy_for("precise") is None and old.final_accuracy_for("running") is None
    assert protocols([_variant("fig6a", "linear", [old])]) == [None]
    assert protocols([_variant("fig6a", "linear", [new])]) == ["precise", "running"]
    assert protocols([_variant("fig6a", "linear", [_run(0, 0.8, eval_bn="running",
                                                        final_test_accuracy_precise=0.81)])]) == ["running", "precise"]


def test_seed_run_curves_per_protocol():
    metrics = [{"step": 1, "loss": 2.0},
               {"step": 2, "test_accuracy": 0.5, "test_accuracy_precise": 0.5, "test_accuracy_running": 0.3},
               {"step": 4, "test_accuracy": 0.7, "test_accuracy_precise": 0.7, "test_accuracy_running": 0.6}]
    run = SeedRun(0, Path("r"), {}, metrics, {"final_test_accuracy": 0.7, "eval_bn": "precise"})
    steps, acc = run.curve()
    assert steps.tolist() == [2, 4] and acc == pytest.approx([50.0, 70.0])
    assert run.curve("running")[1] == pytest.approx([30.0, 60.0])
    vr = _variant("fig6a", "linear", [run])
    assert vr.curves("running")[1].tolist() == [pytest.approx([30.0, 60.0])]


def test_paired_accuracies_align_seeds_both_variants_have():
    a = _variant("fig6a", "relu6", [_run(s, 0.80 + s / 100) for s in (0, 1, 3)])
    b = _variant("fig6a", "linear", [_run(s, 0.90 + s / 100) for s in (0, 1, 2, 3)])
    x, y = paired_accuracies(a, b)
    assert x == pytest.approx([80.0, 81.0, 83.0]) and y == pytest.approx([90.0, 91.0, 93.0])
    assert a.accuracies_for(None) == pytest.approx([80.0, 81.0, 83.0])
    assert paired_accuracies(a, b, "precise") == ([], [])


# ------------------------------------------------------------------------------------------ report


def _fig6b(both: bool) -> list[VariantResults]:
    """Three seeds per variant; running BN inverts the expansion/bottleneck order when measured."""
    noise = [0.3, -0.5, 0.1]
    effects = {"bottleneck": (0.0, 0.0), "expansion": (-1.0, 0.8), "none": (-3.0, -2.0)}
    out = []
    for name, (precise, running) in effects.items():
        runs = []
        for seed in range(3):
            p = (90.0 + precise + noise[seed] + 0.05 * seed * (name == "none")) / 100
            r = (88.0 + running + noise[seed] - 0.04 * seed * (name == "expansion")) / 100
            extra = {"eval_bn": "precise", "final_test_accuracy_precise": p, "final_test_accuracy_running": r}
            runs.append(_run(seed, p, **(extra if both else {})))
        out.append(_variant("fig6b", name, runs))
    return out


def test_report_comparisons_are_paired_and_holm_corrected():
    results = _fig6b(both=False)
    section = report.accuracy_section(STUDIES["fig6b"], results, "fig6b.png")
    assert "our paired difference [Holm-adjusted 95% CI] | pairs | p (Holm) | detectable at 80% power | " \
           "Welch [95% CI] (secondary) | verdict |" in section.body
    comparisons = report.compare(STUDIES["fig6b"], results)
    assert [c.label for c in comparisons] == ["Shortcut between expansions − Shortcut between bottlenecks",
                                              "No residual − Shortcut between bottlenecks",
                                              "No residual − Shortcut between expansions"]
    family = stats.holm_paired([paired_accuracies(*(next(vr for vr in results if vr.variant.name == n)
                                                    for n in (c.name, c.reference))) for c in comparisons])
    for c, expected in zip(comparisons, family):
        assert (c.paired.lo, c.paired.hi, c.paired.p_adjusted) == (expected.lo, expected.hi, expected.p_adjusted)
        assert c.paired.n == 3 and c.detectable == pytest.approx(
            stats.detectable_effect(expected.sd, 3, 1 - expected.confidence))
    assert [v for _, v in section.verdicts] == [stats.REPRODUCED] * 3
    assert section.verdicts[0][0] == ("fig6b: Shortcut between expansions − Shortcut between bottlenecks "
                                      "(< 0 in the paper)")
    row = next(line for line in section.body.splitlines() if line.startswith("| Shortcut between expansions −"))
    assert row.count(" | ") == 7 and "| -0.55 | -1.00 [" in row and "| 3 |" in row
    assert "What 3 paired seeds can detect" in section.body


def test_report_shows_both_batchnorm_protocols_primary_first():
    section = report.accuracy_section(STUDIES["fig6b"], _fig6b(both=True), None)
    body = section.body
    assert "our final test accuracy, % [95% CI] (precise BN) | our final test accuracy, % [95% CI] " \
           "(running BN) |" in body
    assert body.index("with precise BN (primary)") < body.index("with running BN")
    assert "| comparison | verdict (precise BN, primary) | verdict (running BN) |" in body
    claims = dict(section.verdicts)
    key = "fig6b: Shortcut between expansions − Shortcut between bottlenecks (< 0 in the paper)"
    assert claims[f"{key}, precise BN (primary)"] == stats.REPRODUCED
    assert claims[f"{key}, running BN"] == stats.CONTRADICTED
    assert list(claims)[0].endswith("precise BN (primary)") and len(claims) == 6
    full = report.render_report("test", "", {}, [section])
    assert "paired t interval" in full and "Holm" in full and "Welch" in full and "80% power" in full
    assert "What the seed count can detect" in full and "Welch's interval. Verdict" not in full
    assert f"| {key}, running BN | {stats.CONTRADICTED} |" in full


def test_replicate_section_lists_both_runs_verdicts_and_flags_disagreement():
    """A second run of the preset: its verdicts beside these, per protocol, disagreements marked."""
    main = _fig6b(both=True)
    flipped = [VariantResults(vr.study, vr.variant, tuple(
        SeedRun(r.seed, r.run_dir, {}, [], {**r.summary, "final_test_accuracy_running": 0.88})
        for r in vr.runs), ()) for vr in main]  # running BN: every variant equal -> nothing resolved
    section = report.replicate_section([(STUDIES["fig6b"], main, flipped)], "a run with one worker")
    body = section.body
    assert "a run with one worker" in body and "Verdicts agree in 3 of 6." in body
    rows = [line for line in body.splitlines() if line.startswith("| fig6b: ")]
    assert len(rows) == 6 and all(row.count(" | ") == 6 for row in rows)
    running = [row for row in rows if "| running BN |" in row]
    assert all(row.endswith("| **no** |") for row in running)
    assert all(row.endswith("| yes |") for row in rows if "| precise BN |" in row)
    assert section.verdicts == []


# ------------------------------------------------------------------------------------------ paired design


@pytest.mark.parametrize("study, names, field", [
    ("fig6a", ("linear", "relu6"), "bottleneck_activation"),
    ("fig6b", ("bottleneck", "expansion", "none"), "residual"),
])
def test_variants_at_one_seed_share_initial_weights_and_data_order(study, names, field):
    """What makes the comparisons paired: at a seed, the trainer's configs of two variants differ
    only in the ablated field, their initial parameters (``model_init_fn(mcfg)(seed)``) are
    bit-identical and their data order (``epoch_permutation`` of the seed's key) is the same."""
    import jax

    from ablations.plan import variant_spec
    from ablations.studies import get_preset
    from manifold_lab.data import epoch_permutation
    from manifold_lab.train import TrainConfig
    from manifold_lab.train.network import model_config_for, model_init_fn

    preset, s = get_preset("cpu"), STUDIES[study]
    for seed in (0, 1):
        cfgs = [TrainConfig(**variant_spec(s, s.variant(n), preset, seed)).resolved() for n in names]
        base = cfgs[0].to_dict()
        for cfg in cfgs[1:]:
            assert {k for k, v in cfg.to_dict().items() if base[k] != v} == {field}
        inits = [model_init_fn(model_config_for(cfg, 10, 1))(cfg.seed) for cfg in cfgs]
        ref = jax.tree_util.tree_leaves_with_path(inits[0])
        assert len(ref) > 50  # every convolution, BatchNorm and the classifier, params and statistics
        for other in inits[1:]:
            leaves = jax.tree_util.tree_leaves_with_path(other)
            assert [p for p, _ in leaves] == [p for p, _ in ref]
            assert all(np.array_equal(np.asarray(x), np.asarray(y)) for (_, x), (_, y) in zip(leaves, ref))
        orders = [[np.asarray(epoch_permutation(jax.random.key(cfg.seed), e, num_examples=600))
                   for e in (0, 1)] for cfg in cfgs]
        assert all(np.array_equal(o, p) for other in orders[1:] for o, p in zip(other, orders[0]))
    # and the seed does matter: another seed gives other weights and another order
    cfg = TrainConfig(**variant_spec(s, s.variant(names[0]), preset, 0)).resolved()
    w0 = jax.tree_util.tree_leaves(model_init_fn(model_config_for(cfg, 10, 1))(0)[0])
    w1 = jax.tree_util.tree_leaves(model_init_fn(model_config_for(cfg, 10, 1))(1)[0])
    assert not all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(w0, w1))
    assert not np.array_equal(np.asarray(epoch_permutation(jax.random.key(0), 0, num_examples=600)),
                              np.asarray(epoch_permutation(jax.random.key(1), 0, num_examples=600)))


def test_late_drop_note_flags_runs_that_end_far_below_their_best():
    def run(seed, accs):
        metrics = [{"step": 100 * (i + 1), "test_accuracy": a} for i, a in enumerate(accs)]
        return SeedRun(seed, Path(f"r{seed}"), {}, metrics, {"final_test_accuracy": accs[-1]})
    steady = _variant("fig6b", "bottleneck", [run(0, [0.7, 0.8, 0.81]), run(1, [0.7, 0.82, 0.80])])
    assert report.late_drop_note([steady]) == ("Every run ends within 3 points of its best evaluation "
                                               "(largest drop 2.00 points: Shortcut between bottlenecks, "
                                               "seed 1).\n")
    collapsed = _variant("fig6b", "none", [run(0, [0.6, 0.73, 0.49])])
    note = report.late_drop_note([steady, collapsed])
    assert note.startswith("Runs that end more than 3 points below") and "No residual seed 0 (−24.00)" in note
