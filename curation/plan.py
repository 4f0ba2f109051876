"""The per-stage data plan: for each training stage, which pools, which selector, how many scenes, which
skills (minimums and a target distribution) and which real:synthetic ratio -> one Selection manifest per
stage, plus a coverage report (skills x sources x environments: CSV, markdown, PNG).

    plan = load_plan("datasets_cfg/stages/demo.yaml")          # structure checked, nothing loaded
    result = run_plan(plan, "runs/plan", pilot_factory=..., feedback_factory=...)

The YAML format is documented in datasets_cfg/stages/demo.yaml. Every check that can fail runs before any
selection: `load_plan` checks keys, types and ranges; `prepare` loads the pools, resolves skills and checks
each stage's budget against its quotas and skill minimums (a greedy reservation; see below). Errors are
`PlanError`s naming the YAML file and the key (e.g. `stages.align.skills.min.vehicles`).

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
"""
from __future__ import annotations

import inspect
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from common.constants import STAGE_ORDER as STAGES  # the training stages, in order
from common.errors import MoseError
from curation.selection import Selection

TOP_KEYS = {"name", "description", "pools", "seed", "skills_fallback", "taxonomy", "stages"}
STAGE_KEYS = {"pools", "method", "params", "budget", "real_fraction", "ratio", "skills", "filter", "exclude_stages", "scores",
              "predictions", "pilot", "feedback", "description"}
SKILL_KEYS = {"min", "target"}


class PlanError(MoseError, ValueError):
    """The plan cannot run: the message names the YAML file, the key and what was expected."""


