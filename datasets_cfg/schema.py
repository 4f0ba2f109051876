"""ScenePool: one schema for every driving scene, stored as a Hugging Face `datasets` Arrow dataset.

A ScenePool directory looks like::

    POOL/
      pool.json        # schema version, counts per source/dataset (written last, atomically)
      scenes/          # the Arrow dataset (datasets.save_to_disk), replaced atomically on save
      images/ ...      # optional: image files referenced by relative paths in `images[].path`

Rows never embed pixels: images are paths, so loading, filtering and selecting by id never read them.

Fields of one row (units SI; "global" = the scene's map frame, x/y in metres, heading in radians
counter-clockwise from +x; "ego" = the current ego rear-axle frame, +x forward, +y left):

- ``id`` (str): unique scene id within the pool (NAVSIM: the token of the current frame).
- ``dataset`` (str): where the scene comes from, e.g. "navsim", "coda_lm", "sim".
- ``split`` (str): the dataset's split name, e.g. "navtrain", "val", "train".
- ``source`` (str): "real" or "synthetic".
- ``location`` (str): map / city / simulator environment name ("" if unknown).
- ``weather`` (str): "sunny" | "rainy" | "" (unknown).
- ``lighting`` (str): "day" | "night" | "" (unknown).
- ``command`` (str): high-level driving command at the current frame: "left" | "straight" | "right" | "unknown".
- ``tags`` (list[str]): free labels (e.g. "merge", "near_miss", "aggressive_drivers").
- ``dt`` (float, s): nominal interval between frames (0.5 for 2 Hz data).
- ``current_index`` (int): index of the current frame in the ego arrays; earlier frames are history,
  later ones are the future (ground truth).
- ``ego`` (struct of equal-length lists, one entry per frame, global frame, rear axle):
  ``t`` (s, relative to the current frame, so ``t[current_index] == 0``, strictly increasing),
  ``x``, ``y`` (m), ``heading`` (rad), ``speed`` (m/s, signed longitudinal), ``accel`` (m/s²,
  longitudinal), ``accel_lat`` (m/s², lateral, +left), ``yaw_rate`` (rad/s, +counter-clockwise).
- ``agents`` (struct of equal-length lists, one entry per (frame, agent) observation, global frame):
  ``frame`` (index into the ego arrays), ``track_id`` (str, stable across frames), ``category`` (one of
  `AGENT_CATEGORIES`), ``x``, ``y`` (m, box centre), ``heading`` (rad), ``length``, ``width``, ``height``
  (m), ``vx``, ``vy`` (m/s, global frame).
- ``map`` (struct, global frame):
  ``lanes``: list of {``id``, ``kind`` ("lane" | "lane_connector"), ``centerline`` ([[x, y], …] m, in
  driving direction), ``polygon`` ([[x, y], …] m, exterior ring; may be empty), ``speed_limit`` (m/s, NaN if
  unknown), ``on_route`` (bool)};
  ``areas``: list of {``id``, ``kind`` (one of `AREA_KINDS`), ``polygon``}: drivable-area polygons;
  ``route``: lane ids of the route in driving order.
- ``traffic_lights`` (struct of equal-length lists): ``frame``, ``lane_id`` (a lane / lane connector in
  ``map.lanes``), ``is_red`` (bool): the light governing that lane at that frame.
- ``images`` (list of {``frame``, ``camera``, ``path``}): image files; relative paths are relative to the
  pool directory, absolute paths are kept as they are.
- ``qa`` (list of {``qid``, ``task``, ``question``, ``answer``, ``category``, ``box``, ``skills``}):
  question/answer annotations. ``qid`` is unique within the pool; ``task`` e.g. "general", "region",
  "suggestion"; ``box`` is [x, y, w, h] in image pixels from the top-left corner of the frame's first image
  (empty if none); ``skills`` are skill names.
- ``skills`` (list[str]): skills exercised by the scene.
- ``crash`` (bool), ``near_miss`` (bool): safety flags over the scene's time span.
- ``meta`` (str): JSON object with source-specific extras (e.g. NAVSIM log name); "{}" if none.
"""
from __future__ import annotations

