"""Closed-loop rollouts in highway-env: what the planner sees, that the ego really follows its plans, and the
reported rates (short seeded episodes)."""
import math

import numpy as np
import pytest

pytest.importorskip("highway_env")

from datasets_cfg.schema import validate_row  # noqa: E402
from eval.closed_loop import ClosedLoopResult, constant_velocity_planner, episode_means, pdm_closed_planner, run_closed_loop  # noqa: E402


class Recorder:
    """Wraps a planner and keeps the observations it was given."""

    def __init__(self, planner):
        self.planner, self.seen = planner, []

    def __call__(self, obs):
        self.seen.append(obs)
        return self.planner(obs)


def test_observations_are_valid_current_scenes_and_the_ego_follows_the_plan():
    rec = Recorder(constant_velocity_planner())
    res = run_closed_loop(rec, envs=("highway",), episodes=1, seed=0, duration_s=4.0)
    ep = res.episodes[0]
    assert isinstance(res, ClosedLoopResult) and ep["decisions"] == len(rec.seen) == 8
    for k, obs in enumerate(rec.seen):
        validate_row(obs.row)
        assert obs.current_index == obs.num_frames - 1 == min(k, 3)  # history only, current frame last
        assert obs.row["map"]["route"] and obs.row["map"]["areas"] and obs.meta["timestamp_s"] == pytest.approx(0.5 * k)
    # constant velocity: every 0.5 s the ego moved speed * 0.5 m straight ahead
    x = [o.ego_pose()[0] for o in rec.seen]
    v = rec.seen[0].row["ego"]["speed"][0]
    np.testing.assert_allclose(np.diff(x), v * 0.5, rtol=1e-3)
    assert not ep["crashed"] and not ep["offroad"] and ep["planner_failures"] == 0
    assert ep["progress_m"] == pytest.approx(v * 4.0, rel=0.02)


def test_failing_planner_is_counted_and_the_ego_brakes():
    def broken(obs):
        if obs.current_index >= 1:
            raise RuntimeError("planner bug")
        return np.full((8, 3), np.nan)

    ep = run_closed_loop(broken, envs=("highway",), episodes=1, seed=0, duration_s=3.0).episodes[0]
    assert ep["planner_failures"] == ep["decisions"] == 6
    # braking at 4 m/s^2 from ~25 m/s for 3 s covers well under the 75 m of cruising
    assert ep["progress_m"] < 0.8 * 75


def test_offroad_is_detected():
    def swerve(obs):  # drive 6 m to the right within 2 s: off the rightmost lane of the highway
        t = np.arange(1, 9) * 0.5
        v = obs.row["ego"]["speed"][obs.current_index]
        return np.stack([v * t, -np.minimum(t, 2.0) * 6.0, -0.3 * (t <= 2.0)], -1)

    ep = run_closed_loop(swerve, envs=("highway",), episodes=1, seed=3, duration_s=3.0).episodes[0]
    assert ep["offroad"]


def test_pdm_closed_drives_better_than_constant_velocity():
    kw = dict(envs=("merge",), episodes=1, seed=1, duration_s=8.0)
    cv = run_closed_loop(constant_velocity_planner(), **kw)
    pdm = run_closed_loop(pdm_closed_planner(), **kw)
    assert cv.episodes[0]["crashed"] and not pdm.episodes[0]["crashed"]
    assert pdm.means["crash_rate"] == 0.0 and cv.means["crash_rate"] == 1.0
    assert pdm.means["epdms"] > 0.8 > cv.means["epdms"]
    # the crashed episode scores 0 (its scored scenes before the crash keep their own mean) and is counted
    assert cv.episodes[0]["epdms"] == 0.0 and cv.means["epdms"] == 0.0 and cv.means["crashes"] == 1 and pdm.means["crashes"] == 0
    for m in (cv.means, pdm.means):
        assert 0.0 <= m["comfort"] <= 1.0 and 0.0 <= m["route_completion"] <= 1.0 and m["episodes"] == 1
    assert not math.isnan(pdm.episodes[0]["route_completion"])


def _episode(crashed: bool, epdms: float) -> dict:
    return {"crashed": crashed, "offroad": False, "route_completion": 1.0, "progress_m": 100.0, "comfort": 1.0, "epdms": epdms,
            "planner_failures": 0}


def test_a_crash_scores_zero_and_is_never_skipped():
    # rows as an older run wrote them: a crash too early for a scored scene has epdms NaN. Skipping it, the planner that
    # crashes in half its episodes would average 0.95 and beat the safe one's 0.80; counted as 0 it averages 0.475.
    crashing = [_episode(False, 0.95), _episode(True, math.nan), _episode(False, 0.95), _episode(True, 0.90)]
    safe = [_episode(False, 0.80)] * 4
    m_crash, m_safe = episode_means(crashing), episode_means(safe)
    assert m_crash["epdms"] == pytest.approx((0.95 + 0 + 0.95 + 0) / 4) and m_crash["crashes"] == 2 and m_crash["crash_rate"] == 0.5
    assert m_safe["epdms"] == pytest.approx(0.80) and m_safe["crashes"] == 0
    assert m_crash["epdms"] < m_safe["epdms"]
    # an episode too short to score (no crash) is left out and counted, not scored 0
    short = episode_means([_episode(False, 0.6), _episode(False, math.nan)])
    assert short["epdms"] == pytest.approx(0.6) and short["epdms_unscored"] == 1 and short["crashes"] == 0
    assert math.isnan(episode_means([_episode(False, math.nan)])["epdms"])


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown environment"):
        run_closed_loop(constant_velocity_planner(), envs=("mars",), episodes=1)
    with pytest.raises(ValueError, match="at least one"):
        run_closed_loop(constant_velocity_planner(), envs=(), episodes=1)


