"""Two-stage (navhard) EPDMS against the official rule, derived by hand.

Official code: autonomousvision/navsim at 0a380a9 (v2.2). "agg" = navsim/planning/simulation/planner/pdm_planner/
scoring/scene_aggregator.py, "run" = navsim/planning/script/run_pdm_score.py.

The scene set used end to end (all on one straight 3-lane road, ego lane y = 0, speed limit 5 m/s):
- stage 1: one log, frames 0.5 s apart at 10 m/s: prev = L_000 (rear axle x = 0), now = L_001 (x = 5).
- stage 2: three synthetic pairs, offset d = 0, 0.3, 1.0 m: the pair's "now" scene starts at x = 45 + d, its
  "prev" companion 0.5 s earlier at x = 40 + d. Pair d = 0.3 has a stopped car at x = 60.3 in the ego lane.
- every plan is constant velocity (8 x 0.5 s at 10 m/s): the stage-1 endpoints are x = 45 (now) and 40 (prev).
"""
import csv
import json
import math

import numpy as np
import pytest

from datasets_cfg.schema import ScenePool
from eval.navsim import agents
from eval.navsim import fixtures as F
from eval.navsim.scorer import score_scenes
from eval.navsim.two_stage import (MappingEntry, TwoStageError, aggregate_groups, csv_columns, parse_mapping, pseudo_closed_loop_weights,
                                   read_mapping, score_two_stage, write_two_stage_csv)

OFFSETS = (0.0, 0.3, 1.0)
E45, E5 = math.exp(-0.45), math.exp(-5.0)
Z = 1.0 + E45 + E5


# ----------------------------------------------------------------------------------------------
# the weighting rule alone


def test_weights_are_the_normalised_gaussian_kernel():
    # agg:28-45: w = exp(-d² / (2 σ²)) with σ² = 0.1 (agg:18), divided by the sum.
    # d² = 0, 0.09, 1  ->  exp(0) = 1, exp(-0.09 / 0.2) = exp(-0.45), exp(-1 / 0.2) = exp(-5)
    w = pseudo_closed_loop_weights([0.0, 0.0], [[0.0, 0.0], [0.3, 0.0], [0.0, 1.0]])
    assert w == pytest.approx([1 / Z, E45 / Z, E5 / Z], rel=1e-12)
    # 0.3 m off is already a 36 % weight cut; 1 m off weighs 0.7 % of a perfect match


def test_weights_fall_back_to_uniform_when_the_sum_is_zero_or_nan():
    # agg:42-43: np.isclose(sum, 0.0) (atol 1e-8) or NaN -> 1 / n each.
    # 100 m away: exp(-10000 / 0.2) underflows to 0 -> uniform
    assert pseudo_closed_loop_weights([0, 0], [[100, 0], [0, 100], [-100, 0]]) == pytest.approx([1 / 3] * 3)
    # kernel values 6e-9 and 3e-9: sum 9e-9 <= 1e-8 counts as zero -> [1/2, 1/2], not the normalised [2/3, 1/3]
    d = [math.sqrt(-0.2 * math.log(6e-9)), math.sqrt(-0.2 * math.log(3e-9))]
    assert pseudo_closed_loop_weights([0, 0], [[d[0], 0], [d[1], 0]]) == pytest.approx([0.5, 0.5])
    # a missing stage-1 plan (NaN endpoint, the devkit's empty row) -> NaN distances -> uniform
    assert pseudo_closed_loop_weights([np.nan, np.nan], [[0, 0], [1, 0]]) == pytest.approx([0.5, 0.5])


