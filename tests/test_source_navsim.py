"""NAVSIM / OpenScene source: tiny log pickles in the exact format, a tiny GeoJSON map, tiny images.

The fixture is built in a "local" road frame (origin G0, rotated by TH) and moved to the global frame by
hand here, so that every frame error in the importer (wrong rotation sense, ego vs. global, position vs.
velocity) shows up as a numeric mismatch. Expected values are computed independently with math.cos/sin.
"""
from __future__ import annotations

import copy
import json
import math
import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from datasets_cfg.schema import ScenePool
from datasets_cfg.sources import navsim
from datasets_cfg.sources.navsim import NavsimFormatError, NavsimImporter, convert_logs, load_log_pickle
from datasets_cfg.sources.navsim_map import MapFormatError, load_map, parse_map, write_map

G0 = np.array([100.0, 50.0])  # local road frame origin in the global frame
TH = 0.7  # local road frame rotation (rad)
T0_US = 1_620_000_000_000_000
N_FRAMES = 16
CAMS = navsim.CAMERAS


def rot(v, a):
    c, s = math.cos(a), math.sin(a)
    return np.array([c * v[0] - s * v[1], s * v[0] + c * v[1]])


def to_global(local_xy):
    return G0 + rot(local_xy, TH)


def quat_mul(a, b):
    w1, x1, y1, z1 = a
    w2, x2, y2, z2 = b
    return np.array([w1 * w2 - x1 * x2 - y1 * y2 - z1 * z2, w1 * x2 + x1 * w2 + y1 * z2 - z1 * y2,
                     w1 * y2 - x1 * z2 + y1 * w2 + z1 * x2, w1 * z2 + x1 * y2 - y1 * x2 + z1 * w2])


def ego_state(i):
    """Ground truth ego pose (global) at frame i."""
    t = 0.5 * i
    local = np.array([5.0 * t - 10.0, 0.05 * t * t])
    yaw = TH + math.atan2(0.1 * t, 5.0)
    return to_global(local), yaw


def agents_global(i):
    """Ground truth agents at frame i: (track, name, global xy, global heading, global velocity, l, w, h)."""
    t = 0.5 * i
    out = [("veh1", "vehicle", to_global(np.array([20.0 + 8.0 * t, 3.5])), TH, rot(np.array([8.0, 0.0]), TH), 4.5, 2.0, 1.6),
           ("cone1", "traffic_cone", np.array([130.0, 70.0]), 0.0, np.zeros(2), 0.3, 0.3, 0.7)]
    if i >= 2:
        out.append(("ped1", "pedestrian", np.array([105.0, 60.0 + 1.2 * t]), math.pi / 2, np.array([0.0, 1.2]), 0.6, 0.6, 1.8))
    return out


def make_frame(i, log_name="2021.05.12.log_a", prefix="tok"):
    """One frame dict exactly as OpenScene writes it (numpy arrays where it has numpy arrays)."""
    xy, yaw = ego_state(i)
    # a little pitch/roll so the yaw has to be extracted properly from the quaternion
    q = quat_mul(quat_mul([math.cos(yaw / 2), 0, 0, math.sin(yaw / 2)], [math.cos(0.01), 0, math.sin(0.01), 0]), [math.cos(0.015), math.sin(0.015), 0, 0])
    boxes, names, vels, tracks = [], [], [], []
    for track, name, gxy, gh, gv, l, w, h in agents_global(i):
        exy = rot(gxy - xy, -yaw)
        ev = rot(gv, -yaw)
        boxes.append([exy[0], exy[1], 0.5, l, w, h, gh - yaw])  # OpenScene does not wrap the heading
        names.append(name)
        vels.append([ev[0], ev[1], 0.0])
        tracks.append(track)
    token = f"{prefix}{i:02d}"
    command = np.zeros(4, dtype=int)
    command[(i + 3) % 4] = 1  # frame 3 (scene 0's current frame): right
    return {
        "token": token, "frame_idx": i, "timestamp": T0_US + 500_000 * i, "log_name": log_name, "log_token": "lt",
        "scene_name": "log-0001-scene", "scene_token": "sceneA", "map_location": "us-nv-las-vegas-strip",
        "roadblock_ids": ["rb1", "rb2", "rc1", "rb3", "rb4"], "vehicle_name": "veh-35", "can_bus": np.zeros(18),
        "lidar_path": f"{log_name}/MergedPointCloud/{token}.pcd",
        "ego2global_translation": np.array([xy[0], xy[1], 0.3]), "ego2global_rotation": q,
        "ego_dynamic_state": [5.0 + 0.1 * i, 0.01 * i, 0.2, -0.1],
        "traffic_lights": [(1001, i % 4 < 2), (9999, False)],
        "driving_command": command,
        "cams": {cam: {"data_path": f"{log_name}/{cam}/{token}.jpg", "sensor2lidar_rotation": np.eye(3),
                       "sensor2lidar_translation": np.zeros(3), "cam_intrinsic": np.eye(3), "distortion": np.zeros(5)} for cam in CAMS},
        "sample_prev": None, "sample_next": None,
        "anns": {"gt_boxes": np.array(boxes), "gt_names": np.array(names), "gt_velocity_3d": np.array(vels),
                 "instance_tokens": [f"{t}_{i}" for t in tracks], "track_tokens": tracks},
    }


