"""Issue #18: the rules where our scorer used to differ from the official devkit (autonomousvision/navsim at
0a380a9 = v2.2, and motional/nuplan-devkit), one hand-built scene per rule. Each expected value is derived here
from the official rule (file:line cited), never read off our own output.

Geometry as in tests/test_navsim_metrics.py: lanes 3.5 m wide along +x, lane 0 centred on y = 0, road from
y = -1.75 to 8.75 (3 lanes); ego = Pacifica (2.297 m wide, front 4.049 m / rear 1.127 m from the rear axle, box
centre 1.461 m ahead of it). Scenes are scored as given (tracking=False) so the ego is where the poses say.
Where EP would depend on PDM-Closed's IDM plan, its reference poses are put in the ReferenceCache by hand
(the devkit's metric cache holds the same thing: metric_cache.trajectory), so the normaliser is known exactly.
"""
import json
import math

import numpy as np
import pytest

from common.geometry import local_to_global
from datasets_cfg.schema import Scene, validate_row
from eval.navsim import aggregate
from eval.navsim import fixtures as F
from eval.navsim.config import DEFAULT, STEER, VY, YAW_ACCEL, YAW_RATE
from eval.navsim.context import SceneContext
from eval.navsim.scorer import ReferenceCache, average_row, score_scenes
from eval.navsim.simulate import interpolate_poses


def straight(v, y=0.0, n=8, dt=0.5):
    t = np.arange(1, n + 1) * dt
    return np.stack([v * t, np.full_like(t, y), 0 * t], -1)


def pdm_reference(scene, poses, interval=0.5):
    """A ReferenceCache whose PDM-Closed reference for `scene` is `poses` (ego frame, N x `interval`)."""
    glob = local_to_global(interpolate_poses(np.asarray(poses, float)[None], interval, 40, 0.1)[0], scene.ego_pose())
    return ReferenceCache({("pdm_closed", scene.id, "v2", DEFAULT): glob})


def score(scene, poses, cache=None, **kw):
    kw.setdefault("human_filter", False)
    kw.setdefault("tracking", False)
    return score_scenes([scene], {scene.id: np.asarray(poses, float)}, reference_cache=cache, **kw)[0]


def with_meta(scene, **extra):
    row = dict(scene.row)
    row["meta"] = json.dumps({**json.loads(row["meta"]), **extra})
    validate_row(row, "test")
    return Scene(row)


def with_area(scene, area_id, kind, polygon):
    row = dict(scene.row)
    row["map"] = dict(row["map"], areas=list(row["map"]["areas"]) + [{"id": area_id, "kind": kind, "polygon": polygon}])
    validate_row(row, "test")
    return Scene(row)


# ----------------------------------------------------------------------------------------------
# 1. EP = clip(raw / max(raw x product), 0, 1)  (navsim .../scoring/pdm_scorer.py:229-238, since v2.1)


def test_ep_formula_on_hand_numbers():
    # normaliser = max(10 * 1, 40 * 0.5) = 20 -> EP = [10/20, clip(40/20)] = [0.5, 1]
    np.testing.assert_allclose(aggregate.normalise_progress(np.array([10.0, 40.0]), np.array([1.0, 0.5]), 5.0), [0.5, 1.0])
    # normaliser = max(3, 0) = 3 <= 5 m -> all ones, the product-0 run included
    np.testing.assert_array_equal(aggregate.normalise_progress(np.array([3.0, 4.0]), np.array([1.0, 0.0]), 5.0), [1.0, 1.0])


def test_pdms_keeps_the_v1_1_formula():
    # PDMS (v1) is scored as v1.1 (pdm_scorer.py at tag v1.1, lines 165-173): EP = raw x product / max(raw x product).
    # raw [40, 30], product [0.5, 1]: masked [20, 30] -> v1 EP [20/30, 1]; v2 EP [clip(40/30), 30/30] = [1, 1]
    raw, prod = np.array([40.0, 30.0]), np.array([0.5, 1.0])
    np.testing.assert_allclose(aggregate.normalise_progress(raw, prod, 5.0, "v1"), [2 / 3, 1.0])
    np.testing.assert_allclose(aggregate.normalise_progress(raw, prod, 5.0, "v2"), [1.0, 1.0])
    # below the threshold v1.1 gives 0 to a product-0 run, v2 gives 1
    np.testing.assert_array_equal(aggregate.normalise_progress(np.array([3.0, 4.0]), np.array([1.0, 0.0]), 5.0, "v1"), [1.0, 0.0])


