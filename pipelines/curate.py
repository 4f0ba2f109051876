"""`mose curate`: select scenes from a ScenePool and write a selection manifest.

    mose curate --method {random,coreset,uncertainty,mosaic,sead,semantic,autoscale} --pool DIR --budget N --out FILE.jsonl
                [--config YAML] [--seed S] [--scores FILE] [--predictions FILE] [--pilot {auto,fast,none}] [--plots DIR]
    mose curate --plan PLAN.yaml --out DIR ...   (per-stage plans: pipelines/curate_plan.py)

The config YAML holds one section per method with that selector's parameters, plus a `pilot` section for
the fast pilot (eval/pilot.py: eval_fraction, eval_size, model, alpha, metric, tracking, human_filter) and a
`feedback` section for AutoScale's closed-loop evaluator (pipelines/curate_hooks.py: feedback_factory):

    mosaic: {n_domains: 4, importance: high, n_pilot_sizes: 4}
    pilot: {eval_fraction: 0.2, tracking: false}

The methods and what each one receives come from one registry (curation/registry.py). Methods that use a
pilot (MOSAIC unless `fits` are given; SEAD for its retraining rounds with --pilot auto) get the fast pilot;
its held-out scenes are excluded from the selection and listed in the manifest header. This module and
pipelines/curate_plan.py compose the curation library with the eval objects it receives (the fast pilot, AutoScale's
feedback), which pipelines/curate_hooks.py builds by name.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from common.errors import MoseError
from curation.config_sections import load_sections
from curation.registry import METHODS
from curation.selection import SelectionError
from pipelines.curate_hooks import make_pilot


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # --method/--pool/--budget are checked in run(): a per-stage plan (--plan, pipelines/curate_plan.py) replaces them
    parser.add_argument("--method", choices=sorted(METHODS), help="selection method (required unless --plan)")
    parser.add_argument("--pool", help="ScenePool directory")
    parser.add_argument("--budget", type=int, help="number of scenes to select")
    parser.add_argument("--out", required=True, help="manifest rows file (.jsonl); the header goes next to it as <stem>.header.json")
    parser.add_argument("--config", help="YAML with a section per method (selector parameters) and a 'pilot' section")
    parser.add_argument("--seed", type=int, help="random seed (overrides random_state in the config)")
    parser.add_argument("--scores", help="per-scene scores (CSV/JSON/JSONL with id and score): uncertainty, MOSAIC importance")
    parser.add_argument("--predictions", help="semantic: the planner's trajectories per scene, a NAVSIM predictions file "
                        "(.json / .csv / .pkl, eval/navsim/predictions.py; e.g. from `mose plan`) or .npz; default: the "
                        "constant-turn-rate fallback")
    parser.add_argument("--pilot", choices=("auto", "fast", "none"), default="auto",
                        help="model feedback: auto = the fast pilot where the method uses one; none = no pilot")
    parser.add_argument("--plots", help="directory for plots (MOSAIC); default: <out stem>_plots/")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    from pipelines import curate_plan

    curate_plan.register(parser)


def load_config(path: str | None) -> dict:
    # feedback: AutoScale's closed-loop evaluator (curate_hooks.feedback_factory)
    return load_sections(path, {m.section for m in METHODS.values()} | {"pilot", "feedback"})


def build_selector(method: str, params: dict, seed: int | None, progress: bool, where: str = "config"):
    m = METHODS[method]
    bad = m.unknown_parameters(params)
    if bad:
        raise SelectionError(f"{where}: section {m.section!r}: unknown parameter(s) {bad}; expected some of {m.parameters()}")
    return m.build(params, defaults={"progress": progress}, overrides={} if seed is None else {"random_state": seed})


def read_planner_predictions(path: str):
    """--predictions: a NAVSIM predictions file read by eval/navsim/predictions.py ({id: poses}); .npz stays a path
    (curation.semantic.resolve_predictions reads it)."""
    if str(path).lower().endswith(".npz"):
        return path
    from eval.navsim.predictions import read_predictions

    trajectories, interval = read_predictions(path)
    if interval is not None and abs(interval - 0.5) > 1e-9:
        raise SelectionError(f"{path}: field 'interval_s': the semantic selector reads poses 0.5 s apart, got {interval}")
    return trajectories


def needs_pilot(method: str, params: dict, mode: str) -> bool:
    if mode == "none":
        return False
    return METHODS[method].uses_pilot(params)


def plots_dir(args) -> str:
    """--plots, or <out stem>_plots/ next to --out."""
    out = Path(args.out)
    return args.plots or str(out.with_name(out.name.removesuffix(".jsonl") + "_plots"))


def run(args) -> int:
    from datasets_cfg.schema import ScenePool

    if getattr(args, "plan", None):
        from pipelines import curate_plan

        return curate_plan.run(args)
    missing = [f"--{name}" for name in ("method", "pool", "budget") if getattr(args, name) is None]
    if missing:
        print(f"mose curate: error: {', '.join(missing)} required (or --plan PLAN.yaml)", file=sys.stderr)
        return 2
    try:
        m = METHODS[args.method]
        cfg = load_config(args.config)
        params = cfg.get(m.section, {})
        selector = build_selector(args.method, params, args.seed, not args.no_progress, args.config or "config")
        pool = ScenePool.load(args.pool)
        inputs = {}
        if args.scores:
            inputs["scores"] = args.scores
        if args.predictions:
            inputs["predictions"] = read_planner_predictions(args.predictions)
        pilot = None
        if needs_pilot(args.method, params, args.pilot):
            pilot = make_pilot(pool, cfg.get("pilot", {}), args.seed, args.config or "config")
            inputs.update(pilot=pilot, exclude=pilot.eval_ids)
        if m.plot_param and getattr(selector, m.plot_param) is None:
            setattr(selector, m.plot_param, plots_dir(args))
        if "evaluator" in m.needs:
            from pipelines.curate_hooks import feedback_factory

            evaluator = feedback_factory(cfg.get("feedback", {}), pool)
            inputs.update(evaluator=evaluator, exclude=list(getattr(evaluator, "heldout_ids", []) or []))
        if "report_dir" in m.needs:
            inputs["report_dir"] = plots_dir(args)
        selection = selector.select(pool, args.budget, m.context(**inputs))
        if pilot is not None:
            selection.state["pilot_eval_ids"] = list(pilot.eval_ids)
            selection.config = {**selection.config, "pilot": {k: getattr(pilot, k, None) for k in ("model", "alpha", "metric", "tracking", "human_filter")}}
        warned = getattr(evaluator, "sim_warnings", None) if "evaluator" in m.needs else None
        if warned is not None and warned.total:  # counted while the simulator ran (datasets_cfg/sim/world.py)
            selection.state["sim_warnings"] = warned.to_dict()
        selection.pool["path"] = str(Path(args.pool).resolve())
        rows_path = selection.write(args.out)
    except (MoseError, OSError, KeyError, ValueError) as exc:  # ours, file problems, and plain bad values from a library
        print(f"mose curate: error: {exc}", file=sys.stderr)
        return 2
    fb = ""
    if selection.fallbacks:
        from curation.selection import manifest_paths

        kinds = sorted({str(f.get("what")) for f in selection.fallbacks})
        fb = (f", {len(selection.fallbacks)} fallback(s) recorded ({', '.join(kinds)}; read them under 'fallbacks' in "
              f"{manifest_paths(rows_path)[1]})")
    print(f"mose curate: {args.method} selected {len(selection)} of {len(pool)} scenes -> {rows_path}{fb}")
    line = warned.summary("mose curate") if warned is not None else None
    if line:
        print(line, file=sys.stderr)
    return 0
