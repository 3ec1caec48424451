"""Input manifolds for the spiral experiment: a 2-D spiral and two 3-D scikit-learn surfaces.

Every manifold is returned *centred* at the origin and scaled so that its farthest point has norm 1,
together with each point's position along the manifold in [0, 1] (used to colour the figures).

Spiral parametrisation (paper Fig. 1; the paper does not give one, this is ours):
an Archimedean spiral r = theta / (2 pi turns), so the radius grows linearly with the angle and the
outermost point (theta = 2 pi turns) has radius 1. ``turns`` = 3 full turns; the angle runs from half a
turn (theta = pi, r = 1/6) to 2 pi turns, so no point sits at the origin. The ``points`` samples are
equally spaced in arc length (theta proportional to the square root of a uniform grid, the arc length of
an Archimedean spiral growing as theta^2 for large theta). The spiral's centre *is* the origin; its
centroid is not subtracted (ReLU without bias is only meaningful relative to the origin).

swiss_roll / s_curve: ``sklearn.datasets.make_swiss_roll`` / ``make_s_curve`` with ``noise=0`` and
``random_state=seed`` (d = 3), centroid subtracted, then scaled to unit maximum norm; the position is
the generator's ``t`` rescaled to [0, 1].
"""

from __future__ import annotations

import numpy as np

MANIFOLDS = ("spiral", "swiss_roll", "s_curve")
SPIRAL_TURNS = 3.0
SPIRAL_START_ANGLE = np.pi


def spiral(points: int, turns: float = SPIRAL_TURNS) -> tuple[np.ndarray, np.ndarray]:
    """Archimedean spiral (see module docstring): ``(x [points, 2] float32, position [points])``."""
    theta_max = 2.0 * np.pi * turns
    u = np.linspace((SPIRAL_START_ANGLE / theta_max) ** 2, 1.0, points)
    theta = theta_max * np.sqrt(u)
    radius = theta / theta_max
    x = np.stack([radius * np.cos(theta), radius * np.sin(theta)], axis=1)
    position = (theta - theta[0]) / (theta[-1] - theta[0])
    return x.astype(np.float32), position


def _centre_and_scale(x: np.ndarray) -> np.ndarray:
    x = x - x.mean(axis=0, keepdims=True)
    return x / np.linalg.norm(x, axis=1).max()


def make_manifold(name: str, points: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Sample manifold ``name`` (one of :data:`MANIFOLDS`) with ``points`` points.

    Returns ``(x, position)``: ``x`` float32 ``[points, d]`` centred with unit maximum norm (d = 2 for
    the spiral, 3 otherwise), ``position`` float64 ``[points]`` in [0, 1]. Deterministic in ``seed``
    (the spiral does not depend on it)."""
    if name == "spiral":
        return spiral(points)
    from sklearn import datasets  # imported lazily: it is slow to import

    if name == "swiss_roll":
        x, t = datasets.make_swiss_roll(points, noise=0.0, random_state=seed)
    elif name == "s_curve":
        x, t = datasets.make_s_curve(points, noise=0.0, random_state=seed)
    else:
        raise ValueError(f"unknown manifold {name!r}; choose from {', '.join(MANIFOLDS)}")
    position = (t - t.min()) / (t.max() - t.min())
    return _centre_and_scale(x).astype(np.float32), position
