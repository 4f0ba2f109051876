"""Score trajectories on ScenePool scenes with NAVSIM's PDMS (v1) or EPDMS (v2).

    rows = score_scenes(scenes, {token: poses}, metric="epdms")   # poses: (8, 3) x, y, heading, ego frame
    mean_score(rows)

Per scene: the trajectory (N poses at `interval` s in the current rear-axle frame) is put in the global
frame, the current pose prepended, interpolated to 0.1 s and either tracked by the LQR controller on a
kinematic bicycle (`tracking=True`, the official step) or taken as given (`tracking=False`, speeds and
accelerations by finite differences). The PDM-Closed reference is simulated alongside for the EP
normaliser. The logged human trajectory is scored the same way for the v2 human filter.

Decisions the spec leaves to us (documented here and in the rows):
- The human filter applies to scenes with `source == "real"` only: they are the "original" scenes whose
  logged future is a real human's driving. Synthetic scenes (generated or perturbed) have no human to excuse.
- A scene without a usable prediction, or one that cannot be scored (no map geometry, no route, no ego
  states), gets an explicit invalid row: valid=False, score 0.0, sub-metrics NaN, `reason` saying why.
  `mean_score` counts invalid rows as 0 (a missing prediction must not raise the mean); pass
  `valid_only=True` for the mean over valid rows.
- EC (v2) needs the same log's frame 0.5 s earlier (meta "log_name", "timestamp_s"; at most 0.55 s back, as
  upstream) among `scenes`, with a valid trajectory, both original (`source == "real"`, as the one-stage devkit
  pairs ORIGINAL frames only); otherwise EC is NaN and its weight is dropped (/14).
- The human run (always the logged 8 x 0.5 s future) is scored alone, as upstream: its EP is 1, HC = 1 (no past)
  and no EC, so the filter can lift NC, DAC, DDC, TLC, TTC and LK.
"""
from __future__ import annotations

import math
from collections import defaultdict
from typing import Mapping, Sequence

import numpy as np

from common.geometry import local_to_global
from eval.navsim import aggregate, comfort, metrics, pdm_closed
from eval.navsim.config import DEFAULT, V2_COLUMNS, Protocol
from eval.navsim.context import SceneContext, SceneError
from eval.navsim.simulate import interpolate_poses, simulate

METRICS = ("epdms", "pdms")


class ReferenceCache(dict):
    """Agent-independent results per scene (PDM-Closed reference poses, human sub-metrics), reusable across
    calls that score different predictions on the same scenes: NAVSIM's metric cache, in memory.
    Keys include the scene id and the settings that produced the value."""


def _invalid(token: str, reason: str, metric: str, tracking: bool) -> dict:
    row = {"token": token, "valid": False, "reason": reason}
    row.update({k: math.nan for k in V2_COLUMNS})
    if metric == "pdms":
        row["comfort"] = math.nan
    row.update(score=0.0, tracking="lqr" if tracking else "as_given", metric=metric, human_filter_lifted="",
               progress_m=math.nan, progress_normaliser_m=math.nan)
    return row


def check_trajectory(poses, num_poses: int) -> str:
    """'' if `poses` is a finite (num_poses, 3) array, else the reason it is not."""
    if poses is None:
        return "no prediction for this scene"
    try:
        arr = np.asarray(poses, dtype=np.float64)
    except (TypeError, ValueError):
        return f"prediction is not numeric (got {type(poses).__name__})"
    if arr.ndim != 2 or arr.shape[1] != 3:
        return f"prediction has shape {tuple(arr.shape)}; expected ({num_poses}, 3) poses (x, y, heading)"
    if arr.shape[0] != num_poses:
        return f"prediction has {arr.shape[0]} poses; expected {num_poses} (every {{interval}} s)"
    if not np.isfinite(arr).all():
        bad = np.argwhere(~np.isfinite(arr))[0]
        return f"prediction has a non-finite value at pose {bad[0]}, {('x', 'y', 'heading')[bad[1]]}"
    return ""


