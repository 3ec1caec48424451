"""Benchmark: MobileNetV2 inverted-residual blocks in inference or training, layer by layer (``plain``: the
native backend's unfused kernels) against the fused block kernel (``fused``: one native call per
block, the expanded tensor kept in cache-sized tiles), at every block shape of the network at
``--image-size`` (default 224 px).

Default table: per block shape and batch, ms per call (median (min-max) of ``--repeats`` after a
compiling warm-up), GFLOP/s (2 x the block's multiply-adds per second, padded taps counted as in
:mod:`manifold_lab.costs`) and its fraction of the matmul ceiling (XLA's float32 matmul of two
2048 x 2048 matrices, its fastest call in the same run), and fused / plain speed. Both forms are
checked to agree first.

``--train``: the same table for a training forward and backward pass of each block (batch
statistics; the gradients of the parameters and the input for a fixed output weighting), GFLOP/s
counted as 6 x the multiply-adds (forward, input and weight gradients; the fused passes do more,
recomputing the expanded tiles), the forms checked to agree by gradient cosine.

``--memory``: peak activation memory of a whole 224 px inference at each batch, plain and fused
blocks (XLA's compiled temporary and output bytes, which hold every intermediate tensor; the
fused kernel's own per-thread tiles are not XLA buffers and are not counted), against the
Section 5 bounds for float32 (:mod:`manifold_lab.costs.memory_bounds`): Table 3's largest
materialised tensor and the largest block input plus output (both live while a block runs).

The 1-minute load average is printed with each table: other work on the machine inflates times.

    .venv/bin/python benchmarks/fused_block.py [--batches 1,32] [--repeats 7] [--blocks 0,1,2] [--train]
    .venv/bin/python benchmarks/fused_block.py --memory [--batches 1,32]
"""

from __future__ import annotations

import os

from manifold_lab.allocator import reexec_with_allocator

reexec_with_allocator()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from collections.abc import Sequence  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from timing import Timing, matmul_ceiling, time_calls  # noqa: E402
from manifold_lab.cli import ArgumentParser, UsageError, positive_int, run_main  # noqa: E402
from manifold_lab.costs.analytic import model_costs  # noqa: E402
from manifold_lab.costs.memory_bounds import memory_bounds  # noqa: E402
from manifold_lab.models import backend_for, build_model  # noqa: E402
from manifold_lab.models.config import BlockSpec, MobileNetV2Config  # noqa: E402
from manifold_lab.models.mobilenet_v2 import InvertedResidual  # noqa: E402



def _fmt(t: Timing) -> str:
    med, lo, hi = (1e3 * v for v in t)
    return f"{med:.2f} ({lo:.2f}-{hi:.2f})"


def randomize_statistics(module: nnx.Module, key: jax.Array) -> None:
    """BatchNorm statistics and affine parameters away from their initial 0 / 1 (so that folding
    them into the weights is exercised)."""
    for _, bn in nnx.iter_graph(module):
        if isinstance(bn, nnx.BatchNorm):
            key, *keys = jax.random.split(key, 5)
            shape = bn.scale.shape
            bn.scale[...] = jax.random.uniform(keys[0], shape, minval=0.5, maxval=1.5)
            bn.bias[...] = 0.3 * jax.random.normal(keys[1], shape)
            bn.mean[...] = 0.3 * jax.random.normal(keys[2], shape)
            bn.var[...] = jax.random.uniform(keys[3], shape, minval=0.5, maxval=2.0)


def block_inputs(config: MobileNetV2Config, size: int) -> list[tuple[BlockSpec, int, int]]:
    """(spec, input size, multiply-adds per image) of every block with a distinct shape at ``size`` px."""
    layers = {layer.name: layer for layer in model_costs(config, size).layers}
    seen, rows = set(), []
    for spec in config.blocks():
        names = [f"block{spec.index:02d}/{part}" for part in ("expansion", "depthwise", "projection")]
        first = layers.get(names[0]) or layers[names[1]]
        key = (first.input_shape, spec.expanded_channels, spec.out_channels, spec.stride)
        if key not in seen:
            seen.add(key)
            rows.append((spec, first.input_shape[0], sum(layers[n].madds for n in names if n in layers)))
    return rows