def make_log(n=N_FRAMES, **kw):
    return [make_frame(i, **kw) for i in range(n)]


def dump(path, obj, protocol=pickle.HIGHEST_PROTOCOL):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(obj, protocol=protocol))
    return path


def lane(id_, kind, rb, x0, x1, y, outgoing=None, speed=None):
    c = [to_global(np.array([x0, y])).tolist(), to_global(np.array([x1, y])).tolist()]
    poly = [to_global(np.array(p)).tolist() for p in ((x0, y - 1.75), (x1, y - 1.75), (x1, y + 1.75), (x0, y + 1.75))]
    d = {"id": id_, "kind": kind, "roadblock_id": rb, "centerline": c, "polygon": poly, "speed_limit": speed}
    if outgoing is not None:
        d["outgoing"] = outgoing
    return d


def area(id_, kind, x0, x1, y0, y1):
    return {"id": id_, "kind": kind, "polygon": [to_global(np.array(p)).tolist() for p in ((x0, y0), (x1, y0), (x1, y1), (x0, y1))]}


MAP_LANES = [
    lane("L1", "lane", "rb1", -60, 30, 0.0, outgoing=["L2"], speed=13.4),  # explicit successor
    lane("L3", "lane", "rb1", -60, 30, 3.5, outgoing=[]),  # neighbour lane, dead end
    lane("L2", "lane", "rb2", 30, 80, 0.0),  # successors inferred from geometry from here on
    lane("1001", "lane_connector", "rc1", 80, 120, 0.0),
    lane("L4", "lane", "rb3", 120, 300, 0.0),
    lane("L5", "lane", "rb4", 300, 400, 0.0),  # on a route roadblock but beyond 100 m
    lane("L6", "lane", "rbx", -20, 20, -3.5),  # near, not on the route
    lane("Lfar", "lane", "rb9", 500, 600, 0.0),
]
MAP_AREAS = [area("A_rb1", "roadblock", -60, 30, -1.75, 5.25), area("A_ix", "intersection", 80, 120, -5, 5), area("A_far", "carpark", 900, 950, 900, 950)]


@pytest.fixture
def data(tmp_path):
    """A log directory, a map file and a sensor root with tiny JPEGs for every camera image."""
    from PIL import Image

    log = dump(tmp_path / "logs" / "2021.05.12.log_a.pkl", make_log())
    (tmp_path / "logs" / "notes.txt").write_text("not a log")
    (tmp_path / "logs" / "sub").mkdir()
    dump(tmp_path / "logs" / "sub" / "nested.pkl", ["must not be read: directories are not searched recursively"])
    map_path = write_map(tmp_path / "map.geojson", MAP_LANES, MAP_AREAS, location="us-nv-las-vegas-strip")
    root = tmp_path / "sensor_blobs"
    buf = tmp_path / "tiny.jpg"
    Image.new("RGB", (4, 2), (120, 30, 200)).save(buf)
    for frame in make_log():
        for cam in CAMS:
            p = root / frame["cams"][cam]["data_path"]
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(buf.read_bytes())
    return {"log": log, "logs": tmp_path / "logs", "map": map_path, "root": root, "tmp": tmp_path}


