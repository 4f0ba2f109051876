"""NAVSIM / OpenScene log pickles -> ScenePool rows (`mose import navsim`).

SECURITY: a pickle can execute arbitrary code when it is loaded. This module unpickles only files the user
names (a directory named explicitly contributes its ``*.pkl`` files, not recursively), and by default with a
restricted unpickler that accepts only builtin containers/scalars and numpy arrays/scalars/dtypes, which is
all these logs contain; anything else (e.g. ``os.system``) is refused before it runs. ``trusted_pickles=True``
(``--unsafe-pickle``) uses the plain pickle module instead: only for files you trust.

Input (one pickle per log: a list of 2 Hz frame dicts, as written by OpenScene and read by the NAVSIM devkit)
- ``token`` (str), ``timestamp`` (int, µs), ``log_name``, ``scene_token``, ``map_location`` (str);
- ``ego2global_translation`` [x, y, z] (m) and ``ego2global_rotation`` quaternion [w, x, y, z]: the ego
  rear-axle pose in the map frame; ``ego_dynamic_state`` [vx, vy, ax, ay] in the ego frame (m/s, m/s²);
- ``driving_command``: one-hot over (left, straight, right, unknown) — OpenScene's order
  ("left, forward, right, unknown"), computed from the route 20 m ahead;
- ``cams``: {CAM_F0, CAM_L0..L2, CAM_R0..R2, CAM_B0: {data_path (relative to the sensor root),
  sensor2lidar_rotation/translation, cam_intrinsic, distortion}}; ``lidar_path``;
- ``anns``: gt_boxes (N, 7) = (x, y, z, length, width, height, heading) in the ego frame, gt_names (N),
  gt_velocity_3d (N, 3) in the ego frame (as the NAVSIM devkit reads it), instance_tokens, track_tokens;
- ``traffic_lights`` [(lane_connector_id, is_red)], ``roadblock_ids`` (the route, in driving order).

Scenes: like the devkit's ``SceneFilter``, a log is cut into windows of ``history + future`` consecutive
frames starting every ``stride`` frames (navtrain/navtest: 4 + 10, stride 1); the scene id is the token of
frame ``history - 1`` (the current frame); by default scenes whose current frame has no route are left out
(``has_route``), and ``tokens`` keeps only the listed scene ids.

Output row (see `datasets_cfg.schema`): ``ego`` in the global frame at the rear axle, with x, y from the
translation, heading = yaw of the quaternion (atan2(2(wz + xy), 1 − 2(y² + z²)), quaternion normalised),
speed = vx, accel = ax, accel_lat = ay (ego frame, i.e. longitudinal / lateral), and yaw_rate = the time
derivative of the unwrapped heading over the log's timestamps (``numpy.gradient``: central differences
inside a run of consecutive valid frames, one-sided at its ends; 0 for a lone frame) — the logs carry no
yaw rate. ``ego.t`` comes from the real timestamps (seconds relative to the current frame), so a dropped
frame shows as a longer step. Agents of every frame are turned from the ego frame of *that* frame into the
global frame: centre p_g = R(yaw)·p_e + t, heading_g = heading_e + yaw, velocity v_g = R(yaw)·v_e. Class
names map one to one onto `AGENT_CATEGORIES` (nuPlan's seven tracked-object types: vehicle, pedestrian,
bicycle, traffic_cone, barrier, czone_sign, generic_object); any other name is an error. Traffic lights:
one entry per (frame, lane connector); with a map, lights on lane connectors missing from the map file
are dropped and counted (``meta.traffic_lights_unmapped``). Images: with a sensor root, absolute paths
``sensor_root / data_path`` per frame and camera; a ``data_path`` that is absolute or climbs out with
``..`` is refused (a lexical check: symlinks inside the root are followed as the user set them up).
Map geometry comes from optional GeoJSON map files (`datasets_cfg.sources.navsim_map`).
``meta``: log_name, timestamp_s (seconds since the log's first valid frame), timestamp_us, token,
scene_token, log_file, frame_tokens, roadblock_ids, lidar_path, ego_vy (lateral speed per frame, m/s),
num_history_frames, num_future_frames, map (file used or ""), traffic_lights_unmapped.

Bad input: a malformed pickle, a missing field, a wrong type, non-finite numbers, an image path escaping
the sensor root, a missing image (``check_images``), an empty log: a `NavsimFormatError` naming the file,
the frame, the field and what was expected. With ``skip_invalid`` a bad log is skipped as a whole, a bad
frame removes the scenes that contain it, and every skip is counted in `ImportSummary` with its reason.
The CLI writes the pool only after every log is converted (`ScenePool.save` is atomic).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import pickle
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Iterable, Sequence

import numpy as np

from common.errors import MoseError
from common.geometry import rotate_vectors, wrap_angle
from datasets_cfg.schema import AGENT_CATEGORIES, COMMANDS, SchemaError, new_row, validate_row

CAMERAS = ("CAM_F0", "CAM_L0", "CAM_L1", "CAM_L2", "CAM_R0", "CAM_R1", "CAM_R2", "CAM_B0")
COMMAND_ORDER = ("left", "straight", "right", "unknown")  # index of the one-hot driving_command
CLASS_MAP = {name: name for name in AGENT_CATEGORIES}  # nuPlan tracked-object type -> schema category
assert set(COMMAND_ORDER) == set(COMMANDS)

_MISSING = object()


class NavsimFormatError(SchemaError):
    """A log pickle (or a frame in it) does not follow the format. Names the file, frame, field, expectation."""

    def __init__(self, file: Any, field: str, expected: str, got: Any = _MISSING, where: str = ""):
        self.file, self.field, self.expected, self.where = str(file), field, expected, where
        if got is _MISSING:
            tail = " (field missing)"
        else:
            got_s = repr(got)
            tail = f", got {got_s if len(got_s) <= 120 else got_s[:117] + '...'}"
        super().__init__(f"{file}{': ' + where if where else ''}: field '{field}': expected {expected}{tail}")


# ----------------------------------------------------------------------------------------------
# unpickling


def _latin1_encode(obj, encoding="latin1"):
    # numpy arrays pickled with protocol <= 2 store their bytes as `_codecs.encode(str, "latin1")`
    if not isinstance(obj, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"_codecs.encode only allowed for (str, 'latin1'), got ({type(obj).__name__}, {encoding!r})")
    return obj.encode("latin1")


def _allowed_globals() -> dict:
    import builtins
    import collections

    try:  # numpy >= 2 keeps the internals in numpy._core; pickles from numpy 1.x name numpy.core
        from numpy._core import multiarray, numeric
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import multiarray, numeric
    allowed = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype, ("_codecs", "encode"): _latin1_encode,
               ("collections", "OrderedDict"): collections.OrderedDict}
    for mod in ("numpy.core", "numpy._core"):
        allowed[(f"{mod}.multiarray", "_reconstruct")] = multiarray._reconstruct
        allowed[(f"{mod}.multiarray", "scalar")] = multiarray.scalar
        allowed[(f"{mod}.numeric", "_frombuffer")] = numeric._frombuffer
    for name in ("set", "frozenset", "bytearray", "complex"):
        allowed[("builtins", name)] = getattr(builtins, name)
    return allowed


class RefusedGlobal(MoseError, pickle.UnpicklingError):
    def __init__(self, module: str, name: str):
        self.module, self.name = module, name
        super().__init__(f"refusing to load global {module}.{name}")


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the globals a NAVSIM log needs (numpy arrays and builtin containers)."""

    _allowed = None

    def find_class(self, module: str, name: str):
        if RestrictedUnpickler._allowed is None:
            RestrictedUnpickler._allowed = _allowed_globals()
        try:
            return RestrictedUnpickler._allowed[(module, name)]
        except KeyError:
            raise RefusedGlobal(module, name) from None


