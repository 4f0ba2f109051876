"""Simulator corpus throughput: scenes per second, seconds per 1k scenes and disk per scene.

    python benchmarks/sim_throughput.py [--scenes 300] [--workers 2] [--image-size 224] [--repeats 1]

Generates a fresh pool (all default environments, default synthetic fraction, 224x224 renders) into a
temporary directory and prints one JSON object. Timings include process start-up of the workers, the
rollouts, renders, annotations and the final ScenePool write (the whole `generate` call); the median over
`--repeats` runs is reported with every run's figure, with the machine's load average before and after each
run (the machine is shared: a load above the core count means other work competed for the CPUs).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path


def disk_bytes(path: Path) -> dict:
    out = {}
    for part in ("images", "scenes", "shards"):
        out[part] = sum(p.stat().st_size for p in (path / part).rglob("*") if p.is_file())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scenes", type=int, default=300)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from datasets_cfg.sim.corpus import generate

    runs = []
    for r in range(args.repeats):
        out = Path(tempfile.mkdtemp(prefix="simbench-"))
        try:
            load0 = os.getloadavg()[0]
            t0 = time.perf_counter()
            summary = generate(out, args.scenes, seed=args.seed + r, image_size=args.image_size, workers=args.workers, progress=False)
            wall = time.perf_counter() - t0
            disk = disk_bytes(out)
            runs.append({"seconds": wall, "scenes": summary["num_scenes"], "episodes": summary["episodes_simulated"], "disk": disk,
                         "load_avg_1min": [round(load0, 2), round(os.getloadavg()[0], 2)],
                         "mmd_real_vs_synthetic": (summary["distance"] or {}).get("mmd_real_vs_synthetic"),
                         "mmd_real_vs_real_split": (summary["distance"] or {}).get("mmd_real_vs_real_split")})
        finally:
            shutil.rmtree(out, ignore_errors=True)
    sps = [r["scenes"] / r["seconds"] for r in runs]
    med = statistics.median(sps)
    n = runs[0]["scenes"]
    disk = {k: statistics.median(r["disk"][k] for r in runs) / n for k in runs[0]["disk"]}
    print(json.dumps({
        "scenes": n, "workers": args.workers, "image_size": args.image_size, "cpu_count": os.cpu_count(),
        "scenes_per_s": round(med, 2), "seconds_per_1k_scenes": round(1000.0 / med, 1),
        "disk_kb_per_scene": {k: round(v / 1024, 1) for k, v in disk.items()} | {"pool_total": round(sum(disk.values()) / 1024, 1),
                                                                               "pool_without_shards": round((disk["images"] + disk["scenes"]) / 1024, 1)},
        "runs": [{"scenes_per_s": round(s, 2), "seconds": round(r["seconds"], 2), "episodes": r["episodes"], "load_avg_1min": r["load_avg_1min"],
                  "mmd_real_vs_synthetic": r["mmd_real_vs_synthetic"], "mmd_real_vs_real_split": r["mmd_real_vs_real_split"]}
                 for s, r in zip(sps, runs)],
        "target_scenes_per_s": 5.0, "meets_target": med >= 5.0,
    }, indent=2))


if __name__ == "__main__":
    main()
