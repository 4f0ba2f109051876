"""The per-stage data plan's YAML spec and its structural checks (curation/plan.py runs it).

`load_plan(path)` reads a plan file (format: datasets_cfg/stages/demo.yaml) into a `DataPlan` of `StagePlan`s,
checking keys, types, ranges and names without opening any pool; every error is a `PlanError` naming the
file and the key (e.g. `stages.align.skills.min.vehicles`). A stage's method and its parameters are checked
against the method registry (curation/registry.py).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from common.constants import STAGE_ORDER as STAGES  # the training stages, in order
from common.errors import MoseError

TOP_KEYS = {"name", "description", "pools", "seed", "skills_fallback", "taxonomy", "stages"}
STAGE_KEYS = {"pools", "method", "params", "budget", "real_fraction", "ratio", "skills", "filter", "exclude_stages", "scores",
              "predictions", "pilot", "feedback", "description"}
SKILL_KEYS = {"min", "target"}


class PlanError(MoseError, ValueError):
    """The plan cannot run: the message names the YAML file, the key and what was expected."""


@dataclass
class StagePlan:
    name: str
    pools: list[str]
    method: str
    budget: int
    params: dict = field(default_factory=dict)
    real_fraction: float | None = None  # None = the method decides
    skill_min: dict[str, int] = field(default_factory=dict)
    skill_target: dict[str, float] = field(default_factory=dict)
    filter: dict = field(default_factory=dict)
    exclude_stages: list[str] = field(default_factory=list)
    scores: str | None = None
    predictions: str | None = None
    pilot: dict | None = None
    feedback: dict | None = None


@dataclass
class DataPlan:
    path: Path
    name: str
    pools: dict[str, Path]
    stages: list[StagePlan]
    seed: int = 0
    skills_fallback: str = "annotate"
    taxonomy: str | None = None  # the taxonomy YAML the plan names (None: the packaged one)
    skill_tree: Any = None  # the loaded mose.skills.Taxonomy: read once by load_plan, used by every later step

    def err(self, key: str, expected: str, got: Any = None) -> PlanError:
        got_s = "" if got is None else f", got {got!r}"
        return PlanError(f"{self.path}: {key}: expected {expected}{got_s}")


# ----------------------------------------------------------------------------------------------
# loading and structural checks


def _int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _parse_ratio(plan_path: Path, key: str, st: dict) -> float | None:
    where = f"stages.{key}"
    if "real_fraction" in st and "ratio" in st:
        raise PlanError(f"{plan_path}: {where}: give either 'real_fraction' or 'ratio', not both")
    if "ratio" in st:
        r = st["ratio"]
        if r in (None, "auto"):
            return None
        parts = str(r).split(":")
        try:
            a, b = (float(p) for p in parts)
        except ValueError:
            raise PlanError(f"{plan_path}: {where}.ratio: expected 'REAL:SYNTHETIC' (e.g. '3:1') or 'auto', got {r!r}") from None
        if len(parts) != 2 or a < 0 or b < 0 or a + b <= 0 or not (math.isfinite(a) and math.isfinite(b)):
            raise PlanError(f"{plan_path}: {where}.ratio: expected two non-negative numbers 'REAL:SYNTHETIC', not both 0, got {r!r}")
        return a / (a + b)
    f = st.get("real_fraction")
    if f in (None, "auto"):
        return None
    if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0.0 <= float(f) <= 1.0:
        raise PlanError(f"{plan_path}: {where}.real_fraction: expected a number in [0, 1] (the real share of the budget) or 'auto', got {f!r}")
    return float(f)


def load_plan(path: str | os.PathLike, pool_overrides: dict[str, str] | None = None) -> DataPlan:
    """Read and check a plan YAML (keys, types, ranges, names). Pools are not opened here (see `prepare`).

    `pool_overrides` {name: directory} replaces pool paths (the CLI's --pool NAME=DIR)."""
    from common.yaml_file import read_yaml
    from mose.skills import load_taxonomy

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: plan file not found")
    raw = read_yaml(path, what="plan file", expect=object, error=PlanError)
    if not isinstance(raw, dict):
        raise PlanError(f"{path}: expected a mapping with 'pools' and 'stages', got {type(raw).__name__}")
    bad = sorted(set(raw) - TOP_KEYS)
    if bad:
        raise PlanError(f"{path}: unknown top-level key(s) {bad}; expected some of {sorted(TOP_KEYS)}")
    plan = DataPlan(path=path, name=str(raw.get("name", path.stem)), pools={}, stages=[])
    _load_top(plan, raw)
    tax = plan.skill_tree = load_taxonomy(plan.taxonomy)
    _load_pools(plan, raw.get("pools"), dict(pool_overrides or {}))
    stages = raw.get("stages")
    if not isinstance(stages, dict) or not stages:
        raise plan.err("stages", f"a mapping of stage names ({', '.join(STAGES)}) to stage settings", stages)
    for key, st in stages.items():
        plan.stages.append(_load_stage(plan, key, st, tax, [s.name for s in plan.stages]))
    return plan


def _load_top(plan: DataPlan, raw: dict) -> None:
    """seed, skills_fallback, taxonomy (relative to the plan file)."""
    seed = raw.get("seed", 0)
    if not _int(seed):
        raise plan.err("seed", "an integer", seed)
    plan.seed = int(seed)
    fb = raw.get("skills_fallback", "annotate")
    if fb not in ("annotate", "none"):
        raise plan.err("skills_fallback", "'annotate' or 'none'", fb)
    plan.skills_fallback = fb
    plan.taxonomy = raw.get("taxonomy")
    if plan.taxonomy is not None:
        plan.taxonomy = str((plan.path.parent / plan.taxonomy) if not Path(plan.taxonomy).is_absolute() else plan.taxonomy)


def _load_pools(plan: DataPlan, pools, overrides: dict[str, str]) -> None:
    """pools: name -> {path: DIR} or DIR (relative to the plan file unless overridden)."""
    path = plan.path
    if not isinstance(pools, dict) or not pools:
        raise plan.err("pools", "a mapping of pool names to {path: DIR} (or to a directory string)", pools)
    unknown_over = sorted(set(overrides) - set(pools))
    if unknown_over:
        raise PlanError(f"{path}: pools: --pool names {unknown_over} are not pools of this plan; expected some of {sorted(pools)}")
    for name, spec in pools.items():
        p = spec.get("path") if isinstance(spec, dict) else spec
        if name in overrides:
            p = overrides[name]
        if not isinstance(p, str) or not p:
            raise plan.err(f"pools.{name}.path", "a ScenePool directory (relative paths are relative to the plan file)", p)
        q = Path(p).expanduser()
        plan.pools[str(name)] = q if (q.is_absolute() or name in overrides) else (path.parent / q)


def _load_stage(plan: DataPlan, key, st, tax, seen: list[str]) -> StagePlan:
    """One stage's settings, checked in the order of the YAML format's keys."""
    path, w = plan.path, f"stages.{key}"
    if key not in STAGES:
        raise PlanError(f"{path}: {w}: unknown stage {key!r}; expected one of {list(STAGES)}")
    if not isinstance(st, dict):
        raise plan.err(w, "a mapping of stage settings", st)
    bad = sorted(set(st) - STAGE_KEYS)
    if bad:
        raise PlanError(f"{path}: {w}: unknown key(s) {bad}; expected some of {sorted(STAGE_KEYS)}")
    sp = _stage_pools(plan, w, st.get("pools"))
    method, params = _stage_method(plan, w, st)
    budget = st.get("budget")
    if not _int(budget) or budget <= 0:
        raise plan.err(f"{w}.budget", "a positive integer number of scenes", budget)
    frac = _parse_ratio(path, key, st)
    if method.sets_ratio and frac is not None:
        raise PlanError(f"{path}: {w}.real_fraction: method {method.name!r} sets the real:synthetic ratio itself; remove the key or set 'auto'")
    smin, star = _stage_skills(plan, w, st.get("skills") or {}, tax, budget)
    filt = st.get("filter") or {}
    if not isinstance(filt, dict):
        raise plan.err(f"{w}.filter", "a mapping of column -> value or list of values", filt)
    excl = st.get("exclude_stages") or []
    excl = [excl] if isinstance(excl, str) else excl
    for e in excl:
        if e not in seen:
            raise PlanError(f"{path}: {w}.exclude_stages: {e!r} is not a stage listed before {key!r} (earlier: {seen})")
    _stage_inputs(plan, w, st, method)
    rel = lambda p: None if p is None else str(p if Path(p).is_absolute() else path.parent / p)  # noqa: E731
    return StagePlan(key, list(sp), method.name, int(budget), dict(params), frac, smin, star, dict(filt), list(excl),
                     rel(st.get("scores")), rel(st.get("predictions")), st.get("pilot"), st.get("feedback"))


def _stage_pools(plan: DataPlan, w: str, sp) -> list[str]:
    sp = [sp] if isinstance(sp, str) else sp
    if not isinstance(sp, list) or not sp or not all(isinstance(p, str) for p in sp):
        raise plan.err(f"{w}.pools", f"a list of pool names from {sorted(plan.pools)}", sp)
    missing = [p for p in sp if p not in plan.pools]
    if missing:
        raise PlanError(f"{plan.path}: {w}.pools: unknown pool(s) {missing}; expected names from 'pools': {sorted(plan.pools)}")
    return sp


def _stage_method(plan: DataPlan, w: str, st: dict):
    """(the registry's Method, the selector parameters), both checked."""
    from curation.registry import METHODS

    method = st.get("method")
    if method not in METHODS:
        raise PlanError(f"{plan.path}: {w}.method: unknown method {method!r}; expected one of {sorted(METHODS)}")
    m = METHODS[method]
    params = st.get("params") or {}
    if not isinstance(params, dict):
        raise plan.err(f"{w}.params", "a mapping of selector parameters", params)
    badp = m.unknown_parameters(params)
    if badp:
        raise PlanError(f"{plan.path}: {w}.params: unknown parameter(s) {badp} for method {method!r}; expected some of {m.parameters()}")
    return m, params


def _stage_skills(plan: DataPlan, w: str, skills, tax, budget: int) -> tuple[dict[str, int], dict[str, float]]:
    """skills.min (skill: scene count, at most the budget) and skills.target (skill: fraction), canonical names."""
    if not isinstance(skills, dict) or set(skills) - SKILL_KEYS:
        raise plan.err(f"{w}.skills", "a mapping with 'min' (skill: scene count) and/or 'target' (skill: fraction)", skills)
    smin, star = {}, {}
    for kind, out in (("min", smin), ("target", star)):
        spec = skills.get(kind) or {}
        if not isinstance(spec, dict):
            raise plan.err(f"{w}.skills.{kind}", "a mapping of skill names to numbers", spec)
        for s, v in spec.items():
            canon = _skill_name(plan, f"{w}.skills.{kind}", s, tax)
            if kind == "min":
                if not _int(v) or v < 0:
                    raise plan.err(f"{w}.skills.min.{s}", "a non-negative integer number of scenes", v)
                if v > budget:
                    raise PlanError(f"{plan.path}: {w}.skills.min.{s}: minimum {v} exceeds the stage budget {budget} ({w}.budget)")
                out[canon] = int(v)
            else:
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= float(v) <= 1.0:
                    raise plan.err(f"{w}.skills.target.{s}", "a fraction of the budget in [0, 1]", v)
                out[canon] = float(v)
    return smin, star


def _skill_name(plan: DataPlan, where: str, s, tax) -> str:
    from mose.skills import UnknownSkillError

    try:
        return tax.resolve(str(s))
    except (UnknownSkillError, KeyError):
        raise PlanError(f"{plan.path}: {where}.{s}: unknown skill {s!r}; expected one of {tax.names}") from None


def _stage_inputs(plan: DataPlan, w: str, st: dict, method) -> None:
    """scores / predictions (file paths, only for a method that uses them; required where the method needs
    them) and the pilot / feedback settings (mappings)."""
    for k in ("scores", "predictions"):
        if st.get(k) is not None and not isinstance(st[k], str):
            raise plan.err(f"{w}.{k}", "a file path", st[k])
    for k, what in (("scores", "a per-scene scores file"), ("predictions", "a predictions file")):
        if k in method.requires and not st.get(k):
            raise PlanError(f"{plan.path}: {w}.{k}: method {method.name!r} needs {what}")
        if st.get(k) and k not in method.needs:
            raise PlanError(f"{plan.path}: {w}.{k}: method {method.name!r} does not use {what}; remove the key")
    for k in ("pilot", "feedback"):
        if st.get(k) is not None and not isinstance(st[k], dict):
            raise plan.err(f"{w}.{k}", "a mapping of settings", st[k])