def load_log_pickle(path: str | os.PathLike, trusted: bool = False) -> Any:
    """Unpickle one log file. Restricted to numpy/builtin types unless `trusted` (which runs any code in it)."""
    path = Path(path)
    try:
        fh = open(path, "rb")
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: log pickle not found") from None
    except IsADirectoryError:
        raise NavsimFormatError(path, "(file)", "a log pickle file, not a directory", str(path)) from None
    try:
        with fh:
            return pickle.load(fh) if trusted else RestrictedUnpickler(fh).load()
    except RefusedGlobal as exc:
        raise NavsimFormatError(path, "(pickle)", "only builtin containers and numpy arrays (pickles execute code; use "
                                "--unsafe-pickle only for files you trust)", f"global {exc.module}.{exc.name}") from None
    except Exception as exc:  # a malformed pickle can raise nearly anything
        raise NavsimFormatError(path, "(pickle)", "a readable pickle of a list of frame dicts", f"{type(exc).__name__}: {exc}") from None


# ----------------------------------------------------------------------------------------------
# one frame


@dataclass
class Frame:
    """One parsed frame; agents are already in the global frame."""

    index: int
    token: str
    timestamp_us: int
    log_name: str
    scene_token: str
    map_location: str
    pose: np.ndarray  # (3,) x, y, yaw — global, rear axle
    dynamics: np.ndarray  # (4,) vx, vy, ax, ay — ego frame
    command: str
    images: dict  # camera -> data_path (relative)
    lidar_path: str
    agents: dict  # schema agent fields (without "frame"), global frame
    traffic_lights: list  # [(lane_connector_id: str, is_red: bool)]
    roadblock_ids: list
    yaw_rate: float = 0.0


