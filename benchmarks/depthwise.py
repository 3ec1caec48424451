"""Benchmark: the 3x3 depthwise convolution of MobileNetV2, ``xla`` (grouped convolution) vs
``shift`` (nine shifted multiply-adds with a hand-written backward pass), forward and
forward+backward, on the default JAX backend.

For comparison the forward+backward column also times JAX's automatic differentiation of the
shift form (what ``shift`` would cost without its hand-written VJP). Each time is the median of
``--repeats`` calls after a compiling warm-up, with the min-max spread; ratios are xla / shift
(above 1: shift is faster). Both forms are checked to agree before timing.

    .venv/bin/python benchmarks/depthwise.py [--batch 32 --repeats 7]
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Sequence

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from manifold_lab.cli import ArgumentParser, positive_int, run_main  # noqa: E402
from manifold_lab.models.depthwise import _taps_sum, depthwise_conv  # noqa: E402
from manifold_lab.models.layers import output_size, pad_amounts  # noqa: E402

#: (spatial size, channels, stride) of depthwise layers of the 224 px network.
SHAPES: tuple[tuple[int, int, int], ...] = (
    (112, 96, 2), (56, 144, 1), (56, 144, 2), (28, 192, 1), (28, 192, 2), (14, 384, 1), (7, 960, 1),
)


def _autodiff_shift(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
    """The shift form without the custom VJP (JAX differentiates the slices)."""
    pads = [pad_amounts(n, 3, stride, "same") for n in x.shape[1:3]]
    xp = jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
    out = [output_size(n, 3, stride, "same") for n in x.shape[1:3]]
    return _taps_sum(xp, kernel[:, :, 0, :], stride, out[0], out[1])


def _time(fn: Callable[[], object], repeats: int) -> tuple[float, float, float]:
    """(median, min, max) seconds of ``repeats`` calls after one warm-up."""
    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times), min(times), max(times)


def _fmt(t: tuple[float, float, float]) -> str:
    med, lo, hi = (1e3 * v for v in t)
    return f"{med:.2f} ({lo:.2f}-{hi:.2f})"


def main(argv: Sequence[str] | None = None) -> int:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=positive_int, default=32)
    parser.add_argument("--repeats", type=positive_int, default=7)
    args = parser.parse_args(argv)

    print(f"backend {jax.default_backend()}, {jax.devices()[0].device_kind}, JAX {jax.__version__}, "
          f"batch {args.batch}; ms, median (min-max) of {args.repeats}")
    print("| input (HxWxC, stride) | fwd xla | fwd shift | fwd ratio | fwd+bwd xla | fwd+bwd shift "
          "| fwd+bwd ratio | fwd+bwd shift autodiff |")
    print("|---|---|---|---|---|---|---|---|")
    for size, channels, stride in SHAPES:
        kx, kk, kg = jax.random.split(jax.random.key(0), 3)
        x = jax.random.normal(kx, (args.batch, size, size, channels))
        kernel = jax.random.normal(kk, (3, 3, 1, channels)) / 3.0
        out = output_size(size, 3, stride, "same")
        cot = jax.random.normal(kg, (args.batch, out, out, channels))

        def forward(impl: str) -> Callable:
            return jax.jit(lambda x, k: depthwise_conv(x, k, stride=stride, impl=impl))

        def fwd_bwd(fn: Callable) -> Callable:
            grad = jax.jit(jax.grad(lambda x, k, c: jnp.vdot(fn(x, k), c), argnums=(0, 1)))
            return lambda x, k: grad(x, k, cot)

        fx, fs = forward("xla"), forward("shift")
        gx, gs = fwd_bwd(forward("xla")), fwd_bwd(forward("shift"))
        ga = fwd_bwd(lambda x, k: _autodiff_shift(x, k, stride))
        err = max(float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(a)))
                  for a, b in [(fx(x, kernel), fs(x, kernel)), *zip(gx(x, kernel), gs(x, kernel))])
        if err > 1e-4:
            raise RuntimeError(f"xla and shift disagree by {err:.2e} (relative) at {size}x{size}x{channels}")
        t = {name: _time(lambda f=f: f(x, kernel), args.repeats)
             for name, f in [("fx", fx), ("fs", fs), ("gx", gx), ("gs", gs), ("ga", ga)]}
        print(f"| {size}x{size}x{channels}, s{stride} | {_fmt(t['fx'])} | {_fmt(t['fs'])} "
              f"| {t['fx'][0] / t['fs'][0]:.1f}x | {_fmt(t['gx'])} | {_fmt(t['gs'])} "
              f"| {t['gx'][0] / t['gs'][0]:.1f}x | {_fmt(t['ga'])} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main(main, prog="benchmarks/depthwise.py"))
