"""The memory allocator under XLA's CPU buffers: jemalloc that keeps freed pages, or glibc huge pages.

XLA on the CPU allocates a training step's temporaries as one fresh buffer and frees it when the
step ends (2.65 GB at 224 px, width 1.0, batch 32). Through glibc that buffer is mapped and unmapped
on every step, so every step pays its page faults, and with huge pages some steps also stall for
seconds in the kernel (measured in ``benchmarks/README.md``). jemalloc configured never to purge
(``dirty_decay_ms:-1``) hands the same pages back on the next step: no faults after the first.

``MANIFOLD_LAB_ALLOCATOR`` selects: ``auto`` (default: jemalloc when ``libjemalloc.so.2`` is
installed, Debian's ``libjemalloc2``; otherwise glibc with ``glibc.malloc.hugetlb=1``),
``jemalloc``, ``hugetlb`` or ``system`` (leave the process alone). Both settings are read only at
process start (``LD_PRELOAD``, ``GLIBC_TUNABLES``), so entry points call
:func:`reexec_with_allocator` first thing, before importing JAX: the process re-executes itself once.
A setting the user already made (jemalloc in ``LD_PRELOAD``, a ``hugetlb`` tunable) is kept.
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Callable, Mapping

ENV_VAR = "MANIFOLD_LAB_ALLOCATOR"
CHOICES = ("auto", "jemalloc", "hugetlb", "system")
HUGETLB_TUNABLE = "glibc.malloc.hugetlb=1"
#: huge pages for jemalloc's extents and metadata, and freed pages kept for reuse (never purged)
JEMALLOC_CONF = "thp:always,metadata_thp:auto,dirty_decay_ms:-1,muzzy_decay_ms:-1"
JEMALLOC_NAME = "libjemalloc.so.2"
LIBRARY_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib",
                "/usr/local/lib")


def find_jemalloc(dirs: tuple[str, ...] = LIBRARY_DIRS) -> str | None:
    """Path of ``libjemalloc.so.2`` in the usual library folders, or None."""
    for directory in dirs:
        path = os.path.join(directory, JEMALLOC_NAME)
        if os.path.exists(path):
            return path
    return None


def _prepend(value: str, current: str, sep: str) -> str:
    return f"{value}{sep}{current}" if current else value


def allocator_env(environ: Mapping[str, str] = os.environ,
                  find: Callable[[], str | None] = find_jemalloc) -> dict[str, str] | None:
    """The environment to re-execute with, or None when the process should stay as it is.

    Raises ValueError for an unknown ``MANIFOLD_LAB_ALLOCATOR`` or an explicit ``jemalloc`` that is
    not installed."""
    choice = environ.get(ENV_VAR, "auto") or "auto"
    if choice not in CHOICES:
        raise ValueError(f"{ENV_VAR} must be one of {', '.join(CHOICES)}, got {choice!r}")
    if choice == "system" or platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    if "jemalloc" in environ.get("LD_PRELOAD", "") or "glibc.malloc.hugetlb" in environ.get("GLIBC_TUNABLES", ""):
        return None  # already set (by an earlier re-exec or by the user)
    env = dict(environ)
    if choice in ("auto", "jemalloc"):
        path = find()
        if path is not None:
            env["LD_PRELOAD"] = _prepend(path, environ.get("LD_PRELOAD", ""), " ")
            env.setdefault("MALLOC_CONF", JEMALLOC_CONF)
            return env
        if choice == "jemalloc":
            raise ValueError(f"{ENV_VAR}=jemalloc but {JEMALLOC_NAME} is not installed "
                             "(apt-get install -y libjemalloc2)")
    env["GLIBC_TUNABLES"] = _prepend(HUGETLB_TUNABLE, environ.get("GLIBC_TUNABLES", ""), ":")
    return env


def reexec_with_allocator() -> None:
    """Re-execute this interpreter with the same command line under :func:`allocator_env`; returns
    without doing anything when nothing is to change. A bad ``MANIFOLD_LAB_ALLOCATOR`` exits with
    code 2 and a one-line message."""
    try:
        env = allocator_env()
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    if env is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
