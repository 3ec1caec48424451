"""Shared pytest setup: JAX on the CPU, quiet logs, Agg plots, and one persistent XLA compilation
cache per checkout (under .pytest_cache, so a fresh clone starts cold), shared by the xdist workers
and the subprocesses the tests start, so that a network compiled by one test is reused by the next."""

import os
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      str(Path(__file__).resolve().parent.parent / ".pytest_cache" / "jax-compilation-cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
