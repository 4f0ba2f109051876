"""NAVSIM v2 two-stage EPDMS (navhard, "pseudo closed loop"): stage-1 original scenes, stage-2 synthetic scenes
that start near where the stage-1 plan ends, weighted by that proximity and combined per stage-1 scene.

    mapping = read_mapping("navhard_two_stage.yaml")   # the devkit's train_test_split file, or the same list in JSON
    result = score_two_stage(scenes, {token: poses}, mapping)
    write_two_stage_csv("scores.csv", result)

The rules, as the official devkit (autonomousvision/navsim at 0a380a9, v2.2; paths below are relative to
navsim/planning/, "run" = script/run_pdm_score.py, "agg" = simulation/planner/pdm_planner/scoring/scene_aggregator.py):
- A mapping entry is (now, prev, [(now2, prev2), ...]) (run:368-373, the `reactive_all_mapping` list of
  script/config/common/train_test_split/navhard_two_stage.yaml): `now` is a stage-1 scene, `prev` the same log's frame
  0.5 s earlier, and each pair is a stage-2 scene starting 4 s after `now` with its companion starting 4 s after
  `prev` (agg:93, 100). Entries are kept when `now` or `prev` is among the scenes (run:372).
- Every scene is scored alone as in one stage (run:97-104, 151-158); the human filter applies to original scenes
  only (evaluate/pdm_score.py:171), here stage 1.
- EC pairs by mapping, not by log: `now` with `prev` (both rows get that value, agg:88-90) and each stage-2 pair
  (both rows get it, agg:111-122), over the overlap of the two runs, `round(gap / 0.1)` states, the gap being the
  start-time difference, which must lie in (0, 0.55) s (agg:59-66). Every score is then recomputed with EC
  (weights /16, run:201-214).
- Weights: stage-1 rows 1 (agg:89-90). For each stage-1 scene, its stage-2 scenes (the pairs' first members for
  `now`, second members for `prev`) get exp(-d² / (2 σ²)), σ² = 0.1 m² (agg:18, 36-38), d = distance from the
  stage-1 plan's endpoint (its last pose, global) to the stage-2 scene's start rear axle (agg:28-34,
  run:109-118); normalised to sum 1, or uniform when the sum is ~0 (np.isclose, atol 1e-8) or NaN (agg:40-45).
- Per entry, for every score column: stage-1 value x the weighted mean of its stage-2 values, averaged over the
  `now` and `prev` groups (run:256-284). The combined score is the mean over entries; the stage-1 / stage-2
  figures are the means of the 2·entries stage-1 values / stage-2 weighted means (run:286-290), NaN skipped.

Our choices where the devkit gives none (documented in the rows):
- An invalid row (no usable prediction, unscorable scene) is NaN in the official figures, so a group holding one
  is NaN and is skipped by the means (the devkit's NaN arithmetic, run:231-239, 287); the devkit itself cannot
  weight such a group at all (agg needs the row's simulated states) and marks the whole run invalid (run:381-385),
  so the summary rows are valid only when every row is. `score` counts invalid rows as 0 instead (ours, as the
  one-stage mean); `score_valid_only` is the official NaN-skipping figure. An EC pair with an invalid member
  leaves EC NaN (that row's weights /14).
- A mapping that references a scene the pool lacks, a token used twice, a stage-1 scene that is not original
  (`source` "real") or a stage-2 scene that is not synthetic, or start times outside (0, 0.55) s is an error
  (the devkit fails or mislabels silently). Pool scenes no entry refers to are not scored (`unmapped_scenes`).
- Traffic is log replay; the devkit's two-stage run uses reactive IDM agents (script/config/common/
  traffic_agents_policy/navsim_IDM_traffic_agents.yaml, run:77-79, 132-134), which we do not simulate.
"""
from __future__ import annotations

import csv
import json
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from common.atomic import atomic_path
from common.errors import MoseError
from common.geometry import local_to_global
from eval.navsim import aggregate, comfort
from eval.navsim.config import DEFAULT, V2_COLUMNS, Protocol
from eval.navsim.context import scene_meta
from eval.navsim.scorer import score_scenes