def convert(paths, **kw):
    return convert_logs([paths] if isinstance(paths, (str, Path)) else paths, **kw)


# ----------------------------------------------------------------------------------------------
# values


def test_scene_values_in_the_right_frames(data):
    rows, summary = convert(data["log"], sensor_root=data["root"], maps=[data["map"]], check_images=True, split="navtest")
    assert [r["id"] for r in rows] == ["tok03", "tok04", "tok05"]  # windows of 14 frames, stride 1, id = frame 3
    assert summary.scenes == 3 and summary.frames == N_FRAMES and summary.scenes_skipped == 0
    pool = ScenePool.from_rows(rows)
    scene = pool["tok03"]
    assert scene["split"] == "navtest" and scene["dataset"] == "navsim" and scene["location"] == "us-nv-las-vegas-strip"
    assert scene.current_index == 3 and scene.num_frames == 14
    assert scene["command"] == "right"  # one-hot [0, 0, 1, 0] at frame 3: (left, straight, right, unknown)
    assert pool["tok04"]["command"] == "unknown" and pool["tok05"]["command"] == "left"

    # ego: global rear-axle poses, t from timestamps, dynamics from ego_dynamic_state
    ego = scene["ego"]
    for k in range(14):
        xy, yaw = ego_state(k)
        assert ego["x"][k] == pytest.approx(xy[0], abs=1e-9) and ego["y"][k] == pytest.approx(xy[1], abs=1e-9)
        assert ego["heading"][k] == pytest.approx(yaw, abs=1e-9)
        assert ego["t"][k] == pytest.approx(0.5 * (k - 3))
        assert ego["speed"][k] == pytest.approx(5.0 + 0.1 * k) and ego["accel"][k] == pytest.approx(0.2) and ego["accel_lat"][k] == pytest.approx(-0.1)
    # yaw rate: central difference of the headings (interior frames), from the log's neighbours at scene edges
    yaws = [ego_state(k)[1] for k in range(N_FRAMES)]
    for k in range(14):
        expected = (yaws[k + 1] - yaws[k - 1]) / 1.0 if k > 0 else (yaws[1] - yaws[0]) / 0.5
        assert ego["yaw_rate"][k] == pytest.approx(expected, rel=1e-9)
    assert pool["tok04"]["ego"]["yaw_rate"][0] == pytest.approx((yaws[2] - yaws[0]) / 1.0)  # frame 1 has both neighbours in the log

    # agents of every frame in the global frame: positions, headings AND velocities
    for k in range(14):
        truth = {a[0]: a for a in agents_global(k)}
        ag = scene.agents_at(k)
        assert sorted(ag.track_id) == sorted(truth)
        for j, tid in enumerate(ag.track_id):
            _, name, gxy, gh, gv, l, w, h = truth[tid]
            assert ag.category[j] == name
            np.testing.assert_allclose(ag.xy[j], gxy, atol=1e-9)
            np.testing.assert_allclose(ag.velocity[j], gv, atol=1e-9)
            assert math.cos(ag.heading[j] - gh) == pytest.approx(1.0) and -math.pi <= ag.heading[j] < math.pi
            assert (ag.length[j], ag.width[j], ag.height[j]) == pytest.approx((l, w, h))

    # agents_at(frame="ego") gives back the original ego-frame boxes of the current frame
    raw = make_frame(3)["anns"]
    ag = scene.agents_at(frame="ego")
    order = [list(ag.track_id).index(t) for t in raw["track_tokens"]]
    np.testing.assert_allclose(ag.xy[order], raw["gt_boxes"][:, :2], atol=1e-9)
    np.testing.assert_allclose(np.cos(ag.heading[order] - raw["gt_boxes"][:, 6]), 1.0)
    np.testing.assert_allclose(ag.velocity[order], raw["gt_velocity_3d"][:, :2], atol=1e-9)

    # future trajectory in the ego frame of the current frame (NAVSIM's 8 poses at 0.5 s)
    fut = scene.future_trajectory(8, 0.5)
    xy3, yaw3 = ego_state(3)
    for n in range(8):
        xy, yaw = ego_state(4 + n)
        np.testing.assert_allclose(fut[n, :2], rot(xy - xy3, -yaw3), atol=1e-9)
        assert fut[n, 2] == pytest.approx(yaw - yaw3, abs=1e-9)

    # images: absolute paths under the sensor root, every frame and camera
    assert len(scene["images"]) == 14 * 8
    (front,) = scene.image_paths(camera="CAM_F0", frame=3)
    assert front == data["root"].resolve() / "2021.05.12.log_a" / "CAM_F0" / "tok03.jpg" and front.is_file()

    meta = scene.meta
    assert meta["log_name"] == "2021.05.12.log_a" and meta["timestamp_s"] == pytest.approx(1.5)
    assert pool["tok04"].meta["timestamp_s"] - meta["timestamp_s"] == pytest.approx(0.5)  # the scene 0.5 s earlier is findable
    assert meta["frame_tokens"] == [f"tok{k:02d}" for k in range(14)] and meta["scene_token"] == "sceneA"
    assert meta["ego_vy"][3] == pytest.approx(0.03) and meta["map"].endswith("map.geojson")


