"""`mose eval navsim`: score predictions (or a reference agent) on a ScenePool with PDMS / EPDMS.

    mose eval navsim --pool DIR --predictions FILE --out scores.csv [--metric pdms|epdms] [--no-tracking]
    mose eval navsim --pool DIR --agent constant_velocity|human|pdm_closed --out scores.csv
    mose eval navsim --pool DIR [--stage-two-pool DIR] --two-stage navhard_two_stage.yaml --predictions FILE --out scores.csv

Prints a JSON summary (mean score with invalid rows as 0, the official mean that skips them, valid / invalid
counts with reasons) and writes the per-scene CSV with the
official v2 columns and an average row. Tokens in the predictions that are not in the pool become invalid rows
("token not in the pool", listed but not averaged); pool scenes without a prediction are invalid rows that
count as 0 in the mean.

With --two-stage (EPDMS only) the pool's stage-1 scenes and the stage-2 synthetic scenes (in the pool or in
--stage-two-pool) are scored as the devkit's two-stage run: the mapping file's pairs, pseudo-closed-loop weights
and the three extended_pdm_score_* summary rows, written in the official two-stage CSV columns
(eval.navsim.two_stage).
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
    parser.add_argument("--two-stage", metavar="MAPPING", help="two-stage (navhard) EPDMS with this mapping: the devkit's train_test_split "
                        ".yaml (reactive_all_mapping) or the same list in .json")
    parser.add_argument("--stage-two-pool", metavar="DIR", help="with --two-stage: a ScenePool holding the stage-2 synthetic scenes")


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
    if args.stage_two_pool and not args.two_stage:
        print("mose eval navsim: error: --stage-two-pool needs --two-stage MAPPING", file=sys.stderr)
        return 2
    entries = None
    if args.two_stage:
        from eval.navsim.two_stage import read_mapping

        if args.metric != "epdms":
            print("mose eval navsim: error: --two-stage scores EPDMS (NAVSIM v2) only; drop --metric pdms", file=sys.stderr)
            return 2
        try:
            entries = read_mapping(args.two_stage)  # before any scoring: a bad mapping fails fast
            if args.stage_two_pool:
                extra = list(ScenePool.load(args.stage_two_pool))
                both = sorted({s.id for s in scenes} & {s.id for s in extra})
                if both:
                    raise MoseError(f"{args.stage_two_pool}: {len(both)} scene id(s) are also in --pool {args.pool}, e.g. {both[:3]}")
                scenes += extra
        except (MoseError, OSError, ValueError) as exc:
            print(f"mose eval navsim: error: {exc}", file=sys.stderr)
            return 2
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

    if entries is not None:
        return _run_two_stage(args, entries, scenes, trajectories, interval)
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


def _run_two_stage(args, entries, scenes, trajectories, interval) -> int:
    from eval.navsim.two_stage import TwoStageError, score_two_stage, write_two_stage_csv

    try:
        result = score_two_stage(scenes, trajectories, entries, tracking=not args.no_tracking, human_filter=not args.no_human_filter,
                                 num_poses=args.num_poses, interval=interval, progress=None if not args.no_progress else False)
    except TwoStageError as exc:
        print(f"mose eval navsim: error: {exc}", file=sys.stderr)
        return 2
    write_two_stage_csv(args.out, result)
    rows = result.rows
    scored = {r["token"] for r in rows}
    by = {r["token"]: r for r in result.summary}

    def num(v):
        return None if v is None or math.isnan(v) else round(v, 6)

    summary = {
        "metric": "epdms", "two_stage": str(args.two_stage), "tracking": "lqr" if not args.no_tracking else "as_given",
        "entries": len(result.entries), "scenes": len(rows), "unmapped_scenes": result.unmapped_scenes,
        "valid": sum(r["valid"] for r in rows), "invalid": sum(not r["valid"] for r in rows),
        "invalid_reasons": dict(Counter(r["reason"].split(":")[0] for r in rows if not r["valid"])),
        "predictions_not_scored": sum(t not in scored for t in trajectories),
        "score": num(by["extended_pdm_score_combined"]["score"]),
        "score_official": num(by["extended_pdm_score_combined"]["score_valid_only"]),
        "score_stage_one": num(by["extended_pdm_score_stage_one"]["score"]),
        "score_stage_two": num(by["extended_pdm_score_stage_two"]["score"]),
        "score_note": "extended_pdm_score_combined; score: invalid rows count as 0 (ours); score_official: groups with an invalid row "
                      "skipped (the devkit's NaN)",
        "out": str(Path(args.out)),
    }
    print(json.dumps(summary, indent=2))
    return 0