@pytest.mark.parametrize("yaw_rate, expected", [(0.0, "straight"), (0.02, "straight"), (0.2, "left"), (-0.2, "right")])
def test_route_command_reads_the_route_ahead_like_the_future_based_command(yaw_rate, expected):
    """A road that follows the ego's constant-yaw-rate path: the route turns by yaw_rate * 4 s over the 40 m the ego
    covers in 4 s at 10 m/s; the route command (no future needed) equals the future-based command of the same row."""
    from datasets_cfg.sim.command import driving_command, route_command
    from tests.curation_helpers import scene_row

    row = scene_row("s", speed=10.0, yaw_rate=yaw_rate)
    assert route_command(row) == driving_command(row) == expected
    cut = dict(row, map={**row["map"], "route": []})
    assert route_command(cut) == "unknown"


@pytest.mark.parametrize("route_lane, expected", [(0, "straight"), (2, "right")])
def test_route_command_on_highway_env_lanes(route_lane, expected):
    """Ego in lane 0 of highway-v0's straight road, route on lane `route_lane`. highway-env numbers a road's lanes
    from its left edge: its LANE_RIGHT action adds one to the lane index, and lane i lies i x 4 m along the
    screen's y axis, which points down, to the right of a car driving +x (the ScenePool frame mirrors y, so +y is
    the ego's left). Both facts are checked on highway-env itself below. Lane 2 is then 8 m to the ego's right,
    beyond the 3 m lane-change offset: the route asks for a lane change to the right, so the command is "right"
    (and "straight" when the route is the ego's own lane)."""
    import json

    from highway_env.vehicle.controller import ControlledVehicle

    from datasets_cfg.schema import EGO_FIELDS, new_row
    from datasets_cfg.sim.command import route_command
    from datasets_cfg.sim.world import FREQUENCIES, ego_state, export_road, lane_id, make_env, sample_road

    env = make_env("highway", config=FREQUENCIES)
    env.reset(seed=0)
    u = env.unwrapped
    net = u.road.network
    lane0 = net.get_lane(("0", "1", 0))
    probe = ControlledVehicle(u.road, lane0.position(100.0, 0.0), heading=lane0.heading_at(100.0), speed=20.0, target_lane_index=("0", "1", 0))
    probe.act("LANE_RIGHT")
    assert probe.target_lane_index[2] == 1  # LANE_RIGHT: lane index + 1
    assert lane0.heading_at(0.0) == 0.0 and net.get_lane(("0", "1", 2)).position(0.0, 0.0)[1] - lane0.position(0.0, 0.0)[1] == 8.0  # +y_sim

    u.vehicle.position, u.vehicle.heading = lane0.position(200.0, 0.0), lane0.heading_at(200.0)
    u.vehicle.on_state_update()
    st = ego_state(env)
    assert st["lane_id"] == lane_id(("0", "1", 0))
    ego = {k: [0.0] * 4 for k in EGO_FIELDS}
    ego.update(t=[-1.5, -1.0, -0.5, 0.0], x=[st["x"]] * 4, y=[st["y"]] * 4, heading=[st["heading"]] * 4, speed=[st["speed"]] * 4)
    region = (st["x"] - 80.0, st["y"] - 80.0, st["x"] + 80.0, st["y"] + 80.0)
    row = new_row("lanes", "sim", "closed_loop", location="highway", current_index=3, ego=ego,
                  map=export_road(sample_road(env, "highway"), region, [lane_id(("0", "1", route_lane))], env_name="highway"),
                  meta=json.dumps({"ego_size": {"length": st["length"], "width": st["width"], "rear_axle_to_center": 0.0}}))
    env.close()
    assert route_command(row) == expected


def test_closed_loop_observations_carry_the_route_command():
    seen = Recorder(constant_velocity_planner())
    run_closed_loop(seen, envs=("intersection",), episodes=1, seed=0, duration_s=4.0)
    commands = [obs.row["command"] for obs in seen.seen]
    assert set(commands) <= {"left", "straight", "right"} and "left" in commands  # this episode's route turns left


def test_run_closed_loop_counts_the_simulator_warnings_into_its_result(monkeypatch, caplog):
    """Issue #20: highway-env's per-tick warnings are counted in the result (and its JSON), not printed."""
    import logging

    import eval.closed_loop as cl

    caplog.set_level(logging.WARNING)

    def fake_episode(planner, env_name, seed, *a, **k):  # episode i warns seed - 100 + 1 times
        for _ in range(seed - 100 + 1):
            logging.getLogger("highway_env.road.road").warning(f"Route ('a', 'b', {seed}) does not start after current road ('c', 'd', 0).")
        return _episode(False, 0.5)

    monkeypatch.setattr(cl, "run_episode", fake_episode)
    res = run_closed_loop(constant_velocity_planner(), envs=("highway",), episodes=3, seed=100)
    assert res.sim_warnings.total == 1 + 2 + 3 and not caplog.records
    assert res.to_dict()["sim_warnings"]["by_message"] == {"Route (…) does not start after current road (…).": 6}