def test_map_route_and_traffic_lights(data):
    rows, summary = convert(data["log"], maps=[data["map"]])
    scene = ScenePool.from_rows(rows)["tok03"]
    lanes = {l["id"]: l for l in scene["map"]["lanes"]}
    assert set(lanes) == {"L1", "L3", "L2", "1001", "L4", "L6"}  # L5 and Lfar are beyond 100 m
    assert {k for k, l in lanes.items() if l["on_route"]} == {"L1", "L3", "L2", "1001", "L4"}
    assert scene["map"]["route"] == ["L1", "L2", "1001", "L4"]  # connected chain, in driving order, cut at the radius
    assert lanes["L1"]["speed_limit"] == pytest.approx(13.4) and math.isnan(lanes["L2"]["speed_limit"])
    assert lanes["1001"]["kind"] == "lane_connector"
    assert sorted(a["id"] for a in scene["map"]["areas"]) == ["A_ix", "A_rb1"]
    # the route line follows the lanes: local y = 0 from x = -60 to 300
    route = scene.route_centerline()
    assert route.length == pytest.approx(360.0)
    np.testing.assert_allclose(route.coords[0], to_global(np.array([-60.0, 0.0])))
    assert scene.lane_polygons()["L1"].contains(__import__("shapely").Point(scene.ego_pose()[:2]))

    tl = scene["traffic_lights"]
    assert set(tl["lane_id"]) == {"1001"}  # 9999 is not in the map: dropped and counted
    assert list(tl["frame"]) == list(range(14)) and list(tl["is_red"]) == [k % 4 < 2 for k in range(14)]
    assert scene.meta["traffic_lights_unmapped"] == 14 and summary.traffic_lights_unmapped == 3 * 14

    # without a map the lights are kept as they are, and no geometry is attached
    rows, _ = convert(data["log"])
    assert sorted(set(rows[0]["traffic_lights"]["lane_id"])) == ["1001", "9999"] and rows[0]["map"]["lanes"] == []
    # a map for another location is not applied
    other = write_map(data["tmp"] / "other.geojson", MAP_LANES[:1], location="sg-one-north")
    rows, _ = convert(data["log"], maps=[other])
    assert rows[0]["map"]["lanes"] == []