def methods() -> dict:
    """Method name -> selector class: `mose curate`'s methods plus semantic and autoscale."""
    from curation.autoscale import AutoScaleSelector
    from curation.cli import METHODS
    from curation.semantic import SemanticSelector

    return {**METHODS, "semantic": SemanticSelector, "autoscale": AutoScaleSelector}


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
    taxonomy: str | None = None

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
    from mose.skills import UnknownSkillError, load_taxonomy

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
        plan.taxonomy = str((path.parent / plan.taxonomy) if not Path(plan.taxonomy).is_absolute() else plan.taxonomy)
    tax = load_taxonomy(plan.taxonomy)

    pools = raw.get("pools")
    if not isinstance(pools, dict) or not pools:
        raise plan.err("pools", "a mapping of pool names to {path: DIR} (or to a directory string)", pools)
    overrides = dict(pool_overrides or {})
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

    stages = raw.get("stages")
    if not isinstance(stages, dict) or not stages:
        raise plan.err("stages", f"a mapping of stage names ({', '.join(STAGES)}) to stage settings", stages)
    registry = methods()
    seen: list[str] = []
    for key, st in stages.items():
        w = f"stages.{key}"
        if key not in STAGES:
            raise PlanError(f"{path}: {w}: unknown stage {key!r}; expected one of {list(STAGES)}")
        if not isinstance(st, dict):
            raise plan.err(w, "a mapping of stage settings", st)
        bad = sorted(set(st) - STAGE_KEYS)
        if bad:
            raise PlanError(f"{path}: {w}: unknown key(s) {bad}; expected some of {sorted(STAGE_KEYS)}")
        sp = st.get("pools")
        sp = [sp] if isinstance(sp, str) else sp
        if not isinstance(sp, list) or not sp or not all(isinstance(p, str) for p in sp):
            raise plan.err(f"{w}.pools", f"a list of pool names from {sorted(plan.pools)}", st.get("pools"))
        missing = [p for p in sp if p not in plan.pools]
        if missing:
            raise PlanError(f"{path}: {w}.pools: unknown pool(s) {missing}; expected names from 'pools': {sorted(plan.pools)}")
        method = st.get("method")
        if method not in registry:
            raise PlanError(f"{path}: {w}.method: unknown method {method!r}; expected one of {sorted(registry)}")
        params = st.get("params") or {}
        if not isinstance(params, dict):
            raise plan.err(f"{w}.params", "a mapping of selector parameters", params)
        names = set(inspect.signature(registry[method].__init__).parameters) - {"self"}
        badp = sorted(set(params) - names)
        if badp:
            raise PlanError(f"{path}: {w}.params: unknown parameter(s) {badp} for method {method!r}; expected some of {sorted(names)}")
        budget = st.get("budget")
        if not _int(budget) or budget <= 0:
            raise plan.err(f"{w}.budget", "a positive integer number of scenes", budget)
        frac = _parse_ratio(path, key, st)
        if method == "autoscale" and frac is not None:
            raise PlanError(f"{path}: {w}.real_fraction: method 'autoscale' sets the real:synthetic ratio itself; remove the key or set 'auto'")
        skills = st.get("skills") or {}
        if not isinstance(skills, dict) or set(skills) - SKILL_KEYS:
            raise plan.err(f"{w}.skills", "a mapping with 'min' (skill: scene count) and/or 'target' (skill: fraction)", skills)
        smin, star = {}, {}
        for kind, out in (("min", smin), ("target", star)):
            spec = skills.get(kind) or {}
            if not isinstance(spec, dict):
                raise plan.err(f"{w}.skills.{kind}", "a mapping of skill names to numbers", spec)
            for s, v in spec.items():
                try:
                    canon = tax.resolve(str(s))
                except (UnknownSkillError, KeyError):
                    raise PlanError(f"{path}: {w}.skills.{kind}.{s}: unknown skill {s!r}; expected one of {tax.names}") from None
                if kind == "min":
                    if not _int(v) or v < 0:
                        raise plan.err(f"{w}.skills.min.{s}", "a non-negative integer number of scenes", v)
                    if v > budget:
                        raise PlanError(f"{path}: {w}.skills.min.{s}: minimum {v} exceeds the stage budget {budget} ({w}.budget)")
                    out[canon] = int(v)
                else:
                    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= float(v) <= 1.0:
                        raise plan.err(f"{w}.skills.target.{s}", "a fraction of the budget in [0, 1]", v)
                    out[canon] = float(v)
        filt = st.get("filter") or {}
        if not isinstance(filt, dict):
            raise plan.err(f"{w}.filter", "a mapping of column -> value or list of values", filt)
        excl = st.get("exclude_stages") or []
        excl = [excl] if isinstance(excl, str) else excl
        for e in excl:
            if e not in seen:
                raise PlanError(f"{path}: {w}.exclude_stages: {e!r} is not a stage listed before {key!r} (earlier: {seen})")
        for k in ("scores", "predictions"):
            if st.get(k) is not None and not isinstance(st[k], str):
                raise plan.err(f"{w}.{k}", "a file path", st[k])
        if method == "uncertainty" and not st.get("scores"):
            raise PlanError(f"{path}: {w}.scores: method 'uncertainty' needs a per-scene scores file")
        for k in ("pilot", "feedback"):
            if st.get(k) is not None and not isinstance(st[k], dict):
                raise plan.err(f"{w}.{k}", "a mapping of settings", st[k])
        rel = lambda p: None if p is None else str(p if Path(p).is_absolute() else path.parent / p)  # noqa: E731
        plan.stages.append(StagePlan(key, list(sp), method, int(budget), dict(params), frac, smin, star, dict(filt), list(excl),
                                     rel(st.get("scores")), rel(st.get("predictions")), st.get("pilot"), st.get("feedback")))
        seen.append(key)
    return plan


# ----------------------------------------------------------------------------------------------
# pools, skills and feasibility


@dataclass
class StageCandidates:
    """One plan stage's candidate scenes before selection: their pool, ids, sources, locations and skills, the
    scenes reserved for skill minimums, the quotas and shortfalls, and the stage's pilot / evaluator helpers."""

    stage: StagePlan
    pool: Any  # the stage's ScenePool (filters applied; held-out and excluded scenes still in it)
    ids: list[str]  # candidate ids, pool order
    sources: np.ndarray
    locations: np.ndarray
    skills: list[frozenset]  # per candidate, with ancestors
    reserved: list[int]  # positions into ids, in reservation order
    reserved_for: list[str]
    quotas: dict[str, int] | None
    shortfalls: dict[str, int]
    skills_fallback_rows: int
    helpers: dict = field(default_factory=dict)  # pilot / evaluator objects
    removed: dict = field(default_factory=dict)