class _Fields:
    """Typed field access for one frame; every failure names file, frame and field."""

    def __init__(self, file, where: str):
        self.file, self.where = file, where

    def fail(self, field: str, expected: str, got: Any = _MISSING) -> NavsimFormatError:
        return NavsimFormatError(self.file, field, expected, got, self.where)

    def get(self, d: Any, key: str, prefix: str = "") -> Any:
        if not isinstance(d, dict):
            raise self.fail(prefix.rstrip(".") or "(frame)", "a dict", type(d).__name__)
        if key not in d:
            raise self.fail(prefix + key, "a value")
        return d[key]

    def string(self, v: Any, field: str, nonempty: bool = False) -> str:
        if not isinstance(v, str) or (nonempty and not v):
            raise self.fail(field, "a non-empty string" if nonempty else "a string", v)
        return v

    def ident(self, v: Any, field: str) -> str:
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, (str, int, np.integer)) or v == "":
            raise self.fail(field, "a string or integer id", v)
        return str(v)

    def array(self, v: Any, field: str, shape: str, ndim: int, cols: int | None = None, size: int | None = None) -> np.ndarray:
        expected = f"{shape} of finite numbers"
        if isinstance(v, (str, bytes, dict)) or v is None:
            raise self.fail(field, expected, v)
        try:
            arr = np.asarray(v, dtype=np.float64)
        except (TypeError, ValueError):
            raise self.fail(field, expected, v) from None
        if ndim == 2 and arr.size == 0:
            arr = arr.reshape(0, cols or 0)
        if arr.ndim != ndim or (cols is not None and arr.shape[-1] < cols) or (size is not None and arr.shape[0] != size):
            raise self.fail(field, expected, f"array of shape {arr.shape}")
        bad = ~np.isfinite(arr)
        if bad.any():
            i = tuple(int(k) for k in np.argwhere(bad)[0])
            raise self.fail(f"{field}[{']['.join(map(str, i))}]", "a finite number", float(arr[i]))
        return arr

    def strings(self, v: Any, field: str, n: int) -> list[str]:
        if isinstance(v, (str, bytes, dict)) or not hasattr(v, "__len__") or len(v) != n:
            raise self.fail(field, f"a list of {n} strings (one per box)", v if not hasattr(v, "__len__") else f"{type(v).__name__} of length {len(v)}")
        out = []
        for k, s in enumerate(v):
            if not isinstance(s, str):
                raise self.fail(f"{field}[{k}]", "a string", s)
            out.append(s)
        return out


def safe_relative_path(p: str) -> bool:
    """True if `p` is a relative path that stays inside its root (no absolute path, no '..' climbing out)."""
    if not p or "\x00" in p or p.startswith(("/", "\\")) or (len(p) > 1 and p[1] == ":"):
        return False
    depth = 0
    for part in PurePosixPath(p.replace("\\", "/")).parts:
        depth += -1 if part == ".." else (0 if part == "." else 1)
        if depth < 0:
            return False
    return depth > 0


