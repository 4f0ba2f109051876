"""One hand-built scene per NAVSIM rule; expected values follow from docs/methods/navsim_epdms.md.

Geometry (lanes 3.5 m wide along +x, lane 0 centred on y = 0; ego = Pacifica, 2.297 m wide, box centre
1.461 m ahead of the rear axle) is chosen so every expectation can be checked by hand. Most tests score the
poses as given (tracking=False) so the ego is exactly where the trajectory says.
"""
import numpy as np
import pytest

from eval.navsim import fixtures as F
from eval.navsim.scorer import score_scenes

HALF_W = 2.297 / 2


def score(scene, poses, tracking=False, **kw):
    kw.setdefault("human_filter", False)
    return score_scenes([scene], {scene.id: np.asarray(poses, float)}, tracking=tracking, **kw)[0]


def straight(v, y=0.0, n=8, dt=0.5):
    t = np.arange(1, n + 1) * dt
    return np.stack([v * t, np.full_like(t, y), 0 * t], -1)


# ----------------------------------------------------------------------------------------------
# NC


@pytest.mark.parametrize("tracking", [False, True])
def test_front_collision_is_at_fault(tracking):
    # a slower car 20 m ahead in the ego lane; the ego keeps 10 m/s and its front runs into it
    s = F.road_scene("front", agents=[F.vehicle("a", 20, 0, vx=2)])
    r = score(s, straight(10), tracking=tracking)
    assert r["valid"] and r["no_at_fault_collisions"] == 0.0 and r["score"] == 0.0


def test_rear_ended_while_stopped_is_not_at_fault():
    s = F.road_scene("rear", ego=F.constant_accel(speed=0.0), agents=[F.vehicle("a", -20, 0, vx=10)])
    r = score(s, straight(0.0))
    assert r["no_at_fault_collisions"] == 1.0


def test_rear_ended_while_moving_is_not_at_fault():
    # ego at 5 m/s, a car from behind at 15 m/s closes the gap: object > 150 deg off the ego heading
    s = F.road_scene("rear2", ego=F.constant_accel(speed=5.0), agents=[F.vehicle("a", -15, 0, vx=15)])
    assert score(s, straight(5.0))["no_at_fault_collisions"] == 1.0


def test_lateral_collision_in_multiple_lanes_is_at_fault():
    # ego drifts to y = 1.6 (its corners in lanes 0 and 1) next to a car driving alongside in lane 1
    t = np.arange(1, 9) * 0.5
    poses = np.stack([10 * t, np.minimum(t, 1.0) * 1.6, 0 * t], -1)
    s = F.road_scene("lat", agents=[F.vehicle("a", 1.461, 3.5, vx=10)])
    assert score(s, poses)["no_at_fault_collisions"] == 0.0


def test_lateral_collision_in_one_lane_is_not_at_fault():
    # the ego stays centred in its lane; the car alongside swerves into the ego's side
    s = F.road_scene("lat1", agents=[F.vehicle("a", 1.461, 3.5, vx=10, vy=-1.0, heading=0.0)])
    assert score(s, straight(10))["no_at_fault_collisions"] == 1.0


def test_static_cone_costs_half():
    s = F.road_scene("cone", agents=[F.vehicle("c", 20, 0, category="traffic_cone", length=0.5, width=0.5)])
    r = score(s, straight(10))
    assert r["no_at_fault_collisions"] == 0.5
    # score = NC * (5 EP + 5 TTC + 2 LK + 2 HC) / 14 (no EC: single frame)
    expect = 0.5 * (5 * r["ego_progress"] + 5 * r["time_to_collision_within_bound"] + 2 * r["lane_keeping"] + 2 * r["history_comfort"]) / 14
    assert r["score"] == pytest.approx(expect)


def test_agent_overlapping_at_start_is_ignored():
    # v2 log replay drops agents that already overlap the ego at t = 0
    s = F.road_scene("overlap", agents=[F.vehicle("a", 2.0, 0.5, vx=10)])
    assert score(s, straight(10))["no_at_fault_collisions"] == 1.0


# ----------------------------------------------------------------------------------------------
# DAC, DDC, TLC


def test_corner_off_road():
    # one lane: drivable y in [-1.75, 1.75]
    s = F.road_scene("dac", lanes=1)
    assert -0.55 - HALF_W > -1.75 > -0.65 - HALF_W
    assert score(s, straight(10, y=-0.55))["drivable_area_compliance"] == 1.0
    assert score(s, straight(10, y=-0.65))["drivable_area_compliance"] == 0.0


@pytest.mark.parametrize("speed,expected", [(1.5, 1.0), (3.0, 0.5), (7.0, 0.0)])
def test_oncoming_distance_in_one_second(speed, expected):
    # the ego drives (heading +x) in the oncoming lane, which is not on the route: it covers `speed` m per second
    s = F.road_scene(f"ddc{speed}", lanes=1, oncoming_lanes=1, ego=F.constant_accel(y=3.5, speed=speed))
    assert score(s, straight(speed, y=0.0))["driving_direction_compliance"] == expected


def test_oncoming_inside_intersection_does_not_count():
    s = F.road_scene("ddc_int", lanes=1, oncoming_lanes=1, ego=F.constant_accel(y=3.5, speed=7.0), intersections=[(-20, 60)])
    assert score(s, straight(7.0))["driving_direction_compliance"] == 1.0


def test_red_light_crossed():
    reds = [(0, t) for t in np.arange(-1.5, 5.01, 0.5)]
    s = F.road_scene("tl", connectors=[(30, 50)], red_lights=reds)
    assert score(s, straight(10))["traffic_light_compliance"] == 0.0  # front reaches x = 30 at t ~ 2.6 s
    assert score(s, straight(6))["traffic_light_compliance"] == 1.0  # front stays before x = 24 + 4.05 < 30


