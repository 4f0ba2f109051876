"""Skill annotation of ScenePool rows: QA items, answer segments, per-scene skill vectors, coverage tables.

Structured annotation first, text second (our rules; the MoSE paper does not publish its annotation):

- a QA item's skills come from its task and category: "general_object"/"general" with a CODA category and
  "region" with a category name resolve through the taxonomy's aliases (a category name that is no alias is
  matched against the perception keywords, then the answer text, then falls back to `other_objects`, CODA's
  "miscellaneous"); "suggestion" gets the planning skills its sentences mention; a trajectory task gets
  `trajectory`; a scene-level "general" summary gets the perception skills it mentions. Any other task is
  labelled from its text alone (keyword rules in datasets_cfg/skills.yaml).
- answer text is cut into sentences, each labelled with the fine skill its keywords point to inside the QA's
  step (`segment_text`); a sentence with no keyword keeps the QA's default skill.
- the scene itself teaches more than its QA: `scene_segments` writes templated text from the structured
  fields (agents, traffic lights, weather / lighting / location, the ego's future motion, the route's speed
  limit, the safety flags, the simulator's events in `meta`: cut-in, hard brake, work zone). These segments
  feed the hierarchical targets (datasets_cfg/skill_items.py) and the scene's skill vector, so a pool without
  QA (NAVSIM) still gets skills.

`annotate_pool` fills `qa[].skills` and `skills` for a whole pool; `coverage_table` counts scenes, QA items and
segments per skill (split by source or dataset), written as CSV or markdown, with a PNG heatmap helper.
CLI: `python -m datasets_cfg.skill_annotation POOL --out ANNOTATED --coverage cov.md --heatmap cov.png`.
"""
from __future__ import annotations

import argparse
import json
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from common.atomic import atomic_path, save_figure, write_text
from common.geometry import global_to_local, wrap_angle
from datasets_cfg.schema import Scene, ScenePool
from mose.skill_format import TRAJECTORY_SKILL, Segment, format_trajectory, parse_trajectory
from mose.skills import Taxonomy, UnknownSkillError, load_taxonomy

TRAJECTORY_TASKS = ("trajectory", "plan", "planning", "waypoints")
HORIZON_S = 4.0  # future horizon described in the templated prediction / planning text (8 poses x 0.5 s)
DYNAMIC = ("vehicle", "pedestrian", "bicycle")
NEAR_M = 50.0  # agents farther than this are not described
MANOEUVRE_TURN_RAD = 0.6  # heading change over the horizon that makes a described manoeuvre (an agent's or the plan's) a turn
PATH_HALF_WIDTH_M = 1.75  # the ego's path: a lane-wide corridor straight ahead in the ego frame
_SENTENCE = re.compile(r"[^.!?;\n]*(?:[.!?;]+|\n|$)\s*")


@dataclass
class AnnotationReport:
    """Counts of what the annotation did and skipped (a person reads this; nothing is silently dropped)."""

    scenes: int = 0
    qa_items: int = 0
    qa_by_origin: Counter = field(default_factory=Counter)  # "category", "task", "text", "given", "none"
    unknown_skills: Counter = field(default_factory=Counter)  # name -> count (on_unknown="count")
    unlabelled_qa: list = field(default_factory=list)  # qids with no skill at all (first 20)

    def as_dict(self) -> dict:
        return {"scenes": self.scenes, "qa_items": self.qa_items, "qa_by_origin": dict(self.qa_by_origin),
                "unknown_skills": dict(self.unknown_skills), "unlabelled_qa_examples": self.unlabelled_qa[:20]}


# ----------------------------------------------------------------------------------------------
# QA items and free text


