"""Safety measures of a scene row, computed from the row's own boxes (its driving command: command.py).

Near miss (our definition, over every 2 Hz frame of the scene, history and future):
- min_gap_m: the smallest distance between the ego box and any agent box (0 when they touch);
- min_ttc_s: the smallest time to collision with an agent ahead in the ego's path: an agent whose centre
  is ahead of the ego centre and whose box overlaps the ego's lateral extent (+0.3 m), closing at more
  than 0.1 m/s along the ego heading; TTC = bumper gap / closing speed.
A scene is a near miss when it has no crash and min_gap_m < NEAR_MISS_GAP_M or min_ttc_s < NEAR_MISS_TTC_S.
The crash flag itself comes from the simulator (`vehicle.crashed`), not from these boxes.
"""
from __future__ import annotations

import numpy as np

from common.geometry import box_corners, global_to_local
from datasets_cfg.sim.export import REAR_AXLE_TO_CENTER

NEAR_MISS_GAP_M = 1.0
NEAR_MISS_TTC_S = 1.5
NO_VALUE = 99.0  # reported when nothing is near / nothing is closing


def _ego_boxes(row: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    e = row["ego"]
    h = np.asarray(e["heading"], float)
    cx = np.asarray(e["x"], float) + REAR_AXLE_TO_CENTER * np.cos(h)
    cy = np.asarray(e["y"], float) + REAR_AXLE_TO_CENTER * np.sin(h)
    return cx, cy, h


def scene_safety(row: dict, ego_length: float = 5.0, ego_width: float = 2.0) -> dict:
    """{'min_gap_m', 'min_ttc_s'} over all frames of the row (see module doc)."""
    from shapely import Polygon

    cx, cy, h = _ego_boxes(row)
    speed = np.asarray(row["ego"]["speed"], float)
    a = row["agents"]
    frames = np.asarray(a["frame"], int)
    ax, ay = np.asarray(a["x"], float), np.asarray(a["y"], float)
    ah = np.asarray(a["heading"], float)
    al, aw = np.asarray(a["length"], float), np.asarray(a["width"], float)
    avx, avy = np.asarray(a["vx"], float), np.asarray(a["vy"], float)
    min_gap, min_ttc = NO_VALUE, NO_VALUE
    for f in range(len(cx)):
        idx = np.flatnonzero(frames == f)
        if not len(idx):
            continue
        local = global_to_local(np.stack([ax[idx], ay[idx]], -1), np.array([cx[f], cy[f], h[f]]))
        dist = np.hypot(local[:, 0], local[:, 1])
        close = dist < 15.0
        if close.any():
            ego_poly = Polygon(box_corners(cx[f], cy[f], h[f], ego_length, ego_width))
            for k in idx[close]:
                gap = ego_poly.distance(Polygon(box_corners(ax[k], ay[k], ah[k], al[k], aw[k])))
                min_gap = min(min_gap, float(gap))
        # time to collision with agents in the ego's path
        c, s = np.cos(h[f]), np.sin(h[f])
        v_along = avx[idx] * c + avy[idx] * s
        ahead = (local[:, 0] > 0) & (np.abs(local[:, 1]) < (ego_width + aw[idx]) / 2.0 + 0.3)
        closing = speed[f] - v_along
        gap_long = local[:, 0] - (ego_length + al[idx]) / 2.0
        ok = ahead & (closing > 0.1)
        if ok.any():
            ttc = np.maximum(gap_long[ok], 0.0) / closing[ok]
            min_ttc = min(min_ttc, float(ttc.min()))
    return {"min_gap_m": round(min_gap, 3), "min_ttc_s": round(min_ttc, 3)}


def is_near_miss(safety: dict, crash: bool) -> bool:
    return (not crash) and (safety["min_gap_m"] < NEAR_MISS_GAP_M or safety["min_ttc_s"] < NEAR_MISS_TTC_S)
