"""`mose demo`: the whole pipeline end to end on simulator scenes, then a report.

    mose demo [--out runs/demo] [--scale tiny|small] [--config FILE] [--from STEP] [--no-progress]

Steps (each in its own folder under --out; pipelines/demo_steps.py does the work with the package's own APIs):

    1 simulate     a training pool and a held-out pool (real + synthetic scenes, disjoint seeds)
    2 skills       skill annotation, the hierarchical skill dataset, coverage, the offline tokenizer
    3 curate       the stage plan (random / coreset / MOSAIC) -> one manifest per training stage
    4 train        the tiny MoSE through align -> router_pretrain -> skill_tune with DeepSpeed
    5 train_dense  the dense baseline (one expert = the dense FFN) on the same manifests and steps
    6 evaluate     held-out CODA-style QA, EPDMS of the planned trajectories, routing per skill
    7 closed_loop  rollouts in highway-env with each model as the planner, plus reference planners
    8 report       report/report.md with tables and PNG plots, every number read from the step outputs

Re-running reuses finished steps. A step is finished when its folder holds `.done.json`, written last, with the
hash of the step's configuration and of the hashes of the steps it reads; a changed configuration re-runs that
step and every later one. A step that fails leaves the earlier steps, and its own previous finished output,
untouched (a re-run that fails puts the previous folder back); an interrupted first run of a step keeps its partial
folder so that simulation and training resume where they stopped.

Settings: pipelines/demo.yaml (`defaults` + one section per scale). The LLM judge of the CODA-style answers runs
only when MOSE_JUDGE_URL and MOSE_JUDGE_MODEL are set (any OpenAI-compatible endpoint; the key is read from
$MOSE_JUDGE_API_KEY, else $OPENAI_API_KEY); without them only the offline metrics are computed.
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import shutil
import sys
import time
import traceback
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from common.errors import MoseError

DEMO_FORMAT = 1  # bump when a step's outputs change meaning: every marker then mismatches
MARKER = ".done.json"
STARTED = ".started.json"
SCALES = ("tiny", "small")  # documented; "test" also exists for the test suite


@dataclass(frozen=True)
class Step:
    name: str
    title: str
    run: str  # function name in pipelines.demo_steps: fn(ctx) -> summary dict
    sections: tuple[str, ...]  # config sections it reads (its hash covers them)
    needs: tuple[str, ...] = ()  # steps whose outputs it reads


STEPS = (
    Step("simulate", "simulate the training and held-out scene pools", "simulate", ("seed", "simulate")),
    Step("skills", "annotate skills, build the hierarchical skill dataset and tokenizer", "skills", ("skills",), ("simulate",)),
    Step("curate", "curate each training stage's data with the stage plan", "curate", ("seed", "curate"), ("skills",)),
    Step("train", "train the tiny MoSE through align -> router_pretrain -> skill_tune (DeepSpeed)", "train", ("seed", "train"),
         ("skills", "curate")),
    Step("train_dense", "train the dense baseline on the same data and steps", "train_dense", ("seed", "train", "dense"),
         ("skills", "curate")),
    Step("evaluate", "evaluate on held-out scenes: CODA-style QA, EPDMS, routing", "evaluate", ("evaluate",),
         ("skills", "train", "train_dense")),
    Step("closed_loop", "closed-loop rollouts in highway-env", "closed_loop", ("seed", "closed_loop"), ("skills", "train", "train_dense")),
    Step("report", "write the report", "report", ("report",),
         ("simulate", "skills", "curate", "train", "train_dense", "evaluate", "closed_loop")),
)
STEP_NAMES = tuple(s.name for s in STEPS)


class DemoError(MoseError, RuntimeError):
    """A step failed; the message names the step and the cause."""


# ----------------------------------------------------------------------------------------------
# configuration


def default_config_path() -> Path:
    from importlib.resources import files

    return Path(str(files("pipelines") / "demo.yaml"))


def deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in (over or {}).items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def load_demo_config(path: str | os.PathLike | None = None, scale: str = "tiny") -> dict:
    """`defaults` deep-merged with the scale's section. ValueError naming the file and key when malformed."""
    from common.yaml_file import read_yaml

    path = Path(path) if path else default_config_path()
    raw = read_yaml(path, what="demo config", expect=object)
    if not isinstance(raw, dict) or not isinstance(raw.get("defaults"), dict) or not isinstance(raw.get("scales"), dict):
        raise ValueError(f"{path}: expected a mapping with 'defaults' and 'scales' sections")
    if scale not in raw["scales"]:
        raise ValueError(f"{path}: scales.{scale}: no such scale; expected one of {sorted(raw['scales'])}")
    cfg = deep_merge(raw["defaults"], raw["scales"][scale] or {})
    missing = [s for st in STEPS for s in st.sections if s not in cfg]
    if missing:
        raise ValueError(f"{path}: defaults.{missing[0]}: section missing (every step's section must be present)")
    # the judge is part of the evaluate step's settings (a newly configured judge re-runs it); the key never is
    url, model = os.environ.get("MOSE_JUDGE_URL"), os.environ.get("MOSE_JUDGE_MODEL")
    cfg["evaluate"]["judge"] = {"url": url, "model": model} if url and model else None
    cfg["_scale"], cfg["_source"] = scale, str(path)
    return cfg


