"""Choose MOSAIC's benchmark configuration WITHOUT the test set (nested split), for benchmarks/data_efficiency.py.

    python benchmarks/data_efficiency_tune.py --out runs/data_efficiency [--budgets 100,200] [--seeds 0,1]
        [--domains kmeans4,location,source,location+source] [--importance high,low] [--repeats 1] [--name results]

Uses the benchmark's pool and splits (OUT/splits.json; run data_efficiency.py once first, or it builds them).
The test logs T are dropped entirely. Inner split: a feedback set F (real logs drawn from the training logs,
same rule and size as the validation set) gives every variant's pilot its model feedback; each selection is
scored on the benchmark's validation set V; the candidates are the training pool minus F. Random selection on
the same candidates (3 seeds) is the reference. Criterion (OURS): the variant with the highest mean V score
over the tuning budgets and seeds. Writes OUT/tune/<name>.json and prints it.

Variants: the domain definition (k-means on scene features with 4 clusters — the library default —, the
environment `location`, the data `source`, or both) x the importance direction (high / low).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

DOMAINS = {"kmeans4": {"n_domains": 4}, "location": {"domain_key": "location"}, "source": {"domain_key": "source"},
           "location+source": {"domain_key": "location+source"}}
IMPORTANCE = ("high", "low")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/data_efficiency")
    ap.add_argument("--budgets", default="100,200")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--domains", default=",".join(DOMAINS))
    ap.add_argument("--importance", default=",".join(IMPORTANCE))
    ap.add_argument("--repeats", default="1", help="MOSAIC pilot_repeats values to try (pilot runs averaged over redrawn base sets)")
    ap.add_argument("--name", default="results", help="writes OUT/tune/<name>.json")
    ap.add_argument("--no-progress", action="store_true")
    args, rest = ap.parse_known_args(argv)

    from tqdm.auto import tqdm

    from benchmarks.data_efficiency import CONFIG, get_pool, get_splits, ints, parse_args
    from benchmarks.data_efficiency_methods import BenchPilot, Context, make_splits, select
    from common.atomic import write_json

    bargs = parse_args(["--out", args.out, *rest])
    pool = get_pool(bargs, not args.no_progress)
    outer = get_splits(pool, bargs, Path(args.out))
    inner = make_splits(pool.select_ids(outer["train"]), bargs.val_size, 0, bargs.test_source, bargs.split_seed + 1)
    splits = {"train": inner["train"], "val": inner["test"], "test": outer["test"]}  # val = F (feedback); T stays excluded
    budgets, seeds = ints(args.budgets, "--budgets"), ints(args.seeds, "--seeds")
    pilot_cfg = dict(CONFIG["pilot"])
    score_pilot = BenchPilot(pool, outer["val"], **pilot_cfg)  # the tuning score: V
    fb_pilot = BenchPilot(pool, splits["val"], reference_cache=score_pilot.reference_cache, **pilot_cfg)
    excl = set(outer["test"]) | set(outer["val"]) | set(splits["val"])

    t0 = time.perf_counter()
    rows = {}
    ref_budgets = sorted(set(budgets) | {2 * max(budgets)})
    ctx = Context(pool, {**splits, "val": list(splits["val"]) + list(outer["val"])}, fb_pilot, {}, progress=False)
    rows["random"] = {b: [score_pilot.fit_and_score(select("random", ctx, b, s)[0])["score"] for s in (0, 1, 2)] for b in ref_budgets}
    variants = [(d, i, r) for d in args.domains.split(",") for i in args.importance.split(",") for r in ints(args.repeats, "--repeats")]
    base_cfg = {k: v for k, v in CONFIG["mosaic"].items() if k not in ("n_domains", "domain_key", "importance")}
    allocations = {}
    for d, imp, rep in tqdm(variants, desc="MOSAIC variants", disable=args.no_progress):
        name = f"{d}/{imp}" + (f"/repeats{rep}" if rep != 1 else "")
        ctx = Context(pool, {**splits, "val": list(splits["val"]) + list(outer["val"])}, fb_pilot,
                      {"mosaic": {**base_cfg, **DOMAINS[d], "importance": imp, "pilot_repeats": rep}}, progress=False)
        rows[name], allocations[name] = {}, {}
        for b in budgets:
            rows[name][b] = []
            for s in seeds:
                ids, state = select("mosaic", ctx, b, s)
                if set(ids) & excl:
                    raise RuntimeError(f"tuning: {name} selected held-out scenes")
                rows[name][b].append(score_pilot.fit_and_score(ids)["score"])
                allocations[name][f"b{b}_seed{s}"] = state["allocation"]
    table = {}
    for name, per in rows.items():
        table[name] = {str(b): {"mean": float(np.mean(v)), "std": float(np.std(v, ddof=1)) if len(v) > 1 else 0.0, "values": v}
                       for b, v in per.items()}
        if name != "random":
            table[name]["mean_over_budgets"] = float(np.mean([np.mean(per[b]) for b in budgets]))
            table[name]["allocations"] = allocations[name]
    best = max((k for k in table if k != "random"), key=lambda k: table[k]["mean_over_budgets"])
    res = {"criterion": "highest mean validation score over the tuning budgets and seeds", "budgets": budgets, "seeds": seeds,
           "sizes": {"candidates": len(splits["train"]), "feedback": len(splits["val"]), "score_set": len(outer["val"])},
           "variants": table, "chosen": best, "seconds": round(time.perf_counter() - t0, 1)}
    write_json(Path(args.out) / "tune" / f"{args.name}.json", res)
    return res


if __name__ == "__main__":
    print(json.dumps(main(), indent=1))
