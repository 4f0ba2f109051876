"""CODA-LM scores from questions, predictions (by question id) and judgements.

Judge scores, per task (general, region, suggestion) and per region class, each on both scales:

- ``mean_rating``: the mean rating (1-10) over the items the judge rated — the number the official scripts
  print (upstream, too, drops failed and unreadable replies; we say how many there were); ``score`` = it x 10,
  the scale of the published tables;
- ``mean_rating_failures_as_1`` / ``score_failures_as_1``: the same over every question, a failed or
  unparseable judgement or a missing prediction counting as the minimum rating 1 — the number nothing can flatter;
- counts: questions, predicted, missing (no prediction), judged (rated), unparseable, failed; of the rated:
  ``by_rule`` (which official parse rule read it), ``lenient_only`` (read by the official rules but not by our
  strict ``Rating: [[n]]``, 1..10) and ``out_of_range`` (outside 1..10, kept in the mean as upstream keeps it).

Region: the official class table decides, and drops what it does not know (see eval/coda_questions.py);
``region.dropped`` counts those questions by category; ``region_extended`` (optional) is our wider view.

``final`` = mean of the three task scores (both variants), given only when all three tasks have a score.

Offline metrics (no judge), per task, over every question (a missing prediction is scored as the empty
answer): BLEU-4 (0-100), ROUGE-L F (0-1), CIDEr-D (0-10); see eval/text_metrics.py.

Object recall (general perception): a scene's annotated classes (the 7 region classes of its general-perception
categories with objects and of its region boxes) against the classes the prediction mentions, found with
the keyword lists in `CLASS_KEYWORDS` (whole words, plural "s"/"es" allowed, case-insensitive). Reported:
mean per-scene recall |annotated ∩ mentioned| / |annotated| over scenes with at least one annotated class,
mean per-scene precision |annotated ∩ mentioned| / |mentioned| over scenes whose prediction mentions a class,
and per-class recall (share of scenes annotating the class whose prediction mentions it).

Well-formed answers (OURS, `degenerate_reason`): a keyword count flatters degenerate text ("car car car ..."
mentions a vehicle), so `object_recall` also reports the same numbers over well-formed answers only, under
"well_formed", with the count of degenerate answers and why. An answer is well-formed when its words (runs of
letters, lower-cased) are at least `MIN_WORDS` = 4, at least `MIN_DISTINCT` = 3 of them distinct, the distinct
ones at least `MIN_DISTINCT_RATIO` = 0.3 of all words, and at most `MAX_REPEATED_4GRAMS` = 0.5 of its word
4-grams repeat an earlier one (a repetition loop). Reasons: "no_words" (empty, punctuation only), "too_short",
"repetition_loop". Fluent answers (the references are 30-70 words) pass every test; the top-level numbers stay
over every answer, as published.
"""
from __future__ import annotations

import math
import re
from collections import Counter, defaultdict

from eval.coda_judge import OFFICIAL_RULES
from eval.coda_questions import OTHER, REGION_CLASSES
from eval.text_metrics import bleu4, cider_d, rouge_l

TASKS = ("general", "region", "suggestion")
SCALE = {"mean_rating": "mean judge rating, 1-10: the number the official scripts print (Stage1/2/3_score)",
         "score": "mean_rating x 10: the scale of the published tables (e.g. GPT-4V 57.50 / 56.26 / 63.30)"}

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


MIN_WORDS, MIN_DISTINCT, MIN_DISTINCT_RATIO, MAX_REPEATED_4GRAMS = 4, 3, 0.3, 0.5
_WORD = re.compile(r"[a-z]+")


def degenerate_reason(text: str) -> str | None:
    """None for a well-formed free-text answer, else why it is degenerate (see the module docstring)."""
    words = _WORD.findall((text or "").lower())
    if not words:
        return "no_words"
    if len(words) < MIN_WORDS or len(set(words)) < MIN_DISTINCT:
        return "too_short"
    grams = [tuple(words[i:i + 4]) for i in range(len(words) - 3)]
    if len(set(words)) < MIN_DISTINCT_RATIO * len(words) or (grams and 1 - len(set(grams)) / len(grams) > MAX_REPEATED_4GRAMS):
        return "repetition_loop"
    return None