SIGMA_SQUARED = 0.1  # m², the Gaussian kernel's σ² (agg:18)
ZERO_WEIGHT_SUM_ATOL = 1e-8  # np.isclose(sum, 0.0)'s default atol (agg:42)
EC_GAP_MAX_S = 0.55  # `0 < observation_interval < 0.55` (agg:62)
SCORE_COLUMNS = V2_COLUMNS + ("score",)  # the columns aggregated per group (run:394-401, 226)
SUMMARY_TOKENS = ("extended_pdm_score_stage_one", "extended_pdm_score_stage_two", "extended_pdm_score_combined")  # run:427, 436, 445
MAPPING_KEY = "reactive_all_mapping"  # run:368


class TwoStageError(MoseError, ValueError):
    """A two-stage mapping or scene set that cannot be scored; the message names the file / token and the fix."""


@dataclass(frozen=True)
class MappingEntry:
    """One stage-1 scene pair and its stage-2 pairs: (now, prev, ((now2, prev2), ...))."""

    now: str
    prev: str
    stage_two: tuple[tuple[str, str], ...]


@dataclass
class TwoStageResult:
    rows: list[dict]  # one per scored scene: stage-1 rows, then stage-2 rows, in mapping order
    summary: list[dict]  # the three extended_pdm_score_* rows
    entries: list[MappingEntry] = field(default_factory=list)  # the entries that were scored
    unmapped_scenes: int = 0


# ----------------------------------------------------------------------------------------------
# the mapping file


def read_mapping(path) -> list[MappingEntry]:
    """Entries from the devkit's train_test_split YAML (key `reactive_all_mapping`) or a JSON file holding that
    mapping or the bare list [[now, prev, [[now2, prev2], ...]], ...]."""
    path = Path(path)
    if path.suffix.lower() in (".yaml", ".yml"):
        from common.yaml_file import read_yaml

        data = read_yaml(path, what="two-stage mapping", expect=(dict, list), error=TwoStageError)
    elif path.suffix.lower() == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise TwoStageError(f"{path}: two-stage mapping not found") from None
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise TwoStageError(f"{path}: two-stage mapping is not readable JSON ({exc})") from None
    else:
        raise TwoStageError(f"{path}: unknown two-stage mapping format {path.suffix!r}; expected .yaml/.yml (the devkit's "
                            f"train_test_split file) or .json")
    return parse_mapping(data, str(path))


def parse_mapping(data, where: str = "two-stage mapping") -> list[MappingEntry]:
    if isinstance(data, dict):
        if MAPPING_KEY not in data:
            raise TwoStageError(f"{where}: no {MAPPING_KEY!r} key (found {sorted(map(str, data))[:8]}); expected the devkit's "
                                f"two-stage train_test_split file, e.g. navhard_two_stage.yaml")
        data = data[MAPPING_KEY]
    if not isinstance(data, list) or not data:
        raise TwoStageError(f"{where}: {MAPPING_KEY} must be a non-empty list of [now, prev, [[now2, prev2], ...]]")
    entries = []
    for i, e in enumerate(data):
        bad = f"{where}: {MAPPING_KEY}[{i}]"
        if not (isinstance(e, (list, tuple)) and len(e) == 3 and isinstance(e[0], str) and isinstance(e[1], str)):
            raise TwoStageError(f"{bad}: expected [now_token, prev_token, [[now2, prev2], ...]] with string tokens, got {e!r:.120}")
        pairs = e[2]
        if not isinstance(pairs, (list, tuple)) or not pairs:
            # the devkit divides by the number of stage-2 scenes (agg:43): an empty list cannot be weighted
            raise TwoStageError(f"{bad}: no stage-2 pairs; expected a non-empty list of [now2, prev2]")
        for j, p in enumerate(pairs):
            if not (isinstance(p, (list, tuple)) and len(p) == 2 and all(isinstance(t, str) for t in p)):
                raise TwoStageError(f"{bad}[2][{j}]: expected a pair [now2_token, prev2_token] of strings, got {p!r:.120}")
        entries.append(MappingEntry(e[0], e[1], tuple((p[0], p[1]) for p in pairs)))
    return entries