def test_red_light_status_is_held_for_its_frame_only():
    # red in the frames at 0 s and 0.5 s only (held until 1.0 s): the ego arrives at ~2.6 s on green
    s = F.road_scene("tl2", connectors=[(30, 50)], red_lights=[(0, 0.0), (0, 0.5)])
    assert score(s, straight(10))["traffic_light_compliance"] == 1.0
    # red from 2.5 s on: caught
    s = F.road_scene("tl3", connectors=[(30, 50)], red_lights=[(0, 2.5), (0, 3.0)])
    assert score(s, straight(10))["traffic_light_compliance"] == 0.0


# ----------------------------------------------------------------------------------------------
# LK


def lateral_steps(offset_steps, off=0.6, v=10.0):
    """40 poses at 0.1 s; lateral offset `off` at the given step numbers (1-based), 0 elsewhere."""
    k = np.arange(1, 41)
    y = np.where(np.isin(k, list(offset_steps)), off, 0.0)
    return np.stack([v * k * 0.1, y, 0 * k], -1)


@pytest.mark.parametrize("n,expected", [(19, 1.0), (20, 0.0), (21, 0.0)])
def test_lane_keeping_consecutive_steps(n, expected):
    s = F.road_scene("lk", lanes=2)
    r = score(s, lateral_steps(range(5, 5 + n)), num_poses=40, interval=0.1)
    assert r["lane_keeping"] == expected


def test_lane_keeping_skips_intersections_without_resetting():
    # off for steps 1-12 and 20-30, back on the centreline for steps 13-19, whose box centres
    # (x = 1.461 + k m) lie in an intersection spanning x in [14, 21]: skipped, so the run is 12 + 11 = 23
    steps = list(range(1, 13)) + list(range(20, 31))
    plain = F.road_scene("lk2", lanes=2)
    assert score(plain, lateral_steps(steps), num_poses=40, interval=0.1)["lane_keeping"] == 1.0
    inter = F.road_scene("lk3", lanes=2, intersections=[(14.0, 21.0)])
    assert score(inter, lateral_steps(steps), num_poses=40, interval=0.1)["lane_keeping"] == 0.0


# ----------------------------------------------------------------------------------------------
# EP, TTC


def test_progress_normalised_above_5m():
    s = F.road_scene("ep")
    stop = score(s, straight(0.0))
    assert stop["ego_progress"] == 0.0 and stop["progress_normaliser_m"] > 5.0
    slow = score(s, straight(5.0))
    assert slow["progress_m"] == pytest.approx(20.0, abs=1e-6)  # box-centre displacement along the route
    assert slow["ego_progress"] == pytest.approx(slow["progress_m"] / slow["progress_normaliser_m"])
    assert 0.0 < slow["ego_progress"] < 1.0
    fast = score(s, straight(20.0))  # faster than PDM-Closed: the agent is its own normaliser
    assert fast["ego_progress"] == 1.0 and fast["progress_normaliser_m"] == pytest.approx(80.0, abs=1e-6)


def test_progress_below_5m_is_full_marks():
    # stopped behind a stopped car 8 m ahead (bumper gap ~1.3 m): the reference cannot make 5 m either
    s = F.road_scene("ep_blocked", ego=F.constant_accel(speed=0.0), agents=[F.vehicle("a", 8.0, 0.0)])
    r = score(s, straight(0.0))
    assert r["progress_normaliser_m"] <= 5.0
    assert r["ego_progress"] == 1.0 and r["no_at_fault_collisions"] == 1.0


def test_ttc_fails_on_a_near_miss_without_collision():
    # a stopped car whose rear is at x = 37.75; the ego brakes from 16.7 m/s to a stop at rear-axle x = 33.4
    # (front bumper 37.45: never touches), but its 0.9 s constant-speed projections reach the car
    v0 = 16.7  # constant deceleration v0 / 4 s: stopped at t = 4 s
    t = np.arange(1, 9) * 0.5
    x = v0 * t - 0.5 * (v0 / 4) * t**2
    near_miss = np.stack([x, 0 * t, 0 * t], -1)
    s = F.road_scene("ttc", ego=F.constant_accel(speed=v0), agents=[F.vehicle("a", 40.0, 0.0)])
    r = score(s, near_miss)
    assert x[-1] + 4.049 < 40.0 - 2.25
    assert r["no_at_fault_collisions"] == 1.0 and r["time_to_collision_within_bound"] == 0.0
    # stopping 5 m earlier keeps every projection clear
    r2 = score(s, near_miss * np.array([28.4 / 33.4, 1, 1]))
    assert r2["no_at_fault_collisions"] == 1.0 and r2["time_to_collision_within_bound"] == 1.0


def test_ttc_horizon_v2_stops_at_3_1_s_v1_does_not():
    # a stopped car whose rear is at x = 50: at 10 m/s the ego's front (4.05 + 10 t) never reaches it within 4 s,
    # but its 0.9 s projection does from t = 3.7 s on: only PDMS (v1), which checks every step, sees it
    s = F.road_scene("ttc_h", agents=[F.vehicle("a", 52.25, 0.0)])
    v2 = score(s, straight(10))
    v1 = score(s, straight(10), metric="pdms")
    assert v2["no_at_fault_collisions"] == v1["no_at_fault_collisions"] == 1.0
    assert v2["time_to_collision_within_bound"] == 1.0 and v1["time_to_collision_within_bound"] == 0.0
