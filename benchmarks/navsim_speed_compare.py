"""NAVSIM scorer speed of this tree against a baseline checkout, in one run, printed as JSON.

    git worktree add /tmp/navsim_base <commit>
    python benchmarks/navsim_speed_compare.py --baseline /tmp/navsim_base [--scenes 128] [--rounds 3]

Each round scores the same hand-built scenes (benchmarks/navsim_speed.py's `make_scenes`, built by THIS tree's
fixtures and pickled, so both trees see identical input) once with the baseline and once with this tree, each
in a fresh single-process subprocess (alternating which goes first), cold (PDM-Closed and the human run
included) and warm (from a ReferenceCache). CPU milliseconds per scene are reported per tree as the median
over rounds, with the ratio baseline / this (> 1: this tree is faster). Scores are printed too: the two trees
may legitimately differ (that is what a scorer change is), the speed comparison does not depend on it.
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, os, pickle, sys, time
from eval.navsim import agents as ref_agents
from eval.navsim.scorer import ReferenceCache, mean_score, score_scenes
scenes = pickle.load(open(sys.argv[1], "rb"))
preds = ref_agents.human(scenes)
score_scenes(scenes[:8], preds, progress=False)  # imports, lru caches
def cpu():
    t = os.times(); return t.user + t.system
c = cpu(); rows = score_scenes(scenes, preds, progress=False); cold = cpu() - c
cache = ReferenceCache(); score_scenes(scenes, preds, reference_cache=cache, progress=False)
c = cpu(); score_scenes(scenes, preds, reference_cache=cache, progress=False); warm = cpu() - c
print(json.dumps({"cold_cpu_ms": 1000 * cold / len(scenes), "warm_cpu_ms": 1000 * warm / len(scenes), "score": mean_score(rows)}))
"""


def run_tree(root: Path, scenes_file: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(root), OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", CHILD, scenes_file], cwd=root, env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--baseline", required=True, help="root of the baseline source tree (e.g. a git worktree of main)")
    p.add_argument("--scenes", type=int, default=128)
    p.add_argument("--agents", type=int, default=20)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    base = Path(args.baseline).resolve()
    if not (base / "eval" / "navsim" / "scorer.py").is_file():
        sys.exit(f"navsim_speed_compare: --baseline {base}: no eval/navsim/scorer.py there")

    sys.path.insert(0, str(HERE))
    from benchmarks.navsim_speed import make_scenes

    scenes = make_scenes(args.scenes, args.agents)
    with tempfile.TemporaryDirectory() as tmp:
        f = os.path.join(tmp, "scenes.pkl")
        with open(f, "wb") as fh:
            pickle.dump(scenes, fh)
        res = {"baseline": [], "this": []}
        for r in range(args.rounds):
            order = [("baseline", base), ("this", HERE)] if r % 2 == 0 else [("this", HERE), ("baseline", base)]
            for name, root in order:
                res[name].append(run_tree(root, f))

    def med(name, key):
        return statistics.median(x[key] for x in res[name])

    out = {"benchmark": "navsim_speed_compare", "scenes": args.scenes, "agents_per_scene": args.agents, "rounds": args.rounds,
           "baseline": str(base), "this": str(HERE), "load_average_1_5_15_min_at_end": [round(x, 2) for x in os.getloadavg()]}
    for key in ("cold_cpu_ms", "warm_cpu_ms"):
        out[f"{key}_per_scene_baseline"] = round(med("baseline", key), 2)
        out[f"{key}_per_scene_this"] = round(med("this", key), 2)
        out[f"{key}_ratio_baseline_over_this"] = round(med("baseline", key) / med("this", key), 3)
    out["mean_epdms_gt_baseline"] = round(res["baseline"][0]["score"], 4)
    out["mean_epdms_gt_this"] = round(res["this"][0]["score"], 4)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
