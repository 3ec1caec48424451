"""Spiral experiment: Theorem 1, the positive-mean negative control, NumPy oracle, determinism, CLI errors,
figures, report section."""

from __future__ import annotations

import ast
import inspect
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from ablations import report, stats
from manifold_lab.cli import run_main
from manifold_lab.spiral import plotting, run_experiment, validate, write_outputs
from manifold_lab.spiral.__main__ import PROG, main
from manifold_lab.spiral.kernel import collapsed_per_trial, draw_matrices, per_trial_metrics
from manifold_lab.spiral.manifolds import make_manifold
from manifold_lab.spiral.plotting import plot_panels, plot_theorem
from manifold_lab.spiral.reference import reference_metrics
from manifold_lab.spiral.theory import CONTROL_MEAN, expected_collapsed_fraction, p_active, theorem1

POINTS, TRIALS = 120, 400
RESULT_KEYS = {"dim", "collapsed_fraction", "collapsed_fraction_ci95", "theory_collapsed_fraction",
               "law_collapsed_fraction", "naive_error", "activeset_error", "trustworthiness"}


# every JAX call below uses POINTS points, TRIALS trials and n_max = 32 so that it reuses one
# compilation per (d, activation)


@pytest.fixture(scope="module")
def spiral_relu():
    return run_experiment([1, 2, 3, 4, 6, 30], points=POINTS, trials=TRIALS, seed=0)


@pytest.fixture(scope="module")
def swiss_roll_relu():
    return run_experiment([2, 3, 4, 6], points=POINTS, trials=TRIALS, seed=1, manifold="swiss_roll")


def test_theorem1_closed_form():
    assert theorem1(1, 2) == 1.0
    assert theorem1(2, 2) == 0.75
    assert theorem1(5, 2) == 6 / 32
    assert theorem1(5, 3) == 16 / 32
    assert theorem1(30, 2) == pytest.approx(31 / 2**30)


def test_theorem1_inside_reported_ci_d2(spiral_relu):
    for r in spiral_relu.metrics["results"]:
        lo, hi = r["collapsed_fraction_ci95"]
        assert r["theory_collapsed_fraction"] == pytest.approx(theorem1(r["dim"], 2), rel=1e-5)
        if r["dim"] <= 6:
            assert lo <= r["theory_collapsed_fraction"] <= hi, r
            assert hi - lo < 0.1
    # the Theorem 1 sweep behind spiral_theorem.png: n = 1..10 inside the 95% interval
    th = spiral_relu.theorem
    inside = [lo <= t <= hi for (lo, hi), t in zip(th["ci95"][:10], th["theory"][:10])]
    assert sum(inside) >= 9 and inside[0]


def test_theorem1_inside_reported_ci_d3(swiss_roll_relu):
    s_curve = run_experiment([3, 5], points=POINTS, trials=TRIALS, seed=2, manifold="s_curve")
    assert swiss_roll_relu.metrics["input_dim"] == s_curve.metrics["input_dim"] == 3
    for r in swiss_roll_relu.metrics["results"] + s_curve.metrics["results"]:
        lo, hi = r["collapsed_fraction_ci95"]
        assert r["theory_collapsed_fraction"] == pytest.approx(theorem1(r["dim"], 3), rel=1e-5)
        assert lo <= r["theory_collapsed_fraction"] <= hi, r


def test_linear_control_has_no_collapse_and_no_error():
    x, _ = make_manifold("s_curve", POINTS)
    m = per_trial_metrics(x, 0, TRIALS, 32, "linear")
    assert np.all(m[:2, 0] == 1.0)                  # n < d = 3: the whole input loses rank
    assert np.all(m[2:, 0] == 0.0)
    assert np.abs(m[2:, 1:]).max() < 1e-5           # n >= d: T^+ T x = x (round-off; T can be
    assert np.median(m[2:, 1:]) < 1e-12             # ill-conditioned at n = d)
    result = run_experiment([2, 5], points=POINTS, trials=TRIALS, activation="linear", manifold="s_curve")
    low, r = result.metrics["results"]
    assert low["collapsed_fraction"] == low["theory_collapsed_fraction"] == 1
    assert r["collapsed_fraction"] == 0 and r["theory_collapsed_fraction"] == 0
    assert r["naive_error"] < 1e-6 and r["activeset_error"] < 1e-6 and r["trustworthiness"] == 1.0


