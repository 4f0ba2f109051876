"""`mose eval navsim`: score predictions (or a reference agent) on a ScenePool with PDMS / EPDMS.

    mose eval navsim --pool DIR --predictions FILE --out scores.csv [--metric pdms|epdms] [--no-tracking]
    mose eval navsim --pool DIR --agent constant_velocity|human|pdm_closed --out scores.csv

Prints a JSON summary (mean score with invalid rows as 0, the official mean that skips them, valid / invalid
counts with reasons) and writes the per-scene CSV with the
official v2 columns and an average row. Tokens in the predictions that are not in the pool become invalid rows
("token not in the pool", listed but not averaged); pool scenes without a prediction are invalid rows that
count as 0 in the mean.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from collections import Counter
from pathlib import Path

from common.errors import MoseError
from eval.navsim.agents import AGENTS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pool", required=True, help="ScenePool directory (scenes with map geometry)")
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--predictions", help="predictions file: .json, .csv or a NAVSIM submission .pkl (see eval.navsim.predictions)")
    src.add_argument("--agent", choices=AGENTS, help="score a reference agent instead of a predictions file")
    parser.add_argument("--out", required=True, help="output CSV (written atomically)")
    parser.add_argument("--metric", choices=("epdms", "pdms"), default="epdms", help="EPDMS (NAVSIM v2, default) or PDMS (v1)")
    parser.add_argument("--no-tracking", action="store_true", help="score the poses as given instead of tracking them with the LQR controller")
    parser.add_argument("--no-human-filter", action="store_true", help="v2: do not excuse sub-metrics the logged human also fails")
    parser.add_argument("--num-poses", type=int, default=8, help="poses per trajectory (default 8)")
    parser.add_argument("--interval", type=float, default=None, help="seconds between poses (default: from the file, else 0.5)")
    parser.add_argument("--save-predictions", help="with --agent: also write the agent's trajectories to this .json/.csv")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def run(args) -> int:
    from datasets_cfg.schema import ScenePool
    from eval.navsim.agents import run_agent
    from eval.navsim.predictions import NavsimPredictionsError, read_predictions, write_predictions, write_scores_csv
    from eval.navsim.scorer import _invalid, average_row, score_scenes

    try:
        pool = ScenePool.load(args.pool)
    except (MoseError, OSError, ValueError) as exc:  # ValueError: e.g. pool.json not JSON
        print(f"mose eval navsim: error: {exc}", file=sys.stderr)
        return 2
    scenes = list(pool)
    interval = args.interval
    if args.predictions:
        try:
            trajectories, file_interval = read_predictions(args.predictions)
        except NavsimPredictionsError as exc:
            print(f"mose eval navsim: error: {exc}", file=sys.stderr)
            return 2
        if interval is None:
            interval = file_interval or 0.5
        elif file_interval and abs(file_interval - interval) > 1e-9:
            print(f"mose eval navsim: error: --interval {interval} contradicts {args.predictions} (interval_s {file_interval})", file=sys.stderr)
            return 2
    else:
        interval = interval or 0.5
        trajectories = run_agent(args.agent, scenes, args.num_poses, interval)
        if args.save_predictions:
            write_predictions(args.save_predictions, trajectories, interval)
    if args.num_poses < 1 or interval <= 0:
        print("mose eval navsim: error: --num-poses must be >= 1 and --interval > 0", file=sys.stderr)
        return 2

    rows = score_scenes(scenes, trajectories, metric=args.metric, tracking=not args.no_tracking, human_filter=not args.no_human_filter,
                        num_poses=args.num_poses, interval=interval, progress=None if not args.no_progress else False)
    known = set(pool.ids)
    extra = [_invalid(tok, "token not in the pool", args.metric, not args.no_tracking) for tok in trajectories if tok not in known]
    avg = average_row(rows, args.metric)  # over the pool's scenes; unknown tokens are listed, not averaged
    rows += extra
    write_scores_csv(args.out, rows, avg)
    reasons = Counter(r["reason"].split(":")[0] for r in rows if not r["valid"])
    summary = {
        "metric": args.metric, "tracking": "lqr" if not args.no_tracking else "as_given", "scenes": len(scenes),
        "valid": sum(r["valid"] for r in rows), "invalid": sum(not r["valid"] for r in rows), "invalid_reasons": dict(reasons),
        "score": None if math.isnan(avg["score"]) else round(avg["score"], 6),
        "score_official": None if math.isnan(avg["score_valid_only"]) else round(avg["score_valid_only"], 6),
        "score_note": "score: invalid rows count as 0 (ours); score_official: invalid rows skipped, as the devkit's NaN mean",
        "invalid_in_pool": avg["invalid_rows"], "out": str(Path(args.out)),
    }
    print(json.dumps(summary, indent=2))
    return 0