# ----------------------------------------------------------------------------------------------
# the rules


def pseudo_closed_loop_weights(endpoint_xy, start_points_xy, sigma_squared: float = SIGMA_SQUARED) -> np.ndarray:
    """Normalised Gaussian-kernel weights of stage-2 scenes: exp(-|endpoint - start|² / (2 σ²)) / sum, uniform when
    the sum is ~0 or NaN (a NaN endpoint: the stage-1 plan is missing) (agg:28-45)."""
    starts = np.asarray(start_points_xy, float).reshape(-1, 2)
    d2 = np.sum((starts - np.asarray(endpoint_xy, float).reshape(1, 2)) ** 2, axis=-1)
    w = np.exp(-d2 / (2.0 * sigma_squared))
    total = float(w.sum())
    if math.isnan(total) or abs(total) <= ZERO_WEIGHT_SUM_ATOL:
        return np.full(len(starts), 1.0 / len(starts))
    return w / total


def _weighted_mean(values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """(C,) weighted mean over rows, NaN propagating, renormalised (run:221-239)."""
    total = float(np.sum(weights))
    if len(values) == 0 or total == 0.0:
        return np.full(values.shape[1], np.nan)
    return (values * weights[:, None]).sum(axis=0) / total


def _nanmean(vectors: list[np.ndarray], width: int) -> np.ndarray:
    """Column means skipping NaN, as pandas' DataFrame.mean() (run:287-289); NaN where a column has no value."""
    if not vectors:
        return np.full(width, np.nan)
    m = np.stack(vectors)
    ok = ~np.isnan(m)
    n = ok.sum(0)
    s = np.where(ok, m, 0.0).sum(0)
    return np.where(n > 0, s / np.maximum(n, 1), np.nan)


def aggregate_groups(values: Mapping[str, np.ndarray], weights: Mapping[str, float], entries: Sequence[MappingEntry]) -> dict:
    """Summary vectors (over SCORE_COLUMNS or any columns) from per-token value vectors and weights.

    {"combined", "stage_one", "stage_two"} as the devkit (run:242-290): per entry g = s1(now)·S2(now) and
    g' = s1(prev)·S2(prev), S2 the weighted mean of that scene's stage-2 rows; combined = mean of (g + g')/2."""
    width = len(next(iter(values.values())))
    groups, s1s, s2s = [], [], []
    for e in entries:
        halves = []
        for s1_token, s2_tokens in ((e.now, [p[0] for p in e.stage_two]), (e.prev, [p[1] for p in e.stage_two])):
            s1 = _weighted_mean(values[s1_token][None], np.array([weights[s1_token]]))
            s2 = _weighted_mean(np.stack([values[t] for t in s2_tokens]), np.array([weights[t] for t in s2_tokens]))
            s1s.append(s1)
            s2s.append(s2)
            halves.append(s1 * s2)
        groups.append((halves[0] + halves[1]) / 2.0)
    return {"combined": _nanmean(groups, width), "stage_one": _nanmean(s1s, width), "stage_two": _nanmean(s2s, width)}


# ----------------------------------------------------------------------------------------------
# scoring


def _check(scenes_by_id: dict, entries: list[MappingEntry]) -> None:
    seen: dict[str, str] = {}
    for i, e in enumerate(entries):
        for role, tok in [("now", e.now), ("prev", e.prev)] + [(f"stage-2 pair {j}", t) for j, p in enumerate(e.stage_two) for t in p]:
            where = f"{MAPPING_KEY}[{i}] {role}"
            if tok in seen:
                # the devkit writes one EC and one weight per token (run:317-318): a reused token's values would clash
                raise TwoStageError(f"{where}: token {tok!r} is already used by {seen[tok]}; every scene may appear once in the mapping")
            seen[tok] = where
    missing = [t for t in seen if t not in scenes_by_id]
    if missing:
        raise TwoStageError(f"{len(missing)} token(s) of the mapping are not among the scenes, e.g. {missing[:5]} "
                            f"(first at {seen[missing[0]]}); add the stage-2 scenes (--stage-two-pool) or fix the mapping")
    for i, e in enumerate(entries):
        for tok in (e.now, e.prev):
            if scenes_by_id[tok].row["source"] != "real":
                raise TwoStageError(f"{MAPPING_KEY}[{i}]: stage-1 scene {tok!r} has source {scenes_by_id[tok].row['source']!r}; "
                                    f"expected 'real' (stage 1 is the original frames, run:407-412)")
        for p in e.stage_two:
            for tok in p:
                if scenes_by_id[tok].row["source"] != "synthetic":
                    raise TwoStageError(f"{MAPPING_KEY}[{i}]: stage-2 scene {tok!r} has source {scenes_by_id[tok].row['source']!r}; "
                                        f"expected 'synthetic' (stage 2 is the synthetic frames, run:407-412; the human filter "
                                        f"applies to original frames only)")


def _ec_pairs(entries: list[MappingEntry]) -> list[tuple[str, str]]:
    pairs = [(e.now, e.prev) for e in entries]
    pairs += [p for e in entries for p in e.stage_two]
    return pairs


def _start_time(scene) -> float:
    _, t = scene_meta(scene)
    if t is None:
        raise TwoStageError(f"scene {scene.id!r}: meta has no 'timestamp_s'; two-stage EC needs each scene's start time (agg:60)")
    return t


def score_two_stage(
    scenes: Sequence,
    trajectories: Mapping[str, np.ndarray],
    entries: Sequence[MappingEntry],
    *,
    tracking: bool = True,
    human_filter: bool = True,
    num_poses: int = 8,
    interval: float = 0.5,
    protocol: Protocol = DEFAULT,
    sigma_squared: float = SIGMA_SQUARED,
    progress: bool | None = None,
    workers: int = 1,
) -> TwoStageResult:
    """EPDMS rows of every mapped scene with two-stage EC, weights and the three summary rows (module docstring)."""
    by_id = {s.id: s for s in scenes}
    kept = [e for e in entries if e.now in by_id or e.prev in by_id]  # run:371-373
    if not kept:
        raise TwoStageError(f"no mapping entry refers to a scene of the pool ({len(entries)} entries, {len(by_id)} scenes): "
                            f"wrong pool or mapping file?")
    _check(by_id, kept)
    stage_one = [t for e in kept for t in (e.now, e.prev)]
    stage_two = [t for e in kept for t in [p[0] for p in e.stage_two] + [p[1] for p in e.stage_two]]
    order = stage_one + stage_two
    scored = score_scenes([by_id[t] for t in order], trajectories, metric="epdms", tracking=tracking, human_filter=human_filter,
                          num_poses=num_poses, interval=interval, protocol=protocol, progress=progress, workers=workers,
                          keep_states=True)
    rows = {r["token"]: r for r in scored}
    for t in stage_one:
        rows[t]["stage"] = "one"
    for t in stage_two:
        rows[t]["stage"] = "two"

    # EC by mapping pair (agg:49-77, 88-90, 111-122), batched per overlap length
    dt = protocol.scorer.dt
    for r in scored:
        r["two_frame_extended_comfort"] = math.nan
    by_gap = defaultdict(list)
    for cur, prev in _ec_pairs(kept):
        gap = _start_time(by_id[cur]) - _start_time(by_id[prev])
        if not 0.0 < gap < EC_GAP_MAX_S:
            raise TwoStageError(f"EC pair ({cur!r}, {prev!r}): start times {gap:+.3f} s apart; expected the first 0 to "
                                f"{EC_GAP_MAX_S} s after the second (agg:62)")
        if rows[cur]["valid"] and rows[prev]["valid"]:
            by_gap[int(round(gap / dt))].append((cur, prev))
    for k, items in by_gap.items():
        ec = comfort.two_frame_extended_comfort(np.stack([rows[c]["ego_simulated_states"] for c, _ in items]),
                                                np.stack([rows[p]["ego_simulated_states"] for _, p in items]), k, dt, protocol.comfort)
        for (c, p), v in zip(items, ec):
            rows[c]["two_frame_extended_comfort"] = rows[p]["two_frame_extended_comfort"] = float(v)
    for r in scored:
        r.pop("ego_simulated_states", None)
        if r["valid"]:
            r["score"] = aggregate.score_row(r, "v2")  # /16 now that EC is set (run:201-214)

    # weights (agg:20-47, 89-90, 93-122)
    for t in stage_one:
        rows[t]["weight"] = 1.0
    for e in kept:
        for s1, s2_tokens in ((e.now, [p[0] for p in e.stage_two]), (e.prev, [p[1] for p in e.stage_two])):
            endpoint = (local_to_global(np.asarray(trajectories[s1], float)[-1:], by_id[s1].ego_pose())[0, :2]
                        if rows[s1]["valid"] else np.full(2, np.nan))  # an invalid plan: NaN distance, uniform weights
            starts = np.stack([by_id[t].ego_pose()[:2] for t in s2_tokens])
            for t, w in zip(s2_tokens, pseudo_closed_loop_weights(endpoint, starts, sigma_squared)):
                rows[t]["weight"] = float(w)
            rows[s1]["endpoint_x"], rows[s1]["endpoint_y"] = (float(v) for v in endpoint)

    # summaries: official (invalid = NaN) and ours (invalid score = 0)
    cols = SCORE_COLUMNS
    official = {t: (np.array([r[c] for c in cols], float) if r["valid"] else np.full(len(cols), np.nan)) for t, r in rows.items()}
    ours = {t: np.array([r["score"] if r["valid"] else 0.0]) for t, r in rows.items()}
    weights = {t: r["weight"] for t, r in rows.items()}
    off = aggregate_groups(official, weights, kept)
    own = aggregate_groups(ours, weights, kept)
    all_valid = all(r["valid"] for r in scored)
    n_invalid = sum(not r["valid"] for r in scored)
    summary = []
    for token, key, stages in zip(SUMMARY_TOKENS, ("stage_one", "stage_two", "combined"), (("one",), ("two",), ("one", "two"))):
        row = {"token": token, "valid": all_valid, "reason": "" if all_valid else f"{n_invalid} invalid row(s): NaN in the official figures"}
        for stage in stages:  # the combined row carries both stages' sub-metric means (run:444-456)
            vec = off["stage_one" if stage == "one" else "stage_two"]
            for c, v in zip(V2_COLUMNS, vec):
                row[f"{c}_stage_{stage}"] = float(v)
        row["score"] = float(own[key][0])
        row["score_valid_only"] = float(off[key][-1])
        row["invalid_rows"] = n_invalid
        summary.append(row)
    return TwoStageResult(rows=scored, summary=summary, entries=list(kept), unmapped_scenes=len(set(by_id) - set(order)))


# ----------------------------------------------------------------------------------------------
# the CSV


def csv_columns() -> list[str]:
    """The official two-stage columns in order (run:418-422): token, valid, the nine sub-metrics with _stage_one,
    the same with _stage_two, score. (The devkit's leading pandas index column is left out, as in our one-stage CSV.)"""
    return ["token", "valid", *(f"{c}_stage_one" for c in V2_COLUMNS), *(f"{c}_stage_two" for c in V2_COLUMNS), "score"]


EXTRA_COLUMNS = ["stage", "weight", "tracking", "reason", "human_filter_lifted", "score_valid_only", "invalid_rows"]


def write_two_stage_csv(path, result: TwoStageResult) -> Path:
    """Per-scene rows (each row's sub-metrics under its own stage's columns, the other stage's empty, run:407-416),
    then the three summary rows; our columns after the official ones. Written atomically."""
    cols = csv_columns()

    def fmt(v):
        if isinstance(v, float):
            return "" if math.isnan(v) else repr(v)
        return v

    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(cols + EXTRA_COLUMNS)
        for r in result.rows:
            out = {"token": r["token"], "valid": r["valid"], "score": r["score"]}
            out.update({f"{c}_stage_{r['stage']}": r[c] for c in V2_COLUMNS})
            out.update({k: r.get(k, "") for k in EXTRA_COLUMNS})
            w.writerow([fmt(out.get(c, "")) for c in cols + EXTRA_COLUMNS])
        for r in result.summary:
            w.writerow([fmt(r.get(c, "")) for c in cols + EXTRA_COLUMNS])
    return Path(path)
