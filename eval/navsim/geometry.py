"""Vectorised geometry for the scorer: oriented boxes (numpy separating-axis tests), polylines
(projection, interpolation) and points in map polygons (shapely 2 `contains_xy` on bbox candidates).

Boxes are (..., 4, 2) corner arrays in the order front-left, front-right, rear-right, rear-left (as
common.geometry.box_corners). Every function works on whole arrays: callers never loop over steps
or objects in Python.
"""
from __future__ import annotations

import numpy as np
import shapely

from eval.navsim.config import HEADING, VehicleParams, X, Y

# ----------------------------------------------------------------------------------------------
# ego footprint


def ego_boxes(states: np.ndarray, vehicle: VehicleParams) -> tuple[np.ndarray, np.ndarray]:
    """(..., 11) rear-axle states -> corners (..., 4, 2) and box centres (..., 2)."""
    h = states[..., HEADING]
    c, s = np.cos(h), np.sin(h)
    center = np.empty(h.shape + (2,))
    center[..., 0] = states[..., X] + vehicle.rear_axle_to_center * c
    center[..., 1] = states[..., Y] + vehicle.rear_axle_to_center * s
    hl, hw = vehicle.length / 2, vehicle.width / 2
    lx, ly, wx, wy = hl * c, hl * s, -hw * s, hw * c  # half-length and half-width vectors
    corners = np.empty(h.shape + (4, 2))
    for k, (a, b) in enumerate(((1, 1), (1, -1), (-1, -1), (-1, 1))):  # FL, FR, RR, RL
        corners[..., k, 0] = center[..., 0] + a * lx + b * wx
        corners[..., k, 1] = center[..., 1] + a * ly + b * wy
    return corners, center


# ----------------------------------------------------------------------------------------------
# oriented boxes


