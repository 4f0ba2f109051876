"""`mose plan`: a checkpoint plans every scene of a pool; the trajectories go to a NAVSIM predictions file.

    mose plan --model CKPT --pool POOL --out predictions.json [--answer] [--max-new-tokens N] [--no-constrained]

The file (eval/navsim/predictions.py, .json or .csv) is what `mose eval navsim --predictions` scores and what
`mose curate --method semantic --predictions` reads: the trained model's plans, not the constant-turn-rate
fallback. A `head` checkpoint plans from the prompt's forward pass alone (no answer generated) unless --answer is
given; a `text` checkpoint always answers, within --max-new-tokens (required then: the budget of its training
data, mose.answer_grammar.answer_budget). A scene the model cannot plan (an unreadable answer) is left out of the
file and counted; the scorer then marks it invalid.
"""
from __future__ import annotations

import argparse
import sys

from common.errors import MoseError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="MoSE checkpoint directory (a final/ or export)")
    parser.add_argument("--pool", required=True, help="ScenePool directory (the scenes to plan)")
    parser.add_argument("--out", required=True, help="predictions file to write (.json or .csv), atomically")
    parser.add_argument("--answer", action="store_true", help="head checkpoints: also generate the step-by-step answer")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="answer budget (required when an answer is generated)")
    parser.add_argument("--no-constrained", action="store_true", help="generate without the answer grammar")
    parser.add_argument("--image-size", type=int, default=64, help="size of the drawn top-down view for scenes without a camera image")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def plan_pool(model: str, scenes, *, answer: bool = False, max_new_tokens: int | None = None, constrained: bool = True,
              image_size: int = 64, progress: bool = True) -> tuple[dict, dict]:
    """({scene id: (8, 3) poses}, {scene id: reason}) of the scenes the checkpoint could / could not plan."""
    from tqdm.auto import tqdm

    from eval.vlm_planner import ModelPlanner, checkpoint_decoder
    from mose.skills import Taxonomy

    decoder = checkpoint_decoder(model)
    answer = answer or decoder != "head"
    planner = ModelPlanner(model, max_new_tokens, image_size, taxonomy=Taxonomy.load(), constrained=constrained, answer=answer).load()
    plans, failed = {}, {}
    try:
        for scene in tqdm(scenes, desc="planning", unit="scene", disable=not progress):
            try:
                plans[scene.id] = planner(scene)
            except ValueError as exc:  # an unreadable answer: left out, counted
                failed[scene.id] = str(exc)
    finally:
        planner.close()
    return plans, failed


def run(args) -> int:
    from datasets_cfg.schema import ScenePool
    from eval.navsim.predictions import write_predictions

    try:
        if not str(args.out).lower().endswith((".json", ".csv")):
            raise ValueError(f"--out {args.out}: expected a .json or .csv predictions file")
        if args.max_new_tokens is not None and args.max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens: expected an integer >= 1, got {args.max_new_tokens}")
        scenes = list(ScenePool.load(args.pool))
        plans, failed = plan_pool(args.model, scenes, answer=args.answer, max_new_tokens=args.max_new_tokens,
                                  constrained=not args.no_constrained, image_size=args.image_size, progress=not args.no_progress)
        path = write_predictions(args.out, plans)
    except (MoseError, OSError, ValueError) as exc:
        print(f"mose plan: error: {exc}", file=sys.stderr)
        return 2
    tail = f"; {len(failed)} not planned (e.g. {next(iter(failed.values()))})" if failed else ""
    print(f"mose plan: {len(plans)} of {len(scenes)} scenes planned -> {path}{tail}")
    return 0