def _scene_skills(rows_skills, rows, tax, fallback: str, cache: dict, keys) -> tuple[list[frozenset], int]:
    from datasets_cfg.skill_annotation import scene_skills

    out, n_fb = [], 0
    for sk, row, key in zip(rows_skills, rows, keys):
        names = list(sk)
        if not names and fallback == "annotate":
            if key not in cache:
                cache[key] = scene_skills(row(), tax, on_unknown="count")
            names = cache[key]
            n_fb += 1
        full = set()
        for s in names:
            s = tax.try_resolve(s)
            while s is not None:
                full.add(s)
                s = tax.parent(s)
        out.append(frozenset(full))
    return out, n_fb


def _reserve(need: dict[str, int], skills: list[frozenset], sources: np.ndarray, room: dict[str, int] | None, taken: list[int],
             taken_for: list[str], budget: int, rng, hard: bool, plan: DataPlan, where: str) -> dict[str, int]:
    """Greedy reservation (module doc, step 4). Mutates taken / taken_for / room. Returns shortfalls."""
    short = {}
    taken_set = set(taken)
    order = sorted(need, key=lambda s: (sum(s in sk for sk in skills), s))  # scarcest first
    tie = rng.random(len(skills))
    for s in order:
        have = sum(s in skills[i] for i in taken)
        while have < need[s]:
            if len(taken) >= budget:
                if hard:
                    raise PlanError(f"{plan.path}: {where}.min.{s}: the skill minimums need more than the budget of {budget} scenes "
                                    f"({len(taken)} reserved when {s!r} still needs {need[s] - have}); raise the budget or lower the minimums")
                break
            cands = [i for i in range(len(skills)) if i not in taken_set and s in skills[i] and (room is None or room[sources[i]] > 0)]
            if not cands:
                avail = sum(s in sk for sk in skills)
                if hard:
                    quota = "" if room is None else f" within the real/synthetic quotas (room left {room})"
                    raise PlanError(f"{plan.path}: {where}.min.{s}: minimum {need[s]} scenes with skill {s!r} cannot be met: the stage pool has "
                                    f"{avail}{quota}; {have} reserved")
                break
            unmet = {t for t in need if sum(t in skills[i] for i in taken) < need[t]}
            best = max(cands, key=lambda i: (len(skills[i] & unmet), tie[i]))
            taken.append(best)
            taken_for.append(s)
            taken_set.add(best)
            if room is not None:
                room[sources[best]] -= 1
            have += 1
        if have < need[s]:
            short[s] = need[s] - have
    return short


