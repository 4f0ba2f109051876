"""Selecting one stage of a per-stage data plan: the method on each quota, picks interleaved across sources,
then the swap repair that meets the skill minimums and targets (curation/plan.py, step 5 of its module
docstring), with the reservation of curation/plan_reserve.py as the fallback; then the soft targets as an
integer program (step 6, curation/plan_target_ilp.py) on either path, with the per-target report.

`_select_stage(plan, data, out_dir, progress)` returns the stage's `Selection`. The selector and its inputs
come from the method registry (curation/registry.py): the stage's scores / predictions files, the pilot or
evaluator that `prepare` built, and a report directory for methods that write one.
"""
from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import numpy as np

from curation.plan_reserve import StageCandidates, _reserve
from curation.plan_spec import DataPlan, StagePlan
from curation.selection import Selection


def _selector(plan: DataPlan, st: StagePlan, progress: bool):
    from curation.registry import METHODS

    defaults = {"random_state": plan.seed, "progress": progress}
    return METHODS[st.method].build(st.params, defaults=defaults, where=f"{plan.path}: stages.{st.name}.params")


def _method_picks(plan: DataPlan, data: StageCandidates, groups: list[tuple[str, list[int], int]], out_dir: Path, progress: bool):
    """Run the stage's selector on each group (name, candidate positions, budget); returns {name: Selection | None}."""
    st = data.stage
    picks = {}
    for name, members, k in groups:
        if k <= 0:
            picks[name] = None
            continue
        sub = data.pool.select_ids([data.ids[i] for i in members])
        picks[name] = _selector(plan, st, progress).select(sub, int(k), _context(data, name, out_dir))
    return picks


def _context(data: StageCandidates, group: str, out_dir: Path):
    """The selector's inputs for one group: the stage's scores / predictions files (load_plan accepted them only
    for a method that uses them), the pilot / evaluator `prepare` built, and, for a method that writes a report,
    DIR/<stage>_report/<group> (DIR/<stage>_report for a method that sets the ratio itself: it runs on one group)."""
    from curation.registry import METHODS

    st = data.stage
    method = METHODS[st.method]
    inputs = {"scores": st.scores, "predictions": st.predictions, **data.helpers}
    if "report_dir" in method.needs:
        inputs["report_dir"] = out_dir / f"{st.name}_report" if method.sets_ratio else out_dir / f"{st.name}_report" / group
    return method.context(**inputs)


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
    target_report = _meet_targets(plan, data, ids, scores, reasons, groups_col, srcs, fallbacks, skill_state)
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
                   "target": {s: {"fraction": f, "selected_fraction": counts.get(s, 0) / max(len(ids), 1), **target_report["per_skill"][s]}
                              for s, f in st.skill_target.items()},
                   "target_units": target_report["units"],
                   "target_shortfalls": skill_state["target_shortfalls"], "selected_counts": dict(sorted(counts.items()))},
        "method_state": {g: p.state for g, p in picks.items() if p is not None},
    }
    return Selection(ids=ids, scores=scores, reasons=reasons, method=st.method, budget=st.budget, seed=plan.seed,
                     config={"params": st.params, "real_fraction": st.real_fraction, "skills_min": st.skill_min,
                             "skills_target": st.skill_target},
                     state=state, fallbacks=fallbacks, extra={"group": groups_col, "source": srcs},
                     pool={**pool_info(data.pool), "path": ",".join(str(plan.pools[p].resolve()) for p in st.pools)})



def _meet_targets(plan, data, ids, scores, reasons, groups_col, srcs, fallbacks, skill_state) -> dict:
    """Step 6: the soft targets as an integer program (curation/plan_target_ilp.py). When its optimum meets more
    target units than the greedy selection (`ids`, changed in place with the parallel lists), the greedy's
    scenes outside the optimum give their places to the optimum's new scenes (same source when the ratio is
    fixed). Returns the per-target report: target, achieved, reachable (alone), greedy; and the unit totals."""
    from curation import plan_target_ilp as ilp

    st = data.stage
    target_n = {s: int(math.ceil(f * st.budget)) for s, f in st.skill_target.items()}
    if not target_n:
        return {"per_skill": {}, "units": None}
    pos = {sid: i for i, sid in enumerate(data.ids)}
    chosen = [pos[i] for i in ids]
    greedy = ilp.units(chosen, data.skills, target_n)
    rng = np.random.default_rng([plan.seed, 6])
    sol, why = ilp.solve(data.skills, data.sources, st.budget, data.quotas, st.skill_min, target_n, chosen, rng)
    if sol is None:
        fallbacks.append({"what": "target_ilp", "why": why, "consequence": "the greedy swap repair's selection is kept for the soft targets"})
    elif sum(ilp.units(sol, data.skills, target_n).values()) > sum(greedy.values()):
        sol_set, in_set = set(sol), set(chosen)
        added = [i for i in sol if i not in in_set]
        fixed = data.quotas is not None
        swaps = []
        for k, old in enumerate(chosen):
            if old in sol_set:
                continue
            new = next(i for i in added if not fixed or data.sources[i] == data.sources[old])
            added.remove(new)
            gained = sorted(s for s in target_n if s in data.skills[new])
            chosen[k] = new
            ids[k], scores[k], srcs[k], groups_col[k] = data.ids[new], float("nan"), str(data.sources[new]), "target_ilp"
            reasons[k] = f"swapped in by the target program for skill(s) {gained} (replaces {data.ids[old]!r})"
            swaps.append({"added": data.ids[new], "removed": data.ids[old], "skill": ",".join(gained), "by": "target_ilp"})
        skill_state["swaps"] = skill_state["swaps"] + swaps
    achieved = ilp.units(chosen, data.skills, target_n)
    skill_state["target_shortfalls"] = {s: t - achieved[s] for s, t in target_n.items() if achieved[s] < t}
    per = {}
    for s, t in target_n.items():
        alone, _ = ilp.solve(data.skills, data.sources, st.budget, data.quotas, st.skill_min, {s: t})
        per[s] = {"target": t, "achieved": achieved[s], "reachable": None if alone is None else ilp.units(alone, data.skills, {s: t})[s],
                  "greedy": greedy[s]}
    return {"per_skill": per, "units": {"target": sum(target_n.values()), "achieved": sum(achieved.values()),
                                        "reachable_jointly": None if sol is None else sum(ilp.units(sol, data.skills, target_n).values()),
                                        "greedy": sum(greedy.values())}}