def test_cone_on_the_road():
    # A cone (static object) at x = 40 in the ego lane. The agent keeps 10 m/s: rear axle 0 -> 40 m, it hits the
    # cone (static -> NC 0.5) and the cone is dead ahead (TTC 0). PDM-Closed's reference drives 7 m/s and stops short
    # (front at 28 + 4.049 < 39.75): raw 28 m, product 1. Normaliser = max(28 * 1, 40 * 0.5) = 28, so
    # EP = clip(40 / 28, 0, 1) = 1 (the v2.0 formula gave 40 * 0.5 / 28 = 0.714). LK = HC = 1, no EC (single frame):
    # score = 0.5 * (5 * 1 + 5 * 0 + 2 + 2) / 14 = 0.32142857.
    s = F.road_scene("cone", agents=[F.vehicle("cone", 40.0, 0.0, category="traffic_cone", length=0.5, width=0.5)])
    r = score(s, straight(10), pdm_reference(s, straight(7)))
    assert r["no_at_fault_collisions"] == 0.5 and r["time_to_collision_within_bound"] == 0.0
    assert r["progress_m"] == pytest.approx(40.0) and r["progress_normaliser_m"] == pytest.approx(28.0)
    assert r["ego_progress"] == 1.0
    assert r["score"] == pytest.approx(0.5 * 9 / 14)


# ----------------------------------------------------------------------------------------------
# 2. the human is scored alone, so its EP is 1 and never lifts the agent's (navsim/evaluate/pdm_score.py:171-219)


def off_road_ego(speed):
    """Logged ego at `speed` along lane 0 that drifts right to y = -1.5 during the first second (corners at
    y = -2.65 < -1.75: off the drivable area), heading 0."""
    def fn(t):
        t = np.asarray(t, float)
        y = -1.5 * np.clip(t, 0.0, 1.0)
        return speed * t, y, 0 * t, np.full_like(t, speed), 0 * t

    return fn


def test_human_leaving_the_drivable_area():
    # Human and agent drive the same path at 6.5 m/s: 26 m of progress, off the drivable area (DAC 0) and > 0.5 m
    # off the centreline from t = 0.4 s on (LK 0). PDM-Closed's reference: 10 m/s straight, raw 40 m, product 1.
    # Agent (scored with PDM-Closed, pdm_score.py:159): product 0 -> normaliser = max(40, 26 * 0) = 40, EP = 26/40 = 0.65.
    # Human (scored alone, :182-190): normaliser = 26 * 0 = 0 <= 5 -> EP 1, DAC 0, LK 0 -> the agent's DAC and LK are
    # set to 1; EP stays 0.65 (our old code set the human's EP to 0 and so lifted the agent's to 1: score 1.0).
    # Score = (5 * 0.65 + 5 + 2 + 2) / 14 = 0.875.
    s = F.road_scene("hf", ego=off_road_ego(6.5))
    r = score(s, s.future_trajectory(), pdm_reference(s, straight(10)), human_filter=True)
    assert set(r["human_filter_lifted"].split(",")) == {"drivable_area_compliance", "lane_keeping"}
    assert r["ego_progress"] == pytest.approx(0.65)
    assert r["score"] == pytest.approx((5 * 0.65 + 9) / 14)


# ----------------------------------------------------------------------------------------------
# 3. NC: an agent at <= 0.05 m/s is stopped -> at fault (nuplan .../idm/utils.py:191-202; pdm_scorer_utils.py:44)


@pytest.mark.parametrize("creep, nc", [(0.03, 0.0), (0.08, 1.0)])
def test_reversing_into_a_creeping_car(creep, nc):
    # The ego (stopped in the log) reverses at 2 m/s; a car behind creeps forward. Its front (-10 + 2.25 + creep t)
    # meets the ego's rear bumper (-1.127 - 2 t) at t ~ 3.3 s. The ego moves (2 m/s > 0.05), the car is > 150 deg
    # off the ego heading (a rear collision) -- not at fault UNLESS the car counts as stopped: at 0.03 m/s it does
    # (<= 0.05) -> NC 0, score 0; at 0.08 m/s it does not -> NC 1.
    s = F.road_scene(f"rev{creep}", ego=F.constant_accel(speed=0.0), agents=[F.vehicle("a", -10.0, 0.0, vx=creep)])
    r = score(s, straight(-2.0), pdm_reference(s, np.zeros((8, 3))))
    assert r["no_at_fault_collisions"] == nc
    if nc == 0.0:
        assert r["score"] == 0.0