def prepare(plan: DataPlan, *, pilot_factory: Callable | None = None, feedback_factory: Callable | None = None,
            progress: bool = False) -> dict[str, StageCandidates]:
    """Open the pools, resolve skills, build helpers, and check every stage's feasibility (no selection)."""
    from tqdm.auto import tqdm

    from datasets_cfg.schema import ScenePool
    from mose.skills import load_taxonomy

    tax = load_taxonomy(plan.taxonomy)
    opened = {}
    for name, p in plan.pools.items():
        try:
            opened[name] = ScenePool.load(p)
        except FileNotFoundError as exc:
            raise PlanError(f"{plan.path}: pools.{name}.path: {exc}") from None
    out: dict[str, StageCandidates] = {}
    annotated: dict = {}  # (pools, id) -> skills from the annotation fallback, shared by stages on the same pools
    for st in tqdm(plan.stages, desc="checking plan", disable=not progress):
        w = f"stages.{st.name}"
        pool = opened[st.pools[0]] if len(st.pools) == 1 else ScenePool.concatenate([opened[p] for p in st.pools])
        if st.filter:
            try:
                pool = pool.where(**st.filter)
            except KeyError as exc:
                raise PlanError(f"{plan.path}: {w}.filter: {exc.args[0]}") from None
        removed, helpers = {}, {}
        if st.method in ("mosaic", "sead") and not (st.method == "mosaic" and st.params.get("fits") is not None) and pilot_factory is not None:
            helpers["pilot"] = pilot_factory(pool, st.pilot or {}, plan.seed)
            removed["pilot_heldout"] = set(helpers["pilot"].eval_ids)
        if st.method == "autoscale":
            if feedback_factory is None:
                raise PlanError(f"{plan.path}: {w}.feedback: method 'autoscale' needs closed-loop feedback, and no feedback factory was given")
            try:
                helpers["evaluator"] = feedback_factory(st.feedback or {}, pool)
            except (ImportError, AttributeError, TypeError, ValueError) as exc:
                raise PlanError(f"{plan.path}: {w}.feedback: cannot build the evaluator: {type(exc).__name__}: {exc}") from None
            removed["feedback_heldout"] = set(getattr(helpers["evaluator"], "heldout_ids", []) or [])
        drop = set().union(*removed.values()) if removed else set()
        all_ids = pool.ids
        keep = [i for i, s in enumerate(all_ids) if s not in drop]
        ids = [all_ids[i] for i in keep]
        sources = np.asarray(pool.column("source"), dtype=object)[keep].astype(str)
        locations = np.asarray(pool.column("location"), dtype=object)[keep].astype(str)
        raw_sk = pool.column("skills")
        rows = [(lambda i=i: pool.dataset[i]) for i in keep]
        skills, n_fb = _scene_skills([raw_sk[i] for i in keep], rows, tax, plan.skills_fallback, annotated,
                                     [(tuple(st.pools), s) for s in ids])
        n = len(ids)
        # exclude_stages: the earlier stages' picks are known only when they run; check the worst case now
        worst = sum(min(out[e].stage.budget, len(set(out[e].ids) & set(ids))) for e in st.exclude_stages)
        if st.exclude_stages and st.budget > n - worst:
            raise PlanError(f"{plan.path}: {w}.exclude_stages: after excluding up to {worst} scenes chosen by {st.exclude_stages}, "
                            f"{n - worst} candidates may remain for a budget of {st.budget}; lower the budget or drop the exclusion")
        if st.budget > n:
            raise PlanError(f"{plan.path}: {w}.budget: {st.budget} scenes requested but the stage pool has {n} "
                            f"(pools {st.pools}{', filtered' if st.filter else ''}{', minus ' + ', '.join(sorted(removed)) if removed else ''})")
        quotas = None
        if st.real_fraction is not None:
            q_real = int(round(st.real_fraction * st.budget))
            quotas = {"real": q_real, "synthetic": st.budget - q_real}
            for src, q in quotas.items():
                have = int((sources == src).sum())
                if q > have:
                    raise PlanError(f"{plan.path}: {w}.real_fraction: {st.real_fraction:g} of {st.budget} needs {q} {src} scenes but the stage "
                                    f"pool has {have}; change the ratio or the budget")
        rng = np.random.default_rng(plan.seed)
        taken, taken_for = [], []
        room = dict(quotas) if quotas else None
        _reserve(st.skill_min, skills, sources, room, taken, taken_for, st.budget, rng, True, plan, f"{w}.skills")
        target_n = {s: int(math.ceil(f * st.budget)) for s, f in st.skill_target.items()}
        short = _reserve(target_n, skills, sources, room, taken, taken_for, st.budget, rng, False, plan, f"{w}.skills")
        out[st.name] = StageCandidates(st, pool, ids, sources, locations, skills, taken, taken_for, quotas, short, n_fb, helpers,
                                 {k: len(v) for k, v in removed.items()})
    return out


# ----------------------------------------------------------------------------------------------
# running


def _selector(plan: DataPlan, st: StagePlan, progress: bool):
    cls = methods()[st.method]
    params = dict(st.params)
    names = set(inspect.signature(cls.__init__).parameters)
    params.setdefault("random_state", plan.seed)
    if "progress" in names:
        params.setdefault("progress", progress)
    return cls(**params)