def _block_fn(spec: BlockSpec, impl: str, train: bool):
    """(jitted call of one block under ``block_impl=impl``, its state): inference ``f(state, x)``
    is the output; training ``f(state, x)`` is the gradient of ``sum(output * x_out)`` (a fixed
    cotangent) for the parameters and the input, batch statistics as in a training step."""
    config = MobileNetV2Config(block_impl=impl)
    block = InvertedResidual(spec, config, expansion_shortcut=False, rngs=nnx.Rngs(spec.index))
    randomize_statistics(block, jax.random.key(spec.index))
    graphdef, params, rest = nnx.split(block, nnx.Param, ...)
    if not train:
        return jax.jit(lambda s, x: nnx.merge(graphdef, *s)(x, None, False)[0]), (params, rest)

    def loss(p, r, x):
        y = nnx.merge(graphdef, p, r, copy=True)(x, None, True)[0]
        return jnp.sum(y * jnp.cos(jnp.arange(y.size, dtype=y.dtype).reshape(y.shape)))

    return jax.jit(lambda s, x: jax.grad(loss, argnums=(0, 2))(s[0], s[1], x)), (params, rest)


def _disagreement(want, got, train: bool) -> float:
    """Inference: the largest relative difference of the outputs (relative to the largest value).
    Training: 1 - the smallest cosine similarity of a gradient with its plain counterpart (a
    pixel whose pre-activation lies within rounding of a ReLU6 kink may take the other side of it
    in the other form, which moves that pixel's gradient entirely)."""
    pairs = list(zip(jax.tree.leaves(want), jax.tree.leaves(got)))
    if train:
        return max(1.0 - float(jnp.vdot(a, b) / (jnp.linalg.norm(a) * jnp.linalg.norm(b) + 1e-30)) for a, b in pairs)
    return max(float(jnp.max(jnp.abs(a - b)) / jnp.maximum(jnp.max(jnp.abs(a)), 1e-6)) for a, b in pairs)


def time_block(spec: BlockSpec, size: int, batch: int, repeats: int, train: bool = False) -> tuple[Timing, Timing]:
    """(plain, fused) timings of one block at this input size and batch (inference, or a training
    forward and backward pass), checked to agree."""
    calls = {impl: _block_fn(spec, impl, train) for impl in ("plain", "fused")}
    state = calls["plain"][1]
    x = jax.random.normal(jax.random.key(0), (batch, size, size, spec.in_channels), jnp.float32)
    err = _disagreement(calls["plain"][0](state, x), calls["fused"][0](state, x), train)
    if err > 1e-4:
        raise RuntimeError(f"plain and fused disagree by {err:.2e} (relative) in block {spec.index}")
    return tuple(time_calls(lambda impl=impl: calls[impl][0](state, x), repeats) for impl in ("plain", "fused"))


