"""Hand-built road scenes in the exact ScenePool format: straight multi-lane roads with an ego, other road
users, static objects, traffic lights and intersections. Used by the scorer's tests and benchmark and as a
quick sanity check of any planner; nothing here is a stand-in for real data.

Geometry: lanes run along +x, lane k's centre is at y = k * lane_width (k = 0 is the ego's rightmost lane;
+y is left). Oncoming lanes (driving -x) sit to the left of the last forward lane. One roadblock polygon
covers all lanes; optional connector spans split the ego lane into lane / lane_connector / lane (the
connectors can carry traffic lights) and optional intersection areas overlay the road.
"""
from __future__ import annotations

import json
from typing import Callable, Sequence

import numpy as np

from datasets_cfg.schema import Scene, new_row, validate_row

EgoFn = Callable[[np.ndarray], tuple]  # t -> (x, y, heading, speed, accel)


def _rect(x0: float, x1: float, y0: float, y1: float) -> list:
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1]]


def constant_accel(x0: float = 0.0, y: float = 0.0, speed: float = 10.0, accel: float = 0.0) -> EgoFn:
    """Ego moving along +x at lane centre y with constant acceleration (stopping at 0 speed)."""

    def fn(t):
        t = np.asarray(t, float)
        if accel < 0:
            t_stop = speed / -accel
            tc = np.minimum(t, t_stop)
        else:
            tc = t
        v = np.maximum(speed + accel * tc, 0.0)
        x = x0 + speed * tc + 0.5 * accel * tc**2
        return x, np.full_like(t, y), np.zeros_like(t), v, np.where(v > 0, accel, 0.0) * np.ones_like(t)

    return fn


