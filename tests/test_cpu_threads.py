"""XLA:CPU's intra-op thread count decides the bits of a contraction; fixing it makes them independent
of the cores a process may use, and every process of a sweep fixes it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from manifold_lab.cpu_threads import fix_intra_op_threads, intra_op_threads

# A 1x1 convolution's weight gradient in miniature (a sum over 4096 pixels), in a fresh process
# pinned to CPUS ("-": unpinned), with the pool fixed at one thread when told; prints a digest.
CONTRACTION = """
import hashlib, os, sys
from manifold_lab.cpu_threads import fix_intra_op_threads, intra_op_threads
cpus, fix = sys.argv[1:3]
if cpus != "-":
    os.sched_setaffinity(0, {int(c) for c in cpus.split(",")})
if fix == "fix":
    assert fix_intra_op_threads(1)
import jax, numpy as np
x = np.random.default_rng(0).standard_normal((4096, 8), dtype=np.float32)
g = np.random.default_rng(1).standard_normal((4096, 48), dtype=np.float32)
out = np.asarray(jax.jit(lambda a, b: a.T @ b)(x, g))
print(intra_op_threads(), hashlib.sha256(out.tobytes()).hexdigest())
"""


def _contraction(cpus: str, fix: str) -> tuple[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PJRT_NPROC", "NPROC")} | {"JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", CONTRACTION, cpus, fix], capture_output=True, text=True,
                         env=env, timeout=120, check=True).stdout.split()
    return out[0], out[1]


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPU cores")
def test_one_fixed_thread_gives_the_bits_of_one_core() -> None:
    two = ",".join(map(str, sorted(os.sched_getaffinity(0))[:2]))
    pinned = _contraction(two.split(",")[0], "no")
    assert pinned[0] == "1"
    assert _contraction(two, "fix") == pinned
    # the premise: left to itself the pool takes both cores and rounds otherwise
    assert _contraction(two, "no")[1] != pinned[1], "XLA's contraction no longer depends on the thread count"


def test_a_sweep_fixes_one_thread_and_a_started_jax_is_left_alone(tmp_path: Path) -> None:
    code = ("import os, sys\nfrom ablations.run import main\n"
            f"main(['all', '--preset', 'smoke', '--dry-run', '--out', {str(tmp_path)!r}])\n"
            "print(os.environ.get('PJRT_NPROC'))\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PJRT_NPROC", "NPROC")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120,
                         check=True).stdout
    assert out.splitlines()[-1] == "1"
    import jax
    jax.devices()  # this process's pool exists: fixing it now would only mislead
    before = os.environ.get("PJRT_NPROC")
    assert not fix_intra_op_threads(1) and os.environ.get("PJRT_NPROC") == before
    assert intra_op_threads() >= 1