import json
import math
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from common.atomic import atomic_dir, write_json
from common.errors import MoseError
from common.geometry import global_to_local, rotate_vectors, wrap_angle

SCHEMA_VERSION = 1
SOURCES = ("real", "synthetic")
COMMANDS = ("left", "straight", "right", "unknown")
WEATHER = ("sunny", "rainy", "")
LIGHTING = ("day", "night", "")
AGENT_CATEGORIES = ("vehicle", "pedestrian", "bicycle", "traffic_cone", "barrier", "czone_sign", "generic_object")
STATIC_CATEGORIES = ("traffic_cone", "barrier", "czone_sign", "generic_object")
LANE_KINDS = ("lane", "lane_connector")
AREA_KINDS = ("roadblock", "roadblock_connector", "intersection", "carpark")

EGO_FIELDS = ("t", "x", "y", "heading", "speed", "accel", "accel_lat", "yaw_rate")
AGENT_FLOAT_FIELDS = ("x", "y", "heading", "length", "width", "height", "vx", "vy")


class SchemaError(MoseError, ValueError):
    """A row or file does not fit the ScenePool schema. The message names where, the field and what was expected."""


def features():
    """The Arrow schema as `datasets.Features` (imported lazily: `datasets` is slow to import)."""
    from datasets import Features, List, Value

    f64, i32, s, b = Value("float64"), Value("int32"), Value("string"), Value("bool")
    points = List(List(f64))
    return Features(
        {
            "id": s, "dataset": s, "split": s, "source": s, "location": s, "weather": s, "lighting": s,
            "command": s, "tags": List(s), "dt": f64, "current_index": i32,
            "ego": {k: List(f64) for k in EGO_FIELDS},
            "agents": {"frame": List(i32), "track_id": List(s), "category": List(s), **{k: List(f64) for k in AGENT_FLOAT_FIELDS}},
            "map": {
                "lanes": List({"id": s, "kind": s, "centerline": points, "polygon": points, "speed_limit": f64, "on_route": b}),
                "areas": List({"id": s, "kind": s, "polygon": points}),
                "route": List(s),
            },
            "traffic_lights": {"frame": List(i32), "lane_id": List(s), "is_red": List(b)},
            "images": List({"frame": i32, "camera": s, "path": s}),
            "qa": List({"qid": s, "task": s, "question": s, "answer": s, "category": s, "box": List(f64), "skills": List(s)}),
            "skills": List(s), "crash": b, "near_miss": b, "meta": s,
        }
    )


def new_row(id: str, dataset: str, split: str, **fields: Any) -> dict:
    """A row with every field present: empty defaults, overridden by `fields`."""
    row = {
        "id": id, "dataset": dataset, "split": split, "source": "real", "location": "", "weather": "",
        "lighting": "", "command": "unknown", "tags": [], "dt": 0.5, "current_index": 0,
        "ego": {k: [] for k in EGO_FIELDS},
        "agents": {"frame": [], "track_id": [], "category": [], **{k: [] for k in AGENT_FLOAT_FIELDS}},
        "map": {"lanes": [], "areas": [], "route": []},
        "traffic_lights": {"frame": [], "lane_id": [], "is_red": []},
        "images": [], "qa": [], "skills": [], "crash": False, "near_miss": False, "meta": "{}",
    }
    unknown = set(fields) - set(row)
    if unknown:
        raise SchemaError(f"new_row({id!r}): unknown field(s) {sorted(unknown)}; expected some of {sorted(row)}")
    row.update(fields)
    return row


# ----------------------------------------------------------------------------------------------
# validation


def _fail(where: str, field: str, expected: str, got: Any) -> SchemaError:
    got_s = repr(got)
    if len(got_s) > 120:
        got_s = got_s[:117] + "..."
    return SchemaError(f"{where}: field '{field}': expected {expected}, got {got_s}")