def test_group_aggregation_by_hand():
    # run:256-290, one column ("score"):
    # entry A: s1(now) = 0.9, S2(now) = 0.75 * 1.0 + 0.25 * 0.5 = 0.875  -> g1 = 0.7875
    #          s1(prev) = 0.8, S2(prev) = 0.5 * 0.0 + 0.5 * 1.0 = 0.5     -> g2 = 0.4      -> (g1 + g2) / 2 = 0.59375
    # entry B: s1(now) = 1.0, S2(now) = 0.2 -> 0.2; s1(prev) = NaN (invalid) -> g2 NaN -> the entry is NaN
    # combined = NaN-skipping mean over entries (pandas .mean(), run:287) = 0.59375
    # stage one = mean(0.9, 0.8, 1.0, NaN) = 0.9; stage two = mean(0.875, 0.5, 0.2, 0.4) = 0.49375
    v = {"a": 0.9, "ap": 0.8, "a1": 1.0, "a2": 0.5, "ap1": 0.0, "ap2": 1.0, "b": 1.0, "bp": math.nan, "b1": 0.2, "bp1": 0.4}
    w = {"a": 1.0, "ap": 1.0, "a1": 0.75, "a2": 0.25, "ap1": 0.5, "ap2": 0.5, "b": 1.0, "bp": 1.0, "b1": 1.0, "bp1": 1.0}
    entries = [MappingEntry("a", "ap", (("a1", "ap1"), ("a2", "ap2"))), MappingEntry("b", "bp", (("b1", "bp1"),))]
    out = aggregate_groups({k: np.array([x]) for k, x in v.items()}, w, entries)
    assert out["combined"][0] == pytest.approx(0.59375)
    assert out["stage_one"][0] == pytest.approx(0.9)
    assert out["stage_two"][0] == pytest.approx(0.49375)


# ----------------------------------------------------------------------------------------------
# end to end on hand-built scenes


def build_scenes():
    scenes = list(F.log_scenes(2, ego=F.constant_accel(speed=10.0), log_name="L", speed_limit=5.0))
    pairs = []
    for d in OFFSETS:
        agents_fn = (lambda t0: [F.vehicle("stopped", 60.3, 0.0)]) if d == 0.3 else None
        syn = F.log_scenes(2, ego=F.constant_accel(x0=40.0 + d, speed=10.0), log_name=f"syn{d}", source="synthetic", speed_limit=5.0,
                           agents_fn=agents_fn)
        scenes += syn
        pairs.append((syn[1].id, syn[0].id))  # (starts 4 s after `now`, starts 4 s after `prev`)
    return scenes, [MappingEntry("L_001", "L_000", tuple(pairs))]


@pytest.fixture(scope="module")
def setup():
    scenes, entries = build_scenes()
    plans = agents.constant_velocity(scenes)
    return scenes, entries, plans, score_two_stage(scenes, plans, entries)