def score_scenes(
    scenes: Sequence,
    trajectories: Mapping[str, np.ndarray],
    *,
    metric: str = "epdms",
    tracking: bool = True,
    human_filter: bool = True,
    num_poses: int = 8,
    interval: float = 0.5,
    protocol: Protocol = DEFAULT,
    reference_cache: ReferenceCache | None = None,
    progress: bool | None = None,
    workers: int = 1,
    keep_states: bool = False,
) -> list[dict]:
    """One row per scene, in the order of `scenes` (see the module docstring for the row fields).

    `workers` > 1 scores in that many processes, each taking whole logs (so EC pairs stay together).
    `keep_states`: valid rows keep the agent's simulated states, (41, 11), under "ego_simulated_states" (the
    two-stage aggregation pairs them for EC across scenes)."""
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if workers > 1 and len(scenes) > 1:
        return _score_parallel(scenes, trajectories, workers, reference_cache, dict(
            metric=metric, tracking=tracking, human_filter=human_filter, num_poses=num_poses, interval=interval, protocol=protocol,
            keep_states=keep_states))
    version = "v2" if metric == "epdms" else "v1"
    sp = protocol.scorer
    steps = int(round(sp.horizon_s / sp.dt))
    cache = reference_cache if reference_cache is not None else ReferenceCache()

    rows: list[dict | None] = [None] * len(scenes)
    work = []  # (index, ctx, agent poses)
    iterator = range(len(scenes))
    if progress or (progress is None and len(scenes) >= 200):
        from tqdm import tqdm

        iterator = tqdm(iterator, desc=f"navsim {metric}", unit="scene")
    for i in iterator:
        scene = scenes[i]
        token = scene.id
        reason = check_trajectory(trajectories.get(token), num_poses).replace("{interval}", f"{interval:g}")
        if reason:
            rows[i] = _invalid(token, reason, metric, tracking)
            continue
        try:
            ctx = SceneContext.build(scene, protocol)
        except SceneError as exc:
            rows[i] = _invalid(token, f"scene cannot be scored: {exc}", metric, tracking)
            continue
        work.append((i, ctx, np.asarray(trajectories[token], np.float64)))
        if len(work) >= 64:
            _score_batch(work, rows, cache, version, metric, tracking, human_filter, num_poses, interval, steps, protocol)
            work = []
    if work:
        _score_batch(work, rows, cache, version, metric, tracking, human_filter, num_poses, interval, steps, protocol)

    if version == "v2":
        _two_frame_comfort(scenes, rows, protocol)
    for row in rows:
        if row["valid"]:
            row["score"] = aggregate.score_row(row, version)
        states = row.pop("_states", None)
        if keep_states and states is not None:
            row["ego_simulated_states"] = states
        row.pop("_time", None)
        row.pop("_log", None)
        row.pop("_original", None)
    return rows


