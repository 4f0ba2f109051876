"""CODA-LM-style question/answer annotations written from simulator ground truth.

Four kinds of `qa` rows per scene (`task` / `category`):
- "general" / per object category ("vehicle", "traffic_cone", "barrier"): how many objects of that category
  are within `GENERAL_RADIUS_M` of the ego, then the nearest few with appearance, position, direction,
  distance and speed, and why each matters (CODA-LM's general perception, one answer per category);
- "region" / the object's category: an object's box in the current render ([x, y, w, h] pixels) in the
  question, its description and why it matters in the answer (CODA-LM's region perception);
- "suggestion" / "driving_suggestion": what the ego should do, read off its ground-truth future;
- "trajectory" / "planning": the ground-truth future, 8 poses at 0.5 s in the current ego frame.

Every number is computed from the row (ego centre = rear axle + REAR_AXLE_TO_CENTER along the heading;
distances are centre to centre, metres, one decimal; speeds m/s with one decimal or km/h rounded). The
wording is drawn from several templates and synonyms, objects are listed in varying order, and units vary,
so a model cannot learn one sentence by heart. `skills` are left empty (filled by the skill tagger).
"""
from __future__ import annotations

import json

import numpy as np

from common.geometry import box_corners, global_to_local
from datasets_cfg.sim.command import LANE_CHANGE_M, TURN_RAD
from datasets_cfg.sim.export import REAR_AXLE_TO_CENTER, scene_render_transform

GENERAL_RADIUS_M = 50
MAX_DESCRIBED = 5
MAX_REGIONS = 3
SAME_LANE_M = 1.8  # |lateral offset| below this: "in the ego lane"
NOUNS = {"vehicle": ("vehicle", "vehicles"), "traffic_cone": ("traffic cone", "traffic cones"), "barrier": ("barrier", "barriers")}
KIND_NOUN = {"vehicle": ("car", "vehicle"), "traffic_cone": ("traffic cone", "cone"), "barrier": ("barrier", "road barrier")}


