"""Benchmark: the 3x3 depthwise convolution of MobileNetV2 in its three forms, ``xla`` (grouped
convolution), ``shift`` (nine shifted multiply-adds with a hand-written backward pass) and
``native`` (the C++ kernels of :mod:`manifold_lab.native`, CPU only), forward and forward+backward,
on the default JAX backend.

Each time is the median of ``--repeats`` calls after a compiling warm-up, with the min-max spread.
Ratios compare forms measured in the same run (above 1: the second form named is faster). All
forms are checked to agree before timing. The script re-executes itself under the project's
allocator (:mod:`manifold_lab.allocator`), as the training entry points do.

    .venv/bin/python benchmarks/depthwise.py [--batch 32 --repeats 7 --forms xla,shift,native]
"""

from __future__ import annotations

import os

from manifold_lab.allocator import reexec_with_allocator

reexec_with_allocator()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from collections.abc import Sequence  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from timing import Timing, time_calls  # noqa: E402
from manifold_lab.cli import ArgumentParser, UsageError, positive_int, run_main  # noqa: E402
from manifold_lab.models.depthwise import DEPTHWISE_FORMS, depthwise_conv, resolve_impl  # noqa: E402
from manifold_lab.models.geometry import output_size  # noqa: E402

#: (spatial size, channels, stride) of depthwise layers of the 224 px network.
SHAPES: tuple[tuple[int, int, int], ...] = (
    (112, 32, 1), (112, 96, 2), (56, 144, 1), (56, 144, 2), (28, 192, 1), (28, 192, 2), (14, 384, 1),
    (7, 960, 1),
)




def _fmt(t: Timing) -> str:
    med, lo, hi = (1e3 * v for v in t)
    return f"{med:.2f} ({lo:.2f}-{hi:.2f})"


def main(argv: Sequence[str] | None = None) -> int:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=positive_int, default=32)
    parser.add_argument("--repeats", type=positive_int, default=7)
    parser.add_argument("--forms", default=",".join(DEPTHWISE_FORMS),
                        help=f"comma-separated subset of {','.join(DEPTHWISE_FORMS)}")
    args = parser.parse_args(argv)
    forms = [f for f in args.forms.split(",") if f]
    if not forms or any(f not in DEPTHWISE_FORMS for f in forms):
        raise UsageError(f"--forms must be a comma-separated subset of {','.join(DEPTHWISE_FORMS)}, got {args.forms!r}")
    for form in forms:
        try:
            resolve_impl(form)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    pairs = [(a, b) for a, b in (("xla", "shift"), ("xla", "native"), ("shift", "native")) if a in forms and b in forms]

    print(f"backend {jax.default_backend()}, {jax.devices()[0].device_kind}, JAX {jax.__version__}, "
          f"batch {args.batch}; ms, median (min-max) of {args.repeats}")
    head = ([f"fwd {f}" for f in forms] + [f"fwd {b} vs {a}" for a, b in pairs]
            + [f"fwd+bwd {f}" for f in forms] + [f"fwd+bwd {b} vs {a}" for a, b in pairs])
    print("| input (HxWxC, stride) | " + " | ".join(head) + " |")
    print("|---" * (len(head) + 1) + "|")
    for size, channels, stride in SHAPES:
        kx, kk, kg = jax.random.split(jax.random.key(0), 3)
        x = jax.random.normal(kx, (args.batch, size, size, channels))
        kernel = jax.random.normal(kk, (3, 3, 1, channels)) / 3.0
        out = output_size(size, 3, stride, "same")
        cot = jax.random.normal(kg, (args.batch, out, out, channels))
        fwd = {f: jax.jit(lambda x, k, f=f: depthwise_conv(x, k, stride=stride, impl=f)) for f in forms}
        bwd = {f: jax.jit(jax.grad(lambda x, k, c, f=f: jnp.vdot(depthwise_conv(x, k, stride=stride, impl=f), c),
                                   argnums=(0, 1))) for f in forms}
        ref = [fwd[forms[0]](x, kernel), *bwd[forms[0]](x, kernel, cot)]
        for f in forms[1:]:
            got = [fwd[f](x, kernel), *bwd[f](x, kernel, cot)]
            err = max(float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(a))) for a, b in zip(ref, got))
            if err > 1e-4:
                raise RuntimeError(f"{forms[0]} and {f} disagree by {err:.2e} (relative) at {size}x{size}x{channels}")
        tf = {f: time_calls(lambda f=f: fwd[f](x, kernel), args.repeats) for f in forms}
        tb = {f: time_calls(lambda f=f: bwd[f](x, kernel, cot), args.repeats) for f in forms}
        cells = ([_fmt(tf[f]) for f in forms] + [f"{tf[a][0] / tf[b][0]:.1f}x" for a, b in pairs]
                 + [_fmt(tb[f]) for f in forms] + [f"{tb[a][0] / tb[b][0]:.1f}x" for a, b in pairs])
        print(f"| {size}x{size}x{channels}, s{stride} | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main(main, prog="benchmarks/depthwise.py"))