def test_map_file_round_trip_and_errors(tmp_path, data):
    m = load_map(data["map"])
    assert len(m.lanes) == len(MAP_LANES) and len(m.areas) == len(MAP_AREAS) and m.location == "us-nv-las-vegas-strip"
    np.testing.assert_allclose(m.lanes["L4"].centerline, MAP_LANES[4]["centerline"])
    np.testing.assert_allclose(m.areas["A_ix"].polygon, MAP_AREAS[1]["polygon"])  # rings stored open
    assert m.lanes["L1"].outgoing == ("L2",) and m.lanes["L2"].outgoing is None
    assert m.successors("L2") == ["1001"] and m.successors("L3") == []
    m.save(tmp_path / "again.geojson")
    assert json.loads((tmp_path / "again.geojson").read_text()) == json.loads(data["map"].read_text())

    good = json.loads(data["map"].read_text())

    def broken(edit):
        obj = copy.deepcopy(good)
        edit(obj)
        return obj

    cases = [
        (broken(lambda o: o["features"][0]["properties"].update(kind="crosswalk")), "features[0] (id='L1')", "properties.kind"),
        (broken(lambda o: o["features"][8]["geometry"].update(type="LineString")), "features[8]", "geometry.type"),
        (broken(lambda o: o["features"][2]["geometry"]["geometries"][0]["coordinates"][0].__setitem__(0, float("nan"))), "features[2]", "finite"),
        (broken(lambda o: o["features"][3]["properties"].update(id="L1")), "features[3]", "properties.id"),
        (broken(lambda o: o["features"][1]["properties"].update(speed_limit="fast")), "features[1]", "properties.speed_limit"),
        (broken(lambda o: o.update(type="Feature")), "top level", "type"),
    ]
    for obj, where, what in cases:
        p = tmp_path / "bad.geojson"
        p.write_text(json.dumps(obj))
        with pytest.raises(MapFormatError) as ei:
            load_map(p)
        assert str(p) in str(ei.value) and where in str(ei.value) and what in str(ei.value), str(ei.value)
    p.write_text('{"type": "FeatureCollection", "features": [')
    with pytest.raises(MapFormatError, match="bad.geojson: not valid JSON"):
        load_map(p)
    with pytest.raises(MapFormatError):  # write_map refuses what it could not read back, and writes nothing
        write_map(tmp_path / "never.geojson", [{"id": "x", "kind": "lane", "centerline": [[0, 0]]}])
    assert not (tmp_path / "never.geojson").exists()
    assert parse_map({"type": "FeatureCollection", "features": []}).lanes == {}
    # a stationary ego (all positions equal) still gets the elements around it
    sm = m.scene_map(np.tile(to_global(np.array([0.0, 0.0])), (5, 1)), [*to_global(np.array([0.0, 0.0])), TH], ["rb1", "rb2"], radius=10.0)
    assert sorted(l["id"] for l in sm["lanes"]) == ["L1", "L3", "L6"] and sm["route"] == ["L1"]  # L2 starts 30 m ahead


# ----------------------------------------------------------------------------------------------
# pickles: only what is needed gets unpickled


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {_Evil.marker}",))


def test_restricted_unpickler_refuses_code(tmp_path):
    _Evil.marker = tmp_path / "pwned"
    frames = make_log(14)
    frames[2]["anns"]["gt_names"] = _Evil()
    bad = dump(tmp_path / "evil.pkl", frames)
    with pytest.raises(NavsimFormatError) as ei:
        load_log_pickle(bad)
    msg = str(ei.value)
    assert "evil.pkl" in msg and ("posix.system" in msg or "os.system" in msg) and "'(pickle)'" in msg, msg
    assert not _Evil.marker.exists()
    for payload in (b"cbuiltins\neval\n(S'1'\ntR.", b"cbuiltins\ngetattr\n."):
        (tmp_path / "e2.pkl").write_bytes(payload)
        with pytest.raises(NavsimFormatError, match="refusing|only builtin containers"):
            load_log_pickle(tmp_path / "e2.pkl")

    # what real logs hold loads fine, from any protocol, including numpy-1.x module names
    log = make_log(2)
    for proto in (2, 4, 5):
        back = load_log_pickle(dump(tmp_path / f"p{proto}.pkl", log, protocol=proto))
        np.testing.assert_array_equal(back[1]["anns"]["gt_boxes"], log[1]["anns"]["gt_boxes"])
        assert list(back[1]["anns"]["gt_names"]) == list(log[1]["anns"]["gt_names"])
    old = pickle.dumps(log, protocol=2).replace(b"numpy._core.", b"numpy.core.")
    (tmp_path / "old.pkl").write_bytes(old)
    assert load_log_pickle(tmp_path / "old.pkl")[0]["token"] == "tok00"
    # a type outside the allow-list is refused; --unsafe-pickle (trusted=True) is the explicit way around it
    from fractions import Fraction

    odd = dump(tmp_path / "odd.pkl", [{"token": Fraction(1, 3)}])
    with pytest.raises(NavsimFormatError, match="fractions.Fraction"):
        load_log_pickle(odd)
    assert load_log_pickle(odd, trusted=True)[0]["token"] == Fraction(1, 3)