def test_activeset_error_vanishes_where_rank_is_d(spiral_relu):
    by_dim = {r["dim"]: r for r in spiral_relu.metrics["results"]}
    assert by_dim[30]["collapsed_fraction_ci95"] == [0.0, 0.0]
    assert by_dim[30]["activeset_error"] < 1e-9
    assert by_dim[30]["naive_error"] > 0.3          # the naive pseudo-inverse does not undo the ReLU
    # where some points collapse, the error comes from them only: it is below the collapsed fraction
    # (a collapsed point's active-set error is at most 1: projection onto a subspace)
    for n in (2, 3, 4, 6):
        assert 0 < by_dim[n]["activeset_error"] <= by_dim[n]["collapsed_fraction"]


@pytest.mark.parametrize("manifold,activation", [("spiral", "relu"), ("spiral", "relu6"),
                                                 ("s_curve", "relu")])
def test_vectorised_metrics_match_numpy_loop(manifold, activation):
    x, _ = make_manifold(manifold, POINTS)
    d = x.shape[1]
    trials, n_max = 3, 7
    fast = per_trial_metrics(x, 3, TRIALS, 32, activation)[:n_max, :, :trials]
    slow = reference_metrics(x, np.asarray(draw_matrices(3, trials, n_max, d)), range(1, n_max + 1),
                             activation)
    np.testing.assert_allclose(fast, slow, rtol=1e-9, atol=1e-12)


def test_relu6_counts_saturated_units_as_inactive():
    x, _ = make_manifold("spiral", POINTS)
    x = 100 * x                                     # |Tx| mostly beyond 6
    m = per_trial_metrics(x, 0, TRIALS, 32, "relu6")
    r = reference_metrics(x, np.asarray(draw_matrices(0, 3, 4, 2)), range(1, 5), "relu6")
    np.testing.assert_allclose(m[:4, :, :3], r, rtol=1e-9, atol=1e-12)
    assert m[3, 0].mean() > theorem1(4, 2) + 0.2   # saturation collapses far more than ReLU would


def test_draws_do_not_depend_on_trials_or_width():
    a = np.asarray(draw_matrices(5, 3, 7, 2))       # the reference test's shape
    b = np.asarray(draw_matrices(5, TRIALS, 32, 2))
    np.testing.assert_array_equal(a, b[:3, :7])


def test_same_seed_gives_byte_identical_json(tmp_path):
    args = ["--dims", "2", "7", "--points", str(POINTS), "--trials", str(TRIALS), "--seed", "4"]
    for name in ("a", "b"):
        assert main(args + ["--out", str(tmp_path / name)]) == 0
    first = (tmp_path / "a" / "spiral_metrics.json").read_bytes()
    assert first == (tmp_path / "b" / "spiral_metrics.json").read_bytes()
    data = json.loads(first)
    assert set(data) == {"manifold", "input_dim", "points", "trials", "seed", "activation", "matrix", "results"}
    assert data["matrix"] == {"law": "gaussian", "entries": "i.i.d. N(0, 1)", "sign_symmetric": True,
                              "role": "Theorem 1 applies"}
    assert [r["dim"] for r in data["results"]] == [2, 7]
    assert all(set(r) == RESULT_KEYS for r in data["results"])
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [
        "spiral.png", "spiral_metrics.json", "spiral_theorem.png"]


BAD = [(["--dims", "0"], "dims"), (["--dims", "-3"], "dims"), (["--dims", "x"], "integer"),
       (["--points", "1"], "points"), (["--trials", "0"], "trials"), (["--manifold", "torus"], "manifold"),
       (["--activation", "gelu"], "activation"), (["--matrix", "uniform"], "matrix")]


@pytest.mark.parametrize("argv,word", BAD)
def test_bad_input_exits_2_with_one_line(tmp_path, capsys, argv, word):
    out = tmp_path / "out"
    assert run_main(main, argv + ["--out", str(out)], prog=PROG) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(PROG + ": error:") and word in err
    assert not out.exists()


def test_unwritable_out_exits_2_without_files(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert run_main(main, ["--points", "20", "--trials", "2", "--out", str(blocker / "sub")], prog=PROG) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a directory" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_command_line_error_has_no_traceback(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-m", "manifold_lab.spiral", "--dims", "x", "--out",
                           str(tmp_path / "o")], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert not (tmp_path / "o").exists()


