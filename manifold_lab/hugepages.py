"""Transparent huge pages for the process's large buffers (a CPU speed-up for training).

With the kernel's transparent huge pages in ``madvise`` mode, glibc's allocator only asks for huge
pages when started with ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1``. XLA on the CPU writes many large,
fresh activation buffers per training step, and their page faults are a large part of the step:
``benchmarks/README.md`` ("Training throughput") measures the gain. glibc reads the variable only
at process start, so an entry point calls :func:`reexec_with_hugetlb` first thing (before importing
JAX): the process re-executes itself once with the variable set. ``MANIFOLD_LAB_NO_HUGETLB=1``
turns it off.
"""

from __future__ import annotations

import os
import platform
import sys

TUNABLE = "glibc.malloc.hugetlb=1"


def hugetlb_wanted(environ: dict[str, str] | os._Environ[str] = os.environ) -> bool:
    """Whether a re-exec would set the tunable: Linux with glibc, not set yet, not disabled."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    if environ.get("MANIFOLD_LAB_NO_HUGETLB", "") not in ("", "0"):
        return False
    return "glibc.malloc.hugetlb" not in environ.get("GLIBC_TUNABLES", "")


def reexec_with_hugetlb() -> None:
    """Re-execute this interpreter with the same command line and ``GLIBC_TUNABLES`` extended by
    ``glibc.malloc.hugetlb=1``; returns without doing anything when not wanted (or already done)."""
    if not hugetlb_wanted():
        return
    env = dict(os.environ)
    current = env.get("GLIBC_TUNABLES", "")
    env["GLIBC_TUNABLES"] = f"{current}:{TUNABLE}" if current else TUNABLE
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