def _finite_list(values: Any, where: str, field: str, *, allow_nan: bool = False) -> np.ndarray:
    if not isinstance(values, (list, tuple, np.ndarray)):
        raise _fail(where, field, "a list of numbers", values)
    try:
        arr = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        raise _fail(where, field, "a list of numbers", values) from None
    if arr.ndim != 1:
        raise _fail(where, field, "a flat list of numbers", values)
    bad = ~np.isfinite(arr) if not allow_nan else np.isinf(arr)
    if bad.any():
        i = int(np.argmax(bad))
        raise _fail(where, f"{field}[{i}]", "a finite number", arr[i])
    return arr


def _points(values: Any, where: str, field: str, min_points: int) -> None:
    if not isinstance(values, (list, tuple, np.ndarray)):
        raise _fail(where, field, "a list of [x, y] points", values)
    if len(values) == 0:
        return
    try:
        arr = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        raise _fail(where, field, "a list of [x, y] points", values) from None
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise _fail(where, field, "a list of [x, y] points", values)
    if len(arr) < min_points:
        raise _fail(where, field, f"at least {min_points} points", f"{len(arr)} points")
    if not np.isfinite(arr).all():
        raise _fail(where, field, "finite coordinates", values)


def _str(row: dict, key: str, where: str, choices: Sequence[str] | None = None, nonempty: bool = False) -> None:
    v = row.get(key)
    if not isinstance(v, str):
        raise _fail(where, key, "a string", v)
    if nonempty and not v:
        raise _fail(where, key, "a non-empty string", v)
    if choices is not None and v not in choices:
        raise _fail(where, key, f"one of {list(choices)}", v)


def _equal_lengths(struct: Any, keys: Iterable[str], where: str, field: str) -> int:
    if not isinstance(struct, dict):
        raise _fail(where, field, "a struct of lists", struct)
    lengths = {}
    for k in keys:
        if k not in struct:
            raise _fail(where, f"{field}.{k}", "a list (field missing)", None)
        if not isinstance(struct[k], (list, tuple, np.ndarray)):
            raise _fail(where, f"{field}.{k}", "a list", struct[k])
        lengths[k] = len(struct[k])
    if len(set(lengths.values())) > 1:
        raise _fail(where, field, "lists of equal length", lengths)
    return next(iter(lengths.values()), 0)


