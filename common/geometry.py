"""SE(2) frame transforms shared by the data layer, the scorer and the curation features.

Conventions: poses are (x, y, heading) with heading in radians, counter-clockwise from +x. The
"global" frame is the map frame of a scene; the "ego" frame has its origin at the ego rear axle at the
current frame, +x forward, +y to the left.
"""
from __future__ import annotations

import numpy as np


def wrap_angle(a):
    """Wrap angles to [-pi, pi)."""
    return (np.asarray(a) + np.pi) % (2.0 * np.pi) - np.pi


def global_to_local(points: np.ndarray, origin: np.ndarray) -> np.ndarray:
    """Express global (…, 2) points or (…, 3) poses in the frame of `origin` = (x, y, heading)."""
    points = np.asarray(points, dtype=np.float64)
    x0, y0, h0 = (float(v) for v in origin)
    c, s = np.cos(h0), np.sin(h0)
    dx, dy = points[..., 0] - x0, points[..., 1] - y0
    out = np.empty_like(points)
    out[..., 0] = c * dx + s * dy
    out[..., 1] = -s * dx + c * dy
    if points.shape[-1] >= 3:
        out[..., 2] = wrap_angle(points[..., 2] - h0)
        out[..., 3:] = points[..., 3:]
    return out


def local_to_global(points: np.ndarray, origin: np.ndarray) -> np.ndarray:
    """Inverse of `global_to_local`."""
    points = np.asarray(points, dtype=np.float64)
    x0, y0, h0 = (float(v) for v in origin)
    c, s = np.cos(h0), np.sin(h0)
    out = np.empty_like(points)
    out[..., 0] = x0 + c * points[..., 0] - s * points[..., 1]
    out[..., 1] = y0 + s * points[..., 0] + c * points[..., 1]
    if points.shape[-1] >= 3:
        out[..., 2] = wrap_angle(points[..., 2] + h0)
        out[..., 3:] = points[..., 3:]
    return out


def rotate_vectors(vectors: np.ndarray, angle: float) -> np.ndarray:
    """Rotate (…, 2) vectors (e.g. velocities) by `angle` radians."""
    v = np.asarray(vectors, dtype=np.float64)
    c, s = np.cos(angle), np.sin(angle)
    return np.stack([c * v[..., 0] - s * v[..., 1], s * v[..., 0] + c * v[..., 1]], axis=-1)


def box_corners(x, y, heading, length, width) -> np.ndarray:
    """Corners (…, 4, 2) of oriented boxes centred at (x, y): front-left, front-right, rear-right, rear-left."""
    x, y, heading, length, width = np.broadcast_arrays(*(np.asarray(v, dtype=np.float64) for v in (x, y, heading, length, width)))
    c, s = np.cos(heading), np.sin(heading)
    hl, hw = length / 2.0, width / 2.0
    local = np.stack([np.stack([hl, hw], -1), np.stack([hl, -hw], -1), np.stack([-hl, -hw], -1), np.stack([-hl, hw], -1)], -2)
    gx = x[..., None] + c[..., None] * local[..., 0] - s[..., None] * local[..., 1]
    gy = y[..., None] + s[..., None] * local[..., 0] + c[..., None] * local[..., 1]
    return np.stack([gx, gy], axis=-1)
