"""A plain NumPy implementation written the way a user would (loops over n, trials and points, float64).

It is the oracle for the tests and the baseline of ``benchmarks/spiral_bench.py``; the experiment
itself uses :mod:`.kernel`. It takes the matrices explicitly so both see the same draws.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def _act(z: np.ndarray, activation: str) -> tuple[np.ndarray, np.ndarray]:
    if activation == "relu":
        return np.maximum(z, 0.0), z > 0.0
    if activation == "relu6":
        return np.clip(z, 0.0, 6.0), (z > 0.0) & (z < 6.0)
    return z, np.ones(z.shape, bool)


def reference_metrics(x: np.ndarray, t: np.ndarray, dims: Sequence[int], activation: str,
                      per_point_lstsq: bool = True) -> np.ndarray:
    """Per-trial metrics ``[len(dims), 3, trials]`` (collapsed fraction, naive error, active-set error)
    for matrices ``t`` [trials, n_max, d] (trial j, width n uses ``t[j, :n]``).

    ``per_point_lstsq=True`` solves each point's active-set problem with ``np.linalg.lstsq`` (the
    obvious loop); ``False`` vectorises that step over the points of a trial (batched ``pinv`` of the
    masked normal equations), still looping over n and trials."""
    x = np.asarray(x, np.float64)
    d = x.shape[1]
    norms = np.linalg.norm(x, axis=1)
    out = np.zeros((len(dims), 3, t.shape[0]))
    for i, n in enumerate(dims):
        for j in range(t.shape[0]):
            tn = np.asarray(t[j, :n], np.float64)
            y, active = _act(x @ tn.T, activation)
            x_hat = y @ np.linalg.pinv(tn).T
            out[i, 0, j] = np.mean(active.sum(axis=1) < d)
            out[i, 1, j] = np.mean(np.linalg.norm(x_hat - x, axis=1) / norms)
            if per_point_lstsq:
                x_act = np.empty_like(x)
                for p in range(x.shape[0]):
                    rows = active[p]
                    x_act[p] = np.linalg.lstsq(tn[rows], y[p, rows], rcond=None)[0] if rows.any() else 0.0
            else:
                masked = tn[None, :, :] * active[:, :, None]           # [points, n, d]
                gram = np.einsum("pnk,pnl->pkl", masked, masked)
                rhs = np.einsum("pnk,pn->pk", masked, y)
                x_act = np.einsum("pkl,pl->pk", np.linalg.pinv(gram, hermitian=True), rhs)
            out[i, 2, j] = np.mean(np.linalg.norm(x_act - x, axis=1) / norms)
    return out
