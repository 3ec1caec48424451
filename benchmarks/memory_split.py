"""Benchmark: Section 5 split evaluation of MobileNetV2 bottlenecks, k vs peak bytes vs time.

For a few blocks of the 224 px, width-1.0 network (random weights, eval mode, batch 1 by default),
evaluates the block with its expanded channels cut into k slices (``manifold_lab.models.memory_split``)
and reports XLA's compiled peak temporary bytes (``memory_analysis().temp_size_in_bytes``: buffers
other than the arguments and the output) and the wall time per call (median of repeats after a
warm-up call, with the min-max spread). ``plain`` is the model's own block (``InvertedResidual``)
for reference. Multiply-adds do not depend on k.

    .venv/bin/python benchmarks/memory_split.py [--blocks 1 2 7 14] [--batch 1] [--repeats 20]
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Sequence

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from manifold_lab.cli import ArgumentParser, positive_int, run_main  # noqa: E402
from manifold_lab.costs import model_costs  # noqa: E402
from manifold_lab.models import InvertedResidual, MobileNetV2Config  # noqa: E402
from manifold_lab.models.memory_split import split_apply, split_block  # noqa: E402

K_CANDIDATES = (1, 2, 3, 4, 5, 6, 8, 16)


def _time(fn, repeats: int) -> list[float]:
    jax.block_until_ready(fn())  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return times


def _row(label: str, compiled, args, repeats: int, base_bytes: int | None) -> tuple[str, int]:
    peak = int(compiled.memory_analysis().temp_size_in_bytes)
    times = _time(lambda: compiled(*args), repeats)
    ratio = "" if base_bytes is None else f"{peak / base_bytes:6.2f}"
    med = statistics.median(times) * 1e3
    return (f"{label:>7} {peak / 2**20:10.2f} {ratio:>7} {med:9.3f}  "
            f"[{min(times) * 1e3:.3f}, {max(times) * 1e3:.3f}]", peak)


def main(argv: Sequence[str] | None = None) -> int:
    parser = ArgumentParser(prog="benchmarks/memory_split.py", description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, nargs="+", default=[1, 2, 7, 14],
                        help="block indices of the 224 px network (0-16)")
    parser.add_argument("--batch", type=positive_int, default=1)
    parser.add_argument("--repeats", type=positive_int, default=20)
    args = parser.parse_args(argv)
    config = MobileNetV2Config(width=1.0)
    specs = config.blocks()
    if any(not 0 <= b < len(specs) for b in args.blocks):
        parser.error(f"--blocks must be in 0..{len(specs) - 1}")
    layers = {layer.name: layer for layer in model_costs(config, 224).layers}

    print(f"{platform.machine()} {platform.system()}, {os.cpu_count()} CPUs, JAX {jax.__version__} "
          f"({jax.default_backend()}), batch {args.batch}, float32, median of {args.repeats}")
    for index in args.blocks:
        spec = specs[index]
        first = layers[f"block{index:02d}/" + ("expansion" if spec.has_expansion else "depthwise")]
        h, w, _ = first.input_shape
        block = InvertedResidual(spec, config, expansion_shortcut=False, rngs=nnx.Rngs(index))
        x = jax.random.normal(jax.random.key(0), (args.batch, h, w, spec.in_channels), jnp.float32)
        expanded_mib = args.batch * h * w * spec.expanded_channels * 4 / 2**20
        print(f"\nblock {index}: {h}x{w}x{spec.in_channels} -> x{spec.expanded_channels} "
              f"(stride {spec.stride}) -> {spec.out_channels}; expanded tensor {expanded_mib:.2f} MiB")
        print(f"{'k':>7} {'peak MiB':>10} {'vs k=1':>7} {'ms/call':>9}  [min, max]")
        graphdef, state = nnx.split(block)
        plain = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x, None, False)[0]).lower(state, x).compile()
        line, _ = _row("plain", plain, (state, x), args.repeats, None)
        print(line)
        weights = split_block(block)
        base = None
        for k in K_CANDIDATES:
            if spec.expanded_channels % k:
                continue
            compiled = jax.jit(lambda wts, x, k=k: split_apply(wts, x, k)).lower(weights, x).compile()
            line, peak = _row(str(k), compiled, (weights, x), args.repeats, base)
            base = peak if base is None else base
            print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main(main, prog="benchmarks/memory_split.py"))
