"""Shared pytest setup: JAX on the CPU, quiet logs, Agg plots, one persistent XLA compilation
cache per checkout (under .pytest_cache, so a fresh clone starts cold), shared by the xdist workers
and the subprocesses the tests start, so that a network compiled by one test is reused by the next,
and one XLA:CPU intra-op thread in every test process and every process a test starts
(``manifold_lab.cpu_threads``: the thread count decides a run's rounding, so without this a test's
numbers would depend on the machine's cores and on whether an earlier test in the same worker ran a
sweep in-process, which fixes the count before JAX starts; two xdist workers fill two cores)."""

import os
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      str(Path(__file__).resolve().parent.parent / ".pytest_cache" / "jax-compilation-cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
os.environ.setdefault("PJRT_NPROC", "1")
