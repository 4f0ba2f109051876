"""`mose curate --plan PLAN.yaml --out DIR`: run a per-stage data plan (curation/plan.py).

    mose curate --plan datasets_cfg/stages/demo.yaml --out runs/plan [--plan-pool sim=DIR ...] [--seed S] [--no-progress]

Writes DIR/<stage>.jsonl (+ .header.json) per stage, DIR/coverage.{csv,md,png} and DIR/plan_summary.json.
Like pipelines/curate.py, this module composes the curation library with what it receives from eval, built by
pipelines/curate_hooks.py: the fast pilot (MOSAIC / SEAD stages) and AutoScale's closed-loop feedback. A stage's
`feedback.factory` names a hook of FEEDBACK_HOOKS (default "closed_loop": eval.autoscale_feedback.ClosedLoopFeedback),
called as hook(pool, **other feedback keys); any other name, a "module:attr" string included, is refused without
importing anything.

Usable on its own (`add_arguments` / `run`, or `python -m pipelines.curate_plan`) or inside `mose curate`
(`register` adds --plan and --plan-pool to that parser; `run` is called when --plan is given).
"""
from __future__ import annotations

import argparse
import sys

from common.errors import MoseError
from pipelines.curate_hooks import feedback_factory, pilot_factory


def register(parser: argparse.ArgumentParser) -> None:
    """Add the plan options to an existing parser (e.g. `mose curate`'s)."""
    parser.add_argument("--plan", help="per-stage data plan YAML (datasets_cfg/stages/*.yaml); --out is then a directory")
    parser.add_argument("--plan-pool", action="append", default=[], metavar="NAME=DIR",
                        help="with --plan: use DIR for the plan's pool NAME (repeatable)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--plan", required=True, help="per-stage data plan YAML (datasets_cfg/stages/*.yaml)")
    parser.add_argument("--out", required=True, help="output directory for the stage manifests and the coverage report")
    parser.add_argument("--plan-pool", action="append", default=[], metavar="NAME=DIR", help="use DIR for the plan's pool NAME (repeatable)")
    parser.add_argument("--seed", type=int, help="random seed (overrides the plan's seed)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def parse_pools(items) -> dict[str, str]:
    out = {}
    for it in items or []:
        name, sep, path = str(it).partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--plan-pool: expected NAME=DIR, got {it!r}")
        out[name] = path
    return out


def run(args) -> int:
    from curation.plan import load_plan, run_plan

    try:
        plan = load_plan(args.plan, parse_pools(getattr(args, "plan_pool", [])))
        if getattr(args, "seed", None) is not None:
            plan.seed = int(args.seed)
        result = run_plan(plan, args.out, pilot_factory=pilot_factory, feedback_factory=feedback_factory,
                          progress=not getattr(args, "no_progress", False))
    except (MoseError, OSError, KeyError, ValueError) as exc:  # ours, file problems, and plain bad values from a library
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"mose curate --plan: error: {msg}", file=sys.stderr)
        return 2
    for name, sel in result.selections.items():
        fb = f", {len(sel.fallbacks)} fallback(s)" if sel.fallbacks else ""
        print(f"mose curate --plan: {name}: {sel.method} selected {len(sel)} scenes (real:synthetic {sel.state['ratio']}) -> "
              f"{result.manifests[name]}{fb}")
    print(f"mose curate --plan: coverage -> {result.coverage_md}, {result.coverage_png}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.curate_plan", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