def step_hash(step: Step, cfg: dict, upstream: dict[str, str]) -> str:
    payload = {"format": DEMO_FORMAT, "step": step.name, "config": {s: cfg[s] for s in step.sections},
               "inputs": {n: upstream[n] for n in step.needs}}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:20]


# ----------------------------------------------------------------------------------------------
# markers


def read_marker(step_dir: Path) -> dict | None:
    try:
        m = json.loads((step_dir / MARKER).read_text())
        return m if isinstance(m, dict) and "hash" in m else None
    except (OSError, ValueError):
        return None


@dataclass
class StepContext:
    """What a step function gets: its folder (write here), the run folder, its config, the progress flag and the skill
    taxonomy (loaded once by `run_demo`: the packaged datasets_cfg/skills.yaml)."""

    step: Step
    dir: Path
    run_dir: Path
    cfg: dict
    progress: bool = True
    log: Callable[[str], None] = print
    taxonomy: Any = None  # mose.skills.Taxonomy

    def step_dir(self, name: str) -> Path:
        return self.run_dir / name


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def run_step(step: Step, ctx: StepContext, h: str, upstream: dict[str, str]) -> dict:
    """Run one step in its folder with the marker protocol of the module doc. Returns the marker."""
    from common.atomic import write_json
    from pipelines import demo_steps

    d = ctx.dir
    previous = d.with_name(f".{d.name}.previous")
    # a finished older version left aside by a run that was killed mid-step is still the one to fall back to
    backup = previous if read_marker(previous) is not None else None
    if d.exists():
        if read_marker(d) is not None:  # a finished older version: keep it aside until the new one is finished
            shutil.rmtree(previous, ignore_errors=True)
            os.replace(d, previous)
            backup = previous
        elif _read_json(d / STARTED).get("hash") != h:  # partial output of another configuration
            shutil.rmtree(d)
    d.mkdir(parents=True, exist_ok=True)
    write_json(d / STARTED, {"hash": h, "started_at": _now()})
    t0 = time.perf_counter()
    try:
        summary = getattr(demo_steps, step.run)(ctx) or {}
    except BaseException:
        if backup is not None:  # put the previous finished output back; the partial one goes
            shutil.rmtree(d, ignore_errors=True)
            os.replace(backup, d)
        raise
    seconds = time.perf_counter() - t0
    write_json(d / "summary.json", summary)
    marker = {"step": step.name, "hash": h, "config": {s: ctx.cfg[s] for s in step.sections}, "inputs": {n: upstream[n] for n in step.needs},
              "seconds": round(seconds, 2), "finished_at": _now(), "format": DEMO_FORMAT, "scale": ctx.cfg.get("_scale"),
              "settings": ctx.cfg.get("_source")}
    write_json(d / MARKER, marker)  # the commit point: from here on the folder counts as finished
    (d / STARTED).unlink(missing_ok=True)
    shutil.rmtree(previous, ignore_errors=True)
    return marker


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


# ----------------------------------------------------------------------------------------------
# the pipeline