def validate_row(row: dict, where: str = "row") -> None:
    """Raise `SchemaError` if `row` does not fit the schema. `where` names the file/record for the message."""
    if not isinstance(row, dict):
        raise SchemaError(f"{where}: expected a dict row, got {type(row).__name__}")
    where = f"{where} (id={row.get('id')!r})" if "id" in row else where
    required = set(new_row("x", "x", "x"))
    missing = required - set(row)
    if missing:
        raise _fail(where, sorted(missing)[0], "a value (field missing)", None)
    extra = set(row) - required
    if extra:
        raise _fail(where, sorted(extra)[0], f"no such field (known: {sorted(required)})", row[sorted(extra)[0]])
    for key in ("id", "dataset", "split"):
        _str(row, key, where, nonempty=True)
    _str(row, "source", where, SOURCES)
    _str(row, "location", where)
    _str(row, "weather", where, WEATHER)
    _str(row, "lighting", where, LIGHTING)
    _str(row, "command", where, COMMANDS)
    _str(row, "meta", where)
    try:
        if not isinstance(json.loads(row["meta"]), dict):
            raise ValueError
    except ValueError:
        raise _fail(where, "meta", "a JSON object string", row["meta"]) from None
    for key in ("tags", "skills"):
        if not isinstance(row[key], (list, tuple)) or not all(isinstance(x, str) for x in row[key]):
            raise _fail(where, key, "a list of strings", row[key])
    for key in ("crash", "near_miss"):
        if not isinstance(row[key], (bool, np.bool_)):
            raise _fail(where, key, "a bool", row[key])
    dt = row["dt"]
    if isinstance(dt, bool) or not isinstance(dt, (int, float)) or not math.isfinite(dt) or dt <= 0:
        raise _fail(where, "dt", "a positive finite number of seconds", dt)

    # ego
    T = _equal_lengths(row["ego"], EGO_FIELDS, where, "ego")
    for k in EGO_FIELDS:
        _finite_list(row["ego"][k], where, f"ego.{k}")
    ci = row["current_index"]
    if isinstance(ci, bool) or not isinstance(ci, (int, np.integer)) or (T > 0 and not 0 <= ci < T) or (T == 0 and ci != 0):
        raise _fail(where, "current_index", f"an integer index into the {T} ego frames", ci)
    if T:
        t = np.asarray(row["ego"]["t"], dtype=np.float64)
        if T > 1 and not np.all(np.diff(t) > 0):
            raise _fail(where, "ego.t", "strictly increasing times", row["ego"]["t"])
        if abs(t[ci]) > 1e-6:
            raise _fail(where, "ego.t", "t == 0 at current_index", float(t[ci]))

    # agents
    agent_keys = ("frame", "track_id", "category", *AGENT_FLOAT_FIELDS)
    n = _equal_lengths(row["agents"], agent_keys, where, "agents")
    for k in AGENT_FLOAT_FIELDS:
        arr = _finite_list(row["agents"][k], where, f"agents.{k}")
        if k in ("length", "width", "height") and n and (arr < 0).any():
            raise _fail(where, f"agents.{k}", "non-negative sizes", arr[arr < 0][0])
    frames = row["agents"]["frame"]
    if n and (min(frames) < 0 or max(frames) >= max(T, 1)):
        raise _fail(where, "agents.frame", f"frame indices in [0, {T})", [f for f in frames if not 0 <= f < T][:3])
    bad_cat = [c for c in row["agents"]["category"] if c not in AGENT_CATEGORIES]
    if bad_cat:
        raise _fail(where, "agents.category", f"one of {list(AGENT_CATEGORIES)}", bad_cat[0])

    # map
    m = row["map"]
    if not isinstance(m, dict) or set(m) != {"lanes", "areas", "route"}:
        raise _fail(where, "map", "a struct with lanes, areas, route", m)
    lane_ids = set()
    for i, lane in enumerate(m["lanes"]):
        f = f"map.lanes[{i}]"
        if not isinstance(lane, dict) or set(lane) != {"id", "kind", "centerline", "polygon", "speed_limit", "on_route"}:
            raise _fail(where, f, "a struct with id, kind, centerline, polygon, speed_limit, on_route", lane)
        if lane["kind"] not in LANE_KINDS:
            raise _fail(where, f"{f}.kind", f"one of {list(LANE_KINDS)}", lane["kind"])
        _points(lane["centerline"], where, f"{f}.centerline", 2)
        _points(lane["polygon"], where, f"{f}.polygon", 3)
        if lane["id"] in lane_ids:
            raise _fail(where, f"{f}.id", "unique lane ids", lane["id"])
        lane_ids.add(lane["id"])
    for i, area in enumerate(m["areas"]):
        f = f"map.areas[{i}]"
        if not isinstance(area, dict) or set(area) != {"id", "kind", "polygon"}:
            raise _fail(where, f, "a struct with id, kind, polygon", area)
        if area["kind"] not in AREA_KINDS:
            raise _fail(where, f"{f}.kind", f"one of {list(AREA_KINDS)}", area["kind"])
        _points(area["polygon"], where, f"{f}.polygon", 3)
    for lid in m["route"]:
        if lid not in lane_ids:
            raise _fail(where, "map.route", "ids of lanes in map.lanes", lid)

    # traffic lights, images, qa
    nl = _equal_lengths(row["traffic_lights"], ("frame", "lane_id", "is_red"), where, "traffic_lights")
    for i in range(nl):
        if not 0 <= row["traffic_lights"]["frame"][i] < max(T, 1):
            raise _fail(where, f"traffic_lights.frame[{i}]", f"a frame index in [0, {T})", row["traffic_lights"]["frame"][i])
        if lane_ids and row["traffic_lights"]["lane_id"][i] not in lane_ids:
            raise _fail(where, f"traffic_lights.lane_id[{i}]", "a lane id in map.lanes", row["traffic_lights"]["lane_id"][i])
    for i, im in enumerate(row["images"]):
        if not isinstance(im, dict) or set(im) != {"frame", "camera", "path"}:
            raise _fail(where, f"images[{i}]", "a struct with frame, camera, path", im)
        if not isinstance(im["path"], str) or not im["path"]:
            raise _fail(where, f"images[{i}].path", "a non-empty path string", im["path"])
        if not 0 <= im["frame"] < max(T, 1):
            raise _fail(where, f"images[{i}].frame", f"a frame index in [0, {max(T, 1)})", im["frame"])
    qids = set()
    for i, qa in enumerate(row["qa"]):
        f = f"qa[{i}]"
        keys = {"qid", "task", "question", "answer", "category", "box", "skills"}
        if not isinstance(qa, dict) or set(qa) != keys:
            raise _fail(where, f, f"a struct with {sorted(keys)}", qa)
        for k in ("qid", "task", "question", "answer", "category"):
            if not isinstance(qa[k], str):
                raise _fail(where, f"{f}.{k}", "a string", qa[k])
        if not qa["qid"] or qa["qid"] in qids:
            raise _fail(where, f"{f}.qid", "a non-empty id unique within the scene", qa["qid"])
        qids.add(qa["qid"])
        if len(qa["box"]):
            box = _finite_list(qa["box"], where, f"{f}.box")
            if len(box) != 4 or box[2] < 0 or box[3] < 0:
                raise _fail(where, f"{f}.box", "[x, y, w, h] with w, h >= 0", qa["box"])


