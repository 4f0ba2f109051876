"""Offline metrics and score aggregation, checked against hand computations."""
from __future__ import annotations

import math

import pytest

from eval.coda_judge import Judgement
from eval.coda_questions import class_of, official_class_of
from eval.coda_scores import degenerate_reason, judge_scores, mentioned_classes, object_recall, offline_scores
from eval.text_metrics import bleu4, cider_d, rouge_l

L2 = math.log(2.0)


def test_cider_d_hand_computation():
    # N = 2 items; every reference n-gram occurs in one item -> idf = log(2/1) for all of them, and the
    # candidate-only n-grams ("e", "c e") get df 0 -> max(1, 0) = 1 -> the same idf.
    # item A: candidate == reference "a b": n=1 and n=2 cosine 1, n=3,4 have no n-grams -> 0: 10 * (1+1+0+0)/4 = 5
    # item B: "c e" vs "c d": n=1: (L*L) / (sqrt(2)L * sqrt(2)L) = 1/2; n=2 no overlap: 10 * (0.5)/4 = 1.25
    corpus, items = cider_d(["a b", "c e"], ["a b", "c d"])
    assert items == pytest.approx([5.0, 1.25])
    assert corpus == pytest.approx(3.125)


def test_cider_d_clipping_and_length_penalty():
    # unigrams only (n_max=1), N = 2, idf = log 2 = L for every word.
    # "x x" vs "x y": g(c) = {x: 2L}, |g(c)| = 2L; g(s) = {x: L, y: L}, |g(s)| = sqrt(2)L;
    # clipped overlap min(2L, L) * L = L^2 -> cosine 1/(2 sqrt 2); equal lengths -> no penalty.
    _, items = cider_d(["x x", "z"], ["x y", "z"], n_max=1)
    assert items == pytest.approx([10 / (2 * math.sqrt(2)), 10.0])
    # 7 x "p" vs "p": overlap min(7L, L) L = L^2, norms 7L and L -> 1/7; length gap 6 -> exp(-36 / 72)
    _, items = cider_d(["p p p p p p p", "q"], ["p", "q"], n_max=1)
    assert items[0] == pytest.approx(10 / 7 * math.exp(-0.5))


def test_cider_d_multiple_references_average():
    # two references for item 0: one identical (unigram cosine 1), one disjoint (0) -> mean 0.5 -> 5
    _, items = cider_d(["a", "b"], [["a", "c"], "b"], n_max=1)
    assert items == pytest.approx([5.0, 10.0])


