"""`mose curate`: select scenes from a ScenePool and write a selection manifest.

    mose curate --method {random,coreset,uncertainty,mosaic,sead,semantic,autoscale} --pool DIR --budget N --out FILE.jsonl
                [--config YAML] [--seed S] [--scores FILE] [--pilot {auto,fast,none}] [--plots DIR]
    mose curate --plan PLAN.yaml --out DIR ...   (per-stage plans: curation/plan_cli.py, when present)

The config YAML holds one section per method with that selector's parameters, plus a `pilot` section for
the fast pilot (eval/pilot.py: eval_fraction, eval_size, model, alpha, metric, tracking, human_filter):

    mosaic: {n_domains: 4, importance: high, n_pilot_sizes: 4}
    pilot: {eval_fraction: 0.2, tracking: false}

Methods that need model feedback (MOSAIC always unless `fits` are given; SEAD for its retraining rounds
with --pilot auto) get the fast pilot; its held-out scenes are excluded from the selection and listed in
the manifest header. This module is the composition root: it alone imports eval (lazily, for the pilot).
"""
from __future__ import annotations

import argparse
import inspect
import sys
from pathlib import Path

from curation.autoscale import AutoScaleSelector
from curation.baselines import CoresetSelector, RandomSelector, UncertaintySelector
from curation.mosaic import MOSAIC
from curation.sead import SEAD
from curation.selection import PilotError, SelectionError
from curation.semantic import SemanticSelector

# method name -> selector class; other stages (e.g. a per-stage plan) can register more entries
METHODS = {"random": RandomSelector, "coreset": CoresetSelector, "uncertainty": UncertaintySelector, "mosaic": MOSAIC, "sead": SEAD,
           "semantic": SemanticSelector, "autoscale": AutoScaleSelector}
PILOT_KEYS = ("eval_fraction", "eval_size", "max_eval", "model", "alpha", "metric", "tracking", "human_filter")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # --method/--pool/--budget are checked in run(): a per-stage plan (--plan, curation/plan_cli.py) replaces them
    parser.add_argument("--method", choices=sorted(METHODS), help="selection method (required unless --plan)")
    parser.add_argument("--pool", help="ScenePool directory")
    parser.add_argument("--budget", type=int, help="number of scenes to select")
    parser.add_argument("--out", required=True, help="manifest rows file (.jsonl); the header goes next to it as <stem>.header.json")
    parser.add_argument("--config", help="YAML with a section per method (selector parameters) and a 'pilot' section")
    parser.add_argument("--seed", type=int, help="random seed (overrides random_state in the config)")
    parser.add_argument("--scores", help="per-scene scores (CSV/JSON/JSONL with id and score): uncertainty, MOSAIC importance")
    parser.add_argument("--pilot", choices=("auto", "fast", "none"), default="auto",
                        help="model feedback: auto = the fast pilot where the method uses one; none = no pilot")
    parser.add_argument("--plots", help="directory for plots (MOSAIC); default: <out stem>_plots/")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    try:
        from curation import plan_cli
    except ModuleNotFoundError as exc:  # the plan stage is optional
        if exc.name != "curation.plan_cli":
            raise
    else:
        plan_cli.register(parser)


def load_sections(path: str | None, allowed, error=SelectionError) -> dict:
    """A YAML file of named sections, each a mapping of parameters; `allowed` names the sections it may hold."""
    if not path:
        return {}
    from common.yaml_file import read_yaml

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: config file not found")
    cfg = read_yaml(p, what="config file", expect=object, error=error) or {}
    if not isinstance(cfg, dict):
        raise error(f"{p}: expected a mapping of sections ({', '.join(sorted(allowed))}), got {type(cfg).__name__}")
    bad = sorted(set(cfg) - set(allowed))
    if bad:
        raise error(f"{p}: unknown section(s) {bad}; expected some of {sorted(allowed)}")
    for name, section in cfg.items():
        if not isinstance(section, dict):
            raise error(f"{p}: section {name!r}: expected a mapping of parameters, got {section!r}")
    return cfg


