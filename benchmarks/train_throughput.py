"""Benchmark: MobileNetV2 training and inference images/s of one jitted step, ours vs Keras 3 (JAX
backend) and PyTorch 2 (CPU), in one run.

Cases:

- ``a``: 32 px, 10 classes, width 1.0, ``imagenet`` layout (Table 2 strides), batch 128;
- ``b``: the same at width 0.5;
- ``c``: 224 px, 1000 classes, width 1.0, batch 32.

Training is measured for every case, inference (eval mode, running BatchNorm statistics) for ``a``
and ``c``. Ours is the project's own step (:func:`manifold_lab.train.step.make_train_step` with the
paper's RMSProp from :func:`manifold_lab.train.optim.make_optimizer`, jitted with the state buffers
donated). Peers, when installed (the ``bench`` extra): Keras 3 ``keras.applications.MobileNetV2``
(``weights=None``) on the JAX backend, trained with a jitted ``train_on_batch``; PyTorch with the
equivalent module in ``benchmarks/torch_mobilenet_v2.py``, eager NCHW, eager channels-last and
``torch.compile`` (channels-last), each at 1 thread and at all cores; the best variant is reported as "pytorch" (all are in the JSON).

Each figure is ``batch / median`` step time over ``--repeats`` steps after ``--warmup`` steps
(compilation included in the first; fewer timed steps once they take ``--budget`` seconds), with the
spread (images/s of the slowest and fastest step). The script re-executes itself once under
jemalloc (or glibc huge pages where jemalloc is not installed; see :mod:`manifold_lab.allocator`). It
applies to every framework in the run; ``MANIFOLD_LAB_ALLOCATOR=system`` measures without.
Ratios are ours / the fastest peer (above 1: ours is faster). The ceiling column places each case
against the machine's arithmetic peak (XLA's float32 2048^3 matmul, measured at the start of the
run): the images/s that the case's floating-point operations would allow at that peak (2 per
multiply-add of the forward pass, 6 in training), and the share of it that ours reaches and that
twice the fastest peer would need (above 100%: 2x that peer is out of reach on this machine). The
1-minute load average is printed with every figure: other processes on the machine make numbers
noisy.

    .venv/bin/python benchmarks/train_throughput.py [--cases a,b,c] [--quick] [--json out.json]
        [--peers keras,torch] [--torch-threads 1,all] [--no-torch-compile] [--budget 60]
        [--block-impl auto|plain|fused] [--modes train,inference]
"""

from __future__ import annotations

import os

from manifold_lab.allocator import reexec_with_allocator

reexec_with_allocator()  # before JAX allocates anything; MANIFOLD_LAB_ALLOCATOR=system measures without
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("KERAS_BACKEND", "jax")

import dataclasses  # noqa: E402
import importlib.util  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Sequence  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from manifold_lab.atomic import atomic_write_json  # noqa: E402
from manifold_lab.costs.analytic import model_costs  # noqa: E402
from manifold_lab.cli import ArgumentParser, UsageError, positive_int, run_main  # noqa: E402
from manifold_lab.models import MobileNetV2Config, build_model, model_config  # noqa: E402
from manifold_lab.models.config import BLOCK_IMPLS  # noqa: E402
from manifold_lab.train.config import TrainConfig  # noqa: E402
from manifold_lab.train.optim import make_optimizer  # noqa: E402
from manifold_lab.train.step import make_train_step, split_state  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

from timing import matmul_ceiling  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Case:
    """One benchmark configuration."""

    name: str
    size: int
    width: float
    classes: int
    batch: int
    inference: bool

    def config(self, block_impl: str = "auto") -> MobileNetV2Config:
        return model_config("mobilenet_v2", width=self.width, layout="imagenet", num_classes=self.classes,
                            in_channels=3, block_impl=block_impl)

    def flops(self, train: bool) -> float:
        """Floating-point operations per image: 2 per multiply-add of the forward pass, 6 in
        training (the forward pass and the input and weight gradients)."""
        return (6 if train else 2) * model_costs(self.config(), self.size).madds

    def label(self) -> str:
        return f"({self.name}) {self.size}px w{self.width:g} {self.classes}cls b{self.batch}"


CASES: dict[str, Case] = {
    "a": Case("a", 32, 1.0, 10, 128, True),
    "b": Case("b", 32, 0.5, 10, 128, False),
    "c": Case("c", 224, 1.0, 1000, 32, True),
}


#: What can be measured: training steps (every case) and inference passes (cases with ``inference``).
MODES = ("train", "inference")


def load() -> float:
    """The 1-minute load average."""
    return os.getloadavg()[0]