def test_weights_scores_and_summary_end_to_end(setup):
    scenes, entries, plans, res = setup
    by = {r["token"]: r for r in res.rows}
    # stage-1 rows weigh 1 (agg:89-90); both groups see offsets 0, 0.3, 1 m from the endpoint (45 vs 45 + d for
    # `now`, 40 vs 40 + d for `prev`), so both get [1, e^-0.45, e^-5] / Z
    assert by["L_001"]["weight"] == by["L_000"]["weight"] == 1.0
    for d, w in zip(OFFSETS, (1 / Z, E45 / Z, E5 / Z)):
        assert by[f"syn{d}_001"]["weight"] == pytest.approx(w, rel=1e-9)
        assert by[f"syn{d}_000"]["weight"] == pytest.approx(w, rel=1e-9)
    # constant velocity on an empty straight road, PDM-Closed slower (speed limit 5 m/s, so EP clips to 1): every
    # sub-metric 1, score 1; the pair with the stopped car 15 m ahead collides head on: NC 0, score 0
    for r in res.rows:
        assert r["valid"] and r["two_frame_extended_comfort"] == 1.0  # EC by mapping pair, synthetic rows included
        crash = r["token"].startswith("syn0.3")
        assert r["no_at_fault_collisions"] == (0.0 if crash else 1.0)
        assert r["score"] == (0.0 if crash else pytest.approx(1.0))
    # run:279-290: S2 = (1 * 1 + e^-0.45 * 0 + e^-5 * 1) / Z = 0.6122346768, for `now` and `prev` alike;
    # combined = (1 * S2 + 1 * S2) / 2 = S2; stage one = 1; stage two = S2
    s2 = (1.0 + E5) / Z
    assert s2 == pytest.approx(0.6122346768, abs=1e-10)
    summ = {r["token"]: r for r in res.summary}
    assert [r["token"] for r in res.summary] == ["extended_pdm_score_stage_one", "extended_pdm_score_stage_two", "extended_pdm_score_combined"]
    assert summ["extended_pdm_score_combined"]["score"] == pytest.approx(s2, rel=1e-9)
    assert summ["extended_pdm_score_combined"]["score_valid_only"] == pytest.approx(s2, rel=1e-9)
    assert summ["extended_pdm_score_stage_one"]["score"] == pytest.approx(1.0)
    assert summ["extended_pdm_score_stage_two"]["score"] == pytest.approx(s2, rel=1e-9)
    # the sub-metric columns aggregate the same way: NC of stage two is the weighted mean of 1, 0, 1
    assert summ["extended_pdm_score_stage_two"]["no_at_fault_collisions_stage_two"] == pytest.approx(s2, rel=1e-9)
    assert summ["extended_pdm_score_combined"]["no_at_fault_collisions_stage_one"] == pytest.approx(1.0)
    assert all(r["valid"] for r in res.summary) and res.unmapped_scenes == 0
    # one-stage scoring pairs original frames only (run_pdm_score_one_stage.py:142): the synthetic rows had no EC
    one = {r["token"]: r for r in score_scenes(scenes, plans)}
    assert math.isnan(one["syn0.0_001"]["two_frame_extended_comfort"])


def test_ec_compares_the_two_runs_of_a_mapping_pair(setup):
    scenes, entries, plans, _ = setup
    t = np.arange(1, 9) * 0.5
    plans = dict(plans, **{"syn1.0_000": np.stack([10 * t - 1.5 * t**2, 0 * t, 0 * t], -1)})  # the 3.5 s companion brakes
    by = {r["token"]: r for r in score_two_stage(scenes, plans, entries).rows}
    # agg:111-122: the pair's EC is set on both of its rows; the other pairs keep 1
    assert by["syn1.0_001"]["two_frame_extended_comfort"] == 0.0 and by["syn1.0_000"]["two_frame_extended_comfort"] == 0.0
    assert by["syn0.0_001"]["two_frame_extended_comfort"] == 1.0
    r = by["syn1.0_001"]  # its own run is unchanged (score 1 before): now (5 + 5 + 2 + 2 + 0) / 16 = 0.875
    assert r["score"] == pytest.approx(14 / 16)


def test_a_missing_stage_two_plan_and_a_missing_stage_one_plan(setup):
    scenes, entries, plans, _ = setup
    res = score_two_stage(scenes, {k: v for k, v in plans.items() if k != "syn0.0_001"}, entries)
    by = {r["token"]: r for r in res.rows}
    assert not by["syn0.0_001"]["valid"]
    # its companion loses EC (NaN): weights /14, still 1 here
    assert math.isnan(by["syn0.0_000"]["two_frame_extended_comfort"]) and by["syn0.0_000"]["score"] == pytest.approx(1.0)
    combined = res.summary[2]
    # ours, invalid = 0: S2(now) = (0 + 0 + e^-5) / Z, S2(prev) = (1 + e^-5) / Z, combined = their mean
    assert combined["score"] == pytest.approx((E5 / Z + (1 + E5) / Z) / 2, rel=1e-9)
    # official: the NaN row makes the `now` group, hence the only entry, NaN; the run is marked invalid
    assert math.isnan(combined["score_valid_only"]) and not combined["valid"] and combined["invalid_rows"] == 1

    res = score_two_stage(scenes, {k: v for k, v in plans.items() if k != "L_001"}, entries)
    by = {r["token"]: r for r in res.rows}
    # no stage-1 plan: NaN endpoint -> uniform 1/3 weights for its stage-2 scenes (agg:42-43); the `prev` group keeps its own
    assert [by[f"syn{d}_001"]["weight"] for d in OFFSETS] == pytest.approx([1 / 3] * 3)
    assert by["syn0.0_000"]["weight"] == pytest.approx(1 / Z)
    # ours: g1 = 0 * S2(now) = 0, g2 = 1 * (1 + e^-5) / Z
    assert res.summary[2]["score"] == pytest.approx((1 + E5) / Z / 2, rel=1e-9)