def test_only_named_files_are_read(data):
    assert navsim.collect_log_files([data["logs"]]) == [data["log"]]  # *.pkl directly inside, not sub/, not notes.txt
    with pytest.raises(FileNotFoundError, match="no such log file"):
        navsim.collect_log_files([data["logs"] / "missing.pkl"])
    with pytest.raises(FileNotFoundError, match="has no \\*.pkl"):
        navsim.collect_log_files([data["root"]])


# ----------------------------------------------------------------------------------------------
# bad input


def _set(path, value):
    def edit(frame):
        d = frame
        for k in path[:-1]:
            d = d[k]
        d[path[-1]] = value
    return edit


def _del(path):
    def edit(frame):
        d = frame
        for k in path[:-1]:
            d = d[k]
        del d[path[-1]]
    return edit


FRAME_CASES = [
    ("missing field", _del(["ego_dynamic_state"]), "'ego_dynamic_state'", "field missing"),
    ("missing nested field", _del(["anns", "gt_velocity_3d"]), "'anns.gt_velocity_3d'", "field missing"),
    ("wrong type timestamp", _set(["timestamp"], "noon"), "'timestamp'", "integer"),
    ("wrong box shape", _set(["anns", "gt_boxes"], np.zeros((3, 6))), "'anns.gt_boxes'", "(N, 7)"),
    ("names length", _set(["anns", "gt_names"], np.array(["vehicle"])), "'anns.gt_names'", "3 strings"),
    ("unknown class", _set(["anns", "gt_names"], np.array(["spaceship", "traffic_cone", "pedestrian"])), "'anns.gt_names[0]'", "one of"),
    ("bad command", _set(["driving_command"], np.array([1, 1, 0, 0])), "'driving_command'", "one-hot"),
    ("bad quaternion", _set(["ego2global_rotation"], np.zeros(4)), "'ego2global_rotation'", "non-zero quaternion"),
    ("nan translation", _set(["ego2global_translation"], np.array([np.nan, 1.0, 0.0])), "'ego2global_translation[0]'", "finite"),
    ("inf box", lambda f: f["anns"]["gt_boxes"].__setitem__((1, 0), np.inf), "'anns.gt_boxes[1][0]'", "finite"),
    ("negative size", lambda f: f["anns"]["gt_boxes"].__setitem__((0, 4), -2.0), "'anns.gt_boxes'", "non-negative"),
    ("escaping image path", _set(["cams", "CAM_L1", "data_path"], "../../../etc/passwd"), "'cams.CAM_L1.data_path'", "inside the sensor root"),
    ("absolute image path", _set(["cams", "CAM_F0", "data_path"], "/etc/passwd"), "'cams.CAM_F0.data_path'", "inside the sensor root"),
    ("traffic light type", _set(["traffic_lights"], [(1001, "red")]), "'traffic_lights[0][1]'", "bool"),
    ("frame not a dict", lambda f: f.clear() or f.update(token=3), "'token'", "string"),
]


@pytest.mark.parametrize("name,edit,field,expected", FRAME_CASES, ids=[c[0] for c in FRAME_CASES])
def test_bad_frame_names_file_frame_and_field(tmp_path, name, edit, field, expected):
    frames = make_log()
    edit(frames[15])
    path = dump(tmp_path / "bad_log.pkl", frames)
    with pytest.raises(NavsimFormatError) as ei:
        convert(path)
    msg = str(ei.value)
    assert "bad_log.pkl" in msg and "frame 15" in msg and field in msg and expected in msg, msg
    # skip mode: the bad frame takes out only the one scene containing it
    rows, summary = convert(path, skip_invalid=True)
    assert [r["id"] for r in rows] == ["tok03", "tok04"]
    assert summary.frames_invalid == 1 and summary.scenes_skipped == 1 and summary.scenes == 2
    assert sum(summary.skipped_by_field.values()) == 1 and "bad_log.pkl" in summary.errors[0]


