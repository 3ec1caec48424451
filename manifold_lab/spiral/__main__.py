"""``python -m manifold_lab.spiral``: run the spiral experiment and write figures + metrics.
``--matrix positive-mean`` runs it with the negative control's law of T (see :mod:`.theory`).

Every argument is validated before anything is computed or written; a bad one exits with code 2 and a
one-line message."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from manifold_lab.cli import ArgumentParser, UsageError, command_name, integer, run_main

PROG = command_name("spiral", "manifold_lab.spiral")


def check_out_dir(path: str) -> Path:
    """Check, without creating anything, that ``path`` is or can become a writable directory."""
    out = Path(path)
    probe = out
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise UsageError(f"cannot create output directory {path!r}: {str(probe)!r} is not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UsageError(f"output directory {path!r} is not writable")
    return out


def build_parser() -> ArgumentParser:
    """The command-line parser (defaults are the paper's Fig. 1 panels)."""
    from manifold_lab.spiral.experiment import DEFAULT_DIMS
    from manifold_lab.spiral.kernel import ACTIVATIONS
    from manifold_lab.spiral.manifolds import MANIFOLDS
    from manifold_lab.spiral.theory import MATRIX_LAWS

    p = ArgumentParser(prog=PROG, description=(
        "ReLU on low-dimensional manifolds (MobileNetV2 Fig. 1, Appendix A Theorem 1). A point counts as "
        "collapsed when fewer than d units of ReLU(T x) are active: the map loses rank on the point's "
        "d-dimensional neighbourhood (Theorem 1's quantity; a collapsed point of a 1-D curve may still "
        "keep its tangent). See --matrix for the negative control."))
    experiment = p.add_argument_group("experiment")
    experiment.add_argument("--dims", type=integer, nargs="+", default=list(DEFAULT_DIMS),
                            help="expansion widths n")
    experiment.add_argument("--points", type=integer, default=2000, help="points on the manifold")
    experiment.add_argument("--trials", type=integer, default=1000, help="independent draws of T per n")
    experiment.add_argument("--seed", type=integer, default=0, help="random seed")
    experiment.add_argument("--activation", choices=ACTIVATIONS, default="relu",
                            help="the non-linearity after T (linear: the control that loses nothing)")
    experiment.add_argument("--manifold", choices=MANIFOLDS, default="spiral",
                            help="the input manifold: spiral (a curve in the plane) or a surface in 3-D "
                                 "(swiss_roll, s_curve)")
    experiment.add_argument("--matrix", choices=tuple(MATRIX_LAWS), default="gaussian",
                            help="law of T: gaussian, i.i.d. N(0, 1) entries (sign-symmetric: Theorem 1 "
                                 "applies), or positive-mean, i.i.d. N(1, 1) entries (negative control: the "
                                 "sign symmetry Theorem 1 assumes is broken and the measurement departs "
                                 "from its formula)")
    p.add_argument_group("output").add_argument("--out", default="figures", help="output directory")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Parse, validate, run, write ``spiral.png``, ``spiral_theorem.png``, ``spiral_metrics.json``."""
    from manifold_lab.spiral.experiment import format_table, run_experiment, validate, write_outputs

    args = build_parser().parse_args(argv)
    try:
        validate(args.dims, args.points, args.trials, args.seed, args.activation, args.manifold, args.matrix)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    check_out_dir(args.out)
    result = run_experiment(args.dims, args.points, args.trials, args.seed, args.activation, args.manifold,
                            args.matrix)
    try:
        paths = write_outputs(result, args.out)
    except OSError as exc:
        raise UsageError(f"cannot write to {args.out!r}: {exc.strerror or exc}") from None
    print(format_table(result.metrics))
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main(main, prog=PROG))
