"""Soft skill targets met by the plan's greedy swap repair (curation/plan_select._repair, step 5 of
curation/plan.py) vs the target integer program (curation/plan_target_ilp.py, step 6) on seeded random pools.

Each trial: a pool of N candidates (real / synthetic) with 0-3 of K skills (skewed frequencies), a budget, a
fixed 1:1 ratio or none, hard minimums on two skills, soft targets on three; the method's picks = a seeded random
permutation. Units = sum over targets of min(ceil(fraction * budget), selected scenes with the skill). Prints JSON:
units targeted, met by the greedy, met by the program, jointly reachable, and the trials where they differ.

    PYTHONPATH=. python benchmarks/plan_targets.py [--trials 200] [--seed 0]
"""
from __future__ import annotations

import argparse
import json
import math

import numpy as np

from curation import plan_target_ilp as ilp
from curation.plan_select import _repair


def trial(rng) -> dict | None:
    n, k = int(rng.integers(30, 80)), 6
    freq = np.sort(rng.uniform(0.03, 0.4, k))
    skills = [frozenset(f"s{j}" for j in range(k) if rng.random() < freq[j]) for _ in range(n)]
    sources = np.array(["real" if rng.random() < 0.5 else "synthetic" for _ in range(n)])
    budget = int(rng.integers(6, 20))
    quotas = None
    if rng.random() < 0.5:
        q = budget // 2
        quotas = {"real": q, "synthetic": budget - q}
        if (sources == "real").sum() < q or (sources == "synthetic").sum() < budget - q:
            return None
    smin = {f"s{j}": int(rng.integers(1, 3)) for j in rng.choice(k, 2, replace=False)}
    targets = {f"s{j}": int(math.ceil(float(rng.uniform(0.05, 0.4)) * budget)) for j in rng.choice(k, 3, replace=False)}
    # the method's picks: a random ranking within each quota, interleaved like plan_select._interleave
    order = [int(i) for i in rng.permutation(n)]
    if quotas is None:
        chosen = order[:budget]
    else:
        per = {s: [i for i in order if sources[i] == s][:quotas[s]] for s in quotas}
        chosen = [i for pair in zip(per["real"], per["synthetic"]) for i in pair] + per["synthetic"][len(per["real"]):]
    keep: dict = {}
    _, short = _repair(chosen, skills, sources, smin, quotas is not None, np.random.default_rng(0), keep)
    if short:
        return None  # the greedy falls back to the reservation path here; not compared
    _repair(chosen, skills, sources, targets, quotas is not None, np.random.default_rng(0), keep)
    greedy = sum(ilp.units(chosen, skills, targets).values())
    sol, why = ilp.solve(skills, sources, budget, quotas, smin, targets, chosen, np.random.default_rng(1))
    if sol is None:
        return {"failed": why}
    best = sum(ilp.units(sol, skills, targets).values())
    return {"target": sum(targets.values()), "greedy": greedy, "program": max(best, greedy), "reachable": best}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    rng = np.random.default_rng(a.seed)
    res = [r for r in (trial(rng) for _ in range(a.trials)) if r is not None]
    ok = [r for r in res if "failed" not in r]
    out = {"trials": len(res), "solver_failures": len(res) - len(ok),
           "units_target": sum(r["target"] for r in ok), "units_greedy": sum(r["greedy"] for r in ok),
           "units_program": sum(r["program"] for r in ok), "units_reachable": sum(r["reachable"] for r in ok),
           "trials_greedy_short_of_reachable": sum(r["greedy"] < r["reachable"] for r in ok),
           "trials_program_short_of_reachable": sum(r["program"] < r["reachable"] for r in ok)}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