def _pick(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def fmt_dist(d: float, rng) -> str:
    return f"{d:.1f} " + _pick(rng, ("m", "meters", "metres"))


def fmt_speed(v: float, rng) -> str:
    return f"{v:.1f} m/s" if rng.uniform() < 0.7 else f"{v * 3.6:.0f} km/h"


def current_objects(row: dict) -> list[dict]:
    """Agents at the current frame relative to the ego box centre: local xy, distance, relative heading, speed."""
    ci = int(row["current_index"])
    e = row["ego"]
    h = e["heading"][ci]
    center = np.array([e["x"][ci] + REAR_AXLE_TO_CENTER * np.cos(h), e["y"][ci] + REAR_AXLE_TO_CENTER * np.sin(h), h])
    a = row["agents"]
    appearance = json.loads(row["meta"]).get("appearance", {})
    out = []
    for k in np.flatnonzero(np.asarray(a["frame"], int) == ci):
        local = global_to_local(np.array([a["x"][k], a["y"][k], a["heading"][k]]), center)
        speed = float(np.hypot(a["vx"][k], a["vy"][k]))
        out.append({"index": int(k), "track_id": a["track_id"][k], "category": a["category"][k], "lx": float(local[0]),
                    "ly": float(local[1]), "rel_heading": float(local[2]), "distance": float(np.hypot(local[0], local[1])),
                    "speed": speed, "v_along": float(a["vx"][k] * np.cos(h) + a["vy"][k] * np.sin(h)),
                    "color": appearance.get(a["track_id"][k], "")})
    return sorted(out, key=lambda o: o["distance"])


# ----------------------------------------------------------------------------------------------
# phrases


def position_phrase(o: dict, rng) -> str:
    lon = "ahead" if o["lx"] > 2.5 else "behind" if o["lx"] < -2.5 else "alongside"
    lon = _pick(rng, {"ahead": ("ahead", "in front"), "behind": ("behind", "to the rear"), "alongside": ("alongside", "level with the ego car")}[lon])
    if abs(o["ly"]) < SAME_LANE_M:
        lat = _pick(rng, ("in the same lane", "in the ego lane", "in our lane"))
    else:
        side = "left" if o["ly"] > 0 else "right"
        lat = _pick(rng, (f"on the {side}", f"to the {side}", f"on the {side}-hand side"))
    return f"{lon} {lat}"


def direction_phrase(o: dict, rng) -> str:
    if o["category"] != "vehicle":
        return _pick(rng, ("standing still", "stationary", "fixed on the road"))
    if o["speed"] < 0.5:
        return _pick(rng, ("stopped", "standing still"))
    d = np.degrees(o["rel_heading"])
    if abs(d) < 30:
        return _pick(rng, ("travelling in the same direction", "heading the same way as the ego car", "moving in our direction"))
    if abs(d) > 150:
        return _pick(rng, ("oncoming", "coming towards the ego car", "driving in the opposite direction"))
    side = "left" if d > 0 else "right"
    return _pick(rng, (f"crossing towards the {side}", f"turning across our path to the {side}", f"moving across, towards the {side}"))


def impact_phrase(o: dict, ego_speed: float, rng) -> str:
    in_lane = abs(o["ly"]) < SAME_LANE_M
    if o["category"] != "vehicle":
        if in_lane and o["lx"] > 0:
            return _pick(rng, ("It blocks the ego lane, so the ego car has to slow down or move to another lane.",
                               "Our lane is closed by it; plan an early lane change or stop."))
        return _pick(rng, ("It marks an obstruction next to our path; keep clear of it.", "Keep a lateral margin when passing it."))
    closing = ego_speed - o["v_along"]
    if in_lane and o["lx"] > 0:
        if closing > 0.5:
            return _pick(rng, ("The ego car is closing in on it, so it must slow down and keep a safe gap.",
                               "We are faster than it; brake gently to keep a safe following distance."))
        return _pick(rng, ("It is the lead vehicle; keep following at a safe distance.", "Keep a safe time gap behind it."))
    if in_lane and o["lx"] <= 0:
        return _pick(rng, ("It follows the ego car; avoid sudden braking.", "Braking hard would put it at risk of a rear-end collision."))
    if abs(np.degrees(o["rel_heading"])) > 150:
        return _pick(rng, ("Stay in our lane and do not drift towards it.", "Keep to our side of the road as it passes."))
    if 30 <= abs(np.degrees(o["rel_heading"])) <= 150 and o["category"] == "vehicle":
        return _pick(rng, ("Its path crosses ours, so be ready to yield.", "Watch it and yield if it enters our path."))
    return _pick(rng, ("It may change into our lane, so watch its indicators.", "Leave room in case it cuts in.",
                       "It limits our lane changes to that side."))


def describe(o: dict, ego_speed: float, rng, with_impact: bool = True) -> str:
    noun = _pick(rng, KIND_NOUN.get(o["category"], ("object",)))
    color = f"{o['color']} " if o["color"] else ""
    article = "An" if (color or noun)[0] in "aeiou" else "A"
    parts = f"{article} {color}{noun} {fmt_dist(o['distance'], rng)} {position_phrase(o, rng)}, {direction_phrase(o, rng)}"
    if o["category"] == "vehicle" and o["speed"] >= 0.5:
        parts += f" at {fmt_speed(o['speed'], rng)}"
    text = parts + "."
    if with_impact:
        text += " " + impact_phrase(o, ego_speed, rng)
    return text


# ----------------------------------------------------------------------------------------------
# the four tasks

GENERAL_Q = (
    "Describe the {plural} around the ego car: their position, direction and distance, and why they matter for driving.",
    "Which {plural} are near the ego vehicle, and how do they affect its driving?",
    "List the {plural} in the scene with where they are, where they are going and how far away they are.",
    "General perception: report every {singular} close to the ego car and explain its influence on the ego car.",
)
GENERAL_INTRO = (
    "There {are} {n} {noun} within {r} m of the ego car.",
    "{n} {noun} {are} within {r} m.",
    "I can see {n} {noun} within a {r} m radius.",
    "Within {r} m there {are} {n} {noun}."
)


def general_qa(objs: list[dict], category: str, ego_speed: float, rng) -> dict | None:
    singular, plural = NOUNS[category]
    near = [o for o in objs if o["category"] == category and o["distance"] < GENERAL_RADIUS_M]
    if category != "vehicle" and not near:
        return None
    n = len(near)
    noun = singular if n == 1 else plural
    if n == 0:
        intro = _pick(rng, (f"There are no {plural} within {GENERAL_RADIUS_M} m of the ego car.", f"No {plural} are within {GENERAL_RADIUS_M} m."))
    else:
        intro = _pick(rng, GENERAL_INTRO).format(n=n, noun=noun, r=GENERAL_RADIUS_M, are="is" if n == 1 else "are")
    shown = near[:MAX_DESCRIBED]
    if rng.uniform() < 0.4:
        shown = [shown[i] for i in rng.permutation(len(shown))]
    body = [describe(o, ego_speed, rng) for o in shown]
    if n > len(shown):
        body.append(_pick(rng, (f"The other {n - len(shown)} are farther away.", f"{n - len(shown)} more are farther away.")))
    q = _pick(rng, GENERAL_Q).format(plural=plural, singular=singular)
    return {"task": "general", "category": category, "question": q, "answer": " ".join([intro] + body), "box": []}


REGION_Q = (
    "Describe the object inside the box {box} of the image and explain why it affects the ego car.",
    "What is in the region {box} (x, y, width, height in pixels), and does it matter for our driving?",
    "Region perception: the rectangle {box} marks an object. What is it and how should the ego car react?",
)


def region_box(row: dict, o: dict) -> list[float] | None:
    """[x, y, w, h] pixel box of an agent in the current render, or None if it is mostly outside the image."""
    tf = scene_render_transform(row)
    a = row["agents"]
    k = o["index"]
    corners = box_corners(a["x"][k], a["y"][k], a["heading"][k], a["length"][k], a["width"][k])
    uv = tf.project(corners)
    lo, hi = uv.min(axis=0), uv.max(axis=0)
    w_img, h_img = tf.image_size
    clo, chi = np.maximum(lo, 0), np.minimum(hi, [w_img, h_img])
    full = np.prod(hi - lo)
    if full <= 0 or np.any(chi - clo < 2) or np.prod(chi - clo) / full < 0.6:
        return None
    return [round(float(clo[0]), 1), round(float(clo[1]), 1), round(float(chi[0] - clo[0]), 1), round(float(chi[1] - clo[1]), 1)]


def region_qas(row: dict, objs: list[dict], ego_speed: float, rng) -> list[dict]:
    out = []
    for o in objs:
        if len(out) >= MAX_REGIONS:
            break
        box = region_box(row, o)
        if box is None:
            continue
        box_text = "[" + ", ".join(f"{b:.1f}" for b in box) + "]"
        out.append({"task": "region", "category": o["category"], "question": _pick(rng, REGION_Q).format(box=box_text),
                    "answer": describe(o, ego_speed, rng), "box": box})
    return out


SUGGESTION_Q = (
    "What should the ego car do next?",
    "Give a driving suggestion for the ego vehicle in this scene.",
    "How should the ego car drive over the next few seconds, and why?",
    "Driving suggestion: what is the safe and efficient action for the ego car now?",
)


def suggestion_qa(row: dict, objs: list[dict], rng) -> dict:
    e, ci = row["ego"], int(row["current_index"])
    meta = json.loads(row["meta"])
    v0, v_end = float(e["speed"][ci]), float(e["speed"][-1])
    pose = np.array([e["x"][ci], e["y"][ci], e["heading"][ci]])
    end = global_to_local(np.array([e["x"][-1], e["y"][-1], e["heading"][-1]]), pose)
    hh = np.unwrap(np.asarray(e["heading"][ci:], float))
    turn = float(hh[-1] - hh[0])
    parts = []
    if v_end - v0 > 1.5:
        parts.append(_pick(rng, ("Accelerate to about {v} over the next 4 s.", "Speed up gradually to roughly {v}.")).format(v=fmt_speed(v_end, rng)))
    elif v_end - v0 < -1.5:
        parts.append(_pick(rng, ("Slow down to about {v} over the next 4 s.", "Ease off and brake to roughly {v}.")).format(v=fmt_speed(v_end, rng)))
    else:
        parts.append(_pick(rng, ("Keep a steady speed of about {v}.", "Hold the current speed, around {v}.")).format(v=fmt_speed(v0, rng)))
    junction = meta.get("env") in ("intersection", "roundabout", "u-turn")
    if abs(turn) > TURN_RAD:
        side = "left" if turn > 0 else "right"
        where = " at the junction" if junction else " following the road"
        parts.append(_pick(rng, (f"Turn {side}{where}.", f"Follow the route to the {side}{where}.")))
    elif abs(end[1]) > LANE_CHANGE_M:
        side = "left" if end[1] > 0 else "right"
        parts.append(_pick(rng, (f"Change to the {side} lane when the gap is safe.", f"Move over one lane to the {side}.")))
    else:
        parts.append(_pick(rng, ("Stay in the current lane.", "Keep the lane.", "Continue straight in this lane.")))
    lead = next((o for o in objs if o["lx"] > 0 and abs(o["ly"]) < SAME_LANE_M), None)
    if lead is not None and lead["distance"] < GENERAL_RADIUS_M:
        noun = "vehicle" if lead["category"] == "vehicle" else NOUNS.get(lead["category"], ("object",))[0]
        parts.append(_pick(rng, (f"The lead {noun} is {fmt_dist(lead['distance'], rng)} ahead; keep a safe gap.",
                                 f"Mind the {noun} {fmt_dist(lead['distance'], rng)} ahead in our lane.")))
    if any(o["category"] in ("traffic_cone", "barrier") and o["lx"] > 0 for o in objs):
        parts.append(_pick(rng, ("Road works ahead: merge early and pass the cones slowly.", "Cones and a barrier close a lane ahead; be ready to change lanes.")))
    if row["near_miss"]:
        parts.append(_pick(rng, ("Be ready to brake: another vehicle will come very close.", "Stay alert, a close encounter is coming up.")))
    if row["weather"] == "rainy":
        parts.append(_pick(rng, ("The road is wet, so leave extra distance.", "Rain lowers grip: brake earlier than usual.")))
    if row["lighting"] == "night":
        parts.append(_pick(rng, ("It is dark; drive with extra care.", "Visibility is reduced at night.")))
    first, rest = parts[:2], parts[2:]
    rest = [rest[i] for i in rng.permutation(len(rest))]
    return {"task": "suggestion", "category": "driving_suggestion", "question": _pick(rng, SUGGESTION_Q),
            "answer": " ".join(first + rest), "box": []}


TRAJECTORY_Q = (
    "Plan the ego car's trajectory for the next 4 seconds as 8 waypoints (x forward, y left, metres).",
    "Where will the ego vehicle be every 0.5 s over the next 4 s? Give (x, y) in the ego frame.",
    "Predict the future path of the ego car: 8 poses, 0.5 s apart, in ego coordinates.",
)


def trajectory_qa(row: dict, future: np.ndarray, rng) -> dict:
    """`future`: (8, 3) ground-truth poses in the current ego (rear-axle) frame."""
    with_heading = rng.uniform() < 0.3
    future = np.asarray(future, float).copy()
    future[:, :2], future[:, 2] = np.round(future[:, :2], 2) + 0.0, np.round(future[:, 2], 3) + 0.0  # no "-0.00"
    if with_heading:
        pts = ", ".join(f"({x:.2f}, {y:.2f}, {h:.3f})" for x, y, h in future)
        intro = _pick(rng, ("Waypoints (x, y, heading in rad):", "The planned poses (x m, y m, heading rad) are:"))
    else:
        pts = ", ".join(f"({x:.2f}, {y:.2f})" for x, y, _ in future)
        intro = _pick(rng, ("The trajectory is:", "Waypoints (x, y) in metres:", "Over the next 4 s the ego car goes through:"))
    return {"task": "trajectory", "category": "planning", "question": _pick(rng, TRAJECTORY_Q), "answer": f"{intro} [{pts}]", "box": []}


def annotate(row: dict, future_ego: np.ndarray, rng: np.random.Generator) -> list[dict]:
    """All qa rows of a scene (qid = f"{row id}:q{k}"; skills empty)."""
    objs = current_objects(row)
    ego_speed = float(row["ego"]["speed"][int(row["current_index"])])
    qas = []
    for cat in ("vehicle", "traffic_cone", "barrier"):
        qa = general_qa(objs, cat, ego_speed, rng)
        if qa is not None:
            qas.append(qa)
    qas += region_qas(row, objs, ego_speed, rng)
    qas.append(suggestion_qa(row, objs, rng))
    qas.append(trajectory_qa(row, future_ego, rng))
    return [{"qid": f"{row['id']}:q{k}", "skills": [], **qa} for k, qa in enumerate(qas)]