def _score_batch(work, rows, cache, version, metric, tracking, human_filter, num_poses, interval, steps, protocol):
    sp = protocol.scorer
    refs, inits, owners = [], [], []  # one simulation batch for every run of every scene
    humans = {}
    todo = [ctx for _, ctx, _ in work if ("pdm_closed", ctx.id, version, protocol) not in cache]
    for ctx, plan in zip(todo, pdm_closed.plan_batch(todo, protocol, version)):
        cache[("pdm_closed", ctx.id, version, protocol)] = plan.poses
    for i, ctx, poses in work:
        key = ("pdm_closed", ctx.id, version, protocol)
        runs = [cache[key], local_to_global(interpolate_poses(poses[None], interval, steps, sp.dt)[0], ctx.origin)]
        # the human run is always the logged future at 8 x 0.5 s, whatever the agent's sampling
        # (navsim .../metric_caching/metric_cache_processor.py:288-311)
        hn, hdt = sp.human_num_poses, sp.human_interval
        hkey = ("human", ctx.id, version, tracking, hn, hdt, protocol)
        want_human = version == "v2" and human_filter and ctx.source == "real"
        if want_human and hkey not in cache:
            try:
                h = ctx.scene.future_trajectory(hn, hdt, frame="ego")
                runs.append(local_to_global(interpolate_poses(h[None], hdt, steps, sp.dt)[0], ctx.origin))
            except ValueError:
                cache[hkey] = None  # the log is too short for a human trajectory: no filter
        humans[i] = hkey if want_human else None
        refs.extend(runs)
        inits.extend([ctx.initial] * len(runs))
        owners.append(len(runs))
    states_all = simulate(np.stack(refs), np.stack(inits), tracking, protocol, sp.dt)

    start = 0
    for (i, ctx, _), n in zip(work, owners):
        states = states_all[start:start + n]
        start += n
        obs = ctx.observation_for(version)
        sub = metrics.submetrics(states[:2], ctx, obs, protocol, version, history=ctx.history if version == "v2" else None)
        multi = aggregate.multiplicative_product(sub, version)
        ep = aggregate.normalise_progress(sub["progress_raw"], multi, sp.progress_distance_threshold, version)
        row = {"token": ctx.id, "valid": True, "reason": ""}
        cols = V2_COLUMNS if version == "v2" else V2_COLUMNS + ("comfort",)
        for k in cols:
            row[k] = float(sub[k][1]) if k in sub else math.nan
        row["ego_progress"] = float(ep[1])
        row["progress_m"] = float(sub["progress_raw"][1])  # diagnostics: raw progress and the EP normaliser
        row["progress_normaliser_m"] = float(np.max(sub["progress_raw"] * multi))
        lifted = []
        hkey = humans[i]
        if hkey is not None:
            if hkey not in cache:
                # the human is scored alone, without its past (navsim navsim/evaluate/pdm_score.py:171-193): its EP is
                # normalised by its own progress, so it is always 1 and never lifts the agent's EP
                hsub = metrics.submetrics(states[2:3], ctx, obs, protocol, version, history=None)
                hmulti = aggregate.multiplicative_product(hsub, version)
                hrow = {k: float(hsub[k][0]) for k in V2_COLUMNS if k in hsub}
                hrow["ego_progress"] = float(aggregate.normalise_progress(hsub["progress_raw"], hmulti, sp.progress_distance_threshold, version)[0])
                cache[hkey] = hrow
            if cache[hkey] is not None:
                filtered, lifted = aggregate.apply_human_filter(row, cache[hkey], [c for c in V2_COLUMNS if c != "two_frame_extended_comfort"])
                row.update(filtered)
        row.update(score=0.0, tracking="lqr" if tracking else "as_given", metric=metric, human_filter_lifted=",".join(lifted))
        row["_states"] = states[1]
        row["_log"], row["_time"], row["_original"] = ctx.log_name, ctx.timestamp_s, ctx.source == "real"
        rows[i] = row


def _two_frame_comfort(scenes, rows, protocol: Protocol) -> None:
    """EC for every valid original row whose log has a valid original row at most 0.55 s earlier (the closest
    one). As the one-stage devkit (navsim navsim/planning/script/run_pdm_score_one_stage.py:142), only ORIGINAL
    frames (our `source == "real"`) are paired: a synthetic scene gets EC NaN and the /14 weighting."""
    sp = protocol.scorer
    by_log = defaultdict(list)
    for j, row in enumerate(rows):
        if row["valid"] and row.get("_original") and row.get("_log") and row.get("_time") is not None:
            by_log[row["_log"]].append((row["_time"], j))
    pairs = []
    for entries in by_log.values():
        entries.sort()
        for (t0, j0), (t1, j1) in zip(entries, entries[1:]):
            if 0 < t1 - t0 <= sp.ec_frame_gap_max:
                pairs.append((j1, j0, int(round((t1 - t0) / sp.dt))))
    by_gap = defaultdict(list)
    for cur, prev, gap in pairs:
        if gap >= 1:
            by_gap[gap].append((cur, prev))
    for gap, items in by_gap.items():
        cur = np.stack([rows[c]["_states"] for c, _ in items])
        prev = np.stack([rows[p]["_states"] for _, p in items])
        ec = comfort.two_frame_extended_comfort(cur, prev, gap, sp.dt, protocol.comfort)
        for (c, _), v in zip(items, ec):
            rows[c]["two_frame_extended_comfort"] = float(v)