def _project(corners: np.ndarray, axis: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    p = corners[..., 0] * axis[..., None, 0] + corners[..., 1] * axis[..., None, 1]
    return p.min(-1), p.max(-1)


def boxes_intersect(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Closed intersection (touching counts) of oriented rectangles (..., 4, 2), broadcast over leading dims.

    Separating-axis test in centre / half-extent form: on each of the 4 edge directions u, the boxes are apart
    iff |(c_b - c_a) . u| > sum of |half-extent vector . u| over both boxes.
    """
    ca = 0.5 * (a[..., 0, :] + a[..., 2, :])
    cb = 0.5 * (b[..., 0, :] + b[..., 2, :])
    la, wa = 0.5 * (a[..., 0, :] - a[..., 3, :]), 0.5 * (a[..., 0, :] - a[..., 1, :])
    lb, wb = 0.5 * (b[..., 0, :] - b[..., 3, :]), 0.5 * (b[..., 0, :] - b[..., 1, :])
    d = cb - ca

    def dot(u, v):
        return u[..., 0] * v[..., 0] + u[..., 1] * v[..., 1]

    hit = None
    for u in (la, wa, lb, wb):
        ok = np.abs(dot(d, u)) <= np.abs(dot(la, u)) + np.abs(dot(wa, u)) + np.abs(dot(lb, u)) + np.abs(dot(wb, u)) + 1e-9
        hit = ok if hit is None else hit & ok
    return hit


def segments_intersect_boxes(p0: np.ndarray, p1: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Closed intersection of segments p0-p1 (..., 2) with oriented boxes (..., 4, 2) (SAT, 3 axes)."""
    lead = np.broadcast_shapes(np.shape(p0)[:-1], np.shape(p1)[:-1], np.shape(boxes)[:-2])
    seg = np.stack([np.broadcast_to(p0, lead + (2,)), np.broadcast_to(p1, lead + (2,))], -2)
    boxes = np.broadcast_to(boxes, lead + (4, 2))
    d = seg[..., 1, :] - seg[..., 0, :]
    axes = [np.stack([-d[..., 1], d[..., 0]], -1), boxes[..., 1, :] - boxes[..., 0, :], boxes[..., 2, :] - boxes[..., 1, :]]
    hit = np.ones(lead, dtype=bool)
    for axis in axes:
        smin, smax = _project(seg, axis)
        bmin, bmax = _project(boxes, axis)
        hit &= (smax >= bmin) & (bmax >= smin)
    return hit


def _corner_edge_distance(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Min distance from the 4 corners of boxes p (M, 4, 2) to the 4 edges of boxes q (M, 4, 2) -> (M,)."""
    a = q[:, None, :, :]  # edge starts (M, 1, 4, 2)
    ab = np.roll(q, -1, axis=1)[:, None] - a
    ap = p[:, :, None, :] - a  # (M, 4, 4, 2)
    t = np.clip((ap[..., 0] * ab[..., 0] + ap[..., 1] * ab[..., 1]) / np.maximum(ab[..., 0] ** 2 + ab[..., 1] ** 2, 1e-12), 0.0, 1.0)
    dx = ap[..., 0] - t * ab[..., 0]
    dy = ap[..., 1] - t * ab[..., 1]
    return np.sqrt((dx * dx + dy * dy).min(axis=(1, 2)))


def boxes_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Euclidean distance between paired oriented boxes a, b (M, 4, 2) -> (M,); 0 where they intersect."""
    a, b = np.asarray(a, float).reshape(-1, 4, 2), np.asarray(b, float).reshape(-1, 4, 2)
    d = np.minimum(_corner_edge_distance(a, b), _corner_edge_distance(b, a))
    return np.where(boxes_intersect(a, b), 0.0, d)


def relative_angle(origin_xy: np.ndarray, heading: np.ndarray, target_xy: np.ndarray) -> np.ndarray:
    """Unsigned angle [0, pi] between the heading and the direction origin -> target (nuPlan's
    get_agent_relative_angle)."""
    v = target_xy - origin_xy
    n = np.maximum(np.linalg.norm(v, axis=-1), 1e-12)
    cosang = (np.cos(heading) * v[..., 0] + np.sin(heading) * v[..., 1]) / n
    return np.arccos(np.clip(cosang, -1.0, 1.0))


# ----------------------------------------------------------------------------------------------
# polylines


class Polyline:
    """A path with arc length: projection of points, distance, pose interpolation (nuPlan's PDMPath)."""

    def __init__(self, xy: np.ndarray):
        xy = np.asarray(xy, np.float64)
        keep = np.concatenate([[True], np.linalg.norm(np.diff(xy, axis=0), axis=1) > 1e-6])
        self.xy = xy[keep]
        if len(self.xy) < 2:
            raise ValueError("a polyline needs at least two distinct points")
        seg = np.diff(self.xy, axis=0)
        self.seg_len = np.linalg.norm(seg, axis=1)
        self.s = np.concatenate([[0.0], np.cumsum(self.seg_len)])
        self.seg_heading = np.arctan2(seg[:, 1], seg[:, 0])
        # heading per vertex (unwrapped, as PDMPath interpolates it along the arc length)
        h = np.concatenate([self.seg_heading, self.seg_heading[-1:]])
        self.heading = np.unwrap(h)

    @property
    def length(self) -> float:
        return float(self.s[-1])

    def project(self, points: np.ndarray, signed: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """(..., 2) points -> arc length of the nearest point on the line (...,) and the distance to it (...,),
        signed (+ left of the driving direction) if `signed`."""
        p = np.asarray(points, np.float64)
        shape = p.shape[:-1]
        p = p.reshape(-1, 2)
        if len(p) * len(self.seg_len) > 20000:
            return self._project_geos(p, signed, shape)
        a, b = self.xy[:-1], self.xy[1:]
        ab = b - a
        ap = p[:, None] - a[None]
        t = np.clip((ap * ab[None]).sum(-1) / np.maximum(self.seg_len**2, 1e-12)[None], 0.0, 1.0)
        dx = ap[..., 0] - t * ab[None, :, 0]
        dy = ap[..., 1] - t * ab[None, :, 1]
        d2 = dx * dx + dy * dy
        j = d2.argmin(1)
        idx = np.arange(len(p))
        s = self.s[j] + t[idx, j] * self.seg_len[j]
        d = np.sqrt(d2[idx, j])
        if signed:
            cross = ab[j, 0] * ap[idx, j, 1] - ab[j, 1] * ap[idx, j, 0]
            d = np.where(cross < 0, -d, d)
        return s.reshape(shape), d.reshape(shape)

    def _project_geos(self, p: np.ndarray, signed: bool, shape) -> tuple[np.ndarray, np.ndarray]:
        # many points on a long line: GEOS does the nearest-segment search in C
        if not hasattr(self, "_line"):
            self._line = shapely.LineString(self.xy)
            shapely.prepare(self._line)
        pts = shapely.points(p)
        s = shapely.line_locate_point(self._line, pts)
        d = shapely.distance(self._line, pts)
        if signed:
            j = np.clip(np.searchsorted(self.s, s, side="right") - 1, 0, len(self.seg_len) - 1)
            ab = self.xy[j + 1] - self.xy[j]
            ap = p - self.xy[j]
            d = np.where(ab[:, 0] * ap[:, 1] - ab[:, 1] * ap[:, 0] < 0, -d, d)
        return s.reshape(shape), d.reshape(shape)

    def normal_at(self, s: np.ndarray) -> np.ndarray:
        """Unit left normals (..., 2) of the segments at arc lengths s."""
        j = np.clip(np.searchsorted(self.s, s, side="right") - 1, 0, len(self.seg_len) - 1)
        h = self.seg_heading[j]
        return np.stack([-np.sin(h), np.cos(h)], -1)

    def interpolate(self, s: np.ndarray) -> np.ndarray:
        """Arc lengths (...,) -> poses (..., 3), clamped to the ends."""
        s = np.clip(np.asarray(s, np.float64), 0.0, self.length)
        return np.stack([np.interp(s, self.s, self.xy[:, 0]), np.interp(s, self.s, self.xy[:, 1]), np.interp(s, self.s, self.heading)], -1)

    def offset(self, lateral: float) -> "Polyline":
        """A parallel path `lateral` metres to the left (each vertex moved along its heading's normal)."""
        if lateral == 0.0:
            return self
        n = np.stack([-np.sin(self.heading), np.cos(self.heading)], -1)
        return Polyline(self.xy + lateral * n)

    def substring(self, s0: float, s1: float) -> np.ndarray:
        """Vertices of the part between arc lengths s0 < s1 (clamped)."""
        s0, s1 = max(0.0, s0), min(self.length, s1)
        inner = self.xy[(self.s > s0) & (self.s < s1)]
        ends = self.interpolate(np.array([s0, s1]))[:, :2]
        return np.vstack([ends[:1], inner, ends[1:]])


# ----------------------------------------------------------------------------------------------
# points in polygons


class PolygonSet:
    """Polygons with their bounding boxes, for many-points-in-many-polygons queries in one call."""

    def __init__(self, rings: list[np.ndarray]):
        self.geoms = np.array([shapely.Polygon(r) for r in rings], dtype=object) if rings else np.zeros(0, dtype=object)
        if len(self.geoms):
            self.geoms = shapely.make_valid(self.geoms)
            shapely.prepare(self.geoms)
            self.bounds = shapely.bounds(self.geoms)
        else:
            self.bounds = np.zeros((0, 4))

    def __len__(self) -> int:
        return len(self.geoms)

    def contains(self, points: np.ndarray) -> np.ndarray:
        """(..., 2) points -> (..., K) bool: point strictly inside polygon k."""
        p = np.asarray(points, np.float64)
        shape = p.shape[:-1]
        p = p.reshape(-1, 2)
        out = np.zeros((len(p), len(self)), dtype=bool)
        if len(self) and len(p):
            b = self.bounds
            cand = (p[:, None, 0] >= b[None, :, 0]) & (p[:, None, 0] <= b[None, :, 2]) & (p[:, None, 1] >= b[None, :, 1]) & (p[:, None, 1] <= b[None, :, 3])
            i, k = np.nonzero(cand)
            if len(i):
                out[i, k] = shapely.contains_xy(self.geoms[k], p[i, 0], p[i, 1])
        return out.reshape(*shape, len(self))