# ----------------------------------------------------------------------------------------------
# 4. TTC: "ahead" is within 30 deg (nuplan .../idm/utils.py:33-41, called at pdm_scorer.py:566)


@pytest.mark.parametrize("angle_deg, ttc", [(24.0, 0.0), (34.0, 1.0)])
def test_pedestrian_stepping_into_the_side(angle_deg, ttc):
    # Ego at 1 m/s along y = 0 (left side at y = 1.1485). A 0.6 m pedestrian at fixed x_p walks right at 0.5 m/s
    # from y = 2.44: it first overlaps the ego box at t = 2.0 s (y = 1.44, right edge 1.14 < 1.1485), never before.
    # The devkit checks time steps in order, each with projections 0, 0.3, 0.6, 0.9 s (pdm_scorer.py:538-578): the
    # first overlap is the 0.9 s projection from t = 1.1 s (rear axle at x = 1.1), which ends where the ego is at
    # 2.0 s. Its angle from that rear axle to the pedestrian is atan(1.44 / (x_p - 1.1)); x_p is chosen to make it
    # 24 deg (ahead: TTC 0) or 34 deg (not ahead, ego in one lane on the road: the track is ignored from then on,
    # TTC 1). NC is 1 either way (a lateral contact in one lane, pedestrian moving). PDM-Closed's reference = the
    # agent's path (normaliser 4 m <= 5 -> EP 1). Score: 24 deg -> (5 + 0 + 2 + 2) / 14; 34 deg -> 1.
    x_p = 1.1 + 1.44 / np.tan(np.deg2rad(angle_deg))
    ped = {"track_id": "p", "category": "pedestrian", "length": 0.6, "width": 0.6,
           "fn": lambda t: (x_p, 2.44 - 0.5 * t, -np.pi / 2, 0.0, -0.5)}
    s = F.road_scene(f"ped{angle_deg:g}", ego=F.constant_accel(speed=1.0), agents=[ped])
    r = score(s, straight(1.0), pdm_reference(s, straight(1.0)))
    assert r["no_at_fault_collisions"] == 1.0
    assert r["time_to_collision_within_bound"] == ttc
    assert r["score"] == pytest.approx(9 / 14 if ttc == 0.0 else 1.0)


# ----------------------------------------------------------------------------------------------
# 5. drivable area = roadblocks, intersections, carparks; NOT roadblock connectors
#    (navsim .../pdm_planner/observation/pdm_occupancy_map.py:134-186 and the scorer's DRIVABLE_MAP_LAYERS)


@pytest.mark.parametrize("kind, dac", [("roadblock_connector", 0.0), ("carpark", 1.0)])
def test_corner_inside_a_connector_only(kind, dac):
    # The ego drifts to y = -1.0: its right corners (y = -2.15) leave the roadblock (y >= -1.75) and lie only in an
    # extra area y in [-4, -1.75]. A roadblock connector does not make them drivable (DAC 0 -> score 0); a carpark does.
    s = with_area(F.road_scene(f"conn_{kind}"), "extra", kind, [[-150.0, -4.0], [350.0, -4.0], [350.0, -1.75], [-150.0, -1.75]])
    poses = straight(10, y=-1.0)
    r = score(s, poses, pdm_reference(s, poses))
    assert r["drivable_area_compliance"] == dac
    if dac == 0.0:
        assert r["score"] == 0.0


# ----------------------------------------------------------------------------------------------
# 6./7. start state and past states as the devkit (navsim_scenario_utils.py:34-46; pdm_array_representation.py:73-91)


def turning_ego(v=8.0, radius=40.0):
    def fn(t):
        t = np.asarray(t, float)
        h = v * t / radius
        return radius * np.sin(h), radius * (1 - np.cos(h)), h, np.full_like(t, v), 0 * t

    return fn