def parse_frame(raw: Any, file, index: int, cameras: Sequence[str] = CAMERAS) -> Frame:
    """Check and convert one frame dict. Raises `NavsimFormatError` naming the file, frame and field."""
    f = _Fields(file, f"frame {index}")
    if not isinstance(raw, dict):
        raise f.fail("(frame)", "a dict with the frame's fields", type(raw).__name__)
    token = f.string(f.get(raw, "token"), "token", nonempty=True)
    f.where = f"frame {index} (token {token!r})"
    ts = f.get(raw, "timestamp")
    if isinstance(ts, (bool, np.bool_)) or not isinstance(ts, (int, np.integer)) or ts < 0:
        raise f.fail("timestamp", "a non-negative integer (µs)", ts)
    log_name = f.string(f.get(raw, "log_name"), "log_name", nonempty=True)
    scene_token = f.string(f.get(raw, "scene_token"), "scene_token")
    location = f.string(f.get(raw, "map_location"), "map_location")

    trans = f.array(f.get(raw, "ego2global_translation"), "ego2global_translation", "a vector [x, y, z]", 1)
    if len(trans) < 2:
        raise f.fail("ego2global_translation", "a vector [x, y, z] of finite numbers", trans.tolist())
    q = f.array(f.get(raw, "ego2global_rotation"), "ego2global_rotation", "a quaternion [w, x, y, z]", 1)
    if len(q) != 4 or np.linalg.norm(q) < 1e-9:
        raise f.fail("ego2global_rotation", "a non-zero quaternion [w, x, y, z]", q.tolist())
    w, x, y, z = q / np.linalg.norm(q)
    yaw = math.atan2(2.0 * (w * z + x * y), 1.0 - 2.0 * (y * y + z * z))
    dyn = f.array(f.get(raw, "ego_dynamic_state"), "ego_dynamic_state", "a vector [vx, vy, ax, ay]", 1)
    if len(dyn) != 4:
        raise f.fail("ego_dynamic_state", "a vector [vx, vy, ax, ay] of 4 finite numbers", dyn.tolist())

    cmd = f.get(raw, "driving_command")
    try:
        onehot = np.asarray(cmd, dtype=np.float64)
    except (TypeError, ValueError):
        onehot = None
    if onehot is None or onehot.shape != (4,) or not np.isin(onehot, (0.0, 1.0)).all() or onehot.sum() != 1:
        raise f.fail("driving_command", "a one-hot vector of 4 over (left, straight, right, unknown)", cmd)
    command = COMMAND_ORDER[int(np.argmax(onehot))]

    cams = f.get(raw, "cams")
    images = {}
    for cam in cameras:
        path = f.string(f.get(f.get(cams, cam, "cams."), "data_path", f"cams.{cam}."), f"cams.{cam}.data_path", nonempty=True)
        if not safe_relative_path(path):
            raise f.fail(f"cams.{cam}.data_path", "a relative path inside the sensor root (no absolute path, no '..')", path)
        images[cam] = path
    lidar = raw.get("lidar_path", "")
    lidar = "" if lidar is None else f.string(lidar, "lidar_path")

    anns = f.get(raw, "anns")
    boxes = f.array(f.get(anns, "gt_boxes", "anns."), "anns.gt_boxes", "an (N, 7) array [x, y, z, l, w, h, heading]", 2, cols=7)
    n = len(boxes)
    if (boxes[:, 3:6] < 0).any():
        raise f.fail("anns.gt_boxes", "non-negative box sizes (columns 3-5)", boxes[:, 3:6][(boxes[:, 3:6] < 0).any(1)][0].tolist())
    names = f.strings(f.get(anns, "gt_names", "anns."), "anns.gt_names", n)
    for k, name in enumerate(names):
        if name not in CLASS_MAP:
            raise f.fail(f"anns.gt_names[{k}]", f"one of {sorted(CLASS_MAP)}", name)
    vel = f.array(f.get(anns, "gt_velocity_3d", "anns."), "anns.gt_velocity_3d", "an (N, 3) array [vx, vy, vz]", 2, cols=2, size=n)
    tracks = f.strings(f.get(anns, "track_tokens", "anns."), "anns.track_tokens", n)
    f.strings(f.get(anns, "instance_tokens", "anns."), "anns.instance_tokens", n)

    lights_raw = f.get(raw, "traffic_lights")
    if isinstance(lights_raw, (str, bytes, dict)) or not hasattr(lights_raw, "__iter__"):
        raise f.fail("traffic_lights", "a list of (lane_connector_id, is_red) pairs", lights_raw)
    lights = []
    for k, item in enumerate(lights_raw):
        if isinstance(item, (str, bytes, dict)) or not hasattr(item, "__len__") or len(item) != 2:
            raise f.fail(f"traffic_lights[{k}]", "a (lane_connector_id, is_red) pair", item)
        red = item[1]
        if not isinstance(red, (bool, np.bool_)) and not (isinstance(red, (int, np.integer)) and red in (0, 1)):
            raise f.fail(f"traffic_lights[{k}][1]", "a bool (is_red)", red)
        lights.append((f.ident(item[0], f"traffic_lights[{k}][0]"), bool(red)))
    rbs = f.get(raw, "roadblock_ids")
    if isinstance(rbs, (str, bytes, dict)) or not hasattr(rbs, "__iter__"):
        raise f.fail("roadblock_ids", "a list of roadblock ids", rbs)
    roadblocks = [f.ident(r, f"roadblock_ids[{k}]") for k, r in enumerate(rbs)]

    # ego frame -> global frame (the frame's own ego pose)
    pos = rotate_vectors(boxes[:, :2], yaw) + trans[:2]
    v = rotate_vectors(vel[:, :2], yaw)
    agents = {
        "track_id": tracks, "category": [CLASS_MAP[s] for s in names],
        "x": pos[:, 0].tolist(), "y": pos[:, 1].tolist(), "heading": wrap_angle(boxes[:, 6] + yaw).tolist(),
        "length": boxes[:, 3].tolist(), "width": boxes[:, 4].tolist(), "height": boxes[:, 5].tolist(),
        "vx": v[:, 0].tolist(), "vy": v[:, 1].tolist(),
    }
    return Frame(index, token, int(ts), log_name, scene_token, location, np.array([trans[0], trans[1], yaw]), dyn,
                 command, images, lidar, agents, lights, roadblocks)


