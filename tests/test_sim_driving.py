"""The simulated ego drives like a comfortable human, and scenes carry NAVSIM route semantics: the ego's
command limits on live highway-env episodes, and route chains / on_route marks on hand-built lanes."""
from __future__ import annotations

import numpy as np
import pytest

from datasets_cfg.sim.episode import WARMUP_S
from datasets_cfg.sim.export import LaneSamples, export_road, route_chain

# NAVSIM's history-comfort bounds (eval/navsim/config.py; docs/methods/navsim_epdms.md)
LON_ACCEL, LAT_ACCEL, YAW_RATE = (-4.05, 2.40), 4.89, 0.95


def straight(id, edge, x0, x1, y, kind="lane"):
    xs = np.linspace(x0, x1, 6)
    c = np.c_[xs, np.full(6, y)]
    step = 1.0 if x1 > x0 else -1.0
    return LaneSamples(id, edge, kind, False, 20.0, c, c + [0.0, 2.0 * step], c - [0.0, 2.0 * step])


def road():
    """Segment a>b (two lanes, x 0..50), b>c (two lanes, x 50..100), c>d one lane starting 6 m further and 4 m to
    the left (a junction gap, bridged by the connector "b>c#1~c>d#0"), e>f unrelated, and f>e running backwards."""
    lanes = [straight("a>b#0", ("a", "b"), 0, 50, 0), straight("a>b#1", ("a", "b"), 0, 50, 4),
             straight("b>c#0", ("b", "c"), 50, 100, 0), straight("b>c#1", ("b", "c"), 50, 100, 4),
             straight("c>d#0", ("c", "d"), 106, 150, 8), straight("e>f#0", ("e", "f"), 0, 50, 40),
             straight("f>e#0", ("f", "e"), 50, 0, 44)]
    conn = np.c_[np.linspace(100, 106, 5), np.linspace(4, 8, 5)]
    lanes.append(LaneSamples("b>c#1~c>d#0", ("b>c#1", "c>d#0"), "lane_connector", False, 20.0, conn, conn + [0, 2], conn - [0, 2]))
    return lanes


def test_route_chain_keeps_one_connected_lane_per_segment():
    lanes = road()
    # the last lane followed in each segment; repeats and the parallel lane of a lane change collapse
    assert route_chain(lanes, ["a>b#0", "a>b#0", "a>b#1", "b>c#1"]) == ["a>b#1", "b>c#1"]
    # a lane change in the next segment: the earlier segment's lane is the one that leads into the kept lane
    assert route_chain(lanes, ["a>b#0", "b>c#0", "b>c#1"]) == ["a>b#1", "b>c#1"]
    # a junction gap is bridged by its connector (and the lane before it is the one the connector starts from)
    assert route_chain(lanes, ["a>b#0", "b>c#0", "c>d#0"]) == ["a>b#1", "b>c#1", "b>c#1~c>d#0", "c>d#0"]
    # nothing joins e>f to the rest: the chain is cut, keeping the anchor's part; unknown ids are dropped
    assert route_chain(lanes, ["a>b#0", "b>c#0", "e>f#0"], anchor="b>c#0") == ["a>b#0", "b>c#0"]
    assert route_chain(lanes, ["a>b#0", "b>c#0", "e>f#0"], anchor="e>f#0") == ["e>f#0"]
    assert route_chain(lanes, ["zz>yy#0", "a>b#1"]) == ["a>b#1"]


def test_on_route_marks_every_lane_of_the_route_segments():
    m = export_road(road(), None, ["a>b#1", "b>c#1", "b>c#1~c>d#0", "c>d#0"])
    on = {l["id"] for l in m["lanes"] if l["on_route"]}
    assert on == {"a>b#0", "a>b#1", "b>c#0", "b>c#1", "b>c#1~c>d#0", "c>d#0"}
    assert m["route"] == ["a>b#1", "b>c#1", "b>c#1~c>d#0", "c>d#0"]
    # a segment whose lanes run both ways: only the route lane's direction is on the route
    lanes = road()
    lanes.append(straight("e>f#1", ("e", "f"), 50, 0, 36))
    m = export_road(lanes, None, ["e>f#0"])
    assert {l["id"] for l in m["lanes"] if l["on_route"]} == {"e>f#0"}


