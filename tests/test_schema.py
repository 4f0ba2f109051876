"""ScenePool schema: round trips, frame conversions against hand computations, bad input, atomic saves."""
import json
import math

import numpy as np
import pytest

from datasets_cfg.schema import Scene, SchemaError, ScenePool, new_row, validate_row


def turning_row(scene_id="s0"):
    """Ego at (10, 5) heading north (pi/2), driving north at 2 m/s; frames every 0.5 s from -1.0 s to +2.0 s."""
    t = [-1.0, -0.5, 0.0, 0.5, 1.0, 1.5, 2.0]
    return new_row(
        scene_id, "unit", "test", location="grid", weather="rainy", lighting="night", command="straight",
        current_index=2,
        ego={"t": t, "x": [10.0] * 7, "y": [5.0 + 2.0 * ti for ti in t], "heading": [math.pi / 2] * 7,
             "speed": [2.0] * 7, "accel": [0.0] * 7, "accel_lat": [0.0] * 7, "yaw_rate": [0.0] * 7},
        agents={"frame": [2, 2, 3], "track_id": ["car", "cone", "car"], "category": ["vehicle", "traffic_cone", "vehicle"],
                "x": [10.0, 7.0, 10.0], "y": [15.0, 5.0, 16.5], "heading": [math.pi / 2, 0.0, math.pi / 2],
                "length": [4.5, 0.4, 4.5], "width": [1.9, 0.4, 1.9], "height": [1.6, 0.7, 1.6],
                "vx": [0.0, 0.0, 0.0], "vy": [3.0, 0.0, 3.0]},
        map={"lanes": [{"id": "L1", "kind": "lane", "centerline": [[10.0, 0.0], [10.0, 50.0]],
                        "polygon": [[8.0, 0.0], [12.0, 0.0], [12.0, 50.0], [8.0, 50.0]], "speed_limit": 13.9, "on_route": True},
                       {"id": "L2", "kind": "lane_connector", "centerline": [[10.0, 50.0], [10.0, 60.0]],
                        "polygon": [[8.0, 50.0], [12.0, 50.0], [12.0, 60.0], [8.0, 60.0]], "speed_limit": float("nan"), "on_route": True}],
             "areas": [{"id": "R1", "kind": "roadblock", "polygon": [[6.0, 0.0], [14.0, 0.0], [14.0, 60.0], [6.0, 60.0]]}],
             "route": ["L1", "L2"]},
        traffic_lights={"frame": [2], "lane_id": ["L2"], "is_red": [True]},
        images=[{"frame": 2, "camera": "CAM_F0", "path": "images/s0.png"}, {"frame": 2, "camera": "CAM_B0", "path": "/abs/b.png"}],
        qa=[{"qid": f"{scene_id}-q0", "task": "region", "question": "What is in the box?", "answer": "A cone.",
             "category": "traffic_cone", "box": [10.0, 20.0, 5.0, 8.0], "skills": ["cones"]}],
        meta=json.dumps({"log_name": "log-a", "timestamp_s": 12.5}),
    )


def test_round_trip_is_exact(tmp_path):
    rows = [turning_row("a"), turning_row("b")]
    ScenePool.from_rows(rows).save(tmp_path / "pool")
    pool = ScenePool.load(tmp_path / "pool")
    assert pool.ids == ["a", "b"]
    got = pool["b"].row
    for key in ("ego", "agents", "traffic_lights", "images", "qa", "tags", "meta", "weather", "lighting", "command"):
        assert got[key] == rows[1][key], key
    assert got["map"]["route"] == ["L1", "L2"]
    assert math.isnan(got["map"]["lanes"][1]["speed_limit"])
    info = json.loads((tmp_path / "pool" / "pool.json").read_text())
    assert info["num_scenes"] == 2 and info["sources"] == {"real": 2} and info["schema_version"] == 1