def load_config(path: str | None) -> dict:
    # feedback: AutoScale's closed-loop evaluator (plan_cli.feedback_factory)
    return load_sections(path, set(METHODS) | {"pilot", "feedback"})


def build_selector(method: str, params: dict, seed: int | None, progress: bool, where: str = "config"):
    cls = METHODS[method]
    names = set(inspect.signature(cls.__init__).parameters) - {"self"}
    bad = sorted(set(params) - names)
    if bad:
        raise SelectionError(f"{where}: section {method!r}: unknown parameter(s) {bad}; expected some of {sorted(names)}")
    params = dict(params)
    if seed is not None:
        params["random_state"] = seed
    if "progress" in names and "progress" not in params:
        params["progress"] = progress
    return cls(**params)


def needs_pilot(method: str, params: dict, mode: str) -> bool:
    if mode == "none":
        return False
    if method == "mosaic":
        return params.get("fits") is None
    return method == "sead" and mode in ("auto", "fast")


def make_pilot(pool, params: dict, seed: int | None, where: str = "config"):
    from eval.pilot import FastPilot  # eval depends on curation, never the reverse: import here only

    bad = sorted(set(params) - set(PILOT_KEYS))
    if bad:
        raise SelectionError(f"{where}: section 'pilot': unknown parameter(s) {bad}; expected some of {sorted(PILOT_KEYS)}")
    return FastPilot.from_pool(pool, random_state=0 if seed is None else seed, **params)


def run(args) -> int:
    from curation.features import FeatureError
    from datasets_cfg.schema import ScenePool, SchemaError

    if getattr(args, "plan", None):
        from curation import plan_cli

        return plan_cli.run(args)
    missing = [f"--{name}" for name in ("method", "pool", "budget") if getattr(args, name) is None]
    if missing:
        print(f"mose curate: error: {', '.join(missing)} required (or --plan PLAN.yaml)", file=sys.stderr)
        return 2
    try:
        cfg = load_config(args.config)
        params = cfg.get(args.method, {})
        selector = build_selector(args.method, params, args.seed, not args.no_progress, args.config or "config")
        pool = ScenePool.load(args.pool)
        kwargs = {}
        if args.scores:
            kwargs["scores"] = args.scores
        pilot = None
        if needs_pilot(args.method, params, args.pilot):
            pilot = make_pilot(pool, cfg.get("pilot", {}), args.seed, args.config or "config")
            kwargs.update(pilot=pilot, exclude=pilot.eval_ids)
        if args.method == "mosaic" and selector.plot_dir is None:
            out = Path(args.out)
            selector.plot_dir = args.plots or str(out.with_name(out.name.removesuffix(".jsonl") + "_plots"))
        if args.method in ("semantic", "autoscale"):
            from curation import plan_cli

            kwargs.update(plan_cli.method_kwargs(args.method, pool, cfg, args))
        selection = selector.select(pool, args.budget, **kwargs)
        if pilot is not None:
            selection.state["pilot_eval_ids"] = list(pilot.eval_ids)
            selection.config = {**selection.config, "pilot": {k: getattr(pilot, k, None) for k in ("model", "alpha", "metric", "tracking", "human_filter")}}
        selection.pool["path"] = str(Path(args.pool).resolve())
        rows_path = selection.write(args.out)
    except (SelectionError, FeatureError, PilotError, SchemaError, FileNotFoundError, KeyError, ValueError) as exc:
        print(f"mose curate: error: {exc}", file=sys.stderr)
        return 2
    fb = f", {len(selection.fallbacks)} fallback(s) recorded" if selection.fallbacks else ""
    print(f"mose curate: {args.method} selected {len(selection)} of {len(pool)} scenes -> {rows_path}{fb}")
    return 0
