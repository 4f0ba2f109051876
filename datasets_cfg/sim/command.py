"""The driving command of a scene (left / straight / right, "unknown" without the data to tell), in two readings
that share their thresholds.

- `driving_command(row)`, from the ground-truth future (every simulated scene): "left"/"right" when the ego
  heading turns by more than TURN_RAD (0.35 rad, 20 deg) over the future, or, without such a turn, when the
  ego ends the future more than LANE_CHANGE_M (3 m) to the side (a lane change); else "straight". (NAVSIM
  derives its command from the route; ours reads the logged future.)
- `route_command(scene)`, from the route (closed-loop observations, which have no future): look at the route
  centreline `speed x HORIZON_S` ahead of the ego's projection on it (the distance the future covers at the
  current speed; speed at least 1 m/s); "left"/"right" when the route's heading there, in the ego frame, is
  turned by more than TURN_RAD, or the route point lies more than LANE_CHANGE_M to the side (the route is on
  another lane: a lane change is due); else "straight".

Sides follow the ScenePool frame: +y is to the ego's left. highway-env numbers a road's lanes from its left
edge (lane 0) to the right ("LANE_RIGHT" adds one to the lane index, and lane i lies i x 4 m further down its
y-down screen axis, i.e. to the right of a car driving +x), so an ego in lane 0 with the route on lane 2 is
told "right".
"""
from __future__ import annotations

import math

import numpy as np

from common.geometry import global_to_local

TURN_RAD = 0.35  # rad: a heading change larger than this over the horizon is a turn
LANE_CHANGE_M = 3.0  # m: a lateral offset larger than this over the horizon is a lane change
HORIZON_S = 4.0  # s: the scenes' future (8 x 0.5 s), the horizon of both readings


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


def route_command(scene, horizon_s: float = HORIZON_S) -> str:
    """left / straight / right from the route ahead of the ego, for a Scene or a row (see module doc);
    "unknown" without a route."""
    from shapely import Point

    from datasets_cfg.schema import Scene

    scene = scene if isinstance(scene, Scene) else Scene(scene)
    line = scene.route_centerline(frame="ego")
    if line is None or line.length == 0:
        return "unknown"
    v = max(float(scene["ego"]["speed"][scene.current_index]), 1.0)
    s0 = line.project(Point(0.0, 0.0))
    s1 = min(s0 + v * horizon_s, line.length)
    a, b = line.interpolate(max(s1 - 1.0, 0.0)), line.interpolate(s1)
    h = math.atan2(b.y - a.y, b.x - a.x)
    if h > TURN_RAD or b.y > LANE_CHANGE_M:
        return "left"
    if h < -TURN_RAD or b.y < -LANE_CHANGE_M:
        return "right"
    return "straight"