def test_figures_have_the_paper_panels(spiral_relu, tmp_path):
    fig = plot_panels(spiral_relu.x, spiral_relu.position, spiral_relu.back_projections, spiral_relu.metrics)
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == ["Input"] + [f"Output/dim={n}" for n in (1, 2, 3, 4, 6, 30)]
    assert all(len(ax.collections) == 1 for ax in fig.axes)
    colours = fig.axes[0].collections[0].get_array()
    np.testing.assert_allclose(colours, spiral_relu.position)   # coloured by position along the spiral
    theorem = plot_theorem(spiral_relu.theorem, spiral_relu.metrics)
    assert len(theorem.axes) == 2 and theorem.axes[1].get_yscale() == "log"
    xs = theorem.axes[0].lines[0].get_xdata()
    np.testing.assert_array_equal(xs, np.arange(1, 33))
    paths = write_outputs(spiral_relu, tmp_path, figure_name="f.png", theorem_name="t.png")
    assert [p.name for p in paths] == ["f.png", "t.png", "spiral_metrics.json"]
    assert all(p.stat().st_size > 1000 for p in paths[:2])


def test_three_dimensional_manifold_panels(swiss_roll_relu):
    r = swiss_roll_relu
    fig = plot_panels(r.x, r.position, r.back_projections, r.metrics)
    assert [ax.name for ax in fig.axes] == ["3d"] * 5
    assert [ax.get_title() for ax in fig.axes] == ["Input"] + [f"Output/dim={n}" for n in (2, 3, 4, 6)]


def test_spiral_is_centred_archimedean():
    x, position = make_manifold("spiral", 500)
    radius = np.linalg.norm(x, axis=1)
    angle = np.unwrap(np.arctan2(x[:, 1], x[:, 0]))
    np.testing.assert_allclose(radius, angle / angle[-1], rtol=1e-5)   # r proportional to theta
    assert radius.max() == pytest.approx(1.0) and radius.min() > 0.1
    assert (angle[-1] - angle[0]) / (2 * np.pi) == pytest.approx(2.5)  # from half a turn to 3 turns
    assert np.all(np.diff(position) > 0) and position[0] == 0 and position[-1] == 1
    step = np.linalg.norm(np.diff(x, axis=0), axis=1)
    assert step.max() / step.min() < 1.5                                # ~equal arc-length spacing


# ----------------------------------------------------------------- negative control: positive-mean T


def _null_bound(p: float, trials: int, points: int = POINTS) -> float:
    """How far a mean over draws may stray from an expected fraction p by sampling alone (95%; a
    draw's fraction has variance <= p (1 - p) however the points correlate), plus one point in one draw."""
    return 1.96 * math.sqrt(p * (1.0 - p) / trials) + 1.0 / (points * trials)


@pytest.mark.parametrize("fixture,dims", [("spiral_relu", (5, 8, 15, 30)), ("swiss_roll_relu", (3, 8, 15))])
def test_control_departs_from_theorem1(request, fixture, dims):
    th = request.getfixturevalue(fixture).theorem
    assert th["control_law"] == "i.i.d. N(1, 1)"
    for n in dims:
        i = n - 1
        control, formula = th["control_mean"][i], th["theory"][i]
        lo, hi = th["control_ci95"][i]
        standard_error = (hi - lo) / (2 * 1.96)
        assert abs(control - formula) > max(10 * standard_error, _null_bound(formula, TRIALS)), n
        # ... while it follows its own law's exact expectation
        assert abs(control - th["control_theory"][i]) <= 3.5 * standard_error, n
        # and the Gaussian measurement of the same sweep still matches the formula
        assert abs(th["mean"][i] - formula) <= _null_bound(formula, TRIALS), n
    assert th["control_mean"][0] == th["theory"][0] == 1.0  # n = 1 < d: every point collapses either way


def test_control_at_small_size_departs_by_many_sampling_errors():
    x, _ = make_manifold("spiral", 300)
    trials = 64
    control = collapsed_per_trial(x, 7, trials, 16, "relu", CONTROL_MEAN)
    gaussian = collapsed_per_trial(x, 7, trials, 16, "relu", 0.0)
    for n in (5, 10, 15):
        formula, bound = theorem1(n, 2), _null_bound(theorem1(n, 2), trials, 300)
        standard_error = control[n - 1].std(ddof=1) / math.sqrt(trials)
        assert abs(control[n - 1].mean() - formula) > max(10 * standard_error, bound), n
        assert abs(gaussian[n - 1].mean() - formula) <= bound, n


