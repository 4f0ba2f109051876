"""Generator mechanics: determinism, resume/extend, input errors, CLI, and the pieces (safety, distances, export)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from datasets_cfg.schema import ScenePool, new_row
from datasets_cfg.sim.command import driving_command
from datasets_cfg.sim.corpus import generate, read_shard, shard_path
from datasets_cfg.sim.episode import EpisodeRunner, plan_episode
from datasets_cfg.sim.safety import is_near_miss, scene_safety
from datasets_cfg.sim.stats import distribution_distance, mmd, sliced_wasserstein

SMALL = dict(envs="two-way,merge", synthetic_fraction=0.5, scenes_per_episode=3, progress=False)


def rows_of(path):
    return [dict(r) for r in ScenePool.load(path).dataset]


def test_same_seed_same_pool_other_seed_other_pool(tmp_path):
    generate(tmp_path / "a", 6, seed=5, **SMALL)
    generate(tmp_path / "b", 6, seed=5, **SMALL)
    generate(tmp_path / "c", 6, seed=6, **SMALL)
    a, b, c = rows_of(tmp_path / "a"), rows_of(tmp_path / "b"), rows_of(tmp_path / "c")
    assert a == b
    for ra in a:  # same pixels too
        for im in ra["images"]:
            assert (tmp_path / "a" / im["path"]).read_bytes() == (tmp_path / "b" / im["path"]).read_bytes()
    assert {r["id"] for r in a}.isdisjoint({r["id"] for r in c})
    assert [r["ego"]["x"] for r in a] != [r["ego"]["x"] for r in c]


def test_episode_does_not_depend_on_what_ran_before(tmp_path):
    """IntersectionEnv rewrites IDMVehicle class constants; the runner restores them before each episode."""
    envs = ("highway", "intersection")
    hw = plan_episode(1, 0, envs, 0.0, scenes=2)
    inter = plan_episode(1, 1, envs, 0.0, scenes=2)
    assert (hw.env, inter.env) == envs
    fresh = EpisodeRunner().run(hw, tmp_path / "x")
    used = EpisodeRunner()
    used.run(inter, tmp_path / "y")
    again = used.run(hw, tmp_path / "y")
    assert json.dumps(fresh) == json.dumps(again)


def test_extend_keeps_finished_episodes(tmp_path):
    out = tmp_path / "pool"
    s1 = generate(out, 6, seed=2, **SMALL)
    assert s1["episodes_simulated"] >= 2 and s1["episodes_reused"] == 0
    first = rows_of(out)
    shards = sorted((out / "shards").iterdir())
    stamps = {p: p.stat().st_mtime_ns for p in shards}
    images = {p: p.stat().st_mtime_ns for p in (out / "images").rglob("*.*")}

    s2 = generate(out, 12, seed=2, **SMALL)
    assert s2["episodes_reused"] == len(shards)
    assert s2["episodes_simulated"] >= 2
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())
    assert all(p.stat().st_mtime_ns == t for p, t in images.items())
    second = rows_of(out)
    assert len(second) == 12 and second[:6] == first

    s3 = generate(out, 12, seed=2, **SMALL)  # nothing left to do
    assert s3["episodes_simulated"] == 0 and rows_of(out) == second
    # an extended pool equals one generated at that size in one go
    generate(tmp_path / "direct", 12, seed=2, **SMALL)
    assert rows_of(tmp_path / "direct") == second
    assert read_shard(shard_path(out, "sim-s2-e000000"))[0]["id"] == second[0]["id"]


def test_rerun_with_other_settings_is_refused(tmp_path):
    generate(tmp_path, 3, seed=0, **SMALL)
    with pytest.raises(ValueError, match="other settings"):
        generate(tmp_path, 3, seed=1, **SMALL)
    # shards of an older generator version are never mixed with this one's (version 1 wrote no version)
    cfg = json.loads((tmp_path / "sim_config.json").read_text())
    shards = {p: p.read_bytes() for p in (tmp_path / "shards").iterdir()}
    old = {k: v for k, v in cfg.items() if k != "generator_version"}
    (tmp_path / "sim_config.json").write_text(json.dumps(old))
    with pytest.raises(ValueError, match=r"generator version 1.*use a new --out"):
        generate(tmp_path, 6, seed=0, **SMALL)
    assert {p: p.read_bytes() for p in (tmp_path / "shards").iterdir()} == shards
    (tmp_path / "sim_config.json").unlink()  # a pool from elsewhere is never overwritten
    with pytest.raises(ValueError, match="not made by `mose simulate`"):
        generate(tmp_path, 3, seed=0, **SMALL)


@pytest.mark.parametrize("kwargs, match", [
    (dict(envs="highway,mars"), r"unknown environment.*mars"),
    (dict(envs=""), r"--envs"),
    (dict(scenes=0), r"--scenes: expected a positive integer"),
    (dict(scenes=-5), r"--scenes"),
    (dict(synthetic_fraction=1.5), r"--synthetic-fraction: expected a number in \[0, 1\]"),
    (dict(synthetic_fraction=-0.1), r"--synthetic-fraction"),
    (dict(image_size=8), r"--image-size"),
    (dict(workers=0), r"--workers"),
])
def test_bad_input_gives_clear_errors(tmp_path, kwargs, match):
    args = dict(scenes=4, envs="highway", synthetic_fraction=0.3) | kwargs
    with pytest.raises(ValueError, match=match):
        generate(tmp_path / "p", args.pop("scenes"), **args, progress=False)
    assert not (tmp_path / "p").exists()  # nothing written for bad input


def test_cli(tmp_path, capsys):
    from pipelines.cli import main

    out = tmp_path / "cli"
    rc = main(["simulate", "--out", str(out), "--scenes", "4", "--envs", "two-way", "--scenes-per-episode", "4",
               "--synthetic-fraction", "0", "--no-progress"])
    assert rc == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["num_scenes"] == 4 and printed["sources"] == {"real": 4}
    assert len(ScenePool.load(out)) == 4 and (out / "sim_summary.json").is_file()
    warned = json.loads((out / "sim_summary.json").read_text())["sim_warnings"]
    assert warned["total"] == sum(warned["by_message"].values())
    assert main(["simulate", "--out", str(tmp_path / "x"), "--scenes", "3", "--synthetic-fraction", "2"]) == 2
    assert "--synthetic-fraction" in capsys.readouterr().err
    assert main(["simulate", "--out", str(tmp_path / "x"), "--scenes", "3", "--envs", "moon"]) == 2
    assert "moon" in capsys.readouterr().err


def test_workers_give_the_same_pool(tmp_path):
    generate(tmp_path / "one", 6, seed=4, **SMALL)
    generate(tmp_path / "two", 6, seed=4, workers=2, **SMALL)
    assert rows_of(tmp_path / "one") == rows_of(tmp_path / "two")


# ----------------------------------------------------------------------------------------------
# pieces


def _row(agent_xy, agent_v, ego_speed=10.0, headings=None):
    """Ego driving +x at `ego_speed` (rear axle at x = v t), one agent per frame at `agent_xy[f]`."""
    t = np.arange(-3, 9) * 0.5
    n = len(t)
    heading = np.zeros(n) if headings is None else np.asarray(headings)
    ego = {"t": t.tolist(), "x": (ego_speed * t).tolist(), "y": [0.0] * n, "heading": heading.tolist(), "speed": [ego_speed] * n,
           "accel": [0.0] * n, "accel_lat": [0.0] * n, "yaw_rate": [0.0] * n}
    agents = {"frame": list(range(n)), "track_id": ["a"] * n, "category": ["vehicle"] * n,
              "x": [p[0] for p in agent_xy], "y": [p[1] for p in agent_xy], "heading": [0.0] * n, "length": [5.0] * n,
              "width": [2.0] * n, "height": [1.6] * n, "vx": [agent_v] * n, "vy": [0.0] * n}
    return new_row("r", "sim", "train", current_index=3, ego=ego, agents=agents)


def test_safety_by_hand():
    t = np.arange(-3, 9) * 0.5
    # agent 20 m ahead of the ego box centre, 5 m/s slower: bumper gap 15 m, closing 5 m/s -> TTC 3 s at t=-1.5 s,
    # and the gap shrinks by 2.5 m per frame; the smallest gap is at the last frame: 15 - 5 * 5.5 < 0 -> clipped
    ego_center_x = 10.0 * t + 1.461
    far = _row([(x + 40.0, 0.0) for x in ego_center_x], 10.0)  # same speed, 35 m gap: nothing
    s = scene_safety(far)
    assert s["min_ttc_s"] == 99.0 and s["min_gap_m"] == 99.0 and not is_near_miss(s, False)
    slow = _row([(ego_center_x[0] + 20.0 + 5.0 * (ti - t[0]), 0.0) for ti in t], 5.0)
    s = scene_safety(slow)
    gaps = 15.0 - 5.0 * (t - t[0])
    expected_ttc = np.maximum(gaps, 0) / 5.0
    assert s["min_ttc_s"] == pytest.approx(expected_ttc.min(), abs=1e-3)
    assert s["min_gap_m"] == pytest.approx(max(gaps.min(), 0.0), abs=1e-3)
    assert is_near_miss(s, crash=False) and not is_near_miss(s, crash=True)
    side = _row([(x, 4.0) for x in ego_center_x], 10.0)  # alongside, 4 m to the left: gap 2 m, no TTC
    s = scene_safety(side)
    assert s["min_gap_m"] == pytest.approx(2.0, abs=1e-3) and s["min_ttc_s"] == 99.0


def test_driving_command_by_hand():
    n = 12
    straight = _row([(100.0, 50.0)] * n, 0.0)
    assert driving_command(straight) == "straight"
    left_turn = _row([(100.0, 50.0)] * n, 0.0, headings=[0.0] * 4 + list(np.linspace(0.1, 1.2, 8)))
    assert driving_command(left_turn) == "left"
    right_turn = _row([(100.0, 50.0)] * n, 0.0, headings=[0.0] * 4 + list(-np.linspace(0.1, 1.2, 8)))
    assert driving_command(right_turn) == "right"
    lane_change = _row([(100.0, 50.0)] * n, 0.0)
    lane_change["ego"]["y"] = [0.0] * 4 + list(np.linspace(0.5, 4.0, 8))  # 4 m to the left, heading ~0
    assert driving_command(lane_change) == "left"


def test_distances_order_distributions():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(600, 4)), rng.normal(size=(600, 4))
    shifted = rng.normal(size=(600, 4)) + np.array([1.0, 0, 0, 0])
    for method in ("mmd", "swd"):
        same = distribution_distance(a, b, method)
        diff = distribution_distance(a, shifted, method)
        assert diff > 3 * same and diff > 0
    # a shift d along one axis moves a projection on unit u by u . d; E[(u . d)^2] = |d|^2 / dim -> SW2 = 1 / 2
    assert sliced_wasserstein(a, shifted, n_projections=2000) == pytest.approx(0.5, abs=0.1)
    assert mmd(a, a.copy(), 1.0) == pytest.approx(0.0, abs=0.05)
    with pytest.raises(ValueError, match="same number of columns"):
        distribution_distance(a, b[:, :3])


def test_export_functions_on_a_live_env():
    """The importable export API (reused by closed-loop evaluation) on a fresh highway-env instance."""
    import gymnasium as gym
    import highway_env  # noqa: F401

    from datasets_cfg.sim.export import REAR_AXLE_TO_CENTER, TrackIds, ego_state, export_road, export_vehicles, render_transform, to_global_xy  # noqa: I001

    env = gym.make("roundabout-v1", render_mode="rgb_array", config={"offscreen_rendering": True})
    env.reset(seed=0)
    u = env.unwrapped
    st = ego_state(env)
    center = to_global_xy(u.vehicle.position)
    assert np.allclose(st["center"], center) and np.isclose(center[1], -u.vehicle.position[1])
    assert np.allclose([st["x"] + REAR_AXLE_TO_CENTER * np.cos(st["heading"]), st["y"] + REAR_AXLE_TO_CENTER * np.sin(st["heading"])], center)
    assert np.isclose(st["heading"], -u.vehicle.heading)
    ids = TrackIds()
    a0 = export_vehicles(env, 0, ids)
    a1 = export_vehicles(env, 1, ids)
    near = [v for v in u.road.vehicles if v is not u.vehicle and np.hypot(*(v.position - u.vehicle.position)) <= 80.0]
    assert a0["track_id"] == a1["track_id"] and len(a0["x"]) == len(near) and len(near) < len(u.road.vehicles) - 1
    assert sorted(a0["y"]) == pytest.approx(sorted(-v.position[1] for v in near))
    m = export_road(env, env_name="roundabout")
    n_lanes = sum(len(ls) for tos in u.road.network.graph.values() for ls in tos.values())
    # every highway-env lane, plus a connector across each gap highway-env leaves at the roundabout's entries and
    # exits (an entry lane ends 5.6-7.7 m before the ring lanes start): it starts where its lane ends and ends
    # where the next lane starts, so route centrelines join
    exported = {l["id"]: l for l in m["lanes"]}
    connectors = [l for l in m["lanes"] if "~" in l["id"]]
    assert len(m["lanes"]) == n_lanes + len(connectors) and len(connectors) >= 8
    for c in connectors:
        a, b = c["id"].split("~")
        assert c["kind"] == "lane_connector"
        assert np.allclose(c["centerline"][0], exported[a]["centerline"][-1], atol=1e-6)
        assert np.allclose(c["centerline"][-1], exported[b]["centerline"][0], atol=1e-6)
        assert 1.0 < np.hypot(*np.subtract(exported[b]["centerline"][0], exported[a]["centerline"][-1])) <= 10.0
    assert any(a["kind"] == "intersection" for a in m["areas"])
    # a lane centreline point maps back onto the simulator's lane (mirror in y)
    lane = u.road.network.get_lane(("se", "ex", 0))
    exported = next(l for l in m["lanes"] if l["id"] == "se>ex#0")
    assert np.allclose(exported["centerline"][0], to_global_xy(lane.position(0, 0)))
    img = env.render()
    tf = render_transform(env)
    uv = tf.project(center)
    # the ego sits at the env's centering position; its green body is drawn there
    assert np.allclose(uv, [tf.centering[0] * tf.image_size[0], tf.centering[1] * tf.image_size[1]])
    u_px, v_px = np.floor(uv).astype(int)
    assert (img[v_px - 1:v_px + 2, u_px - 1:u_px + 2].reshape(-1, 3) == (50, 200, 0)).all(1).any()
    assert img.shape[:2] == (tf.image_size[1], tf.image_size[0])
    env.close()


def test_an_episode_counts_the_simulator_warnings_and_the_cli_line_sums_them(tmp_path, monkeypatch, caplog):
    """Issue #20: highway-env's per-tick log warnings are counted per episode (returned to the parent, also across
    worker processes) and summed into sim_summary.json; `mose simulate` prints one line, not one per step."""
    import logging

    from datasets_cfg.sim import corpus

    class WarningRunner:
        def run(self, plan, out):
            for k in range(7):
                logging.getLogger("highway_env.road.road").warning(f"Route ('a', 'b', {k}) does not start after current road ('c', 'd', 0).")
            return []

    caplog.set_level(logging.WARNING)
    monkeypatch.setattr(corpus, "_RUNNER", WarningRunner())
    settings = {"seed": 0, "index": 3, "envs": ["highway"], "synthetic_fraction": 0.0, "scenes_per_episode": 2, "stride": 1,
                "image_size": 32, "image_format": "png"}
    index, n, warned = corpus._work((settings, str(tmp_path)))
    assert (index, n) == (3, 0) and warned["counts"] == {"Route (…) does not start after current road (…).": 7} and not caplog.records
    line = corpus._warnings_line({"by_message": {"Route (…) does not start after current road (…).": 7 + 5}})
    assert line.startswith("mose simulate: 12 simulator warning(s)") and "\n" not in line
    assert corpus._warnings_line({"total": 0, "by_message": {}}) is None