def run_demo(out: str | os.PathLike, cfg: dict, *, progress: bool = True, force_from: str | None = None,
             log: Callable[[str], None] = print) -> dict:
    """Run (or reuse) every step; returns {"markers": {step: marker}, "reused": [...], "ran": [...], "report": path}.

    Raises DemoError naming the failed step; earlier steps stay finished on disk."""
    run_dir = Path(out).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    if force_from is not None and force_from not in STEP_NAMES:
        raise ValueError(f"--from: expected one of {', '.join(STEP_NAMES)}, got {force_from!r}")
    from mose.skills import load_taxonomy

    taxonomy = load_taxonomy()  # once, for every step
    hashes: dict[str, str] = {}
    markers: dict[str, dict] = {}
    reused, ran = [], []
    forced = False
    n = len(STEPS)
    t_all = time.perf_counter()
    for i, step in enumerate(STEPS, 1):
        forced = forced or step.name == force_from
        h = step_hash(step, cfg, hashes)
        d = run_dir / step.name
        old = read_marker(d)
        if old is not None and old["hash"] == h and not forced:
            log(f"[{i}/{n}] {step.name}: reused (finished {old['finished_at']}, took {old['seconds']:.0f} s)")
            hashes[step.name], markers[step.name] = h, old
            reused.append(step.name)
            continue
        why = "forced" if forced and old is not None and old["hash"] == h else "configuration or inputs changed" if old else "not run yet"
        log(f"[{i}/{n}] {step.name}: {step.title} ({why})")
        ctx = StepContext(step, d, run_dir, cfg, progress, log, taxonomy)
        try:
            marker = run_step(step, ctx, h, hashes)
        except KeyboardInterrupt:
            raise
        except Exception as exc:
            detail = "".join(traceback.format_exception_only(type(exc), exc)).strip()
            raise DemoError(f"step {i}/{n} '{step.name}' failed: {detail}\n(finished steps are kept in {run_dir}; fix the cause "
                            f"and run the same command again to continue from this step)") from exc
        log(f"[{i}/{n}] {step.name}: done in {marker['seconds']:.0f} s")
        hashes[step.name], markers[step.name] = h, marker
        ran.append(step.name)
    report = run_dir / "report" / "report.md"
    return {"markers": markers, "reused": reused, "ran": ran, "report": str(report), "seconds": round(time.perf_counter() - t_all, 2)}


# ----------------------------------------------------------------------------------------------
# CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/demo", help="run folder (default: runs/demo); re-run to reuse finished steps")
    parser.add_argument("--scale", default="tiny", choices=SCALES + ("test",), metavar="{tiny,small}",
                        help="tiny: under 10 minutes on 2 CPU cores (default); small: more scenes and training steps (slower)")
    parser.add_argument("--config", help="demo settings YAML (default: the packaged pipelines/demo.yaml)")
    parser.add_argument("--from", dest="force_from", choices=STEP_NAMES, metavar="STEP",
                        help=f"re-run from this step even if finished ({', '.join(STEP_NAMES)})")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars (step headers are still printed)")


def run(args) -> int:
    try:
        cfg = load_demo_config(args.config, args.scale)
    except ValueError as exc:
        print(f"mose demo: error: {exc}", file=sys.stderr)
        return 2
    print(f"mose demo: scale {args.scale}, settings {cfg['_source']}, output {Path(args.out).resolve()}", flush=True)
    import datasets

    bars = datasets.is_progress_bar_enabled()
    if args.no_progress:
        datasets.disable_progress_bars()
    try:
        result = run_demo(args.out, cfg, progress=not args.no_progress, force_from=args.force_from,
                          log=lambda m: print(m, flush=True))
    except DemoError as exc:
        print(f"mose demo: error: {exc}", file=sys.stderr)
        return 1
    finally:
        if bars:
            datasets.enable_progress_bars()
    print(f"mose demo: finished in {result['seconds']:.0f} s ({len(result['ran'])} step(s) run, {len(result['reused'])} reused)")
    print(f"report: {result['report']}")
    return 0


__all__ = ["STEPS", "Step", "StepContext", "DemoError", "load_demo_config", "run_demo", "read_marker", "add_arguments", "run"]
