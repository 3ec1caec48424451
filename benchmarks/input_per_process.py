"""Benchmark: images decoded per process for one global batch of an image folder, with one process
and with two (``jax.distributed`` on a localhost coordinator, one CPU device each).

Each process loads its rows of every global batch (``manifold_lab.train.sharding.process_rows``: all
of them on one process, half on each of two), decoding in the process itself (no Grain workers, so
every decode is counted), and assembles the global array from them
(``sharding.put_process_batch``), as the training loop does. For comparison, ``whole batch`` has
each of the two processes decode the whole global batch, as the loop did before. Reported per
process: images decoded per global batch, and seconds per global batch (decode, crop and the
global array), median of ``--repeats`` passes over ``--steps`` batches after a warm-up pass, with
the min-max spread. The images are synthetic JPEGs (``--image-hw``, ImageNet's typical size by
default) unless ``--data-dir`` names an image folder.

    .venv/bin/python benchmarks/input_per_process.py [--batch-size 64] [--steps 4] [--repeats 5]
        [--image-size 224] [--image-hw 375 500] [--data-dir DIR] [--json PATH]
"""

from __future__ import annotations

import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from manifold_lab.atomic import atomic_write_json
from manifold_lab.cli import ArgumentParser, positive_int, run_main

REPO = Path(__file__).resolve().parents[1]
#: Layouts measured: (label, processes, whether each process loads only its own rows).
LAYOUTS = (("1 process", 1, True), ("2 processes, whole batch each (before)", 2, False),
           ("2 processes, own rows (now)", 2, True))


def _make_folder(root: Path, images: int, hw: tuple[int, int]) -> Path:
    """Two classes of random-noise JPEGs of ``hw`` pixels (noise: the decoder's worst case)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, count in (("train", images), ("val", 2)):
        for c in range(2):
            (root / split / f"c{c}").mkdir(parents=True)
            for i in range(count // 2):
                pixels = rng.integers(0, 256, (*hw, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / f"c{c}" / f"{i}.jpg", quality=90)
    return root


def _process(argv: list[str]) -> None:
    """One process of a layout: prints ``{"rows", "decoded", "seconds"}`` as JSON (process 0 only)."""
    data_dir, batch, steps, repeats, size, own, processes, pid, address = argv
    import jax

    from manifold_lab.data import imagefolder
    from manifold_lab.data.registry import load_dataset
    from manifold_lab.train import sharding

    if int(processes) > 1:
        sharding.initialize_distributed(address, int(processes), int(pid))
    batch, steps = int(batch), int(steps)
    mesh = sharding.make_mesh()
    batch_sh = sharding.batch_sharded(mesh)
    rows = sharding.process_rows(batch, mesh) if own == "1" else (0, batch)
    train = load_dataset("imagefolder", data_dir, int(size))[0]
    decoded = [0]
    open_rgb = imagefolder._open_rgb

    def counted(path: str):  # instrumentation: count the decodes of this process
        decoded[0] += 1
        return open_rgb(path)
    imagefolder._open_rgb = counted
    seconds = []
    for _ in range(int(repeats) + 1):  # the first pass warms up
        decoded[0] = 0
        start = time.perf_counter()
        for x, y in train.batches(batch, seed=0, num_steps=steps, num_workers=0, rows=rows):
            if own == "1":
                jax.block_until_ready(sharding.put_process_batch(x, batch_sh, batch))
            else:  # as before: every process held the whole batch and gave each device its slice
                jax.block_until_ready(jax.make_array_from_callback(x.shape, batch_sh, lambda i: x[i]))
        seconds.append((time.perf_counter() - start) / steps)
    if jax.process_index() == 0:
        print(json.dumps({"rows": list(rows), "decoded": decoded[0] / steps, "seconds": seconds[1:]}))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(args, data_dir: Path, processes: int, own: bool) -> dict:
    """Run one layout's processes side by side; process 0's figures."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    address = f"127.0.0.1:{_free_port()}"
    procs = [subprocess.Popen([sys.executable, __file__, "--process", str(data_dir), str(args.batch_size),
                               str(args.steps), str(args.repeats), str(args.image_size), str(int(own)),
                               str(processes), str(i), address],
                              cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
             for i in range(processes)]
    try:
        outs = [p.communicate(timeout=600)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    if any(p.returncode for p in procs):
        raise RuntimeError(f"a benchmark process failed (exit codes {[p.returncode for p in procs]})")
    return json.loads(outs[0].strip().splitlines()[-1])


def main(argv: Sequence[str] | None = None) -> int:
    parser = ArgumentParser(prog="benchmarks/input_per_process.py", description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=positive_int, default=64, help="global batch")
    parser.add_argument("--steps", type=positive_int, default=4, help="global batches per pass")
    parser.add_argument("--repeats", type=positive_int, default=5, help="timed passes after the warm-up")
    parser.add_argument("--image-size", type=positive_int, default=224)
    parser.add_argument("--image-hw", type=positive_int, nargs=2, default=(375, 500), metavar=("H", "W"))
    parser.add_argument("--data-dir", type=Path, default=None, help="an image folder instead of synthetic JPEGs")
    parser.add_argument("--json", type=Path, default=None, help="write every figure here")
    args = parser.parse_args(argv)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        images = 2 * -(-args.batch_size * args.steps // 2)
        data_dir = args.data_dir or _make_folder(Path(tmp), images, tuple(args.image_hw))
        for label, processes, own in LAYOUTS:
            results[label] = measure(args, data_dir, processes, own)
    print(f"global batch {args.batch_size}, {args.steps} batches per pass, {args.image_size} px crops of "
          f"{'the images of ' + str(args.data_dir) if args.data_dir else 'synthetic %dx%d JPEGs' % tuple(args.image_hw)}; "
          f"{platform.machine()}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}; "
          f"median (min-max) of {args.repeats} passes after a warm-up")
    print("| layout | rows per process | images decoded per process per batch | s per batch per process |")
    print("|---|---|---|---|")
    for label, r in results.items():
        s = r["seconds"]
        print(f"| {label} | {r['rows'][0]}-{r['rows'][1] - 1} of process 0 | {r['decoded']:.0f} | "
              f"{statistics.median(s):.3f} ({min(s):.3f}-{max(s):.3f}) |")
    if args.json:
        atomic_write_json(args.json, {"args": {k: str(v) for k, v in vars(args).items()}, "results": results})
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--process"]:
        _process(sys.argv[2:])
    else:
        raise SystemExit(run_main(main, prog="benchmarks/input_per_process.py"))