def test_start_state_has_no_steering_and_the_logged_lateral_speed():
    # logged yaw rate 8/40 = 0.2 rad/s; the devkit starts with steering 0, angular velocity and acceleration 0 and
    # (vx, vy) from the log (here meta ego_vy = 0.04 m/s at every frame)
    s = F.road_scene("turn", ego=turning_ego())
    s = with_meta(s, ego_vy=[0.04] * len(s.row["ego"]["t"]))
    ctx = SceneContext.build(s)
    assert s.row["ego"]["yaw_rate"][s.current_index] == pytest.approx(0.2, rel=0.05)
    assert ctx.initial[STEER] == 0.0 and ctx.initial[YAW_RATE] == 0.0 and ctx.initial[YAW_ACCEL] == 0.0
    assert ctx.initial[VY] == 0.04
    # the past states (history comfort) carry no angular velocity / acceleration either
    assert len(ctx.history) == 14 and not ctx.history[:, [YAW_RATE, YAW_ACCEL]].any()


# ----------------------------------------------------------------------------------------------
# 9. EC pairs ORIGINAL frames only (navsim/planning/script/run_pdm_score_one_stage.py:142)


def test_synthetic_frames_get_no_two_frame_comfort():
    # two frames of one log 0.5 s apart: original -> the second gets EC; synthetic -> neither does (NaN, /14)
    for source, expect_ec in (("real", True), ("synthetic", False)):
        scenes = F.log_scenes(2, ego=F.constant_accel(speed=10.0), log_name=f"ec_{source}", source=source)
        rows = score_scenes(scenes, {sc.id: straight(10) for sc in scenes}, tracking=False, human_filter=False)
        assert math.isnan(rows[0]["two_frame_extended_comfort"])
        assert (not math.isnan(rows[1]["two_frame_extended_comfort"])) == expect_ec


# ----------------------------------------------------------------------------------------------
# 10. both means (the devkit's invalid rows are NaN and skipped: run_pdm_score_one_stage.py:118-122, 293)


def test_average_row_reports_both_means():
    scenes = [F.road_scene(f"avg{i}") for i in range(4)]
    rows = score_scenes(scenes, {"avg3": straight(10)}, tracking=False, human_filter=False)
    x = rows[3]["score"]
    avg = average_row(rows)
    assert avg["invalid_rows"] == 3
    assert avg["score"] == pytest.approx(x / 4)  # ours: invalid = 0
    assert avg["score_valid_only"] == pytest.approx(x)  # official: NaN skipped


# ----------------------------------------------------------------------------------------------
# 11. log replay reads the 2 Hz frames at t = 0..4 s only (metric_caching/metric_cache_processor.py:116-125)


def test_track_seen_again_only_after_4_s_is_held():
    # A car logged at t = 0 (x = 30, 10 m/s) and next at t = 4.5 s (x = 75). Frames after 4 s are not read, so the
    # track has one state and the devkit holds that box for the whole horizon (metric_cache_processor.py:177-178).
    # The ego at 10 m/s (front 4.049 + 10 t) reaches its rear (27.75) at t = 2.4 s: a front collision with a moving
    # agent -> NC 0 (reading the 4.5 s frame would make the car drive away: NC 1).
    s = F.road_scene("late", agents=[F.vehicle("a", 30.0, 0.0, vx=10.0, frames=[0.0, 4.5])])
    r = score(s, straight(10), pdm_reference(s, straight(10)))
    assert r["no_at_fault_collisions"] == 0.0


# ----------------------------------------------------------------------------------------------
# 12. the human run is the logged future at 8 x 0.5 s, whatever the agent's sampling (metric_cache_processor.py:288-311)


def test_human_sampled_at_half_seconds_for_an_agent_at_one_second():
    # The logged ego swerves off the road only at t = 0.5 s (y = -1.5, corners at -2.65), back on the centreline at 1 s.
    # At 8 x 0.5 s the human run contains that pose (DAC 0, lifts the agent's DAC); at 4 x 1.0 s it would not.
    def fn(t):
        t = np.asarray(t, float)
        return 10 * t, np.where(np.isclose(t, 0.5), -1.5, 0.0), 0 * t, np.full_like(t, 10.0), 0 * t

    s = F.road_scene("hs", ego=fn)
    agent = np.array([[10.0, 0.0, 0.0], [20.0, -1.5, 0.0], [30.0, 0.0, 0.0], [40.0, 0.0, 0.0]])  # off the road at 2 s
    r = score_scenes([s], {"hs": agent}, num_poses=4, interval=1.0, tracking=False, human_filter=True,
                     reference_cache=pdm_reference(s, straight(10)))[0]
    assert "drivable_area_compliance" in r["human_filter_lifted"].split(",")
    assert r["drivable_area_compliance"] == 1.0