def _score_chunk(args):
    scenes, trajectories, cache, kwargs = args
    cache = ReferenceCache(cache)
    rows = score_scenes(scenes, trajectories, reference_cache=cache, progress=False, **kwargs)
    return rows, dict(cache)


def _score_parallel(scenes, trajectories, workers, reference_cache, kwargs):
    import multiprocessing as mp

    from eval.navsim.context import scene_meta

    groups = defaultdict(list)  # whole logs per task, so EC finds the previous frame in the same process
    for i, s in enumerate(scenes):
        log, _ = scene_meta(s)
        groups[log or f"__scene{i}"].append(i)
    n_tasks = min(len(groups), workers)  # one big task per process: batching across scenes is what makes it fast
    tasks = [[] for _ in range(n_tasks)]
    for idx in sorted(groups.values(), key=len, reverse=True):  # largest first onto the lightest task
        min(tasks, key=len).extend(idx)
    tasks = [t for t in tasks if t]
    cache = reference_cache if reference_cache is not None else {}
    payload = []
    for t in tasks:
        ids = {scenes[i].id for i in t}
        payload.append(([scenes[i] for i in t], {k: trajectories[k] for k in ids if k in trajectories},
                        {k: v for k, v in cache.items() if k[1] in ids}, kwargs))
    # spawn, not fork: forking a process whose other threads (torch/OpenMP, tokenizers) hold locks can deadlock the child
    ctx = mp.get_context("spawn")
    rows: list = [None] * len(scenes)
    with ctx.Pool(min(workers, len(tasks))) as pool:
        for t, (chunk_rows, chunk_cache) in zip(tasks, pool.map(_score_chunk, payload)):
            for i, r in zip(t, chunk_rows):
                rows[i] = r
            if reference_cache is not None:
                reference_cache.update(chunk_cache)
    return rows


def mean_score(rows: Sequence[dict], valid_only: bool = False) -> float:
    """Mean of the per-scene scores (the benchmark number). Invalid rows count as 0 unless `valid_only`."""
    vals = [float(r["score"]) for r in rows if r["valid"] or not valid_only]
    if not vals:
        raise ValueError("mean_score: no rows to average" + (" (no valid rows)" if valid_only else ""))
    return float(np.mean(vals))


def average_row(rows: Sequence[dict], metric: str = "epdms") -> dict:
    """The CSV's last row: column means over valid rows (NaN skipped), the score mean over all rows (invalid = 0,
    ours), plus `score_valid_only` (the official mean: the devkit's invalid rows are NaN and `mean(skipna=True)`
    skips them, navsim navsim/planning/script/run_pdm_score_one_stage.py:118-122, 293) and `invalid_rows`."""
    cols = V2_COLUMNS + (("comfort",) if metric == "pdms" else ())
    out = {"token": "average_all_frames", "valid": all(r["valid"] for r in rows), "reason": ""}
    for k in cols:
        vals = np.array([r[k] for r in rows if r["valid"]], dtype=float)
        vals = vals[~np.isnan(vals)]
        out[k] = float(vals.mean()) if len(vals) else math.nan
    out["score"] = mean_score(rows) if rows else math.nan
    out["score_valid_only"] = mean_score(rows, valid_only=True) if any(r["valid"] for r in rows) else math.nan
    out["invalid_rows"] = sum(not r["valid"] for r in rows)
    return out
