"""Hand-built ScenePool rows for the curation tests: a straight two-lane road along the ego's start heading,
an ego driving a unicycle path (speed, yaw rate, lateral-accel wiggle), and agents moving with constant
velocity. Consecutive scenes of one log are cut from the same continuous motion (0.5 s apart)."""
from __future__ import annotations

import json

import numpy as np

from datasets_cfg.schema import ScenePool, new_row


def ego_path(times, speed=10.0, yaw_rate=0.0, accel=0.0, wiggle=0.0):
    """Unicycle from the origin heading +x: per time (x, y, heading, v, a, a_lat, w)."""
    times = np.asarray(times, float)
    fine = np.linspace(min(times.min(), 0), max(times.max(), 0), 2001)
    v = np.maximum(speed + accel * fine, 0.1)
    w = yaw_rate + wiggle * np.sin(2.0 * fine)
    h = np.concatenate([[0], np.cumsum(0.5 * (w[1:] + w[:-1]) * np.diff(fine))])
    h -= np.interp(0.0, fine, h)
    x = np.concatenate([[0], np.cumsum(0.5 * (v[1:] * np.cos(h[1:]) + v[:-1] * np.cos(h[:-1])) * np.diff(fine))])
    y = np.concatenate([[0], np.cumsum(0.5 * (v[1:] * np.sin(h[1:]) + v[:-1] * np.sin(h[:-1])) * np.diff(fine))])
    x -= np.interp(0.0, fine, x)
    y -= np.interp(0.0, fine, y)
    at = lambda arr: np.interp(times, fine, arr)  # noqa: E731
    vv, ww = at(v), at(w)
    return at(x), at(y), at(h), vv, np.full_like(times, accel), vv * ww, ww


def scene_row(sid, *, log="log0", t0=0.0, speed=10.0, yaw_rate=0.0, accel=0.0, wiggle=0.0, agents=(),
              lighting="day", weather="sunny", command="straight", location="town", history=4, future=9, dt=0.5,
              dataset="unit", source="real"):
    """One scene at absolute log time t0; `agents`: (track_id, x, y, vx, vy) at log time 0 in the log frame."""
    times = (np.arange(-history + 1, future + 1) * dt)
    x, y, h, v, a, al, w = ego_path(times + t0, speed, yaw_rate, accel, wiggle)
    ego = {"t": times.tolist(), "x": x.tolist(), "y": y.tolist(), "heading": h.tolist(), "speed": v.tolist(),
           "accel": a.tolist(), "accel_lat": al.tolist(), "yaw_rate": w.tolist()}
    ag = {k: [] for k in ("frame", "track_id", "category", "x", "y", "heading", "length", "width", "height", "vx", "vy")}
    for f, t in enumerate(times + t0):
        for tid, ax, ay, vx, vy in agents:
            for k, val in (("frame", f), ("track_id", tid), ("category", "vehicle"), ("x", ax + vx * t), ("y", ay + vy * t),
                           ("heading", float(np.arctan2(vy, vx)) if (vx or vy) else 0.0), ("length", 4.5), ("width", 1.9),
                           ("height", 1.6), ("vx", vx), ("vy", vy)):
                ag[k].append(val)
    # the road follows the ego's own path over the whole log (lane 0) with lane 1 to its left
    px, py, ph = ego_path(np.arange(-20.0, 40.0, 1.0), speed, yaw_rate, accel, wiggle)[:3]
    nx, ny = -np.sin(ph), np.cos(ph)
    strip = lambda lo, hi: np.concatenate([np.stack([px + lo * nx, py + lo * ny], 1), np.stack([px + hi * nx, py + hi * ny], 1)[::-1]]).tolist()  # noqa: E731
    lanes = [{"id": f"lane{k}", "kind": "lane", "centerline": np.stack([px + 3.5 * k * nx, py + 3.5 * k * ny], 1).tolist(),
              "polygon": strip(3.5 * k - 1.75, 3.5 * k + 1.75), "speed_limit": 15.0, "on_route": k == 0} for k in range(2)]
    areas = [{"id": "rb0", "kind": "roadblock", "polygon": strip(-1.75, 5.25)}]
    return new_row(sid, dataset, "train", source=source, location=location, weather=weather, lighting=lighting, command=command,
                   dt=dt, current_index=history - 1, ego=ego, agents=ag, map={"lanes": lanes, "areas": areas, "route": ["lane0"]},
                   meta=json.dumps({"log_name": log, "timestamp_s": float(t0)}))


def log_rows(log, n, **kw):
    """n consecutive scenes of one log, 0.5 s apart."""
    return [scene_row(f"{log}_{k:03d}", log=log, t0=0.5 * k, **kw) for k in range(n)]


def small_pool(n_logs=6, per_log=6, seed=0) -> ScenePool:
    """A varied pool: logs differ in speed, yaw rate, wiggle, lighting, weather and traffic."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n_logs):
        agents = [(f"a{i}_{j}", float(rng.uniform(5, 60)), float(rng.choice([0.0, 3.5])), float(rng.uniform(0, 12)), 0.0)
                  for j in range(int(rng.integers(0, 4)))]
        rows += log_rows(f"log{i}", per_log, speed=float(rng.uniform(4, 14)), yaw_rate=float(rng.uniform(-0.05, 0.05)),
                         wiggle=float(rng.uniform(0, 0.2)), agents=agents, lighting=["day", "night"][i % 2],
                         weather=["sunny", "rainy"][(i // 2) % 2], location=["town", "city", "hill"][i % 3])
    return ScenePool.from_rows(rows)