def road_scene(
    id: str = "scene0",
    *,
    ego: EgoFn | None = None,
    lanes: int = 3,
    oncoming_lanes: int = 0,
    lane_width: float = 3.5,
    x_range: tuple = (-150.0, 350.0),
    ego_lane: int = 0,
    connectors: Sequence[tuple] = (),
    intersections: Sequence[tuple] = (),
    agents: Sequence[dict] = (),
    red_lights: Sequence[tuple] = (),
    speed_limit: float = 15.0,
    history_s: float = 1.5,
    future_s: float = 5.0,
    dt: float = 0.5,
    log_name: str = "log0",
    timestamp_s: float = 0.0,
    source: str = "real",
    dataset: str = "fixture",
    with_map: bool = True,
) -> Scene:
    """A validated Scene.

    agents: dicts with track_id, category, length, width and `fn(t) -> (x, y, heading, vx, vy)` over times
    relative to the current frame (absolute scene time = timestamp_s + t), optional `frames` (times at which
    it is observed; default all frames).
    connectors: (x_start, x_end) spans of the ego lane that are lane connectors ("lc0", "lc1", ...).
    red_lights: (connector index, t) pairs: that connector's light is red in the frame at time t.
    intersections: (x_start, x_end) spans covered by an intersection area.
    """
    ego = ego or constant_accel(y=ego_lane * lane_width)
    times = np.round(np.arange(-history_s, future_s + 1e-9, dt), 9)
    ci = int(np.argmin(np.abs(times)))
    times = times - times[ci]
    ex, ey, eh, ev, ea = (np.asarray(v, float) * np.ones_like(times) for v in ego(times))
    yaw_rate = np.gradient(np.unwrap(eh), times) if len(times) > 1 else np.zeros_like(times)
    egod = {"t": times.tolist(), "x": ex.tolist(), "y": ey.tolist(), "heading": eh.tolist(), "speed": ev.tolist(),
            "accel": ea.tolist(), "accel_lat": (ev * yaw_rate).tolist(), "yaw_rate": yaw_rate.tolist()}

    xa, xb = x_range
    w = lane_width
    map_lanes, areas, route = [], [], []
    if with_map:
        for k in range(lanes):
            yc = k * w
            if k == ego_lane and connectors:
                cuts = [xa] + [c for span in connectors for c in span] + [xb]
                for s in range(len(cuts) - 1):
                    x0, x1 = cuts[s], cuts[s + 1]
                    is_conn = s % 2 == 1
                    lid = f"lc{s // 2}" if is_conn else f"lane{k}_{s // 2}"
                    map_lanes.append({"id": lid, "kind": "lane_connector" if is_conn else "lane", "centerline": [[x0, yc], [x1, yc]],
                                      "polygon": _rect(x0, x1, yc - w / 2, yc + w / 2), "speed_limit": speed_limit, "on_route": True})
                    route.append(lid)
            else:
                lid = f"lane{k}"
                map_lanes.append({"id": lid, "kind": "lane", "centerline": [[xa, yc], [xb, yc]], "polygon": _rect(xa, xb, yc - w / 2, yc + w / 2),
                                  "speed_limit": speed_limit, "on_route": k == ego_lane})
                if k == ego_lane:
                    route.append(lid)
        for j in range(oncoming_lanes):
            yc = (lanes + j) * w
            map_lanes.append({"id": f"oncoming{j}", "kind": "lane", "centerline": [[xb, yc], [xa, yc]], "polygon": _rect(xa, xb, yc - w / 2, yc + w / 2),
                              "speed_limit": speed_limit, "on_route": False})
        y_lo, y_hi = -w / 2, (lanes + oncoming_lanes - 0.5) * w
        areas.append({"id": "roadblock0", "kind": "roadblock", "polygon": _rect(xa, xb, y_lo, y_hi)})
        for s, (x0, x1) in enumerate(intersections):
            areas.append({"id": f"intersection{s}", "kind": "intersection", "polygon": _rect(x0, x1, y_lo, y_hi)})

    ag = {k: [] for k in ("frame", "track_id", "category", "x", "y", "heading", "length", "width", "height", "vx", "vy")}
    for a in agents:
        obs_times = a.get("frames")
        for f, t in enumerate(times):
            if obs_times is not None and not np.any(np.isclose(obs_times, t)):
                continue
            x, y, h, vx, vy = (float(v) for v in a["fn"](t))
            for k, v in (("frame", f), ("track_id", a["track_id"]), ("category", a.get("category", "vehicle")), ("x", x), ("y", y),
                         ("heading", h), ("length", a.get("length", 4.5)), ("width", a.get("width", 1.9)), ("height", 1.6), ("vx", vx), ("vy", vy)):
                ag[k].append(v)

    tl = {"frame": [], "lane_id": [], "is_red": []}
    for conn, t in red_lights:
        f = int(np.argmin(np.abs(times - t)))
        tl["frame"].append(f)
        tl["lane_id"].append(f"lc{conn}")
        tl["is_red"].append(True)

    row = new_row(id, dataset, "test", source=source, dt=dt, current_index=ci, ego=egod, agents=ag,
                  map={"lanes": map_lanes, "areas": areas, "route": route}, traffic_lights=tl,
                  meta=json.dumps({"log_name": log_name, "timestamp_s": float(timestamp_s)}))
    validate_row(row, f"fixture {id}")
    return Scene(row)


def vehicle(track_id: str, x: float, y: float, vx: float = 0.0, vy: float = 0.0, heading: float | None = None, category: str = "vehicle",
            length: float = 4.5, width: float = 1.9, **extra) -> dict:
    """An agent moving with constant velocity from (x, y) at t = 0 (heading from the velocity unless given)."""
    h = float(np.arctan2(vy, vx)) if heading is None and (vx or vy) else float(heading or 0.0)

    def fn(t):
        return x + vx * t, y + vy * t, h, vx, vy

    return {"track_id": track_id, "category": category, "fn": fn, "length": length, "width": width, **extra}


def log_scenes(n: int, *, ego: EgoFn, dt: float = 0.5, log_name: str = "log0", agents_fn=None, **kw) -> list[Scene]:
    """n consecutive scenes of one log, 0.5 s apart, all cut from the same continuous ego motion."""
    out = []
    for k in range(n):
        t0 = k * dt

        def shifted(t, t0=t0):
            return ego(np.asarray(t) + t0)

        agents = agents_fn(t0) if agents_fn else ()
        out.append(road_scene(f"{log_name}_{k:03d}", ego=shifted, agents=agents, log_name=log_name, timestamp_s=t0, dt=dt, **kw))
    return out
