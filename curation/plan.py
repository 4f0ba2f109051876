"""The per-stage data plan: for each training stage, which pools, which selector, how many scenes, which
skills (minimums and a target distribution) and which real:synthetic ratio -> one Selection manifest per
stage, plus a coverage report (skills x sources x environments: CSV, markdown, PNG).

    plan = load_plan("datasets_cfg/stages/demo.yaml")          # structure checked, nothing loaded
    result = run_plan(plan, "runs/plan", pilot_factory=..., feedback_factory=...)

The YAML format is documented in datasets_cfg/stages/demo.yaml. Every check that can fail runs before any
selection: `load_plan` checks keys, types and ranges; `prepare` loads the pools, resolves skills and checks
each stage's budget against its quotas and skill minimums (a greedy reservation; see below). Errors are
`PlanError`s naming the YAML file and the key (e.g. `stages.align.skills.min.vehicles`).

This module is the public entry (`load_plan`, `run_plan`, `PlanError`, ...); the pieces, one idea each:
curation/plan_spec.py (the YAML spec and its checks), curation/plan_reserve.py (pools, skills, the
feasibility reservation: steps 1-4), curation/plan_select.py (a stage's selection with the swap repair:
step 5), curation/plan_target_ilp.py (the soft targets' integer program: step 6) and
curation/plan_coverage.py (the coverage report). Methods come from curation/registry.py.

How a stage is selected (OURS):
1. Stage pool = its pools concatenated, rows matching `filter` (column -> value or list), minus the scenes
   chosen by the stages in `exclude_stages` and the pilot's / feedback's held-out scenes. (Before selection,
   exclude_stages is checked for the worst case; quotas are checked again once the earlier stages have run.)
2. Scene skills = the row's `skills` and their ancestors in the taxonomy (datasets_cfg/skills.yaml). A row
   with no skills falls back (`skills_fallback: annotate`, the default) to the structured annotation of
   `datasets_cfg.skill_annotation.scene_skills` (agents, lights, conditions, ego motion); `none` leaves it
   without skills. The fallback count is recorded in the manifest.
3. Quotas: `real_fraction` f (or `ratio: "R:S"`) gives round(f * budget) real scenes and the rest synthetic;
   absent or "auto" leaves the ratio to the method (autoscale sets it itself and refuses a fixed ratio).
4. Skills, checked before any selection: a greedy reservation proves the hard minimums `skills.min` (scene
   counts) fit the budget and quotas: scarcest skill first, each filled with the scenes that cover the most
   still-unmet minimums (ties in a seeded random order). A minimum the pool or quotas cannot meet is an error.
5. The method selects each quota (per source when the ratio is fixed, else from all), picks interleaved across
   sources so any prefix keeps the ratio. Then a repair pass meets the skills: for each unmet minimum
   (scarcest first), then each soft `skills.target` fraction up to ceil(fraction * budget), the unchosen scene
   covering the most unmet requirements (same source as the scene it replaces when the ratio is fixed) takes
   the place of the method's lowest-ranked pick whose removal breaks no requirement met so far. Swaps are
   listed in the manifest (reason and state); an unmet target is reported, never an error. If the repair
   cannot meet a minimum (rare: the swap rule is greedy), the stage falls back to the reservation of step 4
   followed by the method on the rest (recorded as a fallback).
6. Soft targets, met as far as the pool allows: the greedy repair of step 5 can leave a reachable target unmet
   (it never removes a scene it swapped in or one an earlier requirement needs). The selection is then solved
   as a small integer program (curation/plan_target_ilp.py, `scipy.optimize.milp`): maximise the target units
   met, sum over targets of min(ceil(fraction * budget), selected scenes with the skill), within the budget,
   quotas and hard minimums, keeping as many of the step-5 scenes as possible (best-ranked first). When
   its optimum meets more units, the step-5 scenes outside it give their places to its scenes (group
   "target_ilp", listed in the swaps); a solver failure or time-out keeps step 5 (a recorded fallback).
   Per target the manifest, plan_summary.json and coverage.md report target / achieved / reachable (the
   optimum of the same program for that target alone) / greedy (step 5's count).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from curation.plan_coverage import coverage_rows, write_coverage
from curation.plan_reserve import StageCandidates, _reserve, _without, prepare
from curation.plan_select import _method_picks, _select_stage
from curation.plan_spec import SKILL_KEYS, STAGE_KEYS, STAGES, TOP_KEYS, DataPlan, PlanError, StagePlan, load_plan
from curation.selection import Selection

__all__ = ["DataPlan", "PlanError", "PlanResult", "SKILL_KEYS", "STAGES", "STAGE_KEYS", "StageCandidates", "StagePlan", "TOP_KEYS",
           "coverage_rows", "load_plan", "prepare", "run_plan", "write_coverage", "_method_picks", "_reserve", "_select_stage", "_without"]


@dataclass
class PlanResult:
    manifests: dict[str, Path]
    selections: dict[str, Selection]
    coverage_csv: Path
    coverage_md: Path
    coverage_png: Path
    summary: Path


def run_plan(plan: DataPlan, out_dir: str | os.PathLike, *, pilot_factory: Callable | None = None, feedback_factory: Callable | None = None,
             progress: bool = False) -> PlanResult:
    """Check the whole plan (`prepare`), then select every stage in order and write DIR/<stage>.jsonl
    (+ header), DIR/coverage.{csv,md,png} and DIR/plan_summary.json."""
    from common.atomic import write_json

    out = Path(out_dir)
    data = prepare(plan, pilot_factory=pilot_factory, feedback_factory=feedback_factory, progress=progress)
    out.mkdir(parents=True, exist_ok=True)
    manifests, selections = {}, {}
    for st in plan.stages:
        d = data[st.name]
        if st.exclude_stages:  # drop what earlier stages actually chose (prepare could not know it yet)
            chosen = set().union(*(set(selections[e].ids) for e in st.exclude_stages))
            d = _without(plan, d, chosen)
        sel = _select_stage(plan, d, out, progress)
        selections[st.name] = sel
        manifests[st.name] = sel.write(out / f"{st.name}.jsonl")
    rows = coverage_rows(plan, data, selections)
    csv, md, png = write_coverage(rows, out, [s.name for s in plan.stages],
                                  targets={n: s.state["skills"]["target"] for n, s in selections.items()})
    summary = {"plan": str(plan.path), "name": plan.name, "seed": plan.seed, "stages": {
        name: {"manifest": str(manifests[name]), "method": s.method, "selected": len(s), "budget": s.budget,
               "ratio": s.state["ratio"], "real": s.state["real"], "synthetic": s.state["synthetic"], "reserved": s.state["reserved"],
               "skills_min": s.state["skills"]["min"],
               "skills_target": {k: {f: v[f] for f in ("fraction", "target", "achieved", "reachable", "greedy")}
                                 for k, v in s.state["skills"]["target"].items()},
               "target_units": s.state["skills"]["target_units"], "fallbacks": len(s.fallbacks)} for name, s in selections.items()},
        "coverage": {"csv": str(csv), "markdown": str(md), "png": str(png)}}
    write_json(out / "plan_summary.json", summary)
    return PlanResult(manifests, selections, csv, md, png, out / "plan_summary.json")