def _method_picks(plan: DataPlan, data: StageCandidates, groups: list[tuple[str, list[int], int]], out_dir: Path, progress: bool):
    """Run the stage's selector on each group (name, candidate positions, budget); returns {name: Selection | None}."""
    st = data.stage
    picks = {}
    for name, members, k in groups:
        if k <= 0:
            picks[name] = None
            continue
        sub = data.pool.select_ids([data.ids[i] for i in members])
        kw: dict = {}
        if st.scores:
            kw["scores"] = st.scores
        if "pilot" in data.helpers:
            kw["pilot"] = data.helpers["pilot"]
        if st.method == "semantic":
            kw["report_dir"] = out_dir / f"{st.name}_report" / name
            if st.predictions:
                kw["predictions"] = st.predictions
        if st.method == "autoscale":
            kw["evaluator"] = data.helpers["evaluator"]
            kw["report_dir"] = out_dir / f"{st.name}_report"
        picks[name] = _selector(plan, st, progress).select(sub, int(k), **kw)
    return picks


def _interleave(picks: dict) -> list[tuple[str, int]]:
    """(group, index in that group's selection) in an order where every prefix keeps the groups' proportions."""
    lists = [(g, p) for g, p in picks.items() if p is not None]
    pos = {g: 0 for g, _ in lists}
    out = []
    for _ in range(sum(len(p) for _, p in lists)):
        g, p = min(lists, key=lambda gp: ((pos[gp[0]] + 0.5) / len(gp[1]) if pos[gp[0]] < len(gp[1]) else math.inf, gp[0]))
        out.append((g, pos[g]))
        pos[g] += 1
    return out


def _repair(chosen: list[int], skills: list[frozenset], sources: np.ndarray, need: dict[str, int], fixed_ratio: bool, rng,
            keep_met: dict[str, int]) -> tuple[list[tuple[int, int, str]], dict[str, int]]:
    """Swap scenes into `chosen` (positions, best first; changed in place) until every skill in `need` is met.
    A victim is the lowest-ranked unprotected pick whose removal keeps every skill in `keep_met` (updated) at
    its requirement. Returns (swaps (new, old, skill), shortfalls)."""
    swaps, short = [], {}
    protected: set[int] = set()
    tie = rng.random(len(skills))
    count = Counter(t for i in chosen for t in skills[i])
    for s in sorted(need, key=lambda t: (sum(t in sk for sk in skills), t)):
        keep_met[s] = need[s]
        while count[s] < need[s]:
            in_set = set(chosen)
            unmet = {t for t, m in keep_met.items() if count[t] < m}

            def removable(v):
                return v not in protected and s not in skills[v] and all(count[t] - 1 >= keep_met[t] for t in skills[v] if t in keep_met)

            victims = {}
            for v in reversed(chosen):  # lowest-ranked first
                key = str(sources[v]) if fixed_ratio else "any"
                if key not in victims and removable(v):
                    victims[key] = v
            cands = [i for i in range(len(skills)) if i not in in_set and s in skills[i] and (str(sources[i]) if fixed_ratio else "any") in victims]
            if not cands:
                short[s] = need[s] - count[s]
                break
            new = max(cands, key=lambda i: (len(skills[i] & unmet), tie[i]))
            old = victims[str(sources[new]) if fixed_ratio else "any"]
            chosen[chosen.index(old)] = new
            protected.add(new)
            count.subtract(skills[old])
            count.update(skills[new])
            swaps.append((new, old, s))
    return swaps, short