# ----------------------------------------------------------------------------------------------
# summary


@dataclass
class ImportSummary:
    """What an import did: counts, and for every skipped or refused record the reason."""

    logs: int = 0
    logs_skipped: int = 0
    frames: int = 0
    frames_invalid: int = 0
    scenes: int = 0
    scenes_skipped: int = 0
    filtered: Counter = field(default_factory=Counter)  # not errors: "no_route", "not_in_tokens", "log_too_short"
    skipped_by_field: Counter = field(default_factory=Counter)
    traffic_lights_unmapped: int = 0
    errors: list = field(default_factory=list)  # messages of skipped records

    def to_dict(self) -> dict:
        return {"logs": self.logs, "logs_skipped": self.logs_skipped, "frames": self.frames, "frames_invalid": self.frames_invalid,
                "scenes": self.scenes, "scenes_skipped": self.scenes_skipped, "filtered": dict(self.filtered),
                "skipped_by_field": dict(self.skipped_by_field), "traffic_lights_unmapped": self.traffic_lights_unmapped,
                "errors": list(self.errors)}

    def format(self, max_errors: int = 20) -> str:
        lines = [f"navsim: {self.scenes} scenes from {self.logs - self.logs_skipped}/{self.logs} logs "
                 f"({self.frames} frames, {self.frames_invalid} invalid); skipped: {self.logs_skipped} logs, {self.scenes_skipped} scenes"]
        if self.filtered:
            lines.append("  filtered out (not errors): " + ", ".join(f"{k} {v}" for k, v in sorted(self.filtered.items())))
        if self.skipped_by_field:
            lines.append("  skipped by field: " + ", ".join(f"{k} {v}" for k, v in self.skipped_by_field.most_common()))
        if self.traffic_lights_unmapped:
            lines.append(f"  traffic lights on lane connectors missing from the map (dropped): {self.traffic_lights_unmapped}")
        for msg in self.errors[:max_errors]:
            lines.append(f"  skipped: {msg}")
        if len(self.errors) > max_errors:
            lines.append(f"  ... and {len(self.errors) - max_errors} more")
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# logs -> scenes