# ----------------------------------------------------------------------------------------------
# one scene


@dataclass(frozen=True)
class Agents:
    """Agents observed at one frame (arrays of equal length)."""

    track_id: np.ndarray  # (n,) str
    category: np.ndarray  # (n,) str
    xy: np.ndarray  # (n, 2) m, box centre
    heading: np.ndarray  # (n,) rad
    length: np.ndarray  # (n,) m
    width: np.ndarray  # (n,) m
    height: np.ndarray  # (n,) m
    velocity: np.ndarray  # (n, 2) m/s

    def __len__(self) -> int:
        return len(self.track_id)


class Scene:
    """Read-only view of one ScenePool row with the geometry helpers every later part needs."""

    def __init__(self, row: dict, root: str | os.PathLike | None = None):
        self.row = row
        self.root = Path(root) if root is not None else None

    def __getitem__(self, key: str):
        return self.row[key]

    @property
    def id(self) -> str:
        return self.row["id"]

    @property
    def num_frames(self) -> int:
        return len(self.row["ego"]["t"])

    @property
    def current_index(self) -> int:
        return int(self.row["current_index"])

    @property
    def meta(self) -> dict:
        return json.loads(self.row["meta"])

    # ego ------------------------------------------------------------------------------------
    def ego_trajectory(self, frame: str = "global") -> np.ndarray:
        """(T, 3) ego poses (x, y, heading) over all frames, in the global or current ego frame."""
        e = self.row["ego"]
        traj = np.stack([np.asarray(e["x"], float), np.asarray(e["y"], float), np.asarray(e["heading"], float)], axis=-1)
        return self._to_frame(traj, frame)

    def ego_pose(self) -> np.ndarray:
        """(3,) current ego pose in the global frame."""
        return self.ego_trajectory()[self.current_index]

    def future_trajectory(self, num_poses: int = 8, interval: float = 0.5, frame: str = "ego") -> np.ndarray:
        """(num_poses, 3) ground-truth future poses at `interval` s steps after the current frame.

        Poses are interpolated linearly in time (heading unwrapped first). Raises ValueError if the scene's
        future is shorter than `num_poses * interval`.
        """
        return self._poses_at(np.arange(1, num_poses + 1) * interval, frame)

    def history_trajectory(self, num_poses: int = 4, interval: float = 0.5, frame: str = "ego") -> np.ndarray:
        """(num_poses, 3) past poses, oldest first, ending at the current pose."""
        return self._poses_at(-np.arange(num_poses - 1, -1, -1) * interval, frame)

    def _poses_at(self, times: np.ndarray, frame: str) -> np.ndarray:
        t = np.asarray(self.row["ego"]["t"], float)
        if len(t) == 0 or times.min() < t[0] - 1e-6 or times.max() > t[-1] + 1e-6:
            raise ValueError(
                f"scene {self.id}: poses requested for t in [{times.min():.2f}, {times.max():.2f}] s but the scene covers "
                f"[{t[0] if len(t) else float('nan'):.2f}, {t[-1] if len(t) else float('nan'):.2f}] s"
            )
        traj = self.ego_trajectory()
        heading = np.unwrap(traj[:, 2])
        out = np.stack([np.interp(times, t, traj[:, 0]), np.interp(times, t, traj[:, 1]), wrap_angle(np.interp(times, t, heading))], -1)
        return self._to_frame(out, frame)

    # agents ---------------------------------------------------------------------------------
    def agents_at(self, t: int | None = None, frame: str = "global") -> Agents:
        """Agents observed at frame index `t` (default: the current frame), in the global or ego frame."""
        t = self.current_index if t is None else int(t)
        a = self.row["agents"]
        idx = np.flatnonzero(np.asarray(a["frame"], dtype=np.int64) == t)
        col = lambda k: np.asarray(a[k], dtype=np.float64)[idx] if len(idx) else np.zeros(0)  # noqa: E731
        xy = np.stack([col("x"), col("y")], -1).reshape(-1, 2)
        heading = col("heading")
        vel = np.stack([col("vx"), col("vy")], -1).reshape(-1, 2)
        if frame == "ego":
            origin = self.ego_pose()
            poses = global_to_local(np.concatenate([xy, heading[:, None]], -1), origin)
            xy, heading, vel = poses[:, :2], poses[:, 2], rotate_vectors(vel, -origin[2])
        elif frame != "global":
            raise ValueError(f"frame must be 'global' or 'ego', got {frame!r}")
        take = lambda k: np.asarray(a[k], dtype=object)[idx] if len(idx) else np.zeros(0, dtype=object)  # noqa: E731
        return Agents(take("track_id").astype(str), take("category").astype(str), xy, heading, col("length"), col("width"), col("height"), vel)

    # map ------------------------------------------------------------------------------------
    def lane_polygons(self, frame: str = "global") -> dict:
        """Lane id -> shapely Polygon (lanes with a polygon only)."""
        from shapely import Polygon

        return {l["id"]: Polygon(self._to_frame(np.asarray(l["polygon"], float), frame)) for l in self.row["map"]["lanes"] if len(l["polygon"])}

    def lane_centerlines(self, frame: str = "global") -> dict:
        """Lane id -> shapely LineString of its centreline."""
        from shapely import LineString

        return {l["id"]: LineString(self._to_frame(np.asarray(l["centerline"], float), frame)) for l in self.row["map"]["lanes"]}

    def area_polygons(self, kinds: Sequence[str] = AREA_KINDS, frame: str = "global") -> list:
        """Drivable-area polygons of the given kinds as shapely Polygons."""
        from shapely import Polygon

        return [Polygon(self._to_frame(np.asarray(a["polygon"], float), frame)) for a in self.row["map"]["areas"] if a["kind"] in kinds]

    def route_centerline(self, frame: str = "global"):
        """The route as one shapely LineString: on-route lane centrelines joined in route order (None if no route)."""
        from shapely import LineString

        lanes = {l["id"]: np.asarray(l["centerline"], float) for l in self.row["map"]["lanes"]}
        pts = [lanes[lid] for lid in self.row["map"]["route"]]
        if not pts:
            return None
        joined = [pts[0]] + [p[1:] if np.allclose(p[0], prev[-1]) else p for prev, p in zip(pts, pts[1:])]
        return LineString(self._to_frame(np.concatenate(joined), frame))

    # images ---------------------------------------------------------------------------------
    def image_paths(self, camera: str | None = None, frame: int | None = None) -> list[Path]:
        """Resolved image paths (relative paths are resolved under the pool directory)."""
        out = []
        for im in self.row["images"]:
            if (camera is None or im["camera"] == camera) and (frame is None or im["frame"] == frame):
                p = Path(im["path"])
                out.append(p if p.is_absolute() or self.root is None else self.root / p)
        return out

    def _to_frame(self, arr: np.ndarray, frame: str) -> np.ndarray:
        if frame == "global":
            return arr
        if frame == "ego":
            return global_to_local(arr, self.ego_pose())
        raise ValueError(f"frame must be 'global' or 'ego', got {frame!r}")