def _select_stage(plan: DataPlan, data: StageCandidates, out_dir: Path, progress: bool) -> Selection:
    st = data.stage
    all_pos = list(range(len(data.ids)))
    if data.quotas is None:
        groups = [("all", all_pos, st.budget)]
    else:
        groups = [(src, [i for i in all_pos if data.sources[i] == src], data.quotas[src]) for src in ("real", "synthetic")]
    picks = _method_picks(plan, data, groups, out_dir, progress)
    pos_of = {sid: i for i, sid in enumerate(data.ids)}
    order = _interleave(picks)
    chosen = [pos_of[picks[g].ids[j]] for g, j in order]
    info = {pos_of[picks[g].ids[j]]: (g, picks[g].scores[j], picks[g].reasons[j]) for g, j in order}
    rng = np.random.default_rng(plan.seed)
    keep: dict[str, int] = {}
    swaps, short_min = _repair(chosen, data.skills, data.sources, st.skill_min, data.quotas is not None, rng, keep)
    fallbacks = [dict(f, group=g) for g, p in picks.items() if p is not None for f in p.fallbacks]
    if short_min:  # the greedy swap failed where the reservation (checked in prepare) succeeds: reserve, then select the rest
        fallbacks.append({"what": "skill_reservation", "why": f"swap repair left minimums unmet: {short_min}",
                          "consequence": "scenes reserved for the minimums first, the method chose the rest"})
        return _reserved_stage(plan, data, out_dir, progress, fallbacks)
    target_n = {s: int(math.ceil(f * st.budget)) for s, f in st.skill_target.items()}
    swaps2, short_target = _repair(chosen, data.skills, data.sources, target_n, data.quotas is not None, rng, keep)
    why = {new: f"swapped in for skill {sk!r} (replaces {data.ids[old]!r}, the method's lowest-ranked pick it could spare)"
           for new, old, sk in swaps + swaps2}
    ids, scores, reasons, groups_col, srcs = [], [], [], [], []
    for i in chosen:
        ids.append(data.ids[i])
        srcs.append(str(data.sources[i]))
        if i in why:
            scores.append(float("nan"))
            reasons.append(why[i])
            groups_col.append("skill_repair")
        else:
            g, sc, r = info[i]
            scores.append(sc)
            reasons.append(r)
            groups_col.append(g)
    return _stage_selection(plan, data, ids, scores, reasons, groups_col, srcs, picks, fallbacks,
                            {"swaps": [{"added": data.ids[n], "removed": data.ids[o], "skill": s} for n, o, s in swaps + swaps2],
                             "target_shortfalls": short_target, "reserved": 0})


def _reserved_stage(plan: DataPlan, data: StageCandidates, out_dir: Path, progress: bool, fallbacks: list) -> Selection:
    st = data.stage
    rng = np.random.default_rng(plan.seed)
    taken, taken_for = [], []
    room = dict(data.quotas) if data.quotas else None
    _reserve(st.skill_min, data.skills, data.sources, room, taken, taken_for, st.budget, rng, True, plan, f"stages.{st.name}.skills")
    target_n = {s: int(math.ceil(f * st.budget)) for s, f in st.skill_target.items()}
    short = _reserve(target_n, data.skills, data.sources, room, taken, taken_for, st.budget, rng, False, plan, f"stages.{st.name}.skills")
    rest = [i for i in range(len(data.ids)) if i not in set(taken)]
    if data.quotas is None:
        groups = [("all", rest, st.budget - len(taken))]
    else:
        groups = [(src, [i for i in rest if data.sources[i] == src], room[src]) for src in ("real", "synthetic")]
    picks = _method_picks(plan, data, groups, out_dir, progress)
    ids = [data.ids[i] for i in taken]
    scores = [float("nan")] * len(taken)
    reasons = [f"reserved for skill {w!r} (stage minimum / target)" for w in taken_for]
    groups_col = ["reserved"] * len(taken)
    srcs = [str(data.sources[i]) for i in taken]
    src_of = dict(zip(data.ids, data.sources))
    for g, j in _interleave(picks):
        p = picks[g]
        ids.append(p.ids[j])
        scores.append(p.scores[j])
        reasons.append(p.reasons[j])
        groups_col.append(g)
        srcs.append(str(src_of[p.ids[j]]))
    fallbacks = fallbacks + [dict(f, group=g) for g, p in picks.items() if p is not None for f in p.fallbacks]
    return _stage_selection(plan, data, ids, scores, reasons, groups_col, srcs, picks, fallbacks,
                            {"swaps": [], "target_shortfalls": short, "reserved": len(taken)})


