"""CODA-LM scores from questions, predictions (by question id) and judgements.

Judge scores, per task (general, region, suggestion) and per region class:

- ``score``: mean rating x 10 over the items the judge rated (the published protocol's number, except that
  upstream silently drops failures, and we say how many there were);
- ``score_failures_as_1``: mean x 10 over every question, a failed or unparseable judgement or a missing
  prediction counting as the minimum rating 1 — the number nothing can flatter;
- counts: questions, predicted, missing (no prediction), judged (rated), unparseable, failed.

``final`` = mean of the three task scores (both variants), given only when all three tasks have a score.

Offline metrics (no judge), per task, over every question (a missing prediction is scored as the empty
answer): BLEU-4 (0-100), ROUGE-L F (0-1), CIDEr-D (0-10); see eval/text_metrics.py.

Object recall (general perception): a scene's annotated classes (the 7 region classes of its general-perception
categories with objects and of its region boxes) against the classes the prediction mentions, found with
the keyword lists in `CLASS_KEYWORDS` (whole words, plural "s"/"es" allowed, case-insensitive). Reported:
mean per-scene recall |annotated ∩ mentioned| / |annotated| over scenes with at least one annotated class,
mean per-scene precision |annotated ∩ mentioned| / |mentioned| over scenes whose prediction mentions a class,
and per-class recall (share of scenes annotating the class whose prediction mentions it).
"""
from __future__ import annotations

import math
import re
from collections import defaultdict

from eval.coda_questions import OTHER, REGION_CLASSES
from eval.text_metrics import bleu4, cider_d, rouge_l

TASKS = ("general", "region", "suggestion")

CLASS_KEYWORDS = {
    "vehicle": ["car", "vehicle", "truck", "bus", "van", "taxi", "suv", "sedan", "tram", "trailer", "lorry", "jeep", "pickup", "tractor",
                "minibus", "ambulance", "tricycle", "hatchback", "coach"],
    "vru": ["pedestrian", "person", "people", "man", "men", "woman", "women", "child", "children", "cyclist", "bicyclist", "bicycle", "bike",
            "motorcycle", "motorcyclist", "motorbike", "scooter", "moped", "rider", "stroller", "wheelchair", "cart"],
    "traffic_sign": ["sign", "signage", "signboard", "road sign", "traffic sign"],
    "traffic_light": ["traffic light", "traffic signal", "signal light", "stoplight", "red light", "green light", "yellow light", "amber light"],
    "traffic_cone": ["cone", "traffic cone", "pylon"],
    "barrier": ["barrier", "bollard", "fence", "guardrail", "guard rail", "railing", "barricade", "roadblock", "road block"],
    "miscellaneous": ["debris", "dustbin", "bin", "trash", "garbage", "rubbish", "animal", "dog", "cat", "stone", "rock", "tire", "tyre", "box",
                      "bag", "carton", "cardboard", "machinery", "chair", "basket", "phone booth", "sentry box", "traffic island",
                      "concrete block", "suitcase", "obstacle"],
}
_CLASS_RE = {c: re.compile(r"\b(?:" + "|".join(re.escape(k).replace(r"\ ", r"\s+") for k in kws) + r")(?:s|es)?\b", re.I)
             for c, kws in CLASS_KEYWORDS.items()}


def mentioned_classes(text: str) -> set[str]:
    return {c for c, rx in _CLASS_RE.items() if rx.search(text or "")}


def _mean10(values: list[float]) -> float | None:
    return 10.0 * sum(values) / len(values) if values else None


def _summary(questions: list[dict], predictions: dict, judgements: dict | None) -> dict:
    n = len(questions)
    predicted = [q for q in questions if q["question_id"] in predictions]
    out = {"questions": n, "predicted": len(predicted), "missing": n - len(predicted)}
    if judgements is None:
        return out
    js = [judgements.get(q["question_id"]) for q in predicted]
    rated = [j.rating for j in js if j is not None and j.status == "ok"]
    out.update({
        "judged": len(rated),
        "unparseable": sum(1 for j in js if j is not None and j.status == "unparseable"),
        "failed": sum(1 for j in js if j is None or j.status == "failed"),
        "score": _mean10(rated),
        "score_failures_as_1": _mean10(rated + [1] * (n - len(rated))) if n else None,
    })
    return out


def judge_scores(questions: list[dict], predictions: dict, judgements: dict) -> dict:
    """Per task (and region per class) judge scores; `predictions`: id -> answer; `judgements`: id -> Judgement."""
    out = {}
    for task in TASKS:
        qs = [q for q in questions if q["task"] == task]
        if not qs:
            continue
        out[task] = _summary(qs, predictions, judgements)
        if task == "region":
            classes = [c for c in REGION_CLASSES + (OTHER,) if c in REGION_CLASSES or any(q["class"] == c for q in qs)]
            out[task]["per_class"] = {c: _summary([q for q in qs if q["class"] == c], predictions, judgements) for c in classes}
    if all(t in out and out[t]["score"] is not None for t in TASKS):
        out["final"] = {k: sum(out[t][k] for t in TASKS) / 3 for k in ("score", "score_failures_as_1")}
    return out


def offline_scores(questions: list[dict], predictions: dict) -> dict:
    out = {}
    for task in TASKS:
        qs = [q for q in questions if q["task"] == task]
        if not qs:
            continue
        hyps = [predictions.get(q["question_id"], "") for q in qs]
        refs = [q["reference"] for q in qs]
        out[task] = {"n": len(qs), "missing": sum(q["question_id"] not in predictions for q in qs),
                     "bleu4": bleu4(hyps, refs), "rouge_l": rouge_l(hyps, refs), "cider_d": cider_d(hyps, refs)[0]}
    out["object_recall"] = object_recall([q for q in questions if q["task"] == "general"], predictions)
    return out


def object_recall(general_questions: list[dict], predictions: dict) -> dict:
    recalls, precisions = [], []
    per_class = defaultdict(lambda: [0, 0])  # class -> [mentioned, annotated]
    for q in general_questions:
        ann = set(q.get("annotated_classes", []))
        said = mentioned_classes(predictions.get(q["question_id"], ""))
        if ann:
            recalls.append(len(ann & said) / len(ann))
        if said:
            precisions.append(len(ann & said) / len(said))
        for c in ann:
            per_class[c][1] += 1
            per_class[c][0] += c in said
    return {
        "scenes": len(recalls),
        "recall": sum(recalls) / len(recalls) if recalls else None,
        "precision": sum(precisions) / len(precisions) if precisions else None,
        "per_class_recall": {c: per_class[c][0] / per_class[c][1] for c in REGION_CLASSES if per_class[c][1]},
    }


def clean(obj):
    """NaN -> None so the JSON stays standard."""
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: clean(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [clean(v) for v in obj]
    return obj