# ----------------------------------------------------------------------------------------------
# the pool


class ScenePool:
    """A set of scenes with unique ids, backed by a `datasets.Dataset` (memory-mapped when loaded from disk)."""

    def __init__(self, dataset, root: str | os.PathLike | None = None):
        self.dataset = dataset
        self.root = Path(root) if root is not None else None
        self._index: dict[str, int] | None = None

    # construction --------------------------------------------------------------------------
    @classmethod
    def from_rows(cls, rows: Iterable[dict], root: str | os.PathLike | None = None, where: str = "rows") -> "ScenePool":
        """Validate `rows` and build a pool. Raises SchemaError on the first bad row or a duplicate id."""
        from datasets import Dataset

        rows = list(rows)
        seen: dict[str, int] = {}
        for i, row in enumerate(rows):
            validate_row(row, f"{where}[{i}]")
            if row["id"] in seen:
                raise SchemaError(f"{where}[{i}]: field 'id': expected unique ids, got {row['id']!r} again (first at [{seen[row['id']]}])")
            seen[row["id"]] = i
        _check_unique_qids(rows, where)
        return cls(Dataset.from_list(rows, features=features()), root)

    @classmethod
    def from_generator(cls, rows: Callable[[], Iterable[dict]], root: str | os.PathLike | None = None, where: str = "rows") -> "ScenePool":
        """Like `from_rows`, but streams: `rows()` yields rows that are validated and written to Arrow one by one,
        so a large import (e.g. navtrain) never holds every row in memory."""
        from datasets import Dataset

        def checked():
            seen_ids: set[str] = set()
            seen_qids: set[str] = set()
            for i, row in enumerate(rows()):
                validate_row(row, f"{where}[{i}]")
                if row["id"] in seen_ids:
                    raise SchemaError(f"{where}[{i}]: field 'id': expected unique ids, got {row['id']!r} again")
                seen_ids.add(row["id"])
                for qa in row["qa"]:
                    if qa["qid"] in seen_qids:
                        raise SchemaError(f"{where}[{i}] (id={row['id']!r}): field 'qa.qid': expected ids unique in the pool, got {qa['qid']!r} again")
                    seen_qids.add(qa["qid"])
                yield row

        # datasets fingerprints the generator for caching; a fresh cache dir avoids reusing a stale result
        import tempfile

        from datasets.exceptions import DatasetGenerationError

        cache = tempfile.mkdtemp(prefix="scenepool-gen-")  # holds the memory-mapped Arrow until `save`
        try:
            return cls(Dataset.from_generator(checked, features=features(), cache_dir=cache), root)
        except DatasetGenerationError as exc:  # datasets wraps the generator's error: show ours
            cause = exc.__cause__
            while cause is not None and not isinstance(cause, SchemaError):
                cause = cause.__cause__ or cause.__context__
            if cause is not None:
                raise cause from None
            raise

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ScenePool":
        """Open a pool directory written by `save` (no image is read)."""
        from datasets import load_from_disk

        path = Path(path)
        if not (path / "scenes").is_dir() or not (path / "pool.json").is_file():
            raise FileNotFoundError(f"{path}: not a ScenePool directory (expected {path / 'pool.json'} and {path / 'scenes'}/)")
        info = json.loads((path / "pool.json").read_text())
        if info.get("schema_version") != SCHEMA_VERSION:
            raise SchemaError(f"{path / 'pool.json'}: field 'schema_version': expected {SCHEMA_VERSION}, got {info.get('schema_version')!r}")
        return cls(load_from_disk(str(path / "scenes")), root=path)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the pool to `path` atomically (scenes/ swapped in whole, then pool.json). Refuses duplicate ids."""
        path = Path(path)
        counts = Counter(self.ids)
        dup = [k for k, c in counts.items() if c > 1]
        if dup:
            raise SchemaError(f"{path}: field 'id': expected unique ids, got duplicates {dup[:5]}")
        path.mkdir(parents=True, exist_ok=True)
        with atomic_dir(path / "scenes") as tmp:
            self.dataset.save_to_disk(str(tmp))
        write_json(path / "pool.json", self.summary() | {"schema_version": SCHEMA_VERSION})
        self.root = path
        return path

    @staticmethod
    def concatenate(pools: Sequence["ScenePool"]) -> "ScenePool":
        from datasets import concatenate_datasets

        out = ScenePool(concatenate_datasets([p.dataset for p in pools]), pools[0].root if pools else None)
        dup = [k for k, c in Counter(out.ids).items() if c > 1]
        if dup:
            raise SchemaError(f"concatenate: field 'id': expected unique ids across pools, got duplicates {dup[:5]}")
        return out

    # access ---------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def ids(self) -> list[str]:
        return list(self.dataset["id"])

    def column(self, name: str) -> list:
        """One column as a list (reads only that column)."""
        return list(self.dataset[name])

    def index_of(self, scene_id: str) -> int:
        if self._index is None:
            self._index = {sid: i for i, sid in enumerate(self.dataset["id"])}
        try:
            return self._index[scene_id]
        except KeyError:
            raise KeyError(f"scene id {scene_id!r} is not in the pool ({len(self)} scenes)") from None

    def __contains__(self, scene_id: str) -> bool:
        try:
            self.index_of(scene_id)
            return True
        except KeyError:
            return False

    def __getitem__(self, key: int | str) -> Scene:
        i = self.index_of(key) if isinstance(key, str) else int(key)
        return Scene(self.dataset[i], self.root)

    def __iter__(self):
        for row in self.dataset:
            yield Scene(row, self.root)

    def select_ids(self, ids: Sequence[str]) -> "ScenePool":
        """A new pool with exactly these scenes, in this order. Unknown ids raise KeyError naming them."""
        missing = [i for i in ids if i not in self]
        if missing:
            raise KeyError(f"{len(missing)} id(s) not in the pool, e.g. {missing[:5]}")
        return ScenePool(self.dataset.select([self.index_of(i) for i in ids]), self.root)

    def where(self, **equals: Any) -> "ScenePool":
        """Scenes whose scalar columns equal the given values (e.g. `where(source="real")`); reads only those columns."""
        mask = np.ones(len(self), dtype=bool)
        for col, value in equals.items():
            if col not in self.dataset.column_names:
                raise KeyError(f"no column {col!r}; columns: {self.dataset.column_names}")
            vals = np.asarray(self.dataset[col], dtype=object)
            mask &= np.isin(vals, list(value)) if isinstance(value, (list, tuple, set)) else vals == value
        return ScenePool(self.dataset.select(np.flatnonzero(mask)), self.root)

    def filter(self, fn: Callable[[Scene], bool]) -> "ScenePool":
        """Scenes for which `fn(scene)` is true (decodes rows; prefer `where` for metadata)."""
        keep = [i for i, row in enumerate(self.dataset) if fn(Scene(row, self.root))]
        return ScenePool(self.dataset.select(keep), self.root)

    def with_column(self, name: str, values: Sequence) -> "ScenePool":
        """A new pool with an extra (or replaced) column, e.g. cached features."""
        ds = self.dataset.remove_columns(name) if name in self.dataset.column_names else self.dataset
        return ScenePool(ds.add_column(name, list(values)), self.root)

    def summary(self) -> dict:
        cols = self.dataset.select_columns(["source", "dataset", "location"])
        return {
            "num_scenes": len(self),
            "sources": dict(Counter(cols["source"])),
            "datasets": dict(Counter(cols["dataset"])),
            "locations": dict(Counter(cols["location"])),
        }


def _check_unique_qids(rows: Sequence[dict], where: str) -> None:
    seen: dict[str, str] = {}
    for row in rows:
        for qa in row["qa"]:
            if qa["qid"] in seen:
                raise SchemaError(f"{where} (id={row['id']!r}): field 'qa.qid': expected ids unique in the pool, got {qa['qid']!r} again (first in scene {seen[qa['qid']]!r})")
            seen[qa["qid"]] = row["id"]
