"""Build time of the tiny preset (what the tests and the demo pay per model), against the dense model it is upcycled
from, on CPU. Prints JSON.

    python benchmarks/preset_build.py [--rounds 7]

Baseline: the same decoder built dense (`mose.presets.base_config("tiny")` through transformers' Auto class), so the
ratio says what the sparse blocks add. Rounds alternate the two builds; figures are medians. The first build of each
is a warm-up (imports, lazy registrations) and is left out.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()

    from transformers import AutoModelForImageTextToText

    from mose.presets import base_config, build_preset

    base = base_config("tiny")

    def dense():
        torch.manual_seed(0)
        return AutoModelForImageTextToText.from_config(base)

    def sparse():
        return build_preset("tiny")

    builds = {"mose_tiny": sparse, "dense_base": dense}
    for build in builds.values():
        build()  # warm-up
    seconds = {name: [] for name in builds}
    params = {}
    for _ in range(args.rounds):
        for name, build in builds.items():
            t0 = time.perf_counter()
            model = build()
            seconds[name].append(time.perf_counter() - t0)
            params[name] = sum(p.numel() for p in model.parameters())
    med = {name: statistics.median(v) for name, v in seconds.items()}
    print(json.dumps({
        "rounds": args.rounds, "threads": torch.get_num_threads(), "parameters": params,
        "median_seconds": med, "per_round_seconds": seconds,
        "mose_over_dense_build_time": med["mose_tiny"] / med["dense_base"],
    }, indent=2))


if __name__ == "__main__":
    main()