def qa_skills(qa: dict, taxonomy: Taxonomy, *, where: str = "qa", on_unknown: str = "raise",
              report: AnnotationReport | None = None) -> list[str]:
    """The most specific skills a QA item exercises (parents are implied), from structure, then text.

    Skills already present in `qa["skills"]` are resolved and kept; an unknown name raises UnknownSkillError
    naming `where` (on_unknown="raise") or is dropped and counted in `report` (on_unknown="count").
    """
    tax = taxonomy
    rep = report if report is not None else AnnotationReport()
    given = []
    for name in qa.get("skills") or []:
        s = tax.try_resolve(name)
        if s is None:
            if on_unknown == "raise":
                raise UnknownSkillError(f"{where}: field 'skills': unknown skill {name!r}; known: {tax.names} (see {tax.source})")
            rep.unknown_skills[name] += 1
        else:
            given.append(s)
    if given:
        rep.qa_by_origin["given"] += 1
        return list(dict.fromkeys(given))
    task, cat, answer = qa.get("task", ""), qa.get("category", ""), qa.get("answer", "")
    skills, origin = _structured_skills(task, cat, answer, tax)
    if not skills:
        root = tax.classify_coarse(answer + " " + qa.get("question", ""))
        fine = tax.classify_text(answer, within=root) if root else None
        skills, origin = ([fine or root], "text") if root else ([], "none")
    rep.qa_by_origin[origin] += 1
    if not skills and len(rep.unlabelled_qa) < 20:
        rep.unlabelled_qa.append(qa.get("qid", where))
    return skills


def _structured_skills(task: str, category: str, answer: str, tax: Taxonomy) -> tuple[list[str], str]:
    perception = _root_named(tax, "perception")
    planning = _root_named(tax, "planning")
    if category and task in ("general", "general_object", "region"):
        s = tax.try_resolve(category)
        if s is None and perception:
            s = tax.classify_text(category.replace("_", " "), within=perception) or tax.classify_text(answer, within=perception)
            s = s or tax.try_resolve("other_objects")
        if s is not None:
            return [s], "category"
    if task == "general" and perception:
        hits = [n for n, _ in sorted(tax.keyword_hits(answer, tax.descendants(perception)).items(), key=lambda kv: -kv[1])
                if n in tax.leaves]
        return (hits or [perception]), "task"
    if task == "suggestion" and planning:
        segs = segment_text(answer, tax, default=planning, within=planning)
        return list(dict.fromkeys(s for _, _, s in segs)) or [planning], "task"
    if task in TRAJECTORY_TASKS and TRAJECTORY_SKILL in tax:
        return [TRAJECTORY_SKILL], "task"
    return [], "none"


def _root_named(tax: Taxonomy, name: str) -> str | None:
    return name if name in tax.roots else None


def segment_text(text: str, taxonomy: Taxonomy, *, default: str, within: str | None = None) -> list[tuple[int, int, str]]:
    """(start, end, skill) spans covering `text`: one per run of sentences about the same fine skill.

    Each sentence takes the leaf under `within` its keywords match best, else `default`. Whitespace after a
    sentence belongs to it; adjacent sentences with the same skill are merged.
    """
    tax = taxonomy
    default = tax.resolve(default, "segment_text(default)")
    spans: list[tuple[int, int, str]] = []
    for m in _SENTENCE.finditer(text):
        if m.start() == m.end():
            continue
        skill = tax.classify_text(m.group(0), within=within) or default
        if spans and spans[-1][2] == skill:
            spans[-1] = (spans[-1][0], m.end(), skill)
        else:
            spans.append((m.start(), m.end(), skill))
    return spans


def qa_spans(qa: dict, taxonomy: Taxonomy, skills: Sequence[str] | None = None) -> list[tuple[int, int, str]]:
    """(start, end, skill) spans over the stripped answer of a QA item, using its skills (given or `qa_skills`):
    the whole answer for a single fine skill, else sentence by sentence inside the first skill's step."""
    tax = taxonomy
    skills = list(skills if skills is not None else qa_skills(qa, tax, on_unknown="count"))
    answer = qa.get("answer", "").strip()
    if not skills or not answer:
        return []
    if len(skills) == 1 and skills[0] in tax.leaves:
        return [(0, len(answer), skills[0])]
    root = tax.root_of(skills[0])
    return segment_text(answer, tax, default=root, within=root)


