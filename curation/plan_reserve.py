"""Feasibility of a per-stage data plan: open the pools, resolve every candidate's skills and prove, before any
selection, that each stage's budget fits its real/synthetic quotas and skill minimums (curation/plan.py, steps
1-4 of its module docstring).

`prepare(plan, pilot_factory=..., feedback_factory=...)` returns a `StageCandidates` per stage (candidates, sources,
environments, skills, the greedy reservation, the pilot / evaluator its method uses, per the method registry
curation/registry.py); `_without` redoes a stage's reservation once the stages it excludes have chosen.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from curation.plan_spec import DataPlan, PlanError, StagePlan


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
    helpers: dict = field(default_factory=dict)  # pilot / evaluator objects (SelectionContext inputs)
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

    from curation.registry import METHODS
    from datasets_cfg.schema import ScenePool

    tax = plan.skill_tree
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
        removed, helpers = {}, {}  # helpers: the SelectionContext inputs pilot / evaluator
        method = METHODS[st.method]
        if method.uses_pilot(st.params) and pilot_factory is not None:
            helpers["pilot"] = pilot_factory(pool, st.pilot or {}, plan.seed)
            removed["pilot_heldout"] = set(helpers["pilot"].eval_ids)
        if "evaluator" in method.needs:
            if feedback_factory is None:
                raise PlanError(f"{plan.path}: {w}.feedback: method {st.method!r} needs closed-loop feedback, and no feedback factory was given")
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

