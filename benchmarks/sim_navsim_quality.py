"""How NAVSIM-realistic is the simulator corpus? EPDMS of reference agents on a generated pool, and crash rates.

    python benchmarks/sim_navsim_quality.py [--scenes 200] [--seed 0] [--workers 2] [--pool DIR] [--agents human,constant_velocity,pdm_closed]

Generates a pool with `mose simulate` defaults (all default environments, 30 % synthetic; renders at
--image-size, which changes nothing but the pictures) into a temporary directory, or reads --pool, then
scores each reference agent with the NAVSIM EPDMS scorer (LQR tracking, human filter on) and prints one JSON
object: per agent the mean score, the mean of every sub-metric, and the mean score per environment and per
source; plus, per source, the crash rate of episodes (the ego crashed at any simulated frame, including
episodes that crashed before their first scene) and of scenes (crash within the scene's 4 s future), and
how often the logged ego exceeds NAVSIM's comfort bounds (history comfort of the human run is the
evidence; `logged_lon_accel_outside` counts scenes whose logged accel leaves (-4.05, 2.40) m/s^2).
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np


def _means(rows, keys) -> dict:
    out = {}
    for k in keys:
        vals = np.array([r[k] for r in rows if r["valid"]], dtype=float)
        vals = vals[~np.isnan(vals)]
        out[k] = round(float(vals.mean()), 4) if len(vals) else None
    return out


def episode_crash_rates(pool_dir: Path) -> dict:
    """Per source: episodes simulated, how many had an ego crash, and the rate (from the shards on disk)."""
    from datasets_cfg.sim.corpus import read_shard
    from datasets_cfg.sim.episode import plan_episode

    cfg = json.loads((pool_dir / "sim_config.json").read_text())
    prefix = f"sim-s{cfg['seed']}-e"
    stats = defaultdict(lambda: {"episodes": 0, "crashed": 0})
    for p in sorted((pool_dir / "shards").glob(f"{prefix}*.json.gz")):
        index = int(p.name[len(prefix):-len(".json.gz")])
        plan = plan_episode(cfg["seed"], index, tuple(cfg["envs"]), cfg["synthetic_fraction"], cfg["scenes_per_episode"], cfg["stride"])
        rows = read_shard(p)
        crashed = not rows or any(json.loads(r["meta"])["crash_time_s"] is not None for r in rows)
        s = stats[plan.source]
        s["episodes"] += 1
        s["crashed"] += int(crashed)
    return {k: dict(v, rate=round(v["crashed"] / max(v["episodes"], 1), 4)) for k, v in stats.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scenes", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--pool", default="", help="score this existing simulator pool instead of generating one")
    ap.add_argument("--agents", default="human,constant_velocity,pdm_closed")
    ap.add_argument("--keep", action="store_true", help="keep the generated pool (its path is printed)")
    args = ap.parse_args()

    from datasets_cfg.schema import ScenePool
    from datasets_cfg.sim.corpus import generate
    from eval.navsim import agents as A
    from eval.navsim.config import V2_COLUMNS
    from eval.navsim.scorer import mean_score, score_scenes

    out = Path(args.pool) if args.pool else Path(tempfile.mkdtemp(prefix="simq-"))
    result: dict = {"pool": str(out)}
    try:
        if not args.pool:
            t0 = time.perf_counter()
            generate(out, args.scenes, seed=args.seed, image_size=args.image_size, workers=args.workers, progress=False)
            result["generation_seconds"] = round(time.perf_counter() - t0, 1)
        scenes = list(ScenePool.load(out))
        src = {s.id: s["source"] for s in scenes}
        env = {s.id: s["location"] for s in scenes}
        result["scenes"] = len(scenes)
        result["sources"] = {k: sum(v == k for v in src.values()) for k in sorted(set(src.values()))}
        result["crash_rate"] = {
            "episodes": episode_crash_rates(out),
            "scenes": {k: round(float(np.mean([s["crash"] for s in scenes if s["source"] == k])), 4) for k in result["sources"]},
        }
        cp_lo, cp_hi = -4.05, 2.40
        result["logged_lon_accel_outside"] = {
            k: round(float(np.mean([bool(np.any((np.asarray(s["ego"]["accel"]) <= cp_lo) | (np.asarray(s["ego"]["accel"]) >= cp_hi)))
                                    for s in scenes if s["source"] == k])), 4) for k in result["sources"]}
        result["agents"] = {}
        for name in args.agents.split(","):
            t0 = time.perf_counter()
            trajs = A.run_agent(name, scenes)
            rows = score_scenes(scenes, trajs, workers=args.workers, progress=False)
            by_env, by_src = defaultdict(list), defaultdict(list)
            for r in rows:
                by_env[env[r["token"]]].append(r["score"])
                by_src[src[r["token"]]].append(r["score"])
            result["agents"][name] = {
                "epdms": round(mean_score(rows), 4), "invalid": sum(not r["valid"] for r in rows),
                "submetrics": _means(rows, V2_COLUMNS),
                "per_env": {k: round(float(np.mean(v)), 4) for k, v in sorted(by_env.items())},
                "per_source": {k: round(float(np.mean(v)), 4) for k, v in sorted(by_src.items())},
                "per_source_submetrics": {k: _means([r for r in rows if src[r["token"]] == k], V2_COLUMNS) for k in sorted(by_src)},
                "human_filter_lifted": sum(bool(r.get("human_filter_lifted")) for r in rows),
                "seconds": round(time.perf_counter() - t0, 1),
            }
    finally:
        if not args.pool and not args.keep:
            shutil.rmtree(out, ignore_errors=True)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