def qa_segments(qa: dict, taxonomy: Taxonomy, skills: Sequence[str] | None = None) -> list[Segment]:
    """The answer of a QA item as skill segments (text stripped), see `qa_spans`."""
    answer = qa.get("answer", "").strip()
    return [Segment(s, answer[a:b].strip()) for a, b, s in qa_spans(qa, taxonomy, skills) if answer[a:b].strip()]


# ----------------------------------------------------------------------------------------------
# what the structured fields say (templated text)


def _where(x: float, y: float) -> str:
    lon = f"{abs(x):.0f} m {'ahead' if x >= 0 else 'behind'}"
    if abs(y) < 1.75:
        return f"{lon} in the ego lane"
    return f"{lon}, {abs(y):.0f} m to the {'left' if y > 0 else 'right'}"


_NOUN = {"vehicle": "vehicle", "pedestrian": "pedestrian", "bicycle": "cyclist", "traffic_cone": "traffic cone",
         "barrier": "barrier", "czone_sign": "construction-zone sign", "generic_object": "object"}


def _track_future(row: dict, track: str, ci: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(t, xy global, heading global, v global) of one track at frames after the current one, within the horizon."""
    a, t = row["agents"], np.asarray(row["ego"]["t"], float)
    idx = sorted((i for i, (f, tid) in enumerate(zip(a["frame"], a["track_id"])) if tid == track and f > ci and t[f] <= HORIZON_S + 1e-6),
                 key=lambda i: a["frame"][i])
    ts = np.asarray([t[a["frame"][i]] for i in idx])
    xy = np.asarray([[a["x"][i], a["y"][i]] for i in idx]).reshape(-1, 2)
    v = np.asarray([[a["vx"][i], a["vy"][i]] for i in idx]).reshape(-1, 2)
    return ts, xy, np.asarray([a["heading"][i] for i in idx]), v


def scene_segments(row: dict, taxonomy: Taxonomy) -> list[Segment]:
    """Templated segments from a row's structured fields (empty for a row without ego / agents / conditions).

    Perception: agents at the current frame per category (nearest three), the route's traffic light, weather,
    lighting, location and a simulated work zone. Prediction: each of the nearest moving agents' turn, lane
    change and speed change (from its observed future, else its current velocity), the simulator's cut-in /
    hard-brake events within the horizon, and the smallest time headway in the ego's path (or the safety
    flags). Planning: the ego's speed change and lateral manoeuvre over the next 4 s, the route's red light and
    speed limit, and the 8-pose future trajectory.
    """
    tax = taxonomy
    scene = Scene(row)
    out: list[Segment] = []
    have = lambda s: s in tax  # noqa: E731 - a taxonomy without a skill simply gets no text for it

    cond = ", ".join(x for x in ({"day": "daytime", "night": "night"}.get(row["lighting"], ""), {"sunny": "clear weather", "rainy": "rain"}.get(row["weather"], "")) if x)
    cond = cond[:1].upper() + cond[1:] + "." if cond else ""
    if row["location"]:
        cond = f"{cond} Location: {row['location']}.".strip()
    events = _events(scene.meta)
    if "work_zone" in events:
        cond = f"{cond} A work zone narrows the road.".strip()
    if cond and have("scene_conditions"):
        out.append(Segment("scene_conditions", cond))
    T = scene.num_frames
    if T == 0:
        return out
    ci = scene.current_index
    agents = scene.agents_at(ci, frame="ego")
    order = np.argsort(np.hypot(agents.xy[:, 0], agents.xy[:, 1])) if len(agents) else np.zeros(0, int)
    near = [i for i in order if math.hypot(*agents.xy[i]) <= NEAR_M]
    by_cat: dict[str, list[int]] = {}
    for i in near:
        by_cat.setdefault(str(agents.category[i]), []).append(i)
    for cat, idx in by_cat.items():
        skill = tax.try_resolve(cat)
        if skill is None:
            continue
        parts = []
        for i in idx[:3]:
            speed = float(np.hypot(*agents.velocity[i]))
            motion = f"moving at {speed:.1f} m/s" if speed > 0.5 else "stationary"
            parts.append(f"{_where(*agents.xy[i])}, {motion}" if cat in DYNAMIC else _where(*agents.xy[i]))
        n = len(idx)
        noun = _NOUN.get(cat, cat) + ("s" if n > 1 else "")
        out.append(Segment(skill, f"{n} {noun}: " + "; ".join(parts) + ("; ..." if n > 3 else "") + "."))
    red = _route_light(row, ci)
    if red is not None and have("traffic_lights"):
        out.append(Segment("traffic_lights", f"The traffic light on the ego route is {'red' if red else 'green'}."))

    # prediction
    intents = []
    glob = scene.agents_at(ci)  # same order as `agents`, global frame
    for i in [i for i in near if agents.category[i] in DYNAMIC][:3]:
        intents.append(_intent(row, glob, agents, i, ci))
    intents += [EVENT_TEXT[e].format(t=t) for e, t in events.items() if e in ("cut_in", "hard_brake")]
    if intents and have("agent_intent"):
        out.append(Segment("agent_intent", " ".join(intents)))
    risk = _risk(row, scene, ci)
    if risk and have("interaction_risk"):
        out.append(Segment("interaction_risk", risk))

    # planning
    try:
        fut = scene.future_trajectory(8, 0.5, frame="ego")
    except ValueError:
        fut = None
    t = np.asarray(row["ego"]["t"], float)
    if fut is not None and have("longitudinal_control"):
        v0 = float(row["ego"]["speed"][ci])
        v1 = float(np.interp(HORIZON_S, t, row["ego"]["speed"]))
        out.append(Segment("longitudinal_control", _longitudinal(v0, v1)))
    if fut is not None and have("lateral_control"):
        out.append(Segment("lateral_control", _lateral(fut)))
    rules = []
    if red:
        rules.append("Stop before the red light.")
    limit = next((l["speed_limit"] for l in row["map"]["lanes"] if l["id"] in row["map"]["route"] and math.isfinite(l["speed_limit"])), None)
    if limit is not None:
        rules.append(f"Stay below the speed limit of {limit:.1f} m/s.")
    if rules and have("rule_compliance"):
        out.append(Segment("rule_compliance", " ".join(rules)))
    if fut is not None and have(TRAJECTORY_SKILL):
        out.append(Segment(TRAJECTORY_SKILL, format_trajectory(fut[:, :2])))
    return out


EVENT_TEXT = {"cut_in": "A neighbouring vehicle cuts into the ego lane in {t:.1f} s.",
              "hard_brake": "The lead vehicle brakes hard in {t:.1f} s."}


def _events(meta: dict) -> dict[str, float]:
    """Simulator events of this scene's window: name -> seconds from now (meta "perturbations" with
    "event_time_s" and "timestamp_s"; a work zone lasts the whole episode, reported as 0)."""
    applied = set(meta.get("perturbations") or [])
    out = {"work_zone": 0.0} if "work_zone" in applied else {}
    te, now = meta.get("event_time_s"), meta.get("timestamp_s")
    if te is not None and now is not None and 0.0 <= te - now <= HORIZON_S:
        out.update({e: float(te - now) for e in ("cut_in", "hard_brake") if e in applied})
    return out


def _route_light(row: dict, ci: int) -> bool | None:
    tl, route = row["traffic_lights"], set(row["map"]["route"])
    states = [r for f, lid, r in zip(tl["frame"], tl["lane_id"], tl["is_red"]) if f == ci and lid in route]
    return None if not states else any(states)


def _intent(row: dict, glob, agents, i: int, ci: int) -> str:
    """What agent i will do over the horizon, from its observed future track (else its current velocity)."""
    cat = str(agents.category[i])
    name = f"The {_NOUN.get(cat, cat)} {_where(*agents.xy[i])}"
    v0 = float(np.hypot(*agents.velocity[i]))
    ts, xy, heading, v = _track_future(row, str(agents.track_id[i]), ci)
    if not len(ts):
        return f"{name} is expected to {'keep moving at ' + format(v0, '.1f') + ' m/s' if v0 > 0.5 else 'stay where it is'}."
    h0 = float(glob.heading[i])
    turn = float(wrap_angle(heading[-1] - h0))
    d = xy[-1] - glob.xy[i]
    lat = -math.sin(h0) * d[0] + math.cos(h0) * d[1]  # sideways displacement in its own frame at the current time
    v1 = float(np.hypot(*v[-1]))
    moves = []
    if abs(turn) > MANOEUVRE_TURN_RAD and v0 > 0.5:
        moves.append(f"turn {'left' if turn > 0 else 'right'}")
    elif abs(lat) > 1.5 and v0 > 0.5:
        moves.append(f"move {abs(lat):.1f} m to its {'left' if lat > 0 else 'right'}")
    if v1 < 0.5 and v0 >= 0.5:
        moves.append("stop")
    elif v1 - v0 > 1.0:
        moves.append(f"speed up from {v0:.1f} to {v1:.1f} m/s")
    elif v0 - v1 > 1.0:
        moves.append(f"slow down from {v0:.1f} to {v1:.1f} m/s")
    elif v0 >= 0.5:
        moves.append(f"keep about {v0:.1f} m/s")
    else:
        moves.append("stay stopped")
    return f"{name} will {' and '.join(moves)} in the next {ts[-1]:.1f} s."


def _risk(row: dict, scene: Scene, ci: int) -> str:
    """Risk from the smallest time headway to a road user in the ego's path (lane-wide corridor ahead) over the
    horizon (< 1 s high, < 2 s moderate), plus the closest approach of any road user; the safety flags first."""
    if row["crash"]:
        return "Collision: the ego car collides within this scene."
    t = np.asarray(row["ego"]["t"], float)
    a = row["agents"]
    frames = np.asarray(a["frame"], int)
    in_path, closest = None, None  # (headway s, gap m, t, k) / (distance m, t, k)
    for f in range(ci, scene.num_frames):
        if t[f] > HORIZON_S + 1e-6:
            break
        idx = np.flatnonzero(frames == f)
        if not len(idx):
            continue
        pose = np.array([row["ego"]["x"][f], row["ego"]["y"][f], row["ego"]["heading"][f]])
        local = global_to_local(np.stack([np.asarray(a["x"])[idx], np.asarray(a["y"])[idx]], -1), pose)
        speed = max(abs(float(row["ego"]["speed"][f])), 0.5)
        for (x, y), k in zip(local, idx):
            d = float(np.hypot(x, y))
            if closest is None or d < closest[0]:
                closest = (d, float(t[f]), int(k))
            if 0.0 < x < NEAR_M and abs(y) < PATH_HALF_WIDTH_M:
                gap = max(x - 0.5 * float(a["length"][k]), 0.0)
                if in_path is None or gap / speed < in_path[0]:
                    in_path = (gap / speed, gap, float(t[f]), int(k))
    flag = "Near miss. " if row["near_miss"] else ""
    if closest is None:
        return f"{flag}No other road user is observed near the ego car."
    noun = lambda k: _NOUN.get(a["category"][k], a["category"][k])  # noqa: E731
    when = lambda tt: "now" if tt <= 0 else f"in {tt:.1f} s"  # noqa: E731
    if in_path is not None:
        hw, gap, tt, k = in_path
        level = "High" if hw < 1.0 else "Moderate" if hw < 2.0 else "Low"
        return f"{flag}{level} risk: the {noun(k)} in the ego path is {gap:.1f} m ahead ({hw:.1f} s headway) {when(tt)}."
    d, tt, k = closest
    return f"{flag}Low risk: nothing in the ego path; the closest road user, a {noun(k)}, is {d:.1f} m away {when(tt)}."


def _longitudinal(v0: float, v1: float) -> str:
    if v0 < 0.5 and v1 < 0.5:
        return "Stay stopped."
    if v1 < 0.5:
        return f"Brake from {v0:.1f} m/s to a stop."
    if v1 - v0 > 1.0:
        return f"Accelerate from {v0:.1f} to {v1:.1f} m/s."
    if v0 - v1 > 1.0:
        return f"Slow down from {v0:.1f} to {v1:.1f} m/s."
    return f"Keep about {v0:.1f} m/s."


def _lateral(fut: np.ndarray) -> str:
    y, h = float(fut[-1, 1]), float(fut[-1, 2])
    if abs(h) > MANOEUVRE_TURN_RAD:
        return f"Turn {'left' if h > 0 else 'right'}."
    if abs(y) > 2.0:
        return f"Change to the {'left' if y > 0 else 'right'} lane."
    if abs(y) > 0.5:
        return f"Shift {abs(y):.1f} m to the {'left' if y > 0 else 'right'} within the lane."
    return "Keep the lane."


# ----------------------------------------------------------------------------------------------
# scenes and pools


def hierarchical_segments(row: dict, taxonomy: Taxonomy, report: AnnotationReport | None = None,
                          on_unknown: str = "raise") -> list[Segment]:
    """The segments of a scene's step-by-step target: QA answers first, templated text for what QA lacks.

    Perception comes from per-object QA ("general_object", or "general" with a category), else the scene
    summary, else the agents; region answers are left to the single-skill items (they repeat objects).
    Prediction and planning QA (e.g. "suggestion") come in too. Templated segments are added for each skill the
    QA did not cover; the trajectory comes from the ego's future, else from a trajectory QA. Segments are
    ordered by taxonomy id (stable).
    """
    tax = taxonomy
    qa_segs: list[Segment] = []
    traj_qa = None
    has_objects = any(q["task"] == "general_object" or (q["task"] == "general" and q["category"]) for q in row["qa"])
    for j, q in enumerate(row["qa"]):
        if q["task"] == "region" or (q["task"] == "general" and not q["category"] and has_objects):
            continue
        skills = qa_skills(q, tax, where=f"scene {row['id']} qa[{j}]", on_unknown=on_unknown, report=report)
        if TRAJECTORY_SKILL in skills:
            traj_qa = traj_qa or q
            continue
        qa_segs += qa_segments(q, tax, skills)
    covered = {s.skill for s in qa_segs}
    templ = [s for s in scene_segments(row, tax) if s.skill not in covered]
    if traj_qa is not None and not any(s.skill == TRAJECTORY_SKILL for s in templ):
        xy, _, errors = parse_trajectory(traj_qa["answer"])
        if xy is not None and len(xy) == 8 and not errors:
            templ.append(Segment(TRAJECTORY_SKILL, format_trajectory(xy)))
    segs = qa_segs + templ
    return sorted(segs, key=lambda s: tax.id(s.skill))


def scene_skills(row: dict, taxonomy: Taxonomy, report: AnnotationReport | None = None, on_unknown: str = "raise") -> list[str]:
    """Every fine (or coarse, where no finer one applies) skill a scene exercises, in taxonomy order."""
    tax = taxonomy
    found = {s.skill for s in hierarchical_segments(row, tax, report, on_unknown)}
    for j, q in enumerate(row["qa"]):
        found.update(qa_skills(q, tax, where=f"scene {row['id']} qa[{j}]", on_unknown=on_unknown))
    return [n for n in tax.names if n in found]


def skill_vector(skills: Iterable[str], taxonomy: Taxonomy, with_parents: bool = True) -> np.ndarray:
    """Multi-hot (len(taxonomy),) float32 vector of `skills` (and their ancestors) in taxonomy id order."""
    tax = taxonomy
    v = np.zeros(len(tax), np.float32)
    for s in skills:
        s = tax.resolve(s)
        v[tax.id(s)] = 1.0
        while with_parents and tax.parent(s) is not None:
            s = tax.parent(s)
            v[tax.id(s)] = 1.0
    return v


def annotate_pool(pool: ScenePool, taxonomy: Taxonomy, *, on_unknown: str = "raise",
                  num_proc: int | None = None) -> tuple[ScenePool, AnnotationReport]:
    """A new pool with `qa[].skills` and `skills` filled in (existing names resolved to canonical ones)."""
    tax = taxonomy
    rep = AnnotationReport(scenes=len(pool))

    def annotate(row: dict) -> dict:
        r = AnnotationReport()
        qa = [dict(q, skills=qa_skills(q, tax, where=f"scene {row['id']} qa[{j}]", on_unknown=on_unknown, report=r)) for j, q in enumerate(row["qa"])]
        skills = scene_skills(dict(row, qa=qa), tax, on_unknown=on_unknown)
        return {"qa": qa, "skills": skills, "_report": json.dumps(r.as_dict())}

    # in memory: never reuse a stale cache after the annotation code changed, never write into the pool directory
    ds = pool.dataset.map(annotate, num_proc=num_proc, keep_in_memory=True, desc="annotating skills")
    for s in ds["_report"]:
        r = json.loads(s)
        rep.qa_items += sum(r["qa_by_origin"].values())
        rep.qa_by_origin.update(r["qa_by_origin"])
        rep.unknown_skills.update(r["unknown_skills"])
        rep.unlabelled_qa += r["unlabelled_qa_examples"][: max(0, 20 - len(rep.unlabelled_qa))]
    return ScenePool(ds.remove_columns("_report"), pool.root), rep


# ----------------------------------------------------------------------------------------------
# coverage


def coverage_table(pool: ScenePool, taxonomy: Taxonomy, by: str = "source") -> list[dict]:
    """One row per skill: scenes exercising it (total, fraction, and per value of column `by`), QA items, segments.

    Uses `skills` / `qa[].skills` where filled in, else annotates on the fly (the pool is not changed). A
    scene or QA item counts for a skill's ancestors too.
    """
    tax = taxonomy
    if by and by not in pool.dataset.column_names:
        raise KeyError(f"coverage_table(by={by!r}): no such column; columns: {pool.dataset.column_names}")
    groups = sorted(set(pool.dataset[by])) if by else []
    scenes, qa_items, segments = Counter(), Counter(), Counter()
    per_group: dict[str, Counter] = {g: Counter() for g in groups}
    for row in pool.dataset:
        qa_sk = [q["skills"] or qa_skills(q, tax, on_unknown="count") for q in row["qa"]]
        sk = row["skills"] or scene_skills(row, tax, on_unknown="count")
        vec = skill_vector([tax.resolve(s) for s in sk], tax)
        for n in tax.names:
            if vec[tax.id(n)]:
                scenes[n] += 1
                if by:
                    per_group[row[by]][n] += 1
        for q in qa_sk:
            qv = skill_vector([tax.resolve(s) for s in q], tax)
            for n in tax.names:
                qa_items[n] += int(qv[tax.id(n)])
        for s in hierarchical_segments(row, tax, on_unknown="count"):
            for n in [s.skill, *_ancestors(tax, s.skill)]:
                segments[n] += 1
    n_scenes = max(len(pool), 1)
    table = []
    for n in tax.names:
        rec = {"skill": n, "level": tax.depth(n) + 1, "parent": tax.parent(n) or "", "scenes": scenes[n],
               "scene_fraction": round(scenes[n] / n_scenes, 4), "qa_items": qa_items[n], "segments": segments[n]}
        rec.update({f"{by}={g}": per_group[g][n] for g in groups})
        table.append(rec)
    return table


def _ancestors(tax: Taxonomy, name: str) -> list[str]:
    out = []
    while tax.parent(name) is not None:
        name = tax.parent(name)
        out.append(name)
    return out


def write_coverage(table: list[dict], path: str | Path) -> Path:
    """Write the table as CSV (`.csv`) or a markdown table (anything else), atomically."""
    path = Path(path)
    cols = list(table[0]) if table else ["skill"]
    if path.suffix == ".csv":
        import csv

        with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=cols)
            w.writeheader()
            w.writerows(table)
    else:
        lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        for r in table:
            name = ("&nbsp;&nbsp;" * (r["level"] - 1)) + r["skill"] if "level" in r else r["skill"]
            lines.append("| " + " | ".join([name] + [str(r[c]) for c in cols[1:]]) + " |")
        write_text(path, "\n".join(lines) + "\n")
    return path


def coverage_heatmap(table: list[dict], path: str | Path, title: str = "scenes per skill") -> Path:
    """PNG heatmap: skills (rows) x groups (the `by=` columns, or total scenes), cell = scene count."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = [c for c in table[0] if "=" in c] or ["scenes"]
    data = np.array([[r[c] for c in cols] for r in table], dtype=float)
    fig, ax = plt.subplots(figsize=(1.6 + 1.1 * len(cols), 0.35 * len(table) + 1.2))
    im = ax.imshow(data, aspect="auto", cmap="viridis")
    ax.set_xticks(range(len(cols)), cols, rotation=30, ha="right")
    ax.set_yticks(range(len(table)), ["· " * (r["level"] - 1) + r["skill"] for r in table])
    for (i, j), v in np.ndenumerate(data):
        ax.text(j, i, f"{v:.0f}", ha="center", va="center", color="w" if v < data.max() / 2 else "k", fontsize=7)
    fig.colorbar(im, ax=ax)
    ax.set_title(title)
    fig.tight_layout()
    return save_figure(fig, path)


