"""Speed of the standalone NAVSIM scorer (EPDMS, LQR tracking on), printed as JSON.

    python benchmarks/navsim_speed.py [--scenes 256] [--workers 2] [--repeats 3] [--agents 5,20,50,100]

Scenes are hand-built road scenes in the ScenePool format (eval.navsim.fixtures): four same-direction lanes
plus an oncoming lane, traffic at random speeds, a few static objects, a traffic-light connector, logs of 8
frames (so EC is computed). The ground-truth trajectory is scored.

- cold: everything per scene, including the PDM-Closed reference planner and the human-filter run (a first
  evaluation of a dataset);
- warm: the reference and human results come from a ReferenceCache (NAVSIM's metric cache), as when a
  second model is scored on the same scenes.
Each figure is the median of `--repeats` runs. The machine is shared, so wall-clock rates depend on what else
runs (see load_average); CPU milliseconds per scene (this process and its workers) do not, and give the
idle-machine estimate. "scaling" repeats the measurement for each number of agents per scene.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import numpy as np

from eval.navsim import agents as ref_agents
from eval.navsim import fixtures as F
from eval.navsim.scorer import ReferenceCache, mean_score, score_scenes


def make_scenes(n: int, n_agents: int, seed: int = 0, frames_per_log: int = 8):
    rng = np.random.default_rng(seed)
    scenes = []
    for log in range(int(np.ceil(n / frames_per_log))):
        lane = rng.integers(0, 3)
        v_ego = rng.uniform(6, 14)
        xs = rng.uniform(-60, 160, n_agents)
        lanes = rng.integers(0, 5, n_agents)
        speeds = rng.uniform(3, 16, n_agents)
        static = rng.uniform(size=n_agents) < 0.1
        # keep a gap around the ego's start in its own lane
        bad = (lanes == lane) & (np.abs(xs) < 12)
        xs[bad] += 30

        def agents_fn(t0, xs=xs, lanes=lanes, speeds=speeds, static=static):
            out = []
            for k in range(n_agents):
                oncoming = lanes[k] == 4
                v = 0.0 if static[k] else (-speeds[k] if oncoming else speeds[k])
                out.append(F.vehicle(f"a{k}", xs[k] + v * t0, 3.5 * lanes[k], vx=v, heading=np.pi if oncoming else 0.0,
                                     category="traffic_cone" if static[k] else "vehicle", **({"length": 0.5, "width": 0.5} if static[k] else {})))
            return out

        reds = [(0, t) for t in np.arange(-1.5, 5.01, 0.5)] if log % 4 == 0 else []
        scenes += F.log_scenes(frames_per_log, ego=F.constant_accel(y=3.5 * lane, speed=v_ego, accel=rng.uniform(-0.5, 0.5)), agents_fn=agents_fn,
                               log_name=f"bench{log:04d}", lanes=4, oncoming_lanes=1, ego_lane=int(lane),
                               connectors=[(180, 200)], red_lights=reds)
    return scenes[:n]


def _cpu() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def timed(fn, repeats: int) -> tuple[float, float, object]:
    """Median wall time and median CPU time (this process + its workers) of `repeats` calls."""
    walls, cpus, out = [], [], None
    for _ in range(repeats):
        t, c = time.perf_counter(), _cpu()
        out = fn()
        walls.append(time.perf_counter() - t)
        cpus.append(_cpu() - c)
    return statistics.median(walls), statistics.median(cpus), out


def measure(scenes, workers: int, repeats: int) -> dict:
    preds = ref_agents.human(scenes)
    n = len(scenes)
    cold_s, cold_cpu, rows = timed(lambda: score_scenes(scenes, preds, workers=workers, progress=False), repeats)
    cache = ReferenceCache()
    score_scenes(scenes, preds, workers=workers, reference_cache=cache, progress=False)
    warm_s, warm_cpu, _ = timed(lambda: score_scenes(scenes, preds, workers=workers, reference_cache=cache, progress=False), repeats)
    return {"cold_scenes_per_s": round(n / cold_s, 1), "warm_scenes_per_s": round(n / warm_s, 1),
            "cold_ms_per_scene": round(1000 * cold_s / n, 2), "warm_ms_per_scene": round(1000 * warm_s / n, 2),
            # CPU time is what a busy shared machine does not distort: scenes/s on `workers` idle cores ~ workers * 1000 / cpu_ms
            "cold_cpu_ms_per_scene": round(1000 * cold_cpu / n, 2), "warm_cpu_ms_per_scene": round(1000 * warm_cpu / n, 2),
            "mean_epdms_gt": round(mean_score(rows), 4), "valid": sum(r["valid"] for r in rows)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scenes", type=int, default=256)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--agents", default="5,20,50,100")
    p.add_argument("--main-agents", type=int, default=20, help="agents per scene for the headline figure")
    args = p.parse_args()

    counts = [int(a) for a in args.agents.split(",") if a]
    score_scenes(make_scenes(8, 5), ref_agents.human(make_scenes(8, 5)))  # warm imports and caches
    main_scenes = make_scenes(args.scenes, args.main_agents)
    headline = measure(main_scenes, args.workers, args.repeats)
    single = measure(main_scenes, 1, args.repeats)
    scaling = {str(n): measure(make_scenes(args.scenes, n, seed=n), args.workers, args.repeats) for n in counts}
    out = {
        "benchmark": "navsim_speed", "metric": "epdms", "tracking": "lqr", "scenes": args.scenes, "agents_per_scene": args.main_agents,
        "workers": args.workers, "cpu_count": os.cpu_count(), "python": platform.python_version(),
        "load_average_1_5_15_min_at_end": [round(x, 2) for x in os.getloadavg()],  # a shared machine: other jobs compete
        "headline": headline, "single_process": single,
        "speedup_workers_vs_single_cold": round(headline["cold_scenes_per_s"] / single["cold_scenes_per_s"], 2),
        "scaling_with_agents": scaling,
        "target_scenes_per_s": 50, "meets_target_cold": headline["cold_scenes_per_s"] >= 50, "meets_target_warm": headline["warm_scenes_per_s"] >= 50,
        "idle_2_core_estimate_cold_scenes_per_s": round(2 * 1000 / headline["cold_cpu_ms_per_scene"], 1),
        "idle_2_core_estimate_warm_scenes_per_s": round(2 * 1000 / headline["warm_cpu_ms_per_scene"], 1),
        "navtest_12146_scenes_minutes_cold": round(12146 / headline["cold_scenes_per_s"] / 60, 2),
        "navtest_12146_scenes_minutes_warm": round(12146 / headline["warm_scenes_per_s"] / 60, 2),
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
