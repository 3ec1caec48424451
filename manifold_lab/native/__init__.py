"""Native XLA:CPU kernels (C++ through XLA's FFI), compiled on first use and cached on disk.

Each ``.cc`` file beside this module is one library (``depthwise``: the depthwise convolution;
``batchnorm``: BatchNorm's training reductions; ``conv``: the stem's convolution; ``fused_block``:
a whole inverted-residual block in inference, expansion to projection; ``fused_block_train``: the
passes that train such a block without writing its expanded tensors); their FFI
bindings are :mod:`manifold_lab.native.ffi`, their differentiable operations
:mod:`manifold_lab.native.ops`. Each library is compiled with the shared ``.h`` headers by the
system C++ compiler (``$CXX``, else ``c++``/``g++``, C++20, ``-O3 -march=native``) against the
FFI headers that jaxlib ships (``jax.ffi.include_dir()``), into ``$MANIFOLD_LAB_CACHE`` (default
``~/.cache/manifold_lab``). The file name holds a hash of the sources, the flags, the jaxlib
version and the CPU's feature flags, so a changed source or another machine sharing the home
directory gets its own build; the library is written under a temporary name and renamed into
place, so processes that build at the same time (the sweep's workers, pytest-xdist) never load a
half-written file.

Where no compiler is found or the build fails, :func:`load` returns None and says why once
(``reason()``). The native kernels are used as one set: :func:`available` (all libraries of the
set load) is the one test, which :func:`manifold_lab.models.backend.backend_for` applies when it
resolves a network's ``depthwise_impl``; without them the network takes its pure-JAX forms. The
libraries of :data:`OPTIONAL` are outside that set (the fused block libraries need AVX-512): the backend
loads them where it would use them and takes the unfused path where they do not load.
``MANIFOLD_LAB_NATIVE=0`` turns the native kernels off.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import jax

SOURCE_DIR = Path(__file__).resolve().parent
FLAGS = ("-O3", "-march=native", "-std=c++20", "-shared", "-fPIC", "-w")
ENV_SWITCH = "MANIFOLD_LAB_NATIVE"
ENV_CACHE = "MANIFOLD_LAB_CACHE"

#: FFI targets of each library: (XLA target name, exported handler symbol)
TARGETS: dict[str, tuple[tuple[str, str], ...]] = {
    "depthwise": (("manifold_dw_fwd", "ManifoldDepthwiseForward"),
                  ("manifold_dw_fwd_fused", "ManifoldDepthwiseForwardFused"),
                  ("manifold_dw_bwd", "ManifoldDepthwiseBackward"),
                  ("manifold_dw_bwd_fused", "ManifoldDepthwiseBackwardFused")),
    "batchnorm": (("manifold_bn_moments", "ManifoldBatchNormMoments"),
                  ("manifold_bn_grad_sums", "ManifoldBatchNormGradSums")),
    "conv": (("manifold_conv_fwd", "ManifoldConvForward"),
             ("manifold_conv_wgrad", "ManifoldConvWeightGrad")),
    "fused_block": (("manifold_fused_block_fwd", "ManifoldFusedBlockForward"),),
    "fused_block_train": (("manifold_fused_block_train_stats", "ManifoldFusedBlockTrainStats"),
                          ("manifold_fused_block_train_bwd_sums", "ManifoldFusedBlockTrainBwdSums"),
                          ("manifold_fused_block_train_bwd", "ManifoldFusedBlockTrainBwd")),
}

#: Libraries that :func:`available` does not require (each is checked with :func:`load` where used).
OPTIONAL: frozenset[str] = frozenset({"fused_block", "fused_block_train"})

_loaded: dict[str, ctypes.CDLL | None] = {}
_reasons: dict[str, str] = {}


def cache_dir() -> Path:
    """Where built libraries are kept."""
    if os.environ.get(ENV_CACHE):
        return Path(os.environ[ENV_CACHE])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "manifold_lab"


def compiler() -> str | None:
    """The C++ compiler to use, or None."""
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith(("flags", "Features")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def library_path(name: str, cxx: str) -> Path:
    """The cached library's path for this source (and the shared headers), compiler, flags,
    jaxlib and CPU."""
    sources = [(SOURCE_DIR / f"{name}.cc").read_bytes()]
    sources += [header.read_bytes() for header in sorted(SOURCE_DIR.glob("*.h"))]
    key = hashlib.sha256(b"\0".join([*sources, cxx.encode(), " ".join(FLAGS).encode(),
                                     jax.__version__.encode(), _cpu_flags().encode()])).hexdigest()[:16]
    return cache_dir() / f"{name}-{key}.so"


def _build(name: str, cxx: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        cmd = [cxx, *FLAGS, f"-I{jax.ffi.include_dir()}", str(SOURCE_DIR / f"{name}.cc"), "-o", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            lines = proc.stderr.strip().splitlines() or ["no output"]
            first_error = next((line for line in lines if "error" in line), lines[-1])
            raise RuntimeError(f"{Path(cxx).name} exited with {proc.returncode}: {first_error.strip()}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load(name: str) -> ctypes.CDLL | None:
    """Build (once per source and machine), load and register library ``name`` with XLA:CPU;
    None where that is not possible (see :func:`reason`)."""
    if name in _loaded:
        return _loaded[name]
    lib = None
    try:
        if os.environ.get(ENV_SWITCH, "1") == "0":
            raise RuntimeError(f"turned off by {ENV_SWITCH}=0")
        cxx = compiler()
        if cxx is None:
            raise RuntimeError("no C++ compiler found (install g++ or set CXX)")
        path = library_path(name, cxx)
        if not path.exists():
            _build(name, cxx, path)
        lib = ctypes.cdll.LoadLibrary(str(path))
        for target, symbol in TARGETS[name]:
            jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
    except (OSError, RuntimeError, AttributeError) as exc:
        _reasons[name] = str(exc)
        if os.environ.get(ENV_SWITCH, "1") != "0":
            fallback = "the unfused path" if name in OPTIONAL else "the pure-JAX form"
            warnings.warn(f"native {name} kernels unavailable ({exc}); using {fallback}",
                          RuntimeWarning, stacklevel=2)
        lib = None
    _loaded[name] = lib
    return lib


def reason(name: str) -> str | None:
    """Why :func:`load` returned None for ``name`` (None if it loaded or was not tried)."""
    return _reasons.get(name)


def available() -> bool:
    """Whether every native library but the :data:`OPTIONAL` ones builds and loads here (see
    :func:`unavailable_reason`)."""
    return all(load(name) is not None for name in TARGETS if name not in OPTIONAL)


def unavailable_reason() -> str | None:
    """Why :func:`available` is False: the first library that did not load, and its reason."""
    for name in TARGETS:
        if name not in OPTIONAL and load(name) is None:
            return reason(name)
    return None
