"""Skill annotation: known QA items, answer segments, templated scene text, pool annotation and coverage."""
import json

import numpy as np
import pytest

from datasets_cfg.schema import ScenePool, new_row
from datasets_cfg.skill_annotation import (annotate_pool, coverage_heatmap, coverage_table, hierarchical_segments, qa_skills,
                                           scene_segments, scene_skills, segment_text, skill_vector, write_coverage)
from datasets_cfg.skill_items import pool_items, scene_items
from mose.skills import Taxonomy, UnknownSkillError
from tests.skill_fixtures import driving_row

TAX = Taxonomy.load()


def qa(task, answer, category="", skills=(), qid="q", question="?"):
    return {"qid": qid, "task": task, "question": question, "answer": answer, "category": category, "box": [], "skills": list(skills)}


def coda_row(scene_id="test_0001"):
    """A CODA-LM row as datasets_cfg/sources/coda_lm.py writes it: no ego, per-object general annotations."""
    return new_row(scene_id, "coda_lm", "val", qa=[
        qa("general", "A bus ahead. Cones on the left.", qid=f"{scene_id}:general", question="Describe the scene."),
        qa("general_object", "A white bus ahead, slowing the ego car.", "vehicles", qid=f"{scene_id}:general:vehicles:0", question=""),
        qa("general_object", "Three cones on the left.", "traffic cones", qid=f"{scene_id}:general:traffic cones:0", question=""),
        qa("general_object", "A dustbin on the road.", "other objects", qid=f"{scene_id}:general:other objects:0", question=""),
        qa("region", "A dog crossing the road; slow down.", "dog", qid=f"{scene_id}:region:1", question="What is in the box?"),
        qa("suggestion", "Slow down because of the bus. Keep to the right lane. Obey the traffic rules.", qid=f"{scene_id}:suggestion"),
    ], meta=json.dumps({"log_name": scene_id, "timestamp_s": 0.0}))


@pytest.mark.parametrize("item, expected", [
    (qa("general_object", "x", "vulnerable_road_users"), ["vulnerable_road_users"]),
    (qa("general_object", "x", "traffic signs"), ["traffic_signs"]),
    (qa("general", "x", "vehicle"), ["vehicles"]),  # the simulator's per-category general QA
    (qa("region", "An orange cone.", "traffic_cone"), ["traffic_cones"]),
    (qa("region", "A truck parked; pass wide.", "truck"), ["vehicles"]),
    (qa("region", "A dog crossing; slow down.", "dog"), ["other_objects"]),  # keyword on the category name
    (qa("region", "Something odd.", "concrete_block"), ["other_objects"]),  # CODA's miscellaneous fallback
    (qa("suggestion", "Brake now. Change lanes to the left. Follow the traffic rules."), ["longitudinal_control", "lateral_control", "rule_compliance"]),
    (qa("suggestion", "Be careful."), ["planning"]),
    (qa("trajectory", "[(1, 0)]", "planning"), ["trajectory"]),
    (qa("general", "A pedestrian and two cars; wet road at night."), ["scene_conditions", "vehicles", "vulnerable_road_users"]),
    (qa("caption", "The cyclist will likely cross; there is a collision risk."), ["interaction_risk"]),  # text fallback
    (qa("caption", "Lorem ipsum."), []),
    (qa("region", "x", "dog", skills=["VRU"]), ["vulnerable_road_users"]),  # given skills win, aliases resolved
])
def test_qa_skills_of_known_items(item, expected):
    got = qa_skills(item, TAX)
    assert sorted(got) == sorted(expected)


def test_unknown_skill_names_raise_or_are_counted():
    item = qa("region", "x", "dog", skills=["teleporting"])
    with pytest.raises(UnknownSkillError, match="scene s qa\\[3\\].*'teleporting'"):
        qa_skills(item, TAX, where="scene s qa[3]")
    from datasets_cfg.skill_annotation import AnnotationReport

    rep = AnnotationReport()
    assert qa_skills(item, TAX, on_unknown="count", report=rep) == ["other_objects"]
    assert rep.unknown_skills == {"teleporting": 1}


def test_segment_text_tiles_the_text():
    text = "Slow down for the cyclist.  Change lanes to the left; then obey the red light.\nBe careful."
    spans = segment_text(text, TAX, default="planning", within="planning")
    assert spans[0][0] == 0 and spans[-1][1] == len(text) and all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    assert [(text[a:b].strip(), s) for a, b, s in spans] == [
        ("Slow down for the cyclist.", "longitudinal_control"), ("Change lanes to the left;", "lateral_control"),
        ("then obey the red light.", "rule_compliance"), ("Be careful.", "planning")]