def measure(step: Callable[[], Any], batch: int, warmup: int, repeats: int, budget_s: float) -> dict[str, float]:
    """Images/s of ``step`` (a callable that runs one step and blocks): median and spread of
    ``repeats`` timed steps, fewer (at least 2) once they have taken ``budget_s`` seconds."""
    start = time.perf_counter()
    for _ in range(warmup):
        step()
    first = time.perf_counter() - start
    times: list[float] = []
    while len(times) < repeats and (len(times) < 2 or sum(times) < budget_s):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    med = statistics.median(times)
    return {"images_per_s": batch / med, "min_images_per_s": batch / max(times),
            "max_images_per_s": batch / min(times), "median_step_s": med, "warmup_s": first,
            "repeats": len(times), "load_avg_1m": load()}


# ----------------------------------------------------------------------------------------- ours
def ours_train(case: Case, block_impl: str = "auto") -> Callable[[], None]:
    """A closure running one step of the project's jitted, donated train step, blocks by ``block_impl``."""
    model = build_model(case.config(block_impl), rngs=nnx.Rngs(0))
    graphdef, params, stats = split_state(model)  # the engine's state form
    tx, _ = make_optimizer(TrainConfig(dataset="imagefolder").resolved(), 1000, 10000)
    step = jax.jit(make_train_step(graphdef, tx), donate_argnums=(0, 1, 2))
    kx, kd = jax.random.split(jax.random.key(0))
    x = jax.random.normal(kx, (case.batch, case.size, case.size, 3), jnp.float32)
    y = jnp.arange(case.batch, dtype=jnp.int32) % case.classes
    state = [params, stats, tx.init(params)]

    def run() -> None:
        out = step(*state, x, y, kd)
        jax.block_until_ready(out)
        state[:] = out[:3]
    return run


def ours_infer(case: Case, block_impl: str = "auto") -> Callable[[], None]:
    """A closure running one jitted inference forward pass (eval mode), blocks by ``block_impl``."""
    model = build_model(case.config(block_impl), rngs=nnx.Rngs(0))
    graphdef, params, stats = split_state(model)  # the engine's state form
    fwd = jax.jit(lambda p, s, x: nnx.merge(graphdef, p, s)(x, train=False))
    x = jax.random.normal(jax.random.key(0), (case.batch, case.size, case.size, 3), jnp.float32)
    def run() -> None:
        jax.block_until_ready(fwd(params, stats, x))
    return run


# ---------------------------------------------------------------------------------------- keras
def keras_model(case: Case) -> Any:
    import keras
    keras.utils.set_random_seed(0)
    return keras.applications.MobileNetV2(weights=None, input_shape=(case.size, case.size, 3),
                                          alpha=case.width, classes=case.classes)


def keras_train(case: Case) -> Callable[[], None]:
    """Keras 3 (JAX backend): compiled ``train_on_batch`` with RMSProp."""
    import keras
    model = keras_model(case)
    model.compile(optimizer=keras.optimizers.RMSprop(0.045, rho=0.9, momentum=0.9, epsilon=1.0),
                  loss="sparse_categorical_crossentropy", jit_compile=True)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((case.batch, case.size, case.size, 3), dtype=np.float32)
    y = (np.arange(case.batch) % case.classes).astype(np.int32)
    def step() -> None:
        model.train_on_batch(x, y)
    return step


def keras_infer(case: Case) -> Callable[[], None]:
    """Keras 3 (JAX backend): a jitted stateless call in inference mode."""
    model = keras_model(case)
    tv = [v.value for v in model.trainable_variables]
    ntv = [v.value for v in model.non_trainable_variables]
    fwd = jax.jit(lambda tv, ntv, x: model.stateless_call(tv, ntv, x, training=False)[0])
    x = jax.random.normal(jax.random.key(0), (case.batch, case.size, case.size, 3), jnp.float32)
    def run() -> None:
        jax.block_until_ready(fwd(tv, ntv, x))
    return run


# ---------------------------------------------------------------------------------------- torch
#: PyTorch variants: memory format and compilation, each at 1 thread and at all cores (OpenMP's
#: barriers make 2 threads far slower than 1 when the cores are shared with other processes).
TORCH_VARIANTS = ("eager", "eager_channels_last", "compiled_channels_last")


def torch_setup(case: Case, variant: str, train: bool, threads: int) -> Callable[[], None]:
    """One PyTorch variant as a closure running one (training or inference) step."""
    import torch
    from torch_mobilenet_v2 import TorchMobileNetV2
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    fmt = torch.contiguous_format if variant == "eager" else torch.channels_last
    model = TorchMobileNetV2(case.config()).to(memory_format=fmt)
    x = torch.randn(case.batch, 3, case.size, case.size).to(memory_format=fmt)
    y = torch.arange(case.batch) % case.classes
    if not train:
        model.eval()
        fn = torch.compile(model) if variant.startswith("compiled") else model

        def infer() -> None:
            with torch.no_grad():
                fn(x)
        return infer
    model.train()
    opt = torch.optim.RMSprop(model.parameters(), lr=0.045, alpha=0.9, eps=1.0, momentum=0.9,
                              weight_decay=4e-5)
    loss_fn = torch.nn.CrossEntropyLoss()

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
    return torch.compile(step) if variant.startswith("compiled") else step


