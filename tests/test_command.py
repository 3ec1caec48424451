"""The ``manifold-lab`` command: subcommands, help, version, errors, and ``import manifold_lab``."""

from __future__ import annotations

import argparse
import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

import manifold_lab
from manifold_lab.cli import command_name, run_main
from manifold_lab.command import SUBCOMMANDS, entry, help_text, main

REPO = Path(__file__).resolve().parents[1]


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = run_main(main, argv, prog="manifold-lab")
    out = capsys.readouterr()
    return code, out.out, out.err


def test_help_lists_every_subcommand_with_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(["--help"], capsys)
    assert code == 0 and out.strip() == help_text()
    assert list(SUBCOMMANDS) == ["spiral", "train", "evaluate", "predict", "sweep", "measure", "figures", "audit",
                                 "costs"]
    for name, sub in SUBCOMMANDS.items():
        assert f"  {name:<8}  {sub.summary}" in out.splitlines()


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert _run(["--version"], capsys)[:2] == (0, f"manifold-lab {manifold_lab.__version__}\n")


@pytest.mark.parametrize("argv, message", [
    ([], "missing subcommand"),
    (["bogus"], "unknown subcommand 'bogus'; choose from spiral, train"),
    (["--bogus"], "unknown option '--bogus'"),
])
def test_usage_errors_are_one_line(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _run(argv, capsys)
    assert code == 2 and out == "" and err.count("\n") == 1
    assert err.startswith("manifold-lab: error: ") and message in err


def test_subcommands_delegate_to_the_module_mains(capsys: pytest.CaptureFixture[str]) -> None:
    from manifold_lab.costs.__main__ import main as costs_main
    code, out, _ = _run(["costs", "--width", "0.35", "--image-size", "96", "--json"], capsys)
    assert code == 0
    assert costs_main(["--width", "0.35", "--resolution", "96", "--json"]) == 0  # the alias
    assert json.loads(out) == json.loads(capsys.readouterr().out)
    assert json.loads(out)["resolution"] == 96
    for name, sub in SUBCOMMANDS.items():
        module = __import__(sub.module, fromlist=["main"])
        assert callable(module.main), name


def test_subcommand_errors_name_the_subcommand(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _run(["evaluate", str(tmp_path / "none")], capsys)
    assert code == 2 and err.startswith("manifold-lab evaluate: error: no run config at")
    code, _, err = _run(["costs", "--image-size", "0"], capsys)
    assert code == 2 and err.count("\n") == 1 and err.startswith("manifold-lab costs: error:")
    with pytest.raises(SystemExit) as exc:  # argparse's --help exits 0 after printing
        main(["train", "--help"])
    assert exc.value.code == 0 and "--eval-bn" in capsys.readouterr().out


@pytest.mark.parametrize("name", list(SUBCOMMANDS))
def test_every_subcommand_has_grouped_help_with_its_defaults(name: str) -> None:
    """Options sit in named groups, and every option with a default states it in its help."""
    parser = importlib.import_module(SUBCOMMANDS[name].module).build_parser()
    groups = [g for g in parser._action_groups
              if g._group_actions and g.title not in ("options", "positional arguments")]
    assert groups, f"{name}: no option groups"
    formatter = parser._get_formatter()
    for action in parser._actions:
        if not action.option_strings or action.help is argparse.SUPPRESS or action.dest == "help":
            continue
        assert action.help, f"{name} {action.option_strings[0]}: no help"
        if action.nargs != 0 and action.default not in (None, False, [], argparse.SUPPRESS):
            assert "default" in formatter._expand_help(action), f"{name} {action.option_strings[0]}"


def test_usage_lines_name_the_command_that_ran(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["/venv/bin/manifold-lab", "sweep"])
    assert command_name("sweep", "ablations.run") == "manifold-lab sweep"
    monkeypatch.setattr(sys, "argv", [str(REPO / "manifold_lab" / "__main__.py"), "sweep"])
    assert command_name("sweep", "ablations.run") == "manifold-lab sweep"
    monkeypatch.setattr(sys, "argv", [str(REPO / "ablations" / "run.py")])
    assert command_name("sweep", "ablations.run") == "python -m ablations.run"


def test_console_script_and_python_dash_m(tmp_path: Path) -> None:
    """``python -m manifold_lab`` (the console script's ``entry``): version, and a closed pipe."""
    version = subprocess.run([sys.executable, "-m", "manifold_lab", "--version"], capture_output=True,
                             text=True, cwd=REPO)
    assert version.returncode == 0 and version.stdout == f"manifold-lab {manifold_lab.__version__}\n"
    script = Path(sys.executable).parent / "manifold-lab"
    if script.exists():  # installed with pip install -e .
        out = subprocess.run([str(script), "--help"], capture_output=True, text=True)
        assert out.returncode == 0 and out.stdout.strip() == help_text()
        out = subprocess.run([str(script), "figures", "--help"], capture_output=True, text=True)
        assert out.returncode == 0 and out.stdout.startswith("usage: manifold-lab figures [-h]")
    piped = subprocess.run(f"{sys.executable} -m manifold_lab costs --table slim | head -1", shell=True,
                           capture_output=True, text=True, cwd=REPO)
    assert piped.stderr == "" and len(piped.stdout.splitlines()) == 1
    assert entry.__doc__


def test_import_manifold_lab_is_light_and_lazy() -> None:
    code = ("import sys, manifold_lab as ml\n"
            "assert 'jax' not in sys.modules\n"
            "ml.TrainConfig; ml.__version__\n"
            "assert 'jax' not in sys.modules\n"
            "from manifold_lab.evaluate import evaluate\n"
            "assert callable(ml.evaluate) and callable(ml.predict)\n"
            "assert ml.evaluate.evaluate is evaluate\n"
            "assert ml.train.train is ml.train.loop.train\n"
            "for name in ('build_model', 'model_config', 'restore_model', 'load_predictor', 'train_seeds'):\n"
            "    assert callable(getattr(ml, name)), name\n"
            "print(sorted(set(ml.__all__) - set(dir(ml))))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