def test_scene_segments_match_hand_computation():
    segs = {s.skill: s.text for s in scene_segments(driving_row(), TAX)}
    assert segs["vehicles"] == "1 vehicle: 12 m ahead in the ego lane, moving at 8.0 m/s."
    assert segs["traffic_cones"] == "1 traffic cone: 15 m ahead, 3 m to the right."
    assert segs["traffic_lights"] == "The traffic light on the ego route is red."
    assert segs["scene_conditions"] == "Daytime, clear weather. Location: straight."
    # the lead brakes 1 m/s^2 from 8 m/s: 4.0 m/s after the 4 s horizon
    assert segs["agent_intent"] == "The vehicle 12 m ahead in the ego lane will slow down from 8.0 to 4.0 m/s in the next 4.0 s."
    assert segs["longitudinal_control"] == "Keep about 8.0 m/s." and segs["lateral_control"] == "Keep the lane."
    assert segs["rule_compliance"] == "Stop before the red light. Stay below the speed limit of 13.9 m/s."
    assert segs["trajectory"].startswith("[(4.00, 0.00), (8.00, 0.00)")
    # ego at 8 m/s closes on the braking lead: gap = centre distance - half its length; smallest headway at t = 4 s
    # lead travelled 8*4 - 0.5*1*16 = 24 m, ego 32 m: centre distance 12 + 24 - 32 = 4 m, gap 4 - 2.25 = 1.75 m,
    # headway 1.75 / 8 = 0.22 s
    assert segs["interaction_risk"] == "High risk: the vehicle in the ego path is 1.8 m ahead (0.2 s headway) in 4.0 s."
    quiet = {s.skill: s.text for s in scene_segments(driving_row(lead_brakes=False, red_light=False), TAX)}
    assert quiet["traffic_lights"].endswith("green.") and quiet["rule_compliance"] == "Stay below the speed limit of 13.9 m/s."
    # simulator events in meta: a cut-in 1.5 s after this frame, a work zone over the whole episode
    row = driving_row(lead_brakes=False)
    row["meta"] = json.dumps({"log_name": "x", "timestamp_s": 1.0, "event_time_s": 2.5, "perturbations": ["cut_in", "work_zone"]})
    ev = {s.skill: s.text for s in scene_segments(row, TAX)}
    assert ev["agent_intent"].endswith("A neighbouring vehicle cuts into the ego lane in 1.5 s.")
    assert ev["scene_conditions"].endswith("A work zone narrows the road.")
    row["meta"] = json.dumps({"log_name": "x", "timestamp_s": 9.0, "event_time_s": 2.5, "perturbations": ["cut_in"]})
    assert "cuts into" not in {s.skill: s.text for s in scene_segments(row, TAX)}["agent_intent"]  # the event is past
    # constant 12 m centre distance: gap 9.75 m, headway 9.75 / 8 = 1.22 s, first reached now
    assert quiet["interaction_risk"] == "Moderate risk: the vehicle in the ego path is 9.8 m ahead (1.2 s headway) now."


def test_hierarchical_segments_prefer_qa_and_skip_duplicates():
    segs = hierarchical_segments(coda_row(), TAX)
    skills = [s.skill for s in segs]
    # per-object QA replaces the summary; region answers are left to single items; suggestion split by sentence
    assert skills == ["vehicles", "traffic_cones", "other_objects", "longitudinal_control", "lateral_control", "rule_compliance"]
    assert segs[0].text == "A white bus ahead, slowing the ego car."
    assert scene_skills(coda_row(), TAX) == ["vehicles", "traffic_cones", "other_objects", "longitudinal_control",
                                             "lateral_control", "rule_compliance"]


def test_items_of_a_coda_row_and_skips():
    from datasets_cfg.skill_items import ItemReport

    rep = ItemReport()
    items = scene_items(coda_row(), TAX, report=rep)
    kinds = [(it["kind"], it["task"]) for it in items]
    assert kinds == [("hierarchical", "hierarchical"), ("single", "general"), ("single", "region"), ("single", "suggestion")]
    assert dict(rep.as_dict()["skipped"]) == {"qa without a question": 3}  # the per-object annotations
    region = items[2]
    assert region["spans"] == [{"start": 0, "end": len(region["target"]), "skill": "other_objects"}]
    general = items[1]
    assert [s["skill"] for s in general["spans"]] == ["vehicles", "traffic_cones"]