def test_control_law_expectation():
    x, _ = make_manifold("spiral", POINTS)
    np.testing.assert_allclose(p_active(x, "relu"), 0.5)
    p = p_active(x, "relu", CONTROL_MEAN)
    assert p.min() < 0.1 and p.max() > 0.9              # direction-dependent: Phi(+-sqrt(2)) at the extremes
    assert expected_collapsed_fraction(2, 2, "relu", x, CONTROL_MEAN) < theorem1(2, 2)   # below at n = d
    assert expected_collapsed_fraction(3, 2, "relu", x, CONTROL_MEAN) == pytest.approx(0.5, abs=0.05)
    for n in (5, 15, 30):                                                               # far above for n > 2d - 1
        assert expected_collapsed_fraction(n, 2, "relu", x, CONTROL_MEAN) > 2 * theorem1(n, 2) + 0.02


@pytest.mark.parametrize("activation,mean", [("relu", 0.0), ("relu", CONTROL_MEAN), ("relu6", CONTROL_MEAN)])
def test_collapse_only_pass_matches_full_sweep(activation, mean):
    x, _ = make_manifold("spiral", POINTS)
    full = per_trial_metrics(x, 3, TRIALS, 32, activation, mean)[:, 0]
    np.testing.assert_array_equal(collapsed_per_trial(x, 3, TRIALS, 32, activation, mean), full)


def test_control_run_from_the_command_line(tmp_path, capsys):
    args = ["--dims", "2", "15", "--points", str(POINTS), "--trials", str(TRIALS), "--matrix", "positive-mean"]
    assert main(args + ["--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("NEGATIVE CONTROL") and "T entries i.i.d. N(1, 1)" in out and "this law" in out
    data = json.loads((tmp_path / "spiral_metrics.json").read_text())
    assert data["matrix"]["law"] == "positive-mean" and data["matrix"]["sign_symmetric"] is False
    assert "negative control" in data["matrix"]["role"]
    r15 = data["results"][1]
    assert set(r15) == RESULT_KEYS
    assert r15["theory_collapsed_fraction"] == pytest.approx(theorem1(15, 2), rel=1e-5)
    lo, hi = r15["collapsed_fraction_ci95"]
    assert lo > 50 * r15["theory_collapsed_fraction"]                  # far from Theorem 1 ...
    assert lo <= r15["law_collapsed_fraction"] <= hi                  # ... at its own law's expectation
    with pytest.raises(ValueError, match="matrix"):
        validate([2], POINTS, TRIALS, 0, "relu", "spiral", "uniform")


def test_theorem_figure_shows_the_control(spiral_relu):
    fig = plot_theorem(spiral_relu.theorem, spiral_relu.metrics)
    for ax in fig.axes:
        labels = [t.get_text() for t in ax.get_legend().get_texts()]
        assert "positive-mean T (control: sign symmetry broken)" in labels
        assert any(label.startswith("Theorem 1") for label in labels)
        assert any(label.startswith("N(0, 1) T, measured") for label in labels)


def test_plotting_does_not_import_the_experiment():
    tree = ast.parse(inspect.getsource(plotting))
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    imported |= {a.name for node in ast.walk(tree) if isinstance(node, ast.Import) for a in node.names}
    assert not any(name.startswith("manifold_lab") for name in imported), imported


def test_report_has_the_control_row(spiral_relu):
    section = report.spiral_section(spiral_relu.metrics, spiral_relu.theorem, "f.png", "t.png")
    rows = [line for line in section.body.splitlines() if line.startswith("| negative control")]
    assert len(rows) == 1 and rows[0].count(" | ") == 2 and rows[0].endswith(f"**{stats.REPRODUCED}** |")
    assert "sign symmetry broken → the formula no longer holds" in rows[0] and "N(1, 1)" in rows[0]
    verdicts = dict(section.verdicts)
    assert verdicts["Theorem 1: expected collapsed fraction"] == stats.REPRODUCED
    claim = next(c for c in verdicts if "positive-mean control" in c)
    assert verdicts[claim] == stats.REPRODUCED
    # a control that followed the formula would mean the condition did not matter: contradicted
    same = dict(spiral_relu.theorem, control_mean=spiral_relu.theorem["theory"])
    assert dict(report.spiral_section(spiral_relu.metrics, same, "f", "t").verdicts)[claim] == stats.CONTRADICTED
    without = {k: v for k, v in spiral_relu.theorem.items() if not k.startswith("control")}
    assert dict(report.spiral_section(spiral_relu.metrics, without, "f", "t").verdicts)[claim] == stats.NOT_RESOLVED