# ----------------------------------------------------------------------------------------------
# command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("pool", help="ScenePool directory")
    parser.add_argument("--out", help="write the annotated pool here (default: only report coverage)")
    parser.add_argument("--skills", help="taxonomy YAML (default: the packaged datasets_cfg/skills.yaml)")
    parser.add_argument("--coverage", help="coverage table path (.csv or .md)")
    parser.add_argument("--heatmap", help="coverage heatmap PNG path")
    parser.add_argument("--by", default="source", help="column to split coverage by (default: source)")
    parser.add_argument("--on-unknown", choices=("raise", "count"), default="raise", help="unknown skill names in data")
    parser.add_argument("--num-proc", type=int, default=None)


def run(args: argparse.Namespace) -> int:
    tax = load_taxonomy(args.skills)
    pool = ScenePool.load(args.pool)
    pool, rep = annotate_pool(pool, tax, on_unknown=args.on_unknown, num_proc=args.num_proc)
    if args.out:
        pool.save(args.out)
    table = coverage_table(pool, tax, by=args.by)
    if args.coverage:
        write_coverage(table, args.coverage)
    if args.heatmap:
        coverage_heatmap(table, args.heatmap)
    print(json.dumps({"annotation": rep.as_dict(), "coverage": {r["skill"]: r["scenes"] for r in table}}, indent=2))
    return 0


if __name__ == "__main__":
    import sys

    p = argparse.ArgumentParser(prog="python -m datasets_cfg.skill_annotation", description=__doc__.splitlines()[0])
    add_arguments(p)
    sys.exit(run(p.parse_args()))