def block_table(batches: list[int], indices: list[int] | None, repeats: int, size: int, train: bool) -> None:
    """The per-block table (see the module docstring)."""
    flops_per_madd = 6 if train else 2  # training: forward, input and weight gradients
    ceiling = matmul_ceiling(repeats)
    print(f"matmul ceiling (XLA float32 2048^3): {ceiling:.1f} GFLOP/s, load {os.getloadavg()[0]:.2f}")
    print("| block | input, t, out, stride | batch | plain ms | fused ms | plain GFLOP/s (ceiling) | "
          "fused GFLOP/s (ceiling) | fused / plain | load |")
    print("|---|---|---|---|---|---|---|---|---|")
    for spec, side, madds in block_inputs(MobileNetV2Config(), size):
        if indices is not None and spec.index not in indices:
            continue
        for batch in batches:
            plain, fused = time_block(spec, side, batch, repeats, train)
            rates = [flops_per_madd * madds * batch / t[0] / 1e9 for t in (plain, fused)]
            shape = (f"{side}x{side}x{spec.in_channels}, {spec.expanded_channels // spec.in_channels}, "
                     f"{spec.out_channels}, s{spec.stride}")
            print(f"| {spec.index} | {shape} | {batch} | {_fmt(plain)} | {_fmt(fused)} | "
                  f"{rates[0]:.1f} ({rates[0] / ceiling:.0%}) | {rates[1]:.1f} ({rates[1] / ceiling:.0%}) | "
                  f"{plain[0] / fused[0]:.2f}x | {os.getloadavg()[0]:.2f} |", flush=True)


def peak_bytes(impl: str, batch: int, size: int) -> int:
    """XLA's temporary plus output bytes of the whole network's compiled inference."""
    config = MobileNetV2Config(block_impl=impl)
    model = nnx.eval_shape(lambda: build_model(config, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(model)
    x = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32)
    compiled = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x, train=False)).lower(state, x).compile()
    stats = compiled.memory_analysis()
    return stats.temp_size_in_bytes + stats.output_size_in_bytes


def memory_table(batches: list[int], size: int) -> None:
    """The ``--memory`` table (see the module docstring)."""
    print(f"{size} px, float32; MiB = 2^20 bytes; load {os.getloadavg()[0]:.2f}")
    print("| batch | plain | fused | fused / plain | Table 3 bound (largest tensor) | largest block input + output |")
    print("|---|---|---|---|---|---|")
    for batch in batches:
        plain, fused = (peak_bytes(impl, batch, size) / 2**20 for impl in ("plain", "fused"))
        bounds = memory_bounds(MobileNetV2Config(), size, batch)
        print(f"| {batch} | {plain:.2f} | {fused:.2f} | {fused / plain:.2f} | {bounds.largest_bytes / 2**20:.2f} "
              f"({bounds.largest_tensor}) | {bounds.pair_bytes / 2**20:.2f} ({' + '.join(bounds.pair)}) |",
              flush=True)


def parse_list(text: str, flag: str) -> list[int]:
    """Comma-separated non-negative integers, or UsageError naming ``flag``."""
    try:
        values = [int(v) for v in text.split(",") if v]
    except ValueError:
        raise UsageError(f"{flag} must be comma-separated integers, got {text!r}") from None
    if not values or min(values) < 0:
        raise UsageError(f"{flag} must be comma-separated non-negative integers, got {text!r}")
    return values


def main(argv: Sequence[str] | None = None) -> int:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="1,32", help="comma-separated batch sizes (default 1,32)")
    parser.add_argument("--repeats", type=positive_int, default=7, help="timed calls per figure")
    parser.add_argument("--blocks", default=None, help="comma-separated block indices (default: every shape)")
    parser.add_argument("--memory", action="store_true", help="the peak activation memory table instead")
    parser.add_argument("--train", action="store_true",
                        help="time a training forward and backward pass of each block instead of inference")
    parser.add_argument("--image-size", type=positive_int, default=224, help="input size in pixels (default 224)")
    args = parser.parse_args(argv)
    batches = parse_list(args.batches, "--batches")
    if min(batches) < 1:
        raise UsageError(f"--batches must be positive, got {args.batches!r}")
    try:
        backend_for("auto", block_impl="fused")
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    print(f"backend {jax.default_backend()}, JAX {jax.__version__}, {os.cpu_count()} CPUs")
    if args.memory:
        memory_table(batches, args.image_size)
    else:
        indices = parse_list(args.blocks, "--blocks") if args.blocks else None
        block_table(batches, indices, args.repeats, args.image_size, args.train)
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main(main, prog="benchmarks/fused_block.py"))