def _stage_selection(plan, data, ids, scores, reasons, groups_col, srcs, picks, fallbacks, skill_state) -> Selection:
    from curation.selection import pool_info

    st = data.stage
    if data.skills_fallback_rows:
        fallbacks.append({"what": "skills_fallback", "why": f"{data.skills_fallback_rows} candidate rows have no 'skills'",
                          "consequence": "skills derived with datasets_cfg.skill_annotation.scene_skills" if plan.skills_fallback == "annotate"
                          else "those rows count for no skill"})
    sk = dict(zip(data.ids, data.skills))
    counts = Counter(s for i in ids for s in sk[i])
    n_real = sum(s == "real" for s in srcs)
    state = {
        "plan": {"file": str(plan.path), "name": plan.name, "stage": st.name, "pools": st.pools, "filter": st.filter,
                 "exclude_stages": st.exclude_stages, "removed": data.removed, "candidates": len(data.ids)},
        "quotas": data.quotas, "real": n_real, "synthetic": len(ids) - n_real, "ratio": f"{n_real}:{len(ids) - n_real}",
        "reserved": skill_state["reserved"], "skill_swaps": skill_state["swaps"],
        "skills": {"min": {s: {"required": m, "selected": counts.get(s, 0)} for s, m in st.skill_min.items()},
                   "target": {s: {"fraction": f, "selected_fraction": counts.get(s, 0) / max(len(ids), 1)} for s, f in st.skill_target.items()},
                   "target_shortfalls": skill_state["target_shortfalls"], "selected_counts": dict(sorted(counts.items()))},
        "method_state": {g: p.state for g, p in picks.items() if p is not None},
    }
    return Selection(ids=ids, scores=scores, reasons=reasons, method=st.method, budget=st.budget, seed=plan.seed,
                     config={"params": st.params, "real_fraction": st.real_fraction, "skills_min": st.skill_min,
                             "skills_target": st.skill_target},
                     state=state, fallbacks=fallbacks, extra={"group": groups_col, "source": srcs},
                     pool={**pool_info(data.pool), "path": ",".join(str(plan.pools[p].resolve()) for p in st.pools)})


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
    csv, md, png = write_coverage(rows, out, [s.name for s in plan.stages])
    summary = {"plan": str(plan.path), "name": plan.name, "seed": plan.seed, "stages": {
        name: {"manifest": str(manifests[name]), "method": s.method, "selected": len(s), "budget": s.budget,
               "ratio": s.state["ratio"], "real": s.state["real"], "synthetic": s.state["synthetic"], "reserved": s.state["reserved"],
               "skills_min": s.state["skills"]["min"], "fallbacks": len(s.fallbacks)} for name, s in selections.items()},
        "coverage": {"csv": str(csv), "markdown": str(md), "png": str(png)}}
    write_json(out / "plan_summary.json", summary)
    return PlanResult(manifests, selections, csv, md, png, out / "plan_summary.json")


def _without(plan: DataPlan, d: StageCandidates, chosen: set) -> StageCandidates:
    """The stage's data minus `chosen` ids; the reservation is redone and re-checked on what is left."""
    keep = [i for i, s in enumerate(d.ids) if s not in chosen]
    st = d.stage
    sub = StageCandidates(st, d.pool, [d.ids[i] for i in keep], d.sources[keep], d.locations[keep], [d.skills[i] for i in keep], [], [],
                    d.quotas, {}, d.skills_fallback_rows, d.helpers, {**d.removed, "earlier_stages": len(d.ids) - len(keep)})
    w = f"stages.{st.name}"
    if st.budget > len(sub.ids):
        raise PlanError(f"{plan.path}: {w}.budget: {st.budget} scenes requested but only {len(sub.ids)} remain after excluding stages {st.exclude_stages}")
    if d.quotas:
        for src, q in d.quotas.items():
            have = int((sub.sources == src).sum())
            if q > have:
                raise PlanError(f"{plan.path}: {w}.real_fraction: needs {q} {src} scenes but {have} remain after excluding stages {st.exclude_stages}")
    rng = np.random.default_rng(plan.seed)
    room = dict(d.quotas) if d.quotas else None
    _reserve(st.skill_min, sub.skills, sub.sources, room, sub.reserved, sub.reserved_for, st.budget, rng, True, plan, f"{w}.skills")
    target_n = {s: int(math.ceil(f * st.budget)) for s, f in st.skill_target.items()}
    sub.shortfalls = _reserve(target_n, sub.skills, sub.sources, room, sub.reserved, sub.reserved_for, st.budget, rng, False, plan, f"{w}.skills")
    return sub