def test_ego_frame_helpers_match_hand_computation():
    s = Scene(turning_row())
    np.testing.assert_allclose(s.ego_pose(), [10.0, 5.0, math.pi / 2])
    # heading north: global +y is ego +x; 2 m/s for 0.5 s -> 1 m ahead per pose
    np.testing.assert_allclose(s.future_trajectory(4, 0.5), [[1, 0, 0], [2, 0, 0], [3, 0, 0], [4, 0, 0]], atol=1e-12)
    # interpolation between frames (0.25 s steps)
    np.testing.assert_allclose(s.future_trajectory(2, 0.25)[:, 0], [0.5, 1.0], atol=1e-12)
    np.testing.assert_allclose(s.history_trajectory(3, 0.5)[:, 0], [-2.0, -1.0, 0.0], atol=1e-12)
    with pytest.raises(ValueError, match="covers"):
        s.future_trajectory(8, 0.5)  # only 2 s of future
    ego_traj = s.ego_trajectory("ego")
    assert ego_traj.shape == (7, 3)
    np.testing.assert_allclose(ego_traj[:, 1], 0.0, atol=1e-12)


def test_agents_at_in_ego_frame_rotates_positions_and_velocities():
    s = Scene(turning_row())
    a = s.agents_at(frame="ego")
    assert list(a.track_id) == ["car", "cone"] and list(a.category) == ["vehicle", "traffic_cone"]
    # car 10 m north of ego, heading north, moving north at 3 m/s -> 10 m ahead, heading 0, velocity (3, 0)
    np.testing.assert_allclose(a.xy[0], [10.0, 0.0], atol=1e-12)
    np.testing.assert_allclose(a.heading[0], 0.0, atol=1e-12)
    np.testing.assert_allclose(a.velocity[0], [3.0, 0.0], atol=1e-12)
    # cone 3 m west of ego (ego faces north) -> on the ego's left: y = +3
    np.testing.assert_allclose(a.xy[1], [0.0, 3.0], atol=1e-12)
    g = s.agents_at(3)
    assert len(g) == 1 and g.xy[0, 1] == 16.5
    assert len(s.agents_at(0)) == 0 and s.agents_at(0).xy.shape == (0, 2)


def test_map_geometry_and_images(tmp_path):
    s = Scene(turning_row(), root=tmp_path)
    polys = s.lane_polygons()
    assert set(polys) == {"L1", "L2"} and polys["L1"].area == pytest.approx(4.0 * 50.0)
    route = s.route_centerline()
    assert route.length == pytest.approx(60.0)  # shared end point joined once
    route_ego = s.route_centerline("ego")
    assert route_ego.coords[0] == pytest.approx((-5.0, 0.0))
    assert s.area_polygons()[0].area == pytest.approx(8.0 * 60.0)
    assert s.image_paths("CAM_F0") == [tmp_path / "images/s0.png"]
    assert str(s.image_paths("CAM_B0")[0]) == "/abs/b.png"