# ------------------------------------------------------------------------------------------ run
def fmt(r: dict[str, float] | None) -> str:
    if r is None:
        return "-"
    return f"{r['images_per_s']:.1f} ({r['min_images_per_s']:.1f}-{r['max_images_per_s']:.1f})"


@dataclasses.dataclass(frozen=True)
class Settings:
    """What to measure, from the command line."""

    names: list[str]
    peers: dict[str, bool]  # peer -> installed
    threads: list[int]
    variants: list[str]
    repeats: int
    warmup: int
    budget: float
    json: Path | None
    block_impl: str
    modes: list[str]


def parse_settings(argv: Sequence[str] | None) -> Settings:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="a,b,c", help="comma-separated subset of a,b,c")
    parser.add_argument("--peers", default="keras,torch", help="comma-separated subset of keras,torch ('' = none)")
    parser.add_argument("--quick", action="store_true", help="1 warm-up step and 3 timed steps")
    parser.add_argument("--repeats", type=positive_int, default=None, help="timed steps (default 10; 3 with --quick)")
    parser.add_argument("--warmup", type=positive_int, default=None, help="warm-up steps (default 3; 1 with --quick)")
    parser.add_argument("--budget", type=float, default=60.0,
                        help="seconds of timed steps per figure before stopping early (at least 2 steps)")
    parser.add_argument("--torch-threads", default="1,all",
                        help="comma-separated PyTorch thread counts to try ('all' = every core)")
    parser.add_argument("--no-torch-compile", action="store_true", help="skip the torch.compile variant")
    parser.add_argument("--json", type=Path, default=None, metavar="PATH", help="write every figure as JSON")
    parser.add_argument("--block-impl", choices=BLOCK_IMPLS, default="auto",
                        help="our blocks: auto (fused where faster), plain or fused")
    parser.add_argument("--modes", default="train,inference", help="comma-separated subset of train,inference")
    args = parser.parse_args(argv)
    modes = [m for m in args.modes.split(",") if m]
    if not modes or any(m not in MODES for m in modes):
        raise UsageError(f"--modes must be a comma-separated subset of {','.join(MODES)}, got {args.modes!r}")
    names = [c for c in args.cases.split(",") if c]
    if not names or any(c not in CASES for c in names):
        raise UsageError(f"--cases must be a comma-separated subset of {','.join(CASES)}, got {args.cases!r}")
    peers = [p for p in args.peers.split(",") if p]
    if any(p not in ("keras", "torch") for p in peers):
        raise UsageError(f"--peers must be a subset of keras,torch, got {args.peers!r}")
    try:
        threads = sorted({(os.cpu_count() or 1) if t == "all" else int(t) for t in args.torch_threads.split(",")})
    except ValueError:
        raise UsageError(f"--torch-threads must be comma-separated integers or 'all', got {args.torch_threads!r}") from None
    if not threads or min(threads) < 1:
        raise UsageError(f"--torch-threads must be positive, got {args.torch_threads!r}")
    return Settings(names, {p: importlib.util.find_spec(p) is not None for p in peers}, threads,
                    [v for v in TORCH_VARIANTS if not (args.no_torch_compile and v.startswith("compiled"))],
                    args.repeats or (3 if args.quick else 10), args.warmup or (1 if args.quick else 3),
                    args.budget, args.json, args.block_impl, modes)


def bench(settings: Settings, label: str, make: Callable[[], Callable[[], None]], batch: int
          ) -> dict[str, float] | None:
    """One figure, printed as it is measured; a peer variant that fails is reported, not fatal."""
    try:
        r = measure(make(), batch, settings.warmup, settings.repeats, settings.budget)
    except Exception as exc:  # e.g. torch.compile without a compiler
        print(f"  {label}: failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}", flush=True)
        return None
    print(f"  {label}: {fmt(r)} img/s, load {r['load_avg_1m']:.2f}", flush=True)
    return r


