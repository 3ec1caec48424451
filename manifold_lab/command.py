"""``manifold-lab``: one command for the toolkit, a subcommand per task.

Each subcommand hands its arguments to the ``main(argv)`` of the module that implements it, so
``manifold-lab train ...`` and ``python -m manifold_lab.train ...`` are the same program with the
same flags (``manifold-lab SUBCOMMAND --help`` lists them). Errors are one line on stderr with exit
code 2; Ctrl-C exits 130 and SIGTERM 143 (a training step in flight finishes and is checkpointed
first); a closed output pipe ends quietly (:func:`manifold_lab.cli.run_main`).
"""

from __future__ import annotations

import dataclasses
import importlib
import sys
from collections.abc import Callable, Sequence

from manifold_lab.cli import UsageError, run_main

PROG = "manifold-lab"


@dataclasses.dataclass(frozen=True)
class Subcommand:
    """A subcommand: the module whose ``main(argv)`` runs it, one line of help, and whether it
    re-executes once under the allocator before JAX starts (the long-running trainers, as their
    ``python -m`` forms do; :mod:`manifold_lab.allocator`)."""

    module: str
    summary: str
    allocator: bool = False


#: The subcommands, in the order ``--help`` lists them.
SUBCOMMANDS: dict[str, Subcommand] = {
    "spiral": Subcommand("manifold_lab.spiral.__main__",
                         "the spiral experiment of Fig. 1 and Theorem 1 (figures and metrics)"),
    "train": Subcommand("manifold_lab.train.__main__", "train MobileNetV2 (or V1) with the paper's recipe",
                        allocator=True),
    "evaluate": Subcommand("manifold_lab.evaluate",
                           "test accuracy, loss and top-5 of a run directory at any kept checkpoint"),
    "predict": Subcommand("manifold_lab.predict", "class probabilities of image files with a trained run"),
    "sweep": Subcommand("ablations.run", "train an ablation study's runs (python -m ablations.run)",
                        allocator=True),
    "measure": Subcommand("ablations.measure", "measure a finished sweep: spiral, Fig. 7, costs, latency"),
    "figures": Subcommand("ablations.figures", "render a sweep's figures, tables.md and REPORT.md"),
    "audit": Subcommand("ablations.audit", "Appendix A inside one trained network: rank, decoders, clipping"),
    "costs": Subcommand("manifold_lab.costs.__main__", "parameters, multiply-adds and the paper's cost tables"),
}


def help_text() -> str:
    """``manifold-lab --help``: usage and one line per subcommand."""
    width = max(map(len, SUBCOMMANDS))
    lines = [f"usage: {PROG} [--help] [--version] SUBCOMMAND [ARGS...]", "",
             "The MobileNetV2 paper's manifold/ReLU experiments and ablations, one subcommand per task.",
             "", "subcommands:"]
    lines += [f"  {name:<{width}}  {sub.summary}" for name, sub in SUBCOMMANDS.items()]
    lines += ["", f"{PROG} SUBCOMMAND --help lists the subcommand's options, grouped, with their defaults."]
    return "\n".join(lines)


def version() -> str:
    """The installed package version (``manifold_lab.__version__``)."""
    from manifold_lab import __version__
    return __version__


def subcommand_main(name: str) -> Callable[[Sequence[str] | None], int | None]:
    """The ``main(argv)`` of subcommand ``name`` (UsageError naming the valid ones if unknown)."""
    if name not in SUBCOMMANDS:
        raise UsageError(f"unknown subcommand {name!r}; choose from {', '.join(SUBCOMMANDS)}")
    return importlib.import_module(SUBCOMMANDS[name].module).main


def main(argv: Sequence[str] | None = None) -> int:
    """Dispatch ``argv`` (default: the process's arguments) to a subcommand; returns its exit code.
    The subcommand's errors are reported as ``manifold-lab NAME: error: ...`` (exit code 2)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args:
        raise UsageError(f"missing subcommand; choose from {', '.join(SUBCOMMANDS)} (or --help)")
    first, rest = args[0], args[1:]
    if first in ("-h", "--help"):
        print(help_text())
        return 0
    if first == "--version":
        print(f"{PROG} {version()}")
        return 0
    if first.startswith("-"):
        raise UsageError(f"unknown option {first!r}; a subcommand comes first ({', '.join(SUBCOMMANDS)})")
    return run_main(subcommand_main(first), rest, prog=f"{PROG} {first}")


def entry() -> None:
    """The console script: re-execute under the allocator where the subcommand's ``python -m`` form
    does, then run :func:`main` and exit with its code."""
    name = sys.argv[1] if len(sys.argv) > 1 else ""
    if name in SUBCOMMANDS and SUBCOMMANDS[name].allocator:
        from manifold_lab.allocator import reexec_with_allocator
        reexec_with_allocator()  # jemalloc or huge pages under XLA's buffers (manifold_lab/allocator.py)
    raise SystemExit(run_main(main, prog=PROG))


if __name__ == "__main__":
    entry()