# ----------------------------------------------------------------------------------------------
# the mapping file and its errors


def test_reads_the_devkit_train_test_split_yaml(tmp_path):
    # the layout of navsim/planning/script/config/common/train_test_split/navhard_two_stage.yaml
    p = tmp_path / "navhard_two_stage.yaml"
    p.write_text("defaults:\n- scene_filter: navhard_two_stage\ndata_split: test\nreactive_all_mapping:\n"
                 "- - '4a919f7ea2f65200'\n  - 'd715fbc6ea0551f8'\n  - - - '5421fa2f2e2b4cb13'\n      - '5634addd2134d1453'\n"
                 "    - - '13aeb83dad95704fa'\n      - '7d4dd35efebf5aa8f'\n")
    assert read_mapping(p) == [MappingEntry("4a919f7ea2f65200", "d715fbc6ea0551f8",
                                            (("5421fa2f2e2b4cb13", "5634addd2134d1453"), ("13aeb83dad95704fa", "7d4dd35efebf5aa8f")))]
    j = tmp_path / "m.json"
    j.write_text(json.dumps([["a", "b", [["c", "d"]]]]))
    assert read_mapping(j) == [MappingEntry("a", "b", (("c", "d"),))]


@pytest.mark.parametrize("data, message", [
    ({"data_split": "test"}, "no 'reactive_all_mapping' key"),
    ([["a", "b", []]], "no stage-2 pairs"),
    ([["a", "b", [["c"]]]], "reactive_all_mapping[0][2][0]: expected a pair"),
    ([["a", 3, [["c", "d"]]]], "reactive_all_mapping[0]: expected [now_token"),
])
def test_bad_mappings_are_clear_errors(data, message):
    with pytest.raises(TwoStageError) as exc:
        parse_mapping(data, "m.json")
    assert message in str(exc.value) and str(exc.value).startswith("m.json")


def test_inconsistent_scene_sets_are_clear_errors(setup):
    scenes, entries, plans, _ = setup
    e = entries[0]
    with pytest.raises(TwoStageError, match="not among the scenes"):
        score_two_stage([s for s in scenes if s.id != "syn1.0_000"], plans, entries)
    with pytest.raises(TwoStageError, match="already used"):
        score_two_stage(scenes, plans, [e, MappingEntry("L_001", "L_000", e.stage_two[:1])])
    swapped = MappingEntry(e.stage_two[0][0], e.stage_two[0][1], ((e.now, e.prev),))  # stage roles reversed
    with pytest.raises(TwoStageError, match="expected 'real'"):
        score_two_stage(scenes, plans, [swapped])
    backwards = MappingEntry(e.prev, e.now, e.stage_two)  # `prev` starts after `now`: the devkit's gap assertion (agg:62)
    with pytest.raises(TwoStageError, match="start times"):
        score_two_stage(scenes, plans, [backwards])
    with pytest.raises(TwoStageError, match="no mapping entry refers"):
        score_two_stage(scenes, plans, [MappingEntry("x", "y", (("z", "w"),))])


# ----------------------------------------------------------------------------------------------
# the CSV and the command


