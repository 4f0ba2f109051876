"""Hand-built ScenePool rows for the semantic / AutoScale / plan tests (issue 9).

A straight road along +x (lanes every 3.5 m to the left of y = 0), an ego at the origin at t = 0 driving
+x at constant `speed`, agents moving at constant velocity. 1.5 s of history and 4 s of future at 2 Hz, so
`future_trajectory(8)` works and agent positions at every frame are known in closed form.
"""
from __future__ import annotations

import json

import numpy as np

from datasets_cfg.schema import ScenePool, new_row

TIMES = np.arange(-3, 9) * 0.5  # 12 frames, current index 3


def road(n_lanes: int = 2, length: float = 200.0, curve: float = 0.0) -> dict:
    """Lanes from x = -50 to length - 50 m; `curve` bends them (y += curve * x^2)."""
    xs = np.linspace(-50.0, length - 50.0, 41)
    lanes = []
    for k in range(n_lanes):
        c = np.stack([xs, 3.5 * k + curve * xs ** 2], 1)
        poly = np.concatenate([c + [0, -1.75], (c + [0, 1.75])[::-1]])
        lanes.append({"id": f"lane{k}", "kind": "lane", "centerline": c.tolist(), "polygon": poly.tolist(), "speed_limit": 20.0,
                      "on_route": k == 0})
    area = np.concatenate([np.stack([xs, np.full_like(xs, -1.75)], 1), np.stack([xs, np.full_like(xs, 3.5 * n_lanes - 1.75)], 1)[::-1]])
    return {"lanes": lanes, "areas": [{"id": "rb", "kind": "roadblock", "polygon": area.tolist()}], "route": ["lane0"]}


def scene(sid: str, *, speed: float = 10.0, agents=(), source: str = "real", location: str = "highway", skills=(), log: str | None = None,
          n_lanes: int = 2, curve: float = 0.0, lighting: str = "day", weather: str = "sunny", ego_y: float = 0.0, yaw_rate: float = 0.0) -> dict:
    """One row; `agents`: (track_id, x0, y0, vx, vy) at t = 0 in the global (= current ego) frame."""
    t = TIMES
    ego = {"t": t.tolist(), "x": (speed * t).tolist(), "y": [ego_y] * len(t), "heading": [0.0] * len(t), "speed": [speed] * len(t),
           "accel": [0.0] * len(t), "accel_lat": [0.0] * len(t), "yaw_rate": [yaw_rate] * len(t)}
    ag = {k: [] for k in ("frame", "track_id", "category", "x", "y", "heading", "length", "width", "height", "vx", "vy")}
    for f, tf in enumerate(t):
        for tid, x0, y0, vx, vy in agents:
            for k, v in (("frame", f), ("track_id", tid), ("category", "vehicle"), ("x", x0 + vx * tf), ("y", y0 + vy * tf),
                         ("heading", float(np.arctan2(vy, vx)) if (vx or vy) else 0.0), ("length", 4.0), ("width", 2.0),
                         ("height", 1.5), ("vx", vx), ("vy", vy)):
                ag[k].append(v)
    meta = {"log_name": log or sid, "timestamp_s": 0.0, "ego_size": {"length": 4.0, "width": 2.0, "rear_axle_to_center": 0.0}}
    return new_row(sid, "unit", "train", source=source, location=location, lighting=lighting, weather=weather, command="straight",
                   dt=0.5, current_index=3, ego=ego, agents=ag, map=road(n_lanes, curve=curve), skills=list(skills), meta=json.dumps(meta))


def mixed_rows(n: int = 40, seed: int = 0) -> list[dict]:
    """Half real / half synthetic, two environments, varied traffic; a quarter have a close leading agent."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        src = "real" if i % 2 == 0 else "synthetic"
        env = "highway" if (i // 2) % 2 == 0 else "merge"
        k = int(rng.integers(0, 4))
        agents = [(f"a{i}_{j}", float(rng.uniform(15, 60)), 3.5 * int(rng.integers(0, 2)), float(rng.uniform(5, 12)), 0.0) for j in range(k)]
        if i % 4 == 1:
            agents.append((f"lead{i}", 6.0, 0.0, 4.0, 0.0))  # slower car just ahead: a hazard for a constant-speed plan
        skills = ["vehicles"] + (["interaction_risk"] if i % 4 == 1 else []) + (["lateral_control"] if i % 3 == 0 else [])
        rows.append(scene(f"s{i:03d}", speed=float(rng.uniform(6, 14)), agents=agents, source=src, location=env, skills=skills,
                          yaw_rate=float(rng.normal(0, 0.02))))
    return rows


def mixed_pool(n: int = 40, seed: int = 0) -> ScenePool:
    return ScenePool.from_rows(mixed_rows(n, seed))


class FakeRatioFeedback:
    """A named fake AutoScale feedback for tests: the score peaks when `target` of the mixture is synthetic."""

    def __init__(self, pool, target: float = 0.25):
        self.src = dict(zip(pool.ids, pool.column("source")))
        self.target = target
        self.calls = 0

    def evaluate(self, ids):
        self.calls += 1
        f = float(np.mean([self.src[i] == "synthetic" for i in ids]))
        return {"score": 1.0 - (f - self.target) ** 2, "synthetic_fraction": f}