def test_annotate_pool_and_coverage(tmp_path):
    rows = [driving_row("a"), driving_row("b", qa=False, red_light=False), coda_row("c")]
    rows[1]["source"] = "real"
    pool, rep = annotate_pool(ScenePool.from_rows(rows), TAX)
    assert rep.qa_items == 4 + 6 and rep.qa_by_origin == {"category": 2 + 4, "task": 2 + 2}
    got = {r["id"]: r for r in pool.dataset}
    assert [q["skills"] for q in got["a"]["qa"]] == [["vehicles"], ["traffic_cones"], ["longitudinal_control", "lateral_control", "rule_compliance"], ["trajectory"]]
    assert "traffic_lights" in got["b"]["skills"] and got["b"]["qa"] == []
    vec = skill_vector(got["c"]["skills"], TAX)
    assert vec[TAX.id("perception")] == 1 and vec[TAX.id("prediction")] == 0 and vec[TAX.id("planning")] == 1

    table = {r["skill"]: r for r in coverage_table(pool, TAX, by="source")}
    assert table["perception"]["scenes"] == 3 and table["prediction"]["scenes"] == 2  # the CODA row has no agents
    assert table["traffic_lights"]["source=real"] == 1 and table["traffic_lights"]["source=synthetic"] == 1
    assert table["trajectory"]["scenes"] == 2 and table["trajectory"]["qa_items"] == 1
    assert table["other_objects"]["qa_items"] == 2 and table["vehicles"]["scene_fraction"] == 1.0
    md = write_coverage(list(table.values()), tmp_path / "cov.md").read_text()
    assert md.splitlines()[0].startswith("| skill | level | parent | scenes")
    csv = write_coverage(list(table.values()), tmp_path / "cov.csv").read_text().splitlines()
    assert len(csv) == 1 + len(TAX) and csv[0].split(",")[:4] == ["skill", "level", "parent", "scenes"]
    png = coverage_heatmap(list(table.values()), tmp_path / "cov.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_pool_items_counts_skips(tmp_path):
    rows = [driving_row("a"), coda_row("c")]
    rows[0]["qa"][0]["skills"] = ["teleporting"]
    rows.append(driving_row("b"))
    rows[2]["qa"][3]["answer"] = "Poses: [(4.0, 0.0), (8.0, zero), (12.0,"  # a segment that does not parse
    for q in rows[2]["qa"]:
        q["qid"] = "b-" + q["qid"]
    ds, rep = pool_items(ScenePool.from_rows(rows), TAX)
    d = rep.as_dict()
    assert d["items"] == {"hierarchical/hierarchical": 3, "single/general": 3, "single/region": 3, "single/suggestion": 3, "single/trajectory": 1}
    assert d["skipped"] == {"qa without a question": 3, "unknown skill name 'teleporting' (dropped)": 1, "trajectory answer does not parse": 1}
    assert d["skipped_examples"]["trajectory answer does not parse"] == ["b-b:trajectory"]
    assert len(ds) == 13 and set(ds["kind"]) == {"hierarchical", "single"}
    hier_b = ds[[i for i, k in enumerate(ds["item_id"]) if k == "b:hierarchical"][0]]
    assert "[trajectory] [(4.00, 0.00)" in hier_b["target"]  # the scene's own future still gives the trajectory
    with pytest.raises(UnknownSkillError, match="teleporting"):
        scene_items(rows[0], TAX, on_unknown="raise")


def test_cli_writes_annotated_pool(tmp_path, capsys):
    import argparse

    from datasets_cfg import skill_annotation

    ScenePool.from_rows([driving_row("a"), coda_row("c")]).save(tmp_path / "p")
    parser = argparse.ArgumentParser()
    skill_annotation.add_arguments(parser)
    args = parser.parse_args([str(tmp_path / "p"), "--out", str(tmp_path / "q"), "--coverage", str(tmp_path / "cov.csv")])
    assert skill_annotation.run(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["coverage"]["perception"] == 2 and out["annotation"]["qa_items"] == 10
    q = ScenePool.load(tmp_path / "q")
    assert all(r["skills"] for r in q.dataset) and (tmp_path / "cov.csv").exists()
    np.testing.assert_array_equal(sorted(q.ids), ["a", "c"])
