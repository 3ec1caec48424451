"""manifold-lab: the MobileNetV2 paper's manifold/ReLU experiments and ablations in JAX / Flax NNX."""

from importlib import metadata

try:
    __version__ = metadata.version("manifold-lab")
except metadata.PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"