# run:394-422: score_cols = the PDMResults fields + two_frame_extended_comfort + score (pdm_score excluded), split into
# _stage_one / _stage_two by frame type, then ["token", "valid"] + stage-one + stage-two + ["score"]
OFFICIAL_COLUMNS = [
    "token", "valid",
    "no_at_fault_collisions_stage_one", "drivable_area_compliance_stage_one", "driving_direction_compliance_stage_one",
    "traffic_light_compliance_stage_one", "ego_progress_stage_one", "time_to_collision_within_bound_stage_one",
    "lane_keeping_stage_one", "history_comfort_stage_one", "two_frame_extended_comfort_stage_one",
    "no_at_fault_collisions_stage_two", "drivable_area_compliance_stage_two", "driving_direction_compliance_stage_two",
    "traffic_light_compliance_stage_two", "ego_progress_stage_two", "time_to_collision_within_bound_stage_two",
    "lane_keeping_stage_two", "history_comfort_stage_two", "two_frame_extended_comfort_stage_two",
    "score",
]


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_csv_has_the_official_two_stage_layout(setup, tmp_path):
    _, _, _, res = setup
    out = write_two_stage_csv(tmp_path / "s.csv", res)
    rows = read_csv(out)
    assert csv_columns() == OFFICIAL_COLUMNS
    assert list(rows[0])[:len(OFFICIAL_COLUMNS)] == OFFICIAL_COLUMNS
    assert [r["token"] for r in rows[-3:]] == ["extended_pdm_score_stage_one", "extended_pdm_score_stage_two", "extended_pdm_score_combined"]
    by = {r["token"]: r for r in rows}
    # run:407-416: a stage-1 row fills the _stage_one columns only, a stage-2 row the _stage_two ones
    assert by["L_001"]["ego_progress_stage_one"] == "1.0" and by["L_001"]["ego_progress_stage_two"] == ""
    assert by["syn0.3_001"]["no_at_fault_collisions_stage_two"] == "0.0" and by["syn0.3_001"]["no_at_fault_collisions_stage_one"] == ""
    assert by["extended_pdm_score_stage_one"]["ego_progress_stage_two"] == ""  # run:426-433
    assert by["extended_pdm_score_combined"]["lane_keeping_stage_one"] != "" and by["extended_pdm_score_combined"]["lane_keeping_stage_two"] != ""
    assert float(by["extended_pdm_score_combined"]["score"]) == pytest.approx((1 + E5) / Z)
    assert float(by["syn0.3_001"]["weight"]) == pytest.approx(E45 / Z)


def test_cli_two_stage(tmp_path, capsys):
    from pipelines.cli import main

    scenes, entries = build_scenes()
    ScenePool.from_rows([s.row for s in scenes[:2]]).save(tmp_path / "stage1")
    ScenePool.from_rows([s.row for s in scenes[2:]]).save(tmp_path / "stage2")
    mapping = tmp_path / "m.json"
    mapping.write_text(json.dumps({"reactive_all_mapping": [[e.now, e.prev, [list(p) for p in e.stage_two]] for e in entries]}))
    out = tmp_path / "s.csv"
    args = ["eval", "navsim", "--pool", str(tmp_path / "stage1"), "--stage-two-pool", str(tmp_path / "stage2"), "--two-stage", str(mapping),
            "--agent", "constant_velocity", "--out", str(out), "--no-progress"]
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["score"] == pytest.approx((1 + E5) / Z, abs=1e-6) and summary["score_official"] == summary["score"]
    assert summary["entries"] == 1 and summary["scenes"] == 8 and summary["invalid"] == 0
    assert list(read_csv(out)[0])[:len(OFFICIAL_COLUMNS)] == OFFICIAL_COLUMNS
    # a stage-2 scene missing (no --stage-two-pool): a clear error, no CSV
    out2 = tmp_path / "t.csv"
    assert main(args[:4] + args[6:8] + ["--agent", "constant_velocity", "--out", str(out2), "--no-progress"]) == 2
    assert "not among the scenes" in capsys.readouterr().err and not out2.exists()
    assert main(args + ["--metric", "pdms"]) == 2
    assert "EPDMS (NAVSIM v2) only" in capsys.readouterr().err