def test_frame_that_is_not_a_dict(tmp_path):
    frames = make_log()
    frames[2] = ["token", "tok02"]
    with pytest.raises(NavsimFormatError, match=r"nondict.pkl: frame 2: field '\(frame\)': expected a dict"):
        convert(dump(tmp_path / "nondict.pkl", frames))


def test_bad_logs_and_skip_summary(tmp_path, data):
    good = data["log"]
    trunc = tmp_path / "truncated.pkl"
    trunc.write_bytes(pickle.dumps(make_log(3))[:-40])
    empty = dump(tmp_path / "empty.pkl", [])
    notlist = dump(tmp_path / "dict.pkl", {"frames": []})
    for path, field, expected in ((trunc, "(pickle)", "readable pickle"), (empty, "(top level)", "the log is empty"),
                                  (notlist, "(top level)", "a list of frame dicts")):
        with pytest.raises(NavsimFormatError) as ei:
            convert([good, path])
        assert path.name in str(ei.value) and field in str(ei.value) and expected in str(ei.value), str(ei.value)

    # frames out of time order
    frames = make_log()
    frames[8]["timestamp"] = frames[6]["timestamp"]
    order = dump(tmp_path / "order.pkl", frames)
    with pytest.raises(NavsimFormatError, match="order.pkl: frame 8 .*'timestamp'.*time order"):
        convert(order)

    # skip mode counts every kind of skip; the good log still converts
    rows, summary = convert([good, trunc, empty, notlist, order], skip_invalid=True)
    assert [r["id"] for r in rows] == ["tok03", "tok04", "tok05"]
    assert summary.logs == 5 and summary.logs_skipped == 3
    assert summary.frames_invalid == 1 and summary.scenes_skipped == 3  # frame 8 is in all three windows of order.pkl
    assert summary.skipped_by_field == {"(pickle)": 1, "(top level)": 2, "timestamp": 3}
    text = summary.format()
    assert "3 scenes from 2/5 logs" in text and "truncated.pkl" in text and "empty.pkl" in text

    # the same token in two logs
    dup = dump(tmp_path / "dup.pkl", make_log())
    with pytest.raises(NavsimFormatError, match="dup.pkl: scene 'tok03'.*unique across logs"):
        convert([good, dup])
    rows, summary = convert([good, dup], skip_invalid=True)
    assert len(rows) == 3 and summary.scenes_skipped == 3


def test_missing_image_needs_check_images(data):
    (data["root"] / "2021.05.12.log_a" / "CAM_R2" / "tok07.jpg").unlink()
    rows, _ = convert(data["log"], sensor_root=data["root"])  # not checked: paths recorded as given
    assert len(rows) == 3
    with pytest.raises(NavsimFormatError) as ei:
        convert(data["log"], sensor_root=data["root"], check_images=True)
    msg = str(ei.value)
    assert "2021.05.12.log_a.pkl: frame 7" in msg and "'cams.CAM_R2.data_path'" in msg and "existing image file" in msg
    rows, summary = convert(data["log"], sensor_root=data["root"], check_images=True, skip_invalid=True)
    assert rows == [] and summary.scenes_skipped == 3 and summary.skipped_by_field["cams.CAM_R2.data_path"] == 3
    with pytest.raises(ValueError, match="check_images needs a sensor root"):
        convert(data["log"], check_images=True)