# ----------------------------------------------------------------------------------------------
# coverage


def coverage_rows(plan: DataPlan, data: dict[str, StageCandidates], selections: dict[str, Selection]) -> list[dict]:
    """Long table: one row per (stage, skill, source, environment) with selected scenes and the stage pool's
    available scenes. Stage "<pool>" rows count each stage pool's candidates once per distinct pool set."""
    from mose.skills import load_taxonomy

    tax = load_taxonomy(plan.taxonomy)
    rows = []
    for name, sel in selections.items():
        d = data[name]
        pos = {s: i for i, s in enumerate(d.ids)}
        chosen = [pos[i] for i in sel.ids if i in pos]
        avail = Counter((s, str(d.sources[i]), str(d.locations[i]) or "<unknown>") for i in range(len(d.ids)) for s in d.skills[i])
        got = Counter((s, str(d.sources[i]), str(d.locations[i]) or "<unknown>") for i in chosen for s in d.skills[i])
        envs = sorted({(str(d.sources[i]), str(d.locations[i]) or "<unknown>") for i in range(len(d.ids))})
        for s in tax.names:
            for src, env in envs:
                rows.append({"stage": name, "skill": s, "source": src, "environment": env,
                             "selected": got.get((s, src, env), 0), "available": avail.get((s, src, env), 0)})
    return rows


def write_coverage(rows: list[dict], out: Path, stages: list[str]) -> tuple[Path, Path, Path]:
    """coverage.csv (long), coverage.md (per stage: skills x source/environment, selected of available) and
    coverage.png (one heatmap per stage)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from common.atomic import save_figure, write_text

    lines = ["stage,skill,source,environment,selected,available"]
    lines += [f"{r['stage']},{r['skill']},{r['source']},{r['environment']},{r['selected']},{r['available']}" for r in rows]
    csv = out / "coverage.csv"
    write_text(csv, "\n".join(lines) + "\n")
    md_parts = ["# Coverage: scenes per skill (selected / available in the stage pool)\n"]
    fig, axes = plt.subplots(1, len(stages), figsize=(4.5 * len(stages), 6), squeeze=False)
    for ax, stage in zip(axes[0], stages):
        sr = [r for r in rows if r["stage"] == stage]
        skills = list(dict.fromkeys(r["skill"] for r in sr))
        cols = list(dict.fromkeys(f"{r['source']}/{r['environment']}" for r in sr))
        M = np.zeros((len(skills), len(cols)), int)
        A = np.zeros_like(M)
        for r in sr:
            i, j = skills.index(r["skill"]), cols.index(f"{r['source']}/{r['environment']}")
            M[i, j], A[i, j] = r["selected"], r["available"]
        md_parts.append(f"\n## {stage}\n\n| skill | " + " | ".join(cols) + " | total |\n|" + "---|" * (len(cols) + 2) + "\n")
        for i, s in enumerate(skills):
            md_parts.append(f"| {s} | " + " | ".join(f"{M[i, j]}/{A[i, j]}" for j in range(len(cols))) + f" | {M[i].sum()} |\n")
        im = ax.imshow(M, aspect="auto", cmap="viridis")
        ax.set_xticks(range(len(cols)))
        ax.set_xticklabels(cols, rotation=70, fontsize=6)
        ax.set_yticks(range(len(skills)))
        ax.set_yticklabels(skills, fontsize=6)
        ax.set_title(f"{stage}: selected scenes", fontsize=9)
        for i in range(len(skills)):
            for j in range(len(cols)):
                if M[i, j]:
                    ax.text(j, i, str(M[i, j]), ha="center", va="center", fontsize=5, color="white" if M[i, j] < M.max() / 2 else "black")
        fig.colorbar(im, ax=ax, fraction=0.04)
    fig.tight_layout()
    md = out / "coverage.md"
    write_text(md, "".join(md_parts))
    return csv, md, save_figure(fig, out / "coverage.png")