def collect_log_files(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """The files the user named; a directory named explicitly gives its ``*.pkl`` files (sorted, not recursive)."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(q for q in p.iterdir() if q.suffix == ".pkl" and q.is_file())
            if not found:
                raise FileNotFoundError(f"{p}: directory has no *.pkl log files (expected one pickle per log)")
            out.extend(found)
        elif p.is_file():
            out.append(p)
        else:
            raise FileNotFoundError(f"{p}: no such log file or directory")
    return list(dict.fromkeys(out))


def read_tokens(path: str | os.PathLike) -> list[str]:
    """Scene tokens to keep: a text file (one per line, '#' comments) or a NAVSIM scene-filter YAML (`tokens:`)."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if path.suffix in (".yaml", ".yml"):
        import yaml

        obj = yaml.safe_load(text)
        tokens = obj.get("tokens") if isinstance(obj, dict) else None
        if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
            raise SchemaError(f"{path}: field 'tokens': expected a list of scene tokens, got {type(tokens).__name__}")
        return tokens
    return [ln.split("#", 1)[0].strip() for ln in text.splitlines() if ln.split("#", 1)[0].strip()]


class NavsimImporter:
    """Convert NAVSIM log pickles into ScenePool rows.

    Parameters are set here, as in a scikit-learn estimator; `convert` returns the rows and leaves what it did
    in ``summary_`` (an `ImportSummary`).
    """

    def __init__(self, split: str = "all", history: int = 4, future: int = 10, stride: int = 1, sensor_root: str | os.PathLike | None = None,
                 cameras: Sequence[str] = CAMERAS, maps: Sequence = (), map_radius: float = 100.0, check_images: bool = False,
                 skip_invalid: bool = False, require_route: bool = True, tokens: Iterable[str] | None = None,
                 trusted_pickles: bool = False, progress: bool = False):
        self.split = split
        self.history = history
        self.future = future
        self.stride = stride
        self.sensor_root = sensor_root
        self.cameras = tuple(cameras)
        self.maps = maps
        self.map_radius = map_radius
        self.check_images = check_images
        self.skip_invalid = skip_invalid
        self.require_route = require_route
        self.tokens = tokens
        self.trusted_pickles = trusted_pickles
        self.progress = progress

    def _check_params(self) -> None:
        if not isinstance(self.split, str) or not self.split:
            raise ValueError(f"split: expected a non-empty name, got {self.split!r}")
        for name, lo in (("history", 1), ("future", 0), ("stride", 1)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"{name}: expected an integer >= {lo}, got {v!r}")
        bad = [c for c in self.cameras if c not in CAMERAS]
        if bad:
            raise ValueError(f"cameras: expected names from {list(CAMERAS)}, got {bad}")
        if self.check_images and self.sensor_root is None:
            raise ValueError("check_images needs a sensor root (--sensor-root) to look for the images under")
        if self.sensor_root is not None and not Path(self.sensor_root).is_dir():
            raise FileNotFoundError(f"{self.sensor_root}: sensor root is not a directory")
        if not (isinstance(self.map_radius, (int, float)) and self.map_radius > 0):
            raise ValueError(f"map_radius: expected a positive number of metres, got {self.map_radius!r}")

    def _load_maps(self) -> dict:
        from datasets_cfg.sources.navsim_map import NavsimMap, load_map

        out: dict[str, NavsimMap] = {}
        for m in self.maps:
            m = m if isinstance(m, NavsimMap) else load_map(m)
            if m.location in out:
                raise ValueError(f"{m.source}: a map for location {m.location or '(any)'!r} was already given ({out[m.location].source})")
            out[m.location] = m
        return out

    # ------------------------------------------------------------------------------------------
    def convert(self, log_paths: Iterable[str | os.PathLike]) -> list[dict]:
        """Rows for all scenes of these log files (named explicitly: each one is unpickled)."""
        self._check_params()
        self.summary_ = summary = ImportSummary()
        self._maps = self._load_maps()
        self._root = Path(self.sensor_root).resolve() if self.sensor_root is not None else None
        self._image_ok: dict[str, bool] = {}
        tokens = set(self.tokens) if self.tokens is not None else None
        rows: list[dict] = []
        seen: dict[str, str] = {}
        paths = [Path(p) for p in log_paths]
        if self.progress:
            from tqdm import tqdm

            paths = tqdm(paths, desc="navsim logs", unit="log")
        for path in paths:
            summary.logs += 1
            try:
                frames = self._read_log(path)
            except NavsimFormatError as exc:
                if not self.skip_invalid:
                    raise
                summary.logs_skipped += 1
                summary.skipped_by_field[exc.field] += 1
                summary.errors.append(str(exc))
                continue
            for row in self._scenes(path, frames, tokens):
                if row["id"] in seen:
                    exc = NavsimFormatError(path, "token", f"scene tokens unique across logs (already in {seen[row['id']]})", row["id"],
                                            f"scene {row['id']!r}")
                    if not self.skip_invalid:
                        raise exc
                    self._skip_scene(exc)
                    continue
                seen[row["id"]] = str(path)
                rows.append(row)
        summary.scenes = len(rows)
        return rows

    def _skip_scene(self, exc: NavsimFormatError) -> None:
        self.summary_.scenes_skipped += 1
        self.summary_.skipped_by_field[exc.field] += 1
        self.summary_.errors.append(str(exc))

    def _read_log(self, path: Path) -> list:
        """Parsed frames of one log; an invalid frame is a NavsimFormatError in its place (skip mode only)."""
        raw = load_log_pickle(path, trusted=self.trusted_pickles)
        if not isinstance(raw, list):
            raise NavsimFormatError(path, "(top level)", "a list of frame dicts (one pickle per log)", type(raw).__name__)
        if not raw:
            raise NavsimFormatError(path, "(top level)", "a non-empty list of frames (the log is empty)", [])
        frames: list = []
        last = None
        for i, item in enumerate(raw):
            try:
                fr = parse_frame(item, path, i, self.cameras)
                if last is not None and fr.timestamp_us <= last.timestamp_us:
                    raise NavsimFormatError(path, "timestamp", f"a time after frame {last.index}'s {last.timestamp_us} µs (frames in time order)",
                                            fr.timestamp_us, f"frame {i} (token {fr.token!r})")
                if self._root is not None and self.check_images:
                    for cam, rel in fr.images.items():
                        full = self._root / rel
                        if not self._image_ok.setdefault(str(full), full.is_file()):
                            raise NavsimFormatError(path, f"cams.{cam}.data_path", f"an existing image file (looked for {full})", rel,
                                                    f"frame {i} (token {fr.token!r})")
                last = fr
            except NavsimFormatError as exc:
                if not self.skip_invalid:
                    raise
                self.summary_.frames_invalid += 1
                self.summary_.errors.append(str(exc))
                fr = exc
            frames.append(fr)
        self.summary_.frames += len(raw)
        _fill_yaw_rates(frames)
        return frames

    def _scenes(self, path: Path, frames: list, tokens: set | None):
        n = self.history + self.future
        if len(frames) < n:
            self.summary_.filtered["log_too_short"] += 1
            return
        valid_ts = [f.timestamp_us for f in frames if isinstance(f, Frame)]
        log_start = min(valid_ts) if valid_ts else 0
        for start in range(0, len(frames) - n + 1, self.stride):
            window = frames[start:start + n]
            bad = next((f for f in window if not isinstance(f, Frame)), None)
            if bad is not None:
                self.summary_.scenes_skipped += 1
                self.summary_.skipped_by_field[bad.field] += 1
                continue
            cur = window[self.history - 1]
            if self.require_route and not cur.roadblock_ids:
                self.summary_.filtered["no_route"] += 1
                continue
            if tokens is not None and cur.token not in tokens:
                self.summary_.filtered["not_in_tokens"] += 1
                continue
            row = self._row(path, window, log_start)
            try:
                validate_row(row, f"{path}: scene {row['id']!r}")
            except SchemaError as exc:
                if not self.skip_invalid:
                    raise
                self._skip_scene(NavsimFormatError(path, "(row)", "a row that fits the ScenePool schema", str(exc)))
                continue
            yield row

    def _row(self, path: Path, window: list[Frame], log_start: int) -> dict:
        ci = self.history - 1
        cur = window[ci]
        poses = np.stack([f.pose for f in window])
        dyn = np.stack([f.dynamics for f in window])
        ts = np.array([f.timestamp_us for f in window], dtype=np.int64)
        ego = {"t": ((ts - ts[ci]) / 1e6).tolist(), "x": poses[:, 0].tolist(), "y": poses[:, 1].tolist(), "heading": poses[:, 2].tolist(),
               "speed": dyn[:, 0].tolist(), "accel": dyn[:, 2].tolist(), "accel_lat": dyn[:, 3].tolist(),
               "yaw_rate": [f.yaw_rate for f in window]}
        agents = {k: [] for k in ("frame", "track_id", "category", "x", "y", "heading", "length", "width", "height", "vx", "vy")}
        for k, f in enumerate(window):
            agents["frame"].extend([k] * len(f.agents["track_id"]))
            for key, values in f.agents.items():
                agents[key].extend(values)
        lights = [(k, lid, red) for k, f in enumerate(window) for lid, red in f.traffic_lights]

        nav_map = self._maps.get(cur.map_location, self._maps.get(""))
        scene_map = {"lanes": [], "areas": [], "route": []}
        unmapped = 0
        if nav_map is not None:
            scene_map = nav_map.scene_map(poses[:, :2], poses[ci], cur.roadblock_ids, self.map_radius, {lid for _, lid, _ in lights})
            known = {l["id"] for l in scene_map["lanes"]}
            kept = [lt for lt in lights if lt[1] in known]
            unmapped = len(lights) - len(kept)
            lights = kept
            self.summary_.traffic_lights_unmapped += unmapped
        images = []
        if self._root is not None:
            images = [{"frame": k, "camera": cam, "path": str(self._root / f.images[cam])} for k, f in enumerate(window) for cam in self.cameras]
        meta = {
            "log_name": cur.log_name, "timestamp_s": (cur.timestamp_us - log_start) / 1e6, "timestamp_us": cur.timestamp_us,
            "token": cur.token, "scene_token": cur.scene_token, "log_file": path.name, "frame_tokens": [f.token for f in window],
            "roadblock_ids": cur.roadblock_ids, "lidar_path": cur.lidar_path, "ego_vy": dyn[:, 1].tolist(),
            "num_history_frames": self.history, "num_future_frames": self.future,
            "map": nav_map.source if nav_map is not None else "", "traffic_lights_unmapped": unmapped,
        }
        return new_row(
            cur.token, "navsim", self.split, source="real", location=cur.map_location, command=cur.command, dt=0.5, current_index=ci,
            ego=ego, agents=agents, map=scene_map,
            traffic_lights={"frame": [k for k, _, _ in lights], "lane_id": [l for _, l, _ in lights], "is_red": [r for _, _, r in lights]},
            images=images, meta=json.dumps(meta),
        )


def _fill_yaw_rates(frames: list) -> None:
    """yaw_rate = d(unwrapped heading)/dt over each run of consecutive valid frames (np.gradient on the timestamps)."""
    run: list[Frame] = []
    for f in frames + [None]:
        if isinstance(f, Frame):
            run.append(f)
            continue
        if len(run) >= 2:
            t = np.array([g.timestamp_us for g in run], dtype=np.float64) / 1e6
            rates = np.gradient(np.unwrap([g.pose[2] for g in run]), t)
            for g, r in zip(run, rates):
                g.yaw_rate = float(r)
        run = []


def convert_logs(log_paths: Iterable[str | os.PathLike], **params) -> tuple[list[dict], ImportSummary]:
    """Functional form of `NavsimImporter(**params).convert(log_paths)`: (rows, summary)."""
    importer = NavsimImporter(**params)
    rows = importer.convert(log_paths)
    return rows, importer.summary_


def import_navsim(log_paths: Iterable[str | os.PathLike], out: str | os.PathLike, **params):
    """Convert logs and save a ScenePool at `out` (atomically; nothing is written if anything fails).

    Returns (pool, summary). Raises ValueError if no scene results.
    """
    from datasets_cfg.schema import ScenePool

    rows, summary = convert_logs(log_paths, **params)
    if not rows:
        raise ValueError(f"no scenes to write to {out}:\n{summary.format()}")
    pool = ScenePool.from_rows(rows, where="navsim")
    pool.save(out)
    return pool, summary


# ----------------------------------------------------------------------------------------------
# CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Convert OpenScene/NAVSIM log pickles into a ScenePool. WARNING: pickles can execute code when loaded; "
        "only the files you name are read (a directory you name gives its *.pkl files), with a restricted "
        "unpickler that allows only numpy arrays and builtin containers unless you pass --unsafe-pickle."
    )
    parser.add_argument("--logs", nargs="+", required=True, metavar="FILE_OR_DIR", help="log pickles, or directories whose *.pkl files to read")
    parser.add_argument("--out", required=True, metavar="DIR", help="ScenePool directory to write")
    parser.add_argument("--map", nargs="+", default=[], metavar="FILE", help="map GeoJSON file(s) (format: datasets_cfg/sources/navsim_map.py), one per location")
    parser.add_argument("--sensor-root", metavar="DIR", help="sensor_blobs root; camera data_path entries are resolved under it (and must stay inside)")
    parser.add_argument("--split", default="all", help="split name stored in every row (e.g. navtrain, navtest)")
    parser.add_argument("--history", type=int, default=4, help="frames up to and including the current one (default 4)")
    parser.add_argument("--future", type=int, default=10, help="future frames after the current one (default 10)")
    parser.add_argument("--stride", type=int, default=1, help="frames between scene starts (default 1, as navtrain/navtest)")
    parser.add_argument("--cameras", default=",".join(CAMERAS), help="comma-separated cameras to record (default all 8)")
    parser.add_argument("--map-radius", type=float, default=100.0, help="attach map elements within this many metres of the ego path")
    parser.add_argument("--tokens", metavar="FILE", help="keep only these scene tokens (text file, one per line, or a NAVSIM scene-filter YAML)")
    parser.add_argument("--keep-no-route", action="store_true", help="also keep scenes whose current frame has no route (NAVSIM drops them)")
    parser.add_argument("--check-images", action="store_true", help="check that every recorded image file exists")
    parser.add_argument("--skip-invalid", action="store_true", help="skip bad logs/frames/scenes and report them instead of stopping")
    parser.add_argument("--unsafe-pickle", action="store_true", help="unpickle with the full pickle module: RUNS ANY CODE in the files; only for trusted files")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing ScenePool at --out")


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if (out / "pool.json").exists() and not args.overwrite:
        print(f"mose import navsim: error: {out} already holds a ScenePool; pass --overwrite to replace it", file=sys.stderr)
        return 1
    try:
        params = dict(
            split=args.split, history=args.history, future=args.future, stride=args.stride, sensor_root=args.sensor_root,
            cameras=[c.strip() for c in args.cameras.split(",") if c.strip()], maps=args.map, map_radius=args.map_radius,
            check_images=args.check_images, skip_invalid=args.skip_invalid, require_route=not args.keep_no_route,
            tokens=read_tokens(args.tokens) if args.tokens else None, trusted_pickles=args.unsafe_pickle, progress=sys.stderr.isatty(),
        )
        pool, summary = import_navsim(collect_log_files(args.logs), out, **params)
    except (MoseError, ValueError, OSError) as exc:
        print(f"mose import navsim: error: {exc}", file=sys.stderr)
        return 1
    print(summary.format())
    print(f"wrote {len(pool)} scenes to {out}")
    return 0
