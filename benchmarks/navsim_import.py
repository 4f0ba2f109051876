"""Throughput of `mose import navsim` on a synthetic log in the exact OpenScene format; prints JSON.

python benchmarks/navsim_import.py [--frames 200] [--agents 60] [--lanes 2000] [--repeats 3]

Reports medians over repeats of: unpickling + frame parsing + scene building (`convert`), with and without
a map, and `ScenePool.from_rows` on the result. The synthetic log drives straight through a grid of lanes.
"""
from __future__ import annotations

import argparse
import json
import math
import pickle
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from datasets_cfg.schema import ScenePool
from datasets_cfg.sources.navsim import CAMERAS, convert_logs
from datasets_cfg.sources.navsim_map import write_map


def synthetic_log(frames: int, agents: int, rng: np.random.Generator) -> list[dict]:
    out = []
    for i in range(frames):
        yaw = 0.3 + 0.01 * i
        boxes = np.concatenate([rng.uniform(-50, 50, (agents, 2)), rng.uniform(0, 1, (agents, 1)), rng.uniform(0.5, 5, (agents, 3)),
                                rng.uniform(-3, 3, (agents, 1))], 1)
        out.append({
            "token": f"t{i:05d}", "timestamp": 1_600_000_000_000_000 + 500_000 * i, "log_name": "bench", "scene_token": "s",
            "map_location": "loc", "ego2global_translation": np.array([2.5 * i * math.cos(0.3), 2.5 * i * math.sin(0.3), 0.0]),
            "ego2global_rotation": np.array([math.cos(yaw / 2), 0, 0, math.sin(yaw / 2)]), "ego_dynamic_state": [5.0, 0.0, 0.1, 0.0],
            "driving_command": np.array([0, 1, 0, 0]), "lidar_path": f"bench/lidar/{i}.pcd",
            "cams": {c: {"data_path": f"bench/{c}/{i}.jpg", "sensor2lidar_rotation": np.eye(3), "sensor2lidar_translation": np.zeros(3),
                         "cam_intrinsic": np.eye(3), "distortion": np.zeros(5)} for c in CAMERAS},
            "anns": {"gt_boxes": boxes, "gt_names": np.array(["vehicle"] * agents), "gt_velocity_3d": rng.normal(0, 3, (agents, 3)),
                     "instance_tokens": [f"i{i}_{k}" for k in range(agents)], "track_tokens": [f"a{k}" for k in range(agents)]},
            "traffic_lights": [(7, False)], "roadblock_ids": [f"rb{k}" for k in range(0, 40)],
        })
    return out


def grid_map(path: Path, lanes: int) -> Path:
    per_row = int(math.ceil(math.sqrt(lanes)))
    items = []
    for k in range(lanes):
        r, c = divmod(k, per_row)
        x0, y = 50.0 * c - 500, 4.0 * r - 2 * per_row
        items.append({"id": str(k), "kind": "lane", "roadblock_id": f"rb{c}", "centerline": [[x0, y], [x0 + 50, y]],
                      "polygon": [[x0, y - 2], [x0 + 50, y - 2], [x0 + 50, y + 2], [x0, y + 2]]})
    return write_map(path, items, location="loc")


def median_time(fn, repeats: int):
    times, result = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--frames", type=int, default=200)
    ap.add_argument("--agents", type=int, default=60)
    ap.add_argument("--lanes", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        log = tmp / "bench.pkl"
        log.write_bytes(pickle.dumps(synthetic_log(args.frames, args.agents, np.random.default_rng(0)), protocol=5))
        map_path = grid_map(tmp / "map.geojson", args.lanes)
        t_plain, (rows, _) = median_time(lambda: convert_logs([log], sensor_root=tmp), args.repeats)
        t_map, (rows_map, _) = median_time(lambda: convert_logs([log], sensor_root=tmp, maps=[map_path]), args.repeats)
        t_pool, _ = median_time(lambda: ScenePool.from_rows(rows_map), args.repeats)
    n = len(rows)
    print(json.dumps({
        "frames": args.frames, "agents_per_frame": args.agents, "map_lanes": args.lanes, "scenes": n, "repeats": args.repeats,
        "convert_s": round(t_plain, 4), "scenes_per_s": round(n / t_plain, 1),
        "convert_with_map_s": round(t_map, 4), "scenes_per_s_with_map": round(n / t_map, 1),
        "mean_lanes_per_scene": round(float(np.mean([len(r["map"]["lanes"]) for r in rows_map])), 1),
        "from_rows_s": round(t_pool, 4), "map_overhead_ratio": round(t_map / t_plain, 2),
    }, indent=2))


if __name__ == "__main__":
    main()
