"""AutoScale vs fixed real:synthetic mixtures at equal budget, on the highway-env simulator benchmark.

    python benchmarks/autoscale_mixture.py [--pool DIR | --scenes 800] [--budget 150] [--seeds 0,1,2]
        [--feedback-episodes 14] [--eval-episodes 28] [--rounds 5] [--out result.json]

Pool: an existing `mose simulate` pool (--pool) or a fresh one (--scenes, synthetic fraction 0.5, all default
environments; written under --work). "real" = highway-env's default settings, "synthetic" = perturbed ones
(datasets_cfg/sim/episode.py). The benchmark's test domain is the real one: closed-loop episodes in the
default environments.

Arms, each with exactly `budget` training scenes, per seed:
- no_synthetic: `budget` random real scenes;        - all_synthetic: `budget` random synthetic scenes;
- vanilla: `budget` random scenes of the union (the pool's natural ratio);
- autoscale: AutoScaleSelector (Graph-RAE clusters, Cluster-GA with SPSA, cluster-guided retrieval) with
  closed-loop feedback from eval/autoscale_feedback.py on FEEDBACK episodes (seeds 5000 + ...);
- autoscale_round0 (ablation): AutoScale's starting mixture (cells by size, cluster-guided retrieval order)
  before any Cluster-GA step, to separate the gain of the feedback loop from that of the cluster ordering.
Every arm's scenes train the same fast pilot (eval/pilot.py, ridge, alpha 100) from scratch, which is then
driven on held-out EVALUATION episodes (seeds 90000 + ..., never seen by the feedback). Score = mean
closed-loop EPDMS (eval/closed_loop.py); crash, off-road and route-completion rates are reported too.
Prints one JSON object: per arm mean and std over seeds, per-seed values, AutoScale's chosen ratio and
feedback cost, and the differences autoscale - baseline (mean, std, wins out of seeds).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ENVS = ("highway", "merge", "roundabout", "intersection", "exit", "two-way", "u-turn")
REPORT = ("epdms", "crash_rate", "offroad_rate", "route_completion")


def evaluate(fb_eval, ids) -> dict:
    from eval.autoscale_feedback import episode_score

    pilot = fb_eval.fit(ids)
    res = fb_eval.closed_loop(pilot)
    eps = res.episodes
    return {"score": float(np.mean([episode_score(r, "epdms") for r in eps])),
            "driving_score": float(np.mean([episode_score(r, "driving_score") for r in eps])),
            **{k: float(res.means[k]) for k in REPORT}}


def stats(values: list[float]) -> dict:
    return {"mean": float(np.mean(values)), "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0, "values": values}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pool")
    ap.add_argument("--scenes", type=int, default=800)
    ap.add_argument("--work", default="runs/autoscale_benchmark")
    ap.add_argument("--budget", type=int, default=150)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--envs", default=",".join(ENVS))
    ap.add_argument("--feedback-episodes", type=int, default=14)
    ap.add_argument("--eval-episodes", type=int, default=28)
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--clusters", type=int, default=6)
    ap.add_argument("--gradient", default="spsa")
    ap.add_argument("--step-size", type=float, default=1.5)
    ap.add_argument("--perturbation", type=float, default=1.0)
    ap.add_argument("--spsa-samples", type=int, default=1)
    ap.add_argument("--patience", type=int, default=3)
    ap.add_argument("--rae-epochs", type=int, default=15)
    ap.add_argument("--pilot-alpha", type=float, default=100.0)
    ap.add_argument("--out")
    args = ap.parse_args(argv)

    from curation.autoscale import AutoScaleSelector
    from datasets_cfg.schema import ScenePool
    from eval.autoscale_feedback import ClosedLoopFeedback

    envs = tuple(e for e in args.envs.split(",") if e)
    if args.pool:
        pool_dir = Path(args.pool)
    else:
        from datasets_cfg.sim.corpus import generate

        pool_dir = Path(args.work) / f"pool{args.scenes}"
        generate(pool_dir, args.scenes, envs, seed=7, synthetic_fraction=0.5, image_size=32, progress=False)
    pool = ScenePool.load(pool_dir)
    ids = np.array(pool.ids)
    src = np.array(pool.column("source"))
    real, syn = ids[src == "real"], ids[src == "synthetic"]
    if min(len(real), len(syn)) < args.budget:
        print(f"error: budget {args.budget} exceeds the real ({len(real)}) or synthetic ({len(syn)}) scenes", file=sys.stderr)
        return 2
    common = dict(envs=envs, duration_s=args.duration, pilot_alpha=args.pilot_alpha)
    fb_eval = ClosedLoopFeedback(pool, episodes=args.eval_episodes, seed=90_000, **common)
    seeds = [int(s) for s in args.seeds.split(",")]
    arms = {k: [] for k in ("no_synthetic", "all_synthetic", "vanilla", "autoscale_round0", "autoscale")}
    autoscale_info = []
    t_start = time.perf_counter()
    for s in seeds:
        rng = np.random.default_rng(s)
        chosen = {"no_synthetic": list(rng.choice(real, args.budget, replace=False)),
                  "all_synthetic": list(rng.choice(syn, args.budget, replace=False)),
                  "vanilla": list(rng.choice(ids, args.budget, replace=False))}
        feedback = ClosedLoopFeedback(pool, episodes=args.feedback_episodes, seed=5_000, **common)
        t0 = time.perf_counter()
        selector = AutoScaleSelector(n_clusters=args.clusters, rae_epochs=args.rae_epochs, max_rounds=args.rounds, gradient=args.gradient,
                                step_size=args.step_size, perturbation=args.perturbation, spsa_samples=args.spsa_samples,
                                patience=args.patience, random_state=s, progress=False)
        sel = selector.select(pool, args.budget, evaluator=feedback, report_dir=Path(args.work) / f"seed{s}")
        chosen["autoscale"] = sel.ids
        chosen["autoscale_round0"] = selector.mixtures_[0]  # ablation: the starting mixture, no Cluster-GA step
        st = sel.state
        autoscale_info.append({"seed": s, "ratio": st["ratio"], "synthetic_fraction": st["synthetic_fraction"], "best_round": st["best_round"],
                               "feedback_initial": st["initial_score"], "feedback_best": st["best_score"], "pilot_runs": st["evaluations"],
                               "stop_reason": st["stop_reason"], "select_s": round(time.perf_counter() - t0, 1),
                               "rounds": [{k: r[k] for k in ("round", "score", "ratio")} for r in st["rounds"]]})
        for arm, sel_ids in chosen.items():
            assert len(sel_ids) == args.budget and len(set(sel_ids)) == args.budget
            arms[arm].append(evaluate(fb_eval, sel_ids))
        print(json.dumps({"seed": s, **{a: round(v[-1]["score"], 4) for a, v in arms.items()}, "autoscale_ratio": st["ratio"]}),
              file=sys.stderr, flush=True)
    result = {
        "pool": str(pool_dir), "pool_real": int(len(real)), "pool_synthetic": int(len(syn)), "budget": args.budget, "seeds": seeds,
        "envs": list(envs), "autoscale_params": {k: getattr(args, k) for k in ("rounds", "clusters", "gradient", "step_size", "perturbation",
                                                                                "spsa_samples", "patience", "rae_epochs", "pilot_alpha")},
        "feedback_episodes": args.feedback_episodes, "eval_episodes": args.eval_episodes, "duration_s": args.duration,
        "metric": "mean closed-loop EPDMS on held-out episodes (seeds 90000+)",
        "arms": {a: {"score": stats([r["score"] for r in v]), **{k: stats([r[k] for r in v]) for k in ("driving_score", *REPORT[1:])}}
                 for a, v in arms.items()},
        "autoscale_minus": {b: {**stats([x["score"] - y["score"] for x, y in zip(arms["autoscale"], arms[b])]),
                                "wins": int(sum(x["score"] > y["score"] for x, y in zip(arms["autoscale"], arms[b])))}
                            for b in ("no_synthetic", "all_synthetic", "vanilla", "autoscale_round0")},
        "autoscale": autoscale_info, "seconds": round(time.perf_counter() - t_start, 1),
    }
    text = json.dumps(result, indent=1)
    if args.out:
        from common.atomic import write_text

        write_text(args.out, text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