def mentioned_classes(text: str) -> set[str]:
    return {c for c, rx in _CLASS_RE.items() if rx.search(text or "")}


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _x10(v: float | None) -> float | None:
    return None if v is None else 10.0 * v


def _summary(questions: list[dict], predictions: dict, judgements: dict | None) -> dict:
    n = len(questions)
    predicted = [q for q in questions if q["question_id"] in predictions]
    out = {"questions": n, "predicted": len(predicted), "missing": n - len(predicted)}
    if judgements is None:
        return out
    js = [judgements.get(q["question_id"]) for q in predicted]
    ok = [j for j in js if j is not None and j.status == "ok"]
    rated = [j.rating for j in ok]
    mean, mean1 = _mean(rated), _mean(rated + [1] * (n - len(rated)))
    out.update({
        "judged": len(rated),
        "unparseable": sum(1 for j in js if j is not None and j.status == "unparseable"),
        "failed": sum(1 for j in js if j is None or j.status == "failed"),
        "lenient_only": sum(1 for j in ok if j.lenient_only),
        "out_of_range": sum(1 for j in ok if j.out_of_range),
        "by_rule": {rule: sum(1 for j in ok if j.rule == rule) for rule, _ in OFFICIAL_RULES},
        "mean_rating": mean,  # the official scripts' number (1-10 scale)
        "score": _x10(mean),  # x 10: the published tables' scale
        "mean_rating_failures_as_1": mean1,
        "score_failures_as_1": _x10(mean1),
    })
    return out


def judge_scores(questions: list[dict], predictions: dict, judgements: dict, region_extended: bool = False) -> dict:
    """Per task (and region per official class) judge scores; `predictions`: id -> answer; `judgements`: id -> Judgement.

    Region, as upstream: only questions whose category the official table knows (``official_class``) count, in
    the region score and in its 7 classes; the others are counted under ``dropped`` (by category name). With
    `region_extended`, ``region_extended`` adds our view: every region question, our class mapping (``class``),
    unknown names in "other"."""
    out = {}
    for task in TASKS:
        qs = [q for q in questions if q["task"] == task]
        if not qs:
            continue
        if task == "region":
            kept = [q for q in qs if q.get("official_class")]
            dropped = Counter(q.get("category", "") for q in qs if not q.get("official_class"))
            out[task] = _summary(kept, predictions, judgements)
            out[task]["dropped"] = {"questions": sum(dropped.values()), "by_category": dict(sorted(dropped.items()))}
            out[task]["per_class"] = {c: _summary([q for q in kept if q["official_class"] == c], predictions, judgements) for c in REGION_CLASSES}
            if region_extended:
                classes = [c for c in REGION_CLASSES + (OTHER,) if c in REGION_CLASSES or any(q["class"] == c for q in qs)]
                out["region_extended"] = _summary(qs, predictions, judgements)
                out["region_extended"]["per_class"] = {c: _summary([q for q in qs if q["class"] == c], predictions, judgements) for c in classes}
        else:
            out[task] = _summary(qs, predictions, judgements)
    if all(t in out and out[t]["score"] is not None for t in TASKS):
        keys = ("mean_rating", "score", "mean_rating_failures_as_1", "score_failures_as_1")
        out["final"] = {k: sum(out[t][k] for t in TASKS) / 3 for k in keys}
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
    """Recall / precision over every answer (a missing one = the empty answer), and under "well_formed" over the
    well-formed answers only, with the count of degenerate answers (`degenerate_reason`) and their reasons."""
    out = _recall(general_questions, predictions)
    reasons = {q["question_id"]: degenerate_reason(predictions.get(q["question_id"], "")) for q in general_questions}
    good = [q for q in general_questions if reasons[q["question_id"]] is None]
    wf = _recall(good, predictions)
    out["well_formed"] = {"answers": len(general_questions), "well_formed": len(good), "degenerate": len(general_questions) - len(good),
                          "degenerate_reasons": dict(sorted(Counter(r for r in reasons.values() if r).items())),
                          **{k: wf[k] for k in ("scenes", "recall", "precision")}}
    return out


def _recall(general_questions: list[dict], predictions: dict) -> dict:
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
