"""datasets_cfg/sim/world.py: the tick shared by the scene generator and the closed loop, and the ego written from outside."""
import math

import numpy as np
import pytest

pytest.importorskip("highway_env")

from datasets_cfg.sim.world import CULL_EVERY, SIM_HZ, SPAWN_EVERY, capture_sim_warnings, ego_state, make_env, place_ego, tick  # noqa: E402


class _Road:
    def __init__(self, log):
        self.log, self.vehicles = log, []

    def act(self):
        self.log.append("act")

    def step(self, dt):
        self.log.append(("step", dt))


class _Env:
    """Just what `tick` touches: the road, the clock, the intersection env's clear-and-spawn, the ego for the cull."""

    def __init__(self):
        self.log = []
        self.road, self.time, self.config = _Road(self.log), 0.0, {"spawn_probability": 0.6}
        self.vehicle = type("Ego", (), {"position": np.zeros(2)})()
        self.road.vehicles = [self.vehicle]
        self.unwrapped = self

    def _clear_vehicles(self):
        self.log.append("clear")

    def _spawn_vehicle(self, spawn_probability):
        self.log.append(("spawn", spawn_probability))


def test_tick_integrates_one_step_and_runs_the_chores_once_per_second():
    assert (SPAWN_EVERY, CULL_EVERY) == (SIM_HZ, 2 * SIM_HZ)  # IntersectionEnv.step spawns once per second
    env = _Env()
    far = type("Far", (), {"position": np.array([1000.0, 0.0])})()
    for step in range(-SIM_HZ + 1, 2 * SIM_HZ + 1):  # a 1 s warm-up (steps <= 0), then 2 s
        if step == CULL_EVERY:
            env.road.vehicles.append(far)
        tick(env, "intersection", step)
    steps = 3 * SIM_HZ
    assert env.log.count("act") == steps and env.log.count(("step", 1.0 / SIM_HZ)) == steps
    assert math.isclose(env.time, steps / SIM_HZ)
    # clear-and-spawn at steps 0, SIM_HZ and 2 SIM_HZ, i.e. after the 1st, 2nd and 3rd simulated second
    assert env.log.count("clear") == 3 and env.log.count(("spawn", 0.6)) == 3
    assert env.road.vehicles == [env.vehicle]  # the far vehicle went at the cull of step CULL_EVERY
    other = _Env()
    for step in range(1, 2 * SIM_HZ + 1):
        tick(other, "highway", step)
    assert "clear" not in other.log  # only the intersection env spawns


def test_place_ego_is_the_inverse_of_ego_state():
    env = make_env("highway", config={"simulation_frequency": SIM_HZ})
    env.reset(seed=0)
    pose = np.array([120.0, -5.5, 0.3])
    place_ego(env, pose, 12.5)
    st = ego_state(env)
    np.testing.assert_allclose([st["x"], st["y"], st["heading"], st["speed"]], [*pose, 12.5], atol=1e-9)
    env.close()


class _WarningRoad(_Road):
    """A road whose step warns as highway-env's RoadNetwork.next_lane does (highway_env/road/road.py:106-110: a
    `logger.warning` with the route formatted in), each tick with another route; every 5th tick a second message."""

    def __init__(self, log):
        super().__init__(log)
        self.n = 0

    def step(self, dt):
        import logging

        super().step(dt)
        self.n += 1
        logging.getLogger("highway_env.road.road").warning(
            "Route {} does not start after current road {}.".format(("o1", "ir1", self.n % 3), ("ir0", "il1", 0)))
        if self.n % 5 == 0:
            logging.getLogger("highway_env.vehicle.behavior").warning("Lane [{}] not found".format(self.n))


def test_simulator_warnings_are_counted_and_summarised_once_not_printed_per_step(caplog, capfd):
    import logging

    caplog.set_level(logging.WARNING)
    env = _Env()
    env.road = _WarningRoad(env.log)
    with capture_sim_warnings() as warned:
        for step in range(1, 26):  # 25 ticks: 25 route warnings, 5 lane warnings
            tick(env, "highway", step)
    assert not caplog.records and capfd.readouterr().err == ""  # nothing reached any handler, nothing printed
    assert warned.total == 30 and warned.counts == {
        "Route (…) does not start after current road (…).": 25, "Lane (…) not found": 5}
    line = warned.summary()
    assert "\n" not in line and "30 simulator warning(s)" in line and "25 x 'Route (…) does not start" in line
    d = warned.to_dict()
    assert d["total"] == 30 and d["examples"]["Lane (…) not found"] == "Lane [5] not found"
    # outside the block the logger is as it was: the same ticks reach the handlers again (the check can fail)
    tick(env, "highway", 26)
    assert len(caplog.records) == 1 and "does not start after current road" in caplog.records[0].getMessage()
    assert logging.getLogger("highway_env").propagate and not logging.getLogger("highway_env").handlers
    # blocks nest: each counts
    with capture_sim_warnings() as outer:
        tick(env, "highway", 27)
        with capture_sim_warnings() as inner:
            tick(env, "highway", 28)
    assert (outer.total, inner.total) == (2, 1)
