"""Scene-level behaviour of score_scenes: aggregation (EPDMS with/without EC, PDMS), the human filter, the
two simulation modes, bad input, and ground truth vs constant velocity on road scenes."""
import math

import numpy as np
import pytest

from eval.navsim import agents
from eval.navsim import fixtures as F
from eval.navsim.config import V2_COLUMNS
from eval.navsim.scorer import ReferenceCache, mean_score, score_scenes


def straight(v, y=0.0, n=8, dt=0.5):
    t = np.arange(1, n + 1) * dt
    return np.stack([v * t, np.full_like(t, y), 0 * t], -1)


def epdms(r, ec=True):
    w = 5 * r["ego_progress"] + 5 * r["time_to_collision_within_bound"] + 2 * r["lane_keeping"] + 2 * r["history_comfort"]
    mult = r["no_at_fault_collisions"] * r["drivable_area_compliance"] * r["driving_direction_compliance"] * r["traffic_light_compliance"]
    if ec:
        return mult * (w + 2 * r["two_frame_extended_comfort"]) / 16
    return mult * w / 14


# ----------------------------------------------------------------------------------------------
# EC and the aggregates


def test_ec_with_and_without_previous_frame():
    log = F.log_scenes(2, ego=F.constant_accel(speed=10.0))  # frames 0.5 s apart in one log
    preds = agents.constant_velocity(log)
    both = score_scenes(log, preds)
    assert math.isnan(both[0]["two_frame_extended_comfort"])  # first frame: no earlier one
    assert both[1]["two_frame_extended_comfort"] == 1.0
    assert both[0]["score"] == pytest.approx(epdms(both[0], ec=False))  # weights sum to 14
    assert both[1]["score"] == pytest.approx(epdms(both[1], ec=True))  # weights sum to 16
    alone = score_scenes(log[1:], preds)[0]  # the earlier frame is not scored: EC unavailable
    assert math.isnan(alone["two_frame_extended_comfort"]) and alone["score"] == pytest.approx(epdms(alone, ec=False))


def test_ec_fails_when_consecutive_plans_disagree():
    log = F.log_scenes(2, ego=F.constant_accel(speed=10.0))
    t = np.arange(1, 9) * 0.5
    preds = {log[0].id: np.stack([10 * t - 1.5 * t**2, 0 * t, 0 * t], -1), log[1].id: straight(10.0)}  # brake, then cruise
    r = score_scenes(log, preds)[1]
    assert r["two_frame_extended_comfort"] == 0.0
    assert r["score"] == pytest.approx(epdms(r, ec=True))


def test_ec_needs_the_same_log():
    a = F.road_scene("a", log_name="logA", timestamp_s=0.0)
    b = F.road_scene("b", log_name="logB", timestamp_s=0.5)
    rows = score_scenes([a, b], agents.constant_velocity([a, b]))
    assert all(math.isnan(r["two_frame_extended_comfort"]) for r in rows)


def test_pdms_formula():
    s = F.road_scene("p", agents=[F.vehicle("c", 25, 0, category="traffic_cone", length=0.5, width=0.5)])
    r = score_scenes([s], {"p": straight(10)}, metric="pdms", tracking=False)[0]
    assert r["metric"] == "pdms" and r["no_at_fault_collisions"] == 0.5
    expect = r["no_at_fault_collisions"] * r["drivable_area_compliance"] * (5 * r["time_to_collision_within_bound"] + 5 * r["ego_progress"] + 2 * r["comfort"]) / 12
    assert r["score"] == pytest.approx(expect)
    assert math.isnan(r["lane_keeping"]) and math.isnan(r["traffic_light_compliance"])  # not part of v1


# ----------------------------------------------------------------------------------------------
# human filter


def drifting_ego(y_end=-0.9, speed=10.0):
    def fn(t):
        t = np.asarray(t, float)
        y = np.where(t > 0, np.minimum(t / 2.0, 1.0) * y_end, 0.0)
        return speed * t, y, np.zeros_like(t), np.full_like(t, speed), np.zeros_like(t)

    return fn


def test_human_filter_lifts_what_the_human_also_fails_and_recomputes_the_score():
    # one-lane road; the logged human drifts so far right that a corner leaves the road: DAC 0 for the human
    s = F.road_scene("hf", lanes=1, ego=drifting_ego())
    agent = s.future_trajectory()  # the agent does the same
    off = score_scenes([s], {"hf": agent}, human_filter=False)[0]
    on = score_scenes([s], {"hf": agent}, human_filter=True)[0]
    assert off["drivable_area_compliance"] == 0.0 and off["score"] == 0.0
    assert on["drivable_area_compliance"] == 1.0
    assert "drivable_area_compliance" in on["human_filter_lifted"].split(",")
    assert on["score"] == pytest.approx(epdms(on, ec=False)) and on["score"] > 0.5


def test_human_filter_keeps_failures_the_human_does_not_make():
    s = F.road_scene("hf2", lanes=1)  # the human stays centred
    r = score_scenes([s], {"hf2": straight(10, y=-0.9)}, human_filter=True)[0]
    assert r["drivable_area_compliance"] == 0.0 and r["score"] == 0.0 and r["human_filter_lifted"] == ""


def test_human_filter_only_for_real_scenes():
    s = F.road_scene("hf3", lanes=1, ego=drifting_ego(), source="synthetic")
    r = score_scenes([s], {"hf3": s.future_trajectory()}, human_filter=True)[0]
    assert r["drivable_area_compliance"] == 0.0 and r["human_filter_lifted"] == ""


# ----------------------------------------------------------------------------------------------
# modes, caching


