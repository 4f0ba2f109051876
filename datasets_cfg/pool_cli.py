"""`mose pool DIR`: what is in a ScenePool (counts per source, dataset, split, location, annotations)."""
from __future__ import annotations

import argparse
import json
import sys
from collections import Counter

from common.errors import MoseError


def describe(pool) -> dict:
    """Counts a person checks first when opening a pool; reads only the columns it needs."""
    ds = pool.dataset
    qa = ds["qa"]
    return {
        "scenes": len(pool),
        "by_source": dict(Counter(ds["source"])),
        "by_dataset": dict(Counter(ds["dataset"])),
        "by_split": dict(Counter(ds["split"])),
        "by_location": dict(Counter(ds["location"])),
        "by_weather": dict(Counter(ds["weather"])),
        "by_lighting": dict(Counter(ds["lighting"])),
        "qa_by_task": dict(Counter(q["task"] for row in qa for q in row)),
        "scenes_with_map": sum(1 for m in ds["map"] if m["lanes"] or m["areas"]),
        "crashes": int(sum(ds["crash"])),
        "near_misses": int(sum(ds["near_miss"])),
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("pool", help="ScenePool directory")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def run(args: argparse.Namespace) -> int:
    from datasets_cfg.schema import ScenePool

    try:
        pool = ScenePool.load(args.pool)
    except (MoseError, OSError, ValueError) as exc:  # ValueError: e.g. pool.json not JSON
        print(f"mose pool: error: {exc}", file=sys.stderr)
        return 2
    info = describe(pool)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"{args.pool}: {info['scenes']} scenes, {info['scenes_with_map']} with map geometry, "
          f"{info['crashes']} crashes, {info['near_misses']} near misses")
    for key in ("by_source", "by_dataset", "by_split", "by_location", "by_weather", "by_lighting", "qa_by_task"):
        items = ", ".join(f"{k or '(unset)'}: {v}" for k, v in sorted(info[key].items()))
        print(f"  {key[3:]:<10} {items}")
    return 0