def test_pool_selection_where_filter_and_columns():
    pool = ScenePool.from_rows([turning_row("a"), {**turning_row("b"), "source": "synthetic"}, turning_row("c")])
    assert pool.select_ids(["c", "a"]).ids == ["c", "a"]
    with pytest.raises(KeyError, match="'zz'"):
        pool.select_ids(["a", "zz"])
    assert pool.where(source="synthetic").ids == ["b"]
    assert pool.where(source=["real"], id=["a", "b", "c"]).ids == ["a", "c"]
    with pytest.raises(KeyError, match="no column"):
        pool.where(colour="red")
    assert pool.filter(lambda s: s.id != "a").ids == ["b", "c"]
    feats = pool.with_column("feat", [[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    assert feats["b"]["feat"] == [3.0, 4.0]
    assert ScenePool.concatenate([pool.select_ids(["a"]), pool.select_ids(["b"])]).ids == ["a", "b"]
    with pytest.raises(SchemaError, match="unique ids"):
        ScenePool.concatenate([pool, pool])


@pytest.mark.parametrize(
    "change, field",
    [
        (lambda r: r.pop("split"), "split"),
        (lambda r: r.update(source="fake"), "source"),
        (lambda r: r.update(weather="foggy"), "weather"),
        (lambda r: r.update(dt=0), "dt"),
        (lambda r: r["ego"].update(x=[10.0] * 6), "ego"),
        (lambda r: r["ego"]["y"].__setitem__(3, float("inf")), "ego.y[3]"),
        (lambda r: r["ego"].update(t=[-1.0, -0.5, 0.0, 0.5, 0.5, 1.5, 2.0]), "ego.t"),
        (lambda r: r.update(current_index=9), "current_index"),
        (lambda r: r["agents"]["category"].__setitem__(0, "dragon"), "agents.category"),
        (lambda r: r["agents"]["frame"].__setitem__(0, 7), "agents.frame"),
        (lambda r: r["agents"]["width"].__setitem__(1, -1.0), "agents.width"),
        (lambda r: r["map"].update(route=["L9"]), "map.route"),
        (lambda r: r["map"]["lanes"][0].update(centerline=[[0.0, 0.0]]), "map.lanes[0].centerline"),
        (lambda r: r["map"]["lanes"][0].update(polygon=[[0.0, 0.0], [1.0, float("nan")], [2.0, 0.0]]), "map.lanes[0].polygon"),
        (lambda r: r["map"]["areas"][0].update(kind="lake"), "map.areas[0].kind"),
        (lambda r: r["traffic_lights"].update(lane_id=["L7"]), "traffic_lights.lane_id[0]"),
        (lambda r: r["qa"][0].update(box=[0.0, 0.0, -1.0, 2.0]), "qa[0].box"),
        (lambda r: r["qa"].append(dict(r["qa"][0])), "qa[1].qid"),
        (lambda r: r.update(meta="not json"), "meta"),
        (lambda r: r.update(crash="yes"), "crash"),
        (lambda r: r.update(colour="red"), "colour"),
    ],
)
def test_bad_rows_name_the_field(change, field):
    row = turning_row()
    change(row)
    with pytest.raises(SchemaError) as err:
        validate_row(row, "scenes.json")
    msg = str(err.value)
    assert msg.startswith("scenes.json") and f"field '{field}'" in msg and "expected" in msg


def test_duplicate_ids_are_refused_on_build_and_save(tmp_path):
    with pytest.raises(SchemaError, match="unique ids"):
        ScenePool.from_rows([turning_row("a"), turning_row("a")])
    from datasets import Dataset

    from datasets_cfg.schema import features

    rows = [turning_row("a"), turning_row("a")]
    rows[1]["qa"] = []
    dup = ScenePool(Dataset.from_list(rows, features=features()))
    with pytest.raises(SchemaError, match="duplicates"):
        dup.save(tmp_path / "dup")
    assert not (tmp_path / "dup" / "scenes").exists()
    with pytest.raises(SchemaError, match="qa.qid"):
        ScenePool.from_rows([turning_row("a"), {**turning_row("b"), "qa": turning_row("a")["qa"]}])


def test_failed_save_keeps_previous_pool_and_leaves_no_temp(tmp_path, monkeypatch):
    target = tmp_path / "pool"
    ScenePool.from_rows([turning_row("old")]).save(target)
    new = ScenePool.from_rows([turning_row("new")])

    def broken(path, *a, **k):
        (__import__("pathlib").Path(path) / "partial.arrow").write_text("half")
        raise OSError("disk full")

    monkeypatch.setattr(new.dataset, "save_to_disk", broken)
    with pytest.raises(OSError, match="disk full"):
        new.save(target)
    assert ScenePool.load(target).ids == ["old"]
    assert sorted(p.name for p in target.iterdir()) == ["pool.json", "scenes"]


def test_load_rejects_non_pool_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a ScenePool directory"):
        ScenePool.load(tmp_path)
    ScenePool.from_rows([turning_row()]).save(tmp_path / "p")
    (tmp_path / "p" / "pool.json").write_text(json.dumps({"schema_version": 99}))
    with pytest.raises(SchemaError, match="schema_version"):
        ScenePool.load(tmp_path / "p")


def test_from_generator_streams_and_checks(tmp_path):
    pool = ScenePool.from_generator(lambda: (turning_row(f"g{i}") for i in range(3)))
    assert pool.ids == ["g0", "g1", "g2"]
    assert pool["g1"].row["agents"] == turning_row("g1")["agents"]
    with pytest.raises(SchemaError, match="unique ids"):
        ScenePool.from_generator(lambda: (turning_row("same") for _ in range(2)))
    bad = turning_row("b")
    bad["ego"]["x"][0] = float("nan")
    with pytest.raises(SchemaError, match=r"ego.x\[0\]"):
        ScenePool.from_generator(lambda: iter([turning_row("ok"), bad]))