def test_bleu4_hand_computation():
    # hypothesis vs reference: 1-gram 5/6, 2-gram 3/5, 3-gram 2/4, 4-gram 1/3 matches; equal lengths -> BP = 1
    expected = 100 * (5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25
    assert bleu4(["the cat sat on the mat"], ["the cat sat on a mat"]) == pytest.approx(expected, abs=1e-6)
    assert bleu4(["a car stops at the red light"], ["a car stops at the red light"]) == pytest.approx(100.0)


def test_rouge_l_hand_computation():
    # LCS("the car stops here", "the car waits here") = "the car here": P = R = 3/4 -> F = 0.75; second pair: LCS 1 of 2/4
    assert rouge_l(["the car stops here"], ["the car waits here"]) == pytest.approx(0.75)
    f2 = 2 * (1 / 2) * (1 / 4) / (1 / 2 + 1 / 4)
    assert rouge_l(["the car stops here", "slow down"], ["the car waits here", "please slow now carefully"]) == pytest.approx((0.75 + f2) / 2)


def test_metric_inputs_must_align():
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        cider_d(["a", "b"], ["a"])


@pytest.mark.parametrize("name,cls", [("traffic_cone", "traffic_cone"), ("dog", "miscellaneous"), ("truck", "vehicle"), ("Cyclist", "vru"),
                                      ("warning_sign", "traffic_sign"), ("traffic signs", "traffic_sign"), ("vulnerable_road_users", "vru"),
                                      ("other objects", "miscellaneous"), ("bollard", "barrier"), ("czone_sign", "traffic_sign"), ("generic_object", "miscellaneous"),
                                      ("pedestrian", "vru"), ("spaceship", "other"), ("", "other")])
def test_class_mapping(name, cls):
    assert class_of(name) == cls


# The official table, by hand from DLUT-LYZ/CODA-LM@24544cc evaluation/stage3_eval_batch.py:50-58 and its lookup
# `if category_name in label_info` (:68-70): exact, case-sensitive names; anything else -> None (dropped).
@pytest.mark.parametrize("name,cls", [("car", "vehicle"), ("construction_vehicle", "vehicle"), ("cart", "vru"), ("warning_sign", "traffic_sign"),
                                      ("traffic_light", "traffic_light"), ("bollard", "barrier"), ("suitcace", "miscellaneous"), ("misc", "miscellaneous"),
                                      ("Car", None), ("suitcase", None), ("van", None), ("vehicle", None), ("miscellaneous", None),
                                      ("czone_sign", None), ("traffic cone", None), ("", None)])
def test_official_class_table(name, cls):
    assert official_class_of(name) == cls


def test_mentioned_classes():
    assert mentioned_classes("Two cars ahead, a traffic light turns red and a pedestrian crosses.") == {"vehicle", "traffic_light", "vru"}
    assert mentioned_classes("Cones and a barrier; a warning sign.") == {"traffic_cone", "barrier", "traffic_sign"}
    assert mentioned_classes("A scar on the signal pole, nothing else.") == set()  # no 'car', 'sign' inside other words


def test_object_recall_hand_computation():
    qs = [
        {"question_id": "a", "annotated_classes": ["vehicle", "vru", "traffic_cone"]},
        {"question_id": "b", "annotated_classes": ["barrier"]},
        {"question_id": "c", "annotated_classes": []},
    ]
    preds = {"a": "A truck and two cones, also a dog.", "b": "Nothing.", "c": "A bus."}
    r = object_recall(qs, preds)
    # a: annotated 3, mentioned {vehicle, traffic_cone, miscellaneous} -> recall 2/3, precision 2/3; b: recall 0; c: precision 0/1
    assert r["scenes"] == 2 and r["recall"] == pytest.approx((2 / 3 + 0) / 2)
    assert r["precision"] == pytest.approx((2 / 3 + 0) / 2)
    assert r["per_class_recall"] == {"vehicle": 1.0, "vru": 0.0, "traffic_cone": 1.0, "barrier": 0.0}


def test_degenerate_answers_by_the_documented_rule():
    assert degenerate_reason("") == degenerate_reason("........") == degenerate_reason(None) == "no_words"
    assert degenerate_reason("A bus.") == "too_short"  # 2 words < 4
    assert degenerate_reason("car car car car car car car car") == "too_short"  # 1 distinct word < 3
    # 12 words, 4 distinct (0.33 >= 0.3) but 5 of its 9 word 4-grams repeat an earlier one (0.56 > 0.5)
    assert degenerate_reason("the car is ahead the car is ahead the car is ahead") == "repetition_loop"
    # 11 words, 3 distinct: 3 / 11 = 0.27 < 0.3
    assert degenerate_reason("car truck car truck car truck car truck car truck bus") == "repetition_loop"
    assert degenerate_reason("A truck and two cones, also a dog.") is None
    assert degenerate_reason("A white car ahead in the same lane slows down, so the ego car keeps its distance.") is None


def test_object_recall_over_well_formed_answers_flags_degenerate_text():
    # the degenerate answers mention "car": over every answer they score recall 1 and precision 1 on scene b and c
    qs = [{"question_id": "a", "annotated_classes": ["vehicle", "vru"]},
          {"question_id": "b", "annotated_classes": ["vehicle"]},
          {"question_id": "c", "annotated_classes": ["vehicle"]}]
    preds = {"a": "A white car ahead, no pedestrian on the road here.", "b": "car car car car car car", "c": "the car is ahead the car is ahead the car is ahead"}
    r = object_recall(qs, preds)
    assert r["recall"] == pytest.approx((1 + 1 + 1) / 3) and r["scenes"] == 3  # every answer: a mentions vehicle and vru
    wf = r["well_formed"]
    assert (wf["answers"], wf["well_formed"], wf["degenerate"]) == (3, 1, 2)
    assert wf["degenerate_reasons"] == {"repetition_loop": 1, "too_short": 1}
    assert wf["scenes"] == 1 and wf["recall"] == pytest.approx(1.0) and wf["precision"] == pytest.approx(1.0)
    # all degenerate: nothing to score, no number
    none = object_recall(qs[1:], preds)["well_formed"]
    assert none["degenerate"] == none["answers"] == 2 and none["recall"] is None and none["precision"] is None and none["scenes"] == 0


def _q(qid, task, cls="", official=None, category=""):
    return {"question_id": qid, "task": task, "class": cls, "official_class": official if official is not None else (cls if cls != "other" else None),
            "category": category, "reference": f"reference of {qid}", "annotated_classes": []}


def test_judge_scores_hand_computation():
    qs = [_q("g1", "general"), _q("g2", "general"), _q("g3", "general"),
          _q("r1", "region", "vehicle"), _q("r2", "region", "vehicle"), _q("r3", "region", "traffic_cone"), _q("r4", "region", "other"),
          _q("s1", "suggestion"), _q("s2", "suggestion")]
    preds = {k: "text" for k in ["g1", "g2", "g3", "r1", "r2", "r3", "r4", "s1"]}  # s2 missing
    J = lambda r: Judgement("ok", r)  # noqa: E731
    judgements = {"g1": J(8), "g2": J(6), "g3": Judgement("unparseable", reply="?"), "r1": J(9), "r2": J(5), "r3": Judgement("failed", error="x"),
                  "r4": J(2), "s1": J(7)}
    s = judge_scores(qs, preds, judgements, region_extended=True)
    g = s["general"]
    assert (g["questions"], g["predicted"], g["judged"], g["unparseable"], g["failed"], g["missing"]) == (3, 3, 2, 1, 0, 0)
    assert g["score"] == pytest.approx(70.0) and g["score_failures_as_1"] == pytest.approx(50.0)  # (8+6)/2, (8+6+1)/3
    assert g["mean_rating"] == pytest.approx(7.0) and g["mean_rating_failures_as_1"] == pytest.approx(5.0)  # the 1-10 scale
    r = s["region"]  # official view: r4 (category not in the official table) is dropped, as stage3_eval_batch.py:243-279 drops it
    assert r["questions"] == 3 and r["dropped"]["questions"] == 1
    assert r["score"] == pytest.approx(70.0) and r["score_failures_as_1"] == pytest.approx(10 * 15 / 3) and r["failed"] == 1  # (9+5)/2; (9+5+1)/3
    assert r["per_class"]["vehicle"]["score"] == pytest.approx(70.0) and "other" not in r["per_class"]
    assert r["per_class"]["traffic_cone"]["score"] is None and r["per_class"]["traffic_cone"]["score_failures_as_1"] == pytest.approx(10.0)
    x = s["region_extended"]  # our view: every region question, r4 in "other"
    assert x["score"] == pytest.approx(10 * 16 / 3) and x["score_failures_as_1"] == pytest.approx(10 * 17 / 4)
    assert x["per_class"]["other"]["score"] == pytest.approx(20.0) and x["per_class"]["vru"]["questions"] == 0
    sg = s["suggestion"]
    assert (sg["missing"], sg["score"], sg["score_failures_as_1"]) == (1, pytest.approx(70.0), pytest.approx(40.0))
    assert s["final"]["score"] == pytest.approx((70 + 70 + 70) / 3) and s["final"]["mean_rating"] == pytest.approx(7.0)
    assert s["final"]["score_failures_as_1"] == pytest.approx((50 + 50 + 40) / 3)
    assert "region_extended" not in judge_scores(qs, preds, judgements)


def test_offline_scores_count_missing_as_empty():
    qs = [{**_q("g1", "general"), "reference": "a car stops", "annotated_classes": ["vehicle"]},
          {**_q("g2", "general"), "reference": "a dog runs"}]
    out = offline_scores(qs, {"g1": "a car stops"})
    assert out["general"]["n"] == 2 and out["general"]["missing"] == 1
    assert out["general"]["rouge_l"] == pytest.approx(0.5)  # 1.0 for g1, 0.0 for the missing g2
    assert out["object_recall"]["recall"] == 1.0