def test_rows_say_which_mode_produced_them():
    s = F.road_scene("m")
    lqr = score_scenes([s], {"m": straight(10)}, tracking=True)[0]
    given = score_scenes([s], {"m": straight(10)}, tracking=False)[0]
    assert lqr["tracking"] == "lqr" and given["tracking"] == "as_given"
    assert lqr["progress_m"] == pytest.approx(given["progress_m"], abs=0.05)  # a straight line is tracked exactly


def test_reference_cache_gives_identical_rows():
    scenes = [F.road_scene(f"c{i}", agents=[F.vehicle("a", 30 + 5 * i, 3.5, vx=8)]) for i in range(3)]
    preds = agents.human(scenes)
    cache = ReferenceCache()
    first = score_scenes(scenes, preds, reference_cache=cache)
    assert any(k[0] == "pdm_closed" for k in cache)
    again = score_scenes(scenes, preds, reference_cache=cache)
    fresh = score_scenes(scenes, preds)
    for a, b, c in zip(first, again, fresh):
        assert a["score"] == b["score"] == c["score"]


# ----------------------------------------------------------------------------------------------
# bad input


def test_bad_predictions_give_invalid_rows_with_reasons():
    scenes = [F.road_scene(f"b{i}") for i in range(4)]
    preds = {"b0": straight(10)[:6], "b1": np.where(np.arange(24).reshape(8, 3) == 7, np.nan, straight(10)), "b3": straight(10)}
    rows = score_scenes(scenes, preds)
    assert [r["valid"] for r in rows] == [False, False, False, True]
    assert "6 poses; expected 8" in rows[0]["reason"]
    assert "non-finite" in rows[1]["reason"] and "pose 2" in rows[1]["reason"]
    assert rows[2]["reason"] == "no prediction for this scene"
    for r in rows[:3]:
        assert r["score"] == 0.0 and all(math.isnan(r[c]) for c in V2_COLUMNS)
    assert mean_score(rows) == pytest.approx(rows[3]["score"] / 4)  # invalid rows count as 0
    assert mean_score(rows, valid_only=True) == pytest.approx(rows[3]["score"])


def test_scene_without_map_is_an_invalid_row():
    s = F.road_scene("nomap", with_map=False)
    r = score_scenes([s], {"nomap": straight(10)})[0]
    assert not r["valid"] and "no map geometry" in r["reason"] and r["score"] == 0.0


def test_unknown_metric_is_an_error():
    with pytest.raises(ValueError, match="metric"):
        score_scenes([], {}, metric="epdms_v3")


# ----------------------------------------------------------------------------------------------
# ground truth vs constant velocity


def road_scenes():
    """Road scenes where the human brakes for slower traffic, stops at a red light, follows, or cruises;
    4 logs x 4 frames (0.5 s apart, so EC applies)."""
    out = []
    slow_lead = lambda t0: [F.vehicle("lead", 25 + 4.0 * t0, 0.0, vx=4.0), F.vehicle("left", 10 + 8.0 * t0, 3.5, vx=8.0)]  # noqa: E731
    out += F.log_scenes(4, ego=decelerate(10.0, 4.0, 2.0), agents_fn=slow_lead, log_name="brake", lanes=2)
    reds = [(0, t) for t in np.arange(-1.5, 5.01, 0.5)]
    out += F.log_scenes(4, ego=decelerate(10.0, 0.0, 100 / 70), log_name="red", lanes=2, connectors=[(40, 60)], red_lights=reds)
    out += F.log_scenes(4, ego=F.constant_accel(speed=8.0), agents_fn=lambda t0: [F.vehicle("lead", 25 + 8.0 * t0, 0.0, vx=8.0)], log_name="follow", lanes=2)
    out += F.log_scenes(4, ego=F.constant_accel(speed=12.0, accel=0.5), log_name="cruise", lanes=3)
    return out


def decelerate(v0, v1, a):
    """Ego braking smoothly from v0 to v1 at `a` m/s^2 (with jerk-limited ends), then holding v1."""
    def fn(t):
        t = np.asarray(t, float)
        tb = (v0 - v1) / a
        v = np.clip(v0 - a * np.clip(t, 0, None), v1, v0)
        v = np.where(t < 0, v0, v)
        x = np.where(t < 0, v0 * t, np.where(t < tb, v0 * t - 0.5 * a * t**2, v0 * tb - 0.5 * a * tb**2 + v1 * (t - tb)))
        acc = np.where((t >= 0) & (t < tb), -a, 0.0)
        return x, np.zeros_like(t), np.zeros_like(t), v, acc

    return fn


def test_ground_truth_scores_high_and_constant_velocity_clearly_lower_on_road_scenes():
    scenes = road_scenes()
    cache = ReferenceCache()
    gt = mean_score(score_scenes(scenes, agents.human(scenes), reference_cache=cache))
    cv = mean_score(score_scenes(scenes, agents.constant_velocity(scenes), reference_cache=cache))
    assert gt >= 0.9
    assert cv <= gt - 0.15


def test_scores_do_not_depend_on_batching_or_processes():
    scenes = road_scenes()
    preds = agents.constant_velocity(scenes)
    one = score_scenes(scenes, preds)
    two = score_scenes(scenes, preds, workers=2)
    few = [r for k in range(0, len(scenes), 4) for r in score_scenes(scenes[k:k + 4], preds)]  # logs of 4 frames each
    for a, b, c in zip(one, two, few):
        assert a["score"] == b["score"] == c["score"]
        assert a["progress_normaliser_m"] == b["progress_normaliser_m"] == c["progress_normaliser_m"]