def test_route_lanes_stay_joined_when_the_map_is_cropped():
    m = export_road(road(), (40.0, -10.0, 60.0, 10.0), ["a>b#0", "b>c#0"])
    lanes = {l["id"]: l for l in m["lanes"]}
    # other lanes are cropped to the region (samples every 10 m), route lanes to the region grown by ROUTE_TAIL_M
    assert lanes["a>b#1"]["centerline"] == [[40.0, 4.0], [50.0, 4.0]] and "c>d#0" not in lanes
    assert lanes["a>b#0"]["centerline"] == [[0.0, 0.0], [50.0, 0.0]] and lanes["b>c#0"]["centerline"] == [[50.0, 0.0], [100.0, 0.0]]
    far = LaneSamples("g>h#0", ("g", "h"), "lane", False, 20.0, np.c_[np.linspace(0, 1000, 101), np.zeros(101)],
                      np.c_[np.linspace(0, 1000, 101), np.full(101, 2.0)], np.c_[np.linspace(0, 1000, 101), np.full(101, -2.0)])
    line = {l["id"]: l for l in export_road([far], (40.0, -10.0, 60.0, 10.0), ["g>h#0"])["lanes"]}["g>h#0"]["centerline"]
    assert line == [[0.0, 0.0], [210.0, 0.0]]  # x in [40 - 150, 60 + 150]
    # a route lane outside the grown region is kept whole, and joints are kept
    m = export_road(road(), (-250.0, -10.0, -200.0, 10.0), ["b>c#1", "b>c#1~c>d#0", "c>d#0"])
    lanes = {l["id"]: l for l in m["lanes"]}
    assert lanes["c>d#0"]["centerline"][0] == [106.0, 8.0] and lanes["c>d#0"]["centerline"][-1] == [150.0, 8.0]
    assert lanes["b>c#1"]["centerline"][-1] == [100.0, 4.0] and lanes["b>c#1"]["centerline"][0] == [50.0, 4.0]


@pytest.mark.parametrize("env_id, policy", [("highway-v0", "idm_mobil"), ("roundabout-v1", "idm_mobil"), ("u-turn-v1", "cautious")])
def test_ego_commands_stay_within_its_limits(env_id, policy):
    """Step a live episode: every command of the ego respects its size and rate limits, and the motion stays inside
    NAVSIM's comfort bounds (highway-env's own IDM ego brakes at up to 5 m/s^2 and turns at up to 1.2 rad/s)."""
    import gymnasium as gym
    import highway_env  # noqa: F401

    from datasets_cfg.sim.drivers import install_ego, restore_class_params

    restore_class_params()
    env = gym.make(env_id, config={"offscreen_rendering": True, "simulation_frequency": 10, "policy_frequency": 2})
    env.reset(seed=1)
    u = env.unwrapped
    ego = install_ego(env, policy, env_id.split("-v")[0])
    dt = ego.CONTROL_DT
    acc, yaw, speed, emergency = [], [], [], []
    for _ in range(150):
        u.road.act()
        u.road.step(dt)
        if ego.crashed:
            break
        delta = ego.action["steering"]
        acc.append(ego.action["acceleration"])
        yaw.append(ego.speed * np.sin(np.arctan(0.5 * np.tan(delta))) / (ego.LENGTH / 2))  # highway-env's bicycle
        speed.append(ego.speed)
        emergency.append(ego.emergency)
    env.close()
    acc, yaw, speed = map(np.asarray, (acc, yaw, speed))
    assert len(acc) > 100
    assert acc.max() <= ego.ACC_UP + 1e-9 and acc.min() >= ego.BRAKE_EMERGENCY - 1e-9
    jerk = np.abs(np.diff(acc)) / dt
    normal = ~np.asarray(emergency[1:])
    assert (jerk[normal] <= ego.JERK_MAX + 1e-6).all() and (jerk <= ego.JERK_EMERGENCY + 1e-6).all()
    # outside an emergency it never brakes harder than BRAKE_MAX (after one it only eases off)
    assert (acc[1:][normal] >= np.minimum(ego.BRAKE_MAX, acc[:-1][normal]) - 1e-9).all()
    assert np.abs(yaw).max() <= ego.YAW_RATE_MAX + 1e-6
    assert (np.abs(np.diff(yaw)) / dt <= ego.YAW_ACCEL_MAX + 0.5).all()  # the commanded rate limit, plus speed changes
    # after the generator's warm-up (highway-env spawns cars at arbitrary speeds and gaps), within NAVSIM's bounds
    after = slice(int(round(WARMUP_S / dt)), None)
    assert acc[after].min() > LON_ACCEL[0] and acc[after].max() < LON_ACCEL[1]
    assert np.abs(speed * yaw)[after].max() < LAT_ACCEL and np.abs(yaw).max() < YAW_RATE
    assert speed.min() >= 0.0  # stops, never reverses