def test_filters_and_window_parameters(tmp_path, data):
    frames = make_log()
    frames[4]["roadblock_ids"] = []
    path = dump(tmp_path / "noroute.pkl", frames)
    rows, summary = convert(path)
    assert [r["id"] for r in rows] == ["tok03", "tok05"] and summary.filtered["no_route"] == 1
    rows, _ = convert(path, require_route=False)
    assert len(rows) == 3
    rows, summary = convert(data["log"], tokens=["tok05"])
    assert [r["id"] for r in rows] == ["tok05"] and summary.filtered["not_in_tokens"] == 2
    rows, _ = convert(data["log"], history=2, future=6, stride=4, cameras=["CAM_F0"], sensor_root=data["root"])
    assert [r["id"] for r in rows] == ["tok01", "tok05", "tok09"]
    assert rows[0]["current_index"] == 1 and len(rows[0]["ego"]["t"]) == 8 and len(rows[0]["images"]) == 8
    rows, summary = convert(dump(tmp_path / "short.pkl", make_log(10)))
    assert rows == [] and summary.filtered["log_too_short"] == 1
    with pytest.raises(ValueError, match="history"):
        convert(data["log"], history=0)


# ----------------------------------------------------------------------------------------------
# CLI


def test_cli_round_trip_and_nothing_written_on_failure(tmp_path, data, capsys):
    from pipelines.cli import main

    out = tmp_path / "pool"
    tokens = tmp_path / "tokens.yaml"
    tokens.write_text("tokens:\n  - tok03\n  - tok05\n")
    argv = ["import", "navsim", "--logs", str(data["logs"]), "--out", str(out), "--map", str(data["map"]), "--sensor-root",
            str(data["root"]), "--check-images", "--split", "navtest", "--tokens", str(tokens)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "2 scenes from 1/1 logs" in printed and "not_in_tokens 1" in printed and "wrote 2 scenes" in printed
    pool = ScenePool.load(out)
    assert sorted(pool.ids) == ["tok03", "tok05"] and pool.summary()["datasets"] == {"navsim": 2}
    scene = pool["tok05"]
    assert scene["split"] == "navtest" and scene["map"]["route"][:2] == ["L1", "L2"]
    xy, yaw = ego_state(5)
    assert scene.ego_pose() == pytest.approx([xy[0], xy[1], yaw])
    assert all(p.is_file() for p in scene.image_paths(frame=0))

    # an existing pool is not replaced without --overwrite
    assert main(argv) == 1 and "--overwrite" in capsys.readouterr().err

    # a failing import writes nothing, and leaves an existing pool as it was
    bad_frames = make_log()
    bad_frames[9]["anns"]["gt_boxes"][0, 1] = np.nan
    bad = dump(tmp_path / "bad" / "bad.pkl", bad_frames)
    fresh = tmp_path / "fresh"
    assert main(["import", "navsim", "--logs", str(bad), "--out", str(fresh)]) == 1
    err = capsys.readouterr().err
    assert "bad.pkl: frame 9" in err and "'anns.gt_boxes[0][1]'" in err
    assert not fresh.exists()
    before = sorted(p.name for p in out.rglob("*"))
    assert main(["import", "navsim", "--logs", str(bad), "--out", str(out), "--overwrite"]) == 1
    assert sorted(p.name for p in out.rglob("*")) == before and sorted(ScenePool.load(out).ids) == ["tok03", "tok05"]

    # skip mode: the bad log's scenes are skipped and reported; the good ones are written
    assert main(["import", "navsim", "--logs", str(bad), str(data["log"]), "--out", str(fresh), "--skip-invalid",
                 "--history", "4", "--future", "10"]) == 0
    printed = capsys.readouterr().out
    assert "3 scenes from 2/2 logs (32 frames, 1 invalid); skipped: 0 logs, 3 scenes" in printed
    assert "skipped by field: anns.gt_boxes[0][1] 3" in printed and "bad.pkl: frame 9" in printed
    assert len(ScenePool.load(fresh)) == 3
    assert main(["import", "navsim", "--logs", str(bad), "--out", str(tmp_path / "none"), "--skip-invalid"]) == 1
    assert "no scenes to write" in capsys.readouterr().err and not (tmp_path / "none").exists()


def test_cli_help_warns_about_pickles(capsys):
    from pipelines.cli import main

    with pytest.raises(SystemExit):
        main(["import", "navsim", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "pickles can execute code" in text and "--unsafe-pickle" in text and "--skip-invalid" in text
