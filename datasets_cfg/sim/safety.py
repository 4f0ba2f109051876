"""Safety measures of a scene row and its driving command, computed from the row's own boxes.

Near miss (our definition, over every 2 Hz frame of the scene, history and future):
- min_gap_m: the smallest distance between the ego box and any agent box (0 when they touch);
- min_ttc_s: the smallest time to collision with an agent ahead in the ego's path: an agent whose centre
  is ahead of the ego centre and whose box overlaps the ego's lateral extent (+0.3 m), closing at more
  than 0.1 m/s along the ego heading; TTC = bumper gap / closing speed.
A scene is a near miss when it has no crash and min_gap_m < NEAR_MISS_GAP_M or min_ttc_s < NEAR_MISS_TTC_S.
The crash flag itself comes from the simulator (`vehicle.crashed`), not from these boxes.

Driving command: "left"/"right" when the ego heading turns by more than 0.35 rad (20 deg) over the future,
or, without such a turn, when the ego ends the future more than 3 m to the side (a lane change); else
"straight". (NAVSIM derives its command from the route; ours reads the ground-truth future.)
Without a future (closed-loop observations), `route_command` reads the route instead: the same turn threshold on
the route's heading change between the ego's position and the distance the ego covers in the same horizon at
its current speed (at least `min_lookahead_m`). Lane changes are not inferred from the route.
"""
from __future__ import annotations

import math

import numpy as np

from common.geometry import box_corners, global_to_local, wrap_angle
from datasets_cfg.sim.export import REAR_AXLE_TO_CENTER

NEAR_MISS_GAP_M = 1.0
NEAR_MISS_TTC_S = 1.5
TURN_RAD = 0.35
LANE_CHANGE_M = 3.0
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


def driving_command(row: dict) -> str:
    """left / straight / right from the ground-truth future (see module doc)."""
    e = row["ego"]
    ci = int(row["current_index"])
    if ci >= len(e["x"]) - 1:
        return "unknown"
    pose = np.array([e["x"][ci], e["y"][ci], e["heading"][ci]])
    end = global_to_local(np.array([e["x"][-1], e["y"][-1], e["heading"][-1]]), pose)
    hh = np.unwrap(np.asarray(e["heading"][ci:], float))
    turn = float(hh[-1] - hh[0])
    if turn > TURN_RAD:
        return "left"
    if turn < -TURN_RAD:
        return "right"
    if end[1] > LANE_CHANGE_M:
        return "left"
    if end[1] < -LANE_CHANGE_M:
        return "right"
    return "straight"


def route_command(row: dict, horizon_s: float = 4.0, min_lookahead_m: float = 10.0) -> str:
    """left / straight / right from the route ahead of the ego (for rows without a future; see module doc)."""
    from shapely import Point

    from datasets_cfg.schema import Scene

    line = Scene(row).route_centerline("ego")
    if line is None or line.length < 1.0:
        return "unknown"
    speed = float(row["ego"]["speed"][int(row["current_index"])])
    start = line.project(Point(0.0, 0.0))
    end = min(start + max(speed * horizon_s, min_lookahead_m), line.length)

    def heading(s: float) -> float:
        a, b = line.interpolate(max(s - 1.0, 0.0)), line.interpolate(min(s + 1.0, line.length))
        return math.atan2(b.y - a.y, b.x - a.x)

    turn = wrap_angle(heading(end) - heading(start))
    return "left" if turn > TURN_RAD else "right" if turn < -TURN_RAD else "straight"