def measure_mode(settings: Settings, case: Any, mode: str, ceiling: float) -> dict[str, Any]:
    """Ours and every installed peer on one case in one mode, with the ratio to the fastest peer
    and, against the matmul ceiling (``ceiling`` GFLOP/s), the images/s that the case's
    floating-point operations allow and the share of it that ours and twice the fastest peer are."""
    train = mode == "train"
    make_ours = (lambda: (ours_train if train else ours_infer)(case, settings.block_impl))
    figs: dict[str, Any] = {"ours": bench(settings, f"{mode} ours", make_ours, case.batch)}
    if settings.peers.get("keras"):
        figs["keras_jax"] = bench(settings, f"{mode} keras/jax",
                                  lambda: (keras_train if train else keras_infer)(case), case.batch)
    if settings.peers.get("torch"):
        torch_figs = {f"{v}_{t}t": bench(settings, f"{mode} torch {v} {t} thread(s)",
                                         lambda v=v, t=t: torch_setup(case, v, train, t), case.batch)
                      for v in settings.variants for t in settings.threads}
        figs["torch_variants"] = torch_figs
        ok = {v: r for v, r in torch_figs.items() if r is not None}
        if ok:
            best = max(ok, key=lambda v: ok[v]["images_per_s"])
            figs["pytorch"] = {**ok[best], "variant": best}
    peer_figs = {k: figs[k] for k in ("keras_jax", "pytorch") if figs.get(k)}
    if figs["ours"] and peer_figs:
        fastest = max(peer_figs, key=lambda k: peer_figs[k]["images_per_s"])
        figs["fastest_peer"] = fastest
        figs["ratio_vs_fastest_peer"] = figs["ours"]["images_per_s"] / peer_figs[fastest]["images_per_s"]
    figs["ceiling_images_per_s"] = ceiling * 1e9 / case.flops(train)
    if figs["ours"]:
        figs["ours_share_of_ceiling"] = figs["ours"]["images_per_s"] / figs["ceiling_images_per_s"]
    if peer_figs:
        best_peer = max(r["images_per_s"] for r in peer_figs.values())
        figs["twice_peer_share_of_ceiling"] = 2 * best_peer / figs["ceiling_images_per_s"]
    return figs


def print_table(cases: dict[str, Any]) -> None:
    print()
    print("| case | mode | ours | keras/jax | pytorch (best variant) | ours / fastest peer | ceiling img/s: "
          "ours, 2x peer | load |")
    print("|---|---|---|---|---|---|---|---|")
    for name, entry in cases.items():
        for mode in ("train", "inference"):
            if mode not in entry:
                continue
            f = entry[mode]
            torch_txt = fmt(f.get("pytorch")) + (f" {f['pytorch']['variant']}" if f.get("pytorch") else "")
            ratio = f"{f['ratio_vs_fastest_peer']:.2f}x" if "ratio_vs_fastest_peer" in f else "-"
            loads = [r["load_avg_1m"] for k, r in f.items() if isinstance(r, dict) and "load_avg_1m" in r]
            shares = " / ".join(f"{f[k]:.0%}" if k in f else "-"
                                for k in ("ours_share_of_ceiling", "twice_peer_share_of_ceiling"))
            print(f"| {CASES[name].label()} | {mode} | {fmt(f['ours'])} | {fmt(f.get('keras_jax'))} | {torch_txt} "
                  f"| {ratio} | {f['ceiling_images_per_s']:,.0f}: {shares} | {min(loads):.1f}-{max(loads):.1f} |")


def main(argv: Sequence[str] | None = None) -> int:
    settings = parse_settings(argv)
    results: dict[str, Any] = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "jax": jax.__version__,
                    "backend": jax.default_backend(), "xla_flags": os.environ.get("XLA_FLAGS", ""),
                    "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
                    "ld_preload": os.environ.get("LD_PRELOAD", ""), "malloc_conf": os.environ.get("MALLOC_CONF", "")},
        "repeats": settings.repeats, "warmup": settings.warmup, "block_impl": settings.block_impl, "cases": {}}
    print(f"JAX {jax.__version__} ({jax.default_backend()}), {os.cpu_count()} CPUs; images/s, median "
          f"(slowest-fastest step) of {settings.repeats} after {settings.warmup} warm-up; load = 1-min load average")
    ceiling = matmul_ceiling(5)
    results["matmul_ceiling_gflops"] = ceiling
    print(f"matmul ceiling (XLA float32 2048^3, fastest of 5): {ceiling:.1f} GFLOP/s")
    for name in settings.names:
        case = CASES[name]
        print(case.label(), flush=True)
        entry: dict[str, Any] = {"case": dataclasses.asdict(case)}
        for mode in [m for m in settings.modes if m == "train" or case.inference]:
            entry[mode] = measure_mode(settings, case, mode, ceiling)
        results["cases"][name] = entry
    print_table(results["cases"])
    if settings.json is not None:
        atomic_write_json(settings.json, results)
        print(f"wrote {settings.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main(main, prog="benchmarks/train_throughput.py"))
