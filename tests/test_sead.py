"""SEAD: EMD, feature shift, key frames, dynamic/static strata, the initial selection and the rounds."""
import json

import numpy as np
import pytest
from scipy.stats import wasserstein_distance_nd

from curation.features import ArrayPool
from curation.sead import (SEAD, STRATA, FrameSets, clip_feature_shift, dynamic_strata, emd, ground_truth_sets, key_frame_flags,
                           longest_run, proportional_quotas, rank_high, shift_from_means)
from curation.selection import SelectionError
from datasets_cfg.schema import ScenePool
from tests.curation_helpers import log_rows


def test_emd_matches_scipy_on_small_sets():
    rng = np.random.default_rng(0)
    for n, m, d in ((1, 1, 2), (3, 5, 2), (7, 4, 3), (6, 6, 4)):
        A, B = rng.normal(size=(n, d)), rng.normal(size=(m, d)) + 0.5
        assert emd(A, B) == pytest.approx(wasserstein_distance_nd(A, B), rel=1e-7, abs=1e-9)
    # an empty set counts as one element at the origin
    B = rng.normal(size=(4, 2))
    assert emd(np.zeros((0, 2)), B) == pytest.approx(wasserstein_distance_nd(np.zeros((1, 2)), B))
    assert emd(np.zeros((0, 2)), np.zeros((0, 2))) == 0.0


def test_feature_shift_sums_consecutive_frames():
    # 1-D single-element sets: agent positions 0, 3, 7 and map positions 1, 1, 2 -> FS = (3 + 4) + (0 + 1)
    agents = [np.array([[0.0]]), np.array([[3.0]]), np.array([[7.0]])]
    maps = [np.array([[1.0]]), np.array([[1.0]]), np.array([[2.0]])]
    clips = [np.array([0, 1, 2]), np.array([2]), np.array([1, 0])]
    np.testing.assert_allclose(clip_feature_shift(agents, maps, clips, "emd"), [8.0, 0.0, 3.0])
    np.testing.assert_allclose(clip_feature_shift(agents, maps, clips, "mean"), [8.0, 0.0, 3.0])
    # "mean" = distance between the sets' mean elements; differs from EMD for spread sets
    A, B = np.array([[0.0, 0.0], [2.0, 0.0]]), np.array([[1.0, 0.0]])
    assert clip_feature_shift([A, B], [A, A], [np.array([0, 1])], "mean")[0] == pytest.approx(0.0)
    assert clip_feature_shift([A, B], [A, A], [np.array([0, 1])], "emd")[0] == pytest.approx(1.0)
    # offsets form (frames stored clip by clip) equals the list form
    rng = np.random.default_rng(1)
    M = rng.normal(size=(10, 4))
    clips = [np.arange(0, 3), np.arange(3, 4), np.arange(4, 10)]
    np.testing.assert_allclose(shift_from_means(M, np.array([0, 3, 4, 10]), split=2), shift_from_means(M, clips, split=2))
    by_hand = sum(np.linalg.norm(M[t, :2] - M[t - 1, :2]) + np.linalg.norm(M[t, 2:] - M[t - 1, 2:]) for t in range(5, 10))
    assert shift_from_means(M, clips, split=2)[2] == pytest.approx(by_hand)


def test_longest_run_and_key_frame_flags():
    assert longest_run([0, 1, 1, 0, 1, 1, 1, 0]) == (4, 3)
    assert longest_run([1, 1, 0, 1, 1]) == (0, 2)  # ties: the earliest
    assert longest_run([0, 0]) == (0, 0) and longest_run([]) == (0, 0)
    xy = [np.array([[4.0, 0.0]]), np.array([[0.0, 4.9]]), np.array([[3.0, 4.0]]), np.array([[6.0, 0.0], [1.0, 1.0]]), np.zeros((0, 2))]
    conf = [np.array([0.4]), np.array([0.6]), np.array([0.9]), np.array([0.9, 0.5]), np.zeros(0)]
    # 4 m but conf 0.4 (not > 0.5); 4.9 m conf 0.6; exactly 5 m (not < 5); 1.4 m only at conf 0.5 (not > 0.5); none
    assert key_frame_flags(xy, conf).tolist() == [False, True, False, False, False]
    assert key_frame_flags(xy, conf, conf_threshold=0.3, distance_threshold=6.5).tolist() == [True, True, True, True, False]


def test_dynamic_strata_and_quotas():
    acc = np.array([9, 8, 7, 1, 2, 3, 4, 5, 6.0])
    yaw = np.array([9, 1, 2, 8, 7, 3, 4, 5, 6.0])
    assert rank_high(acc, 1 / 3).tolist() == [True, True, True, False, False, False, False, False, False]
    # acc high: 0,1,2; yaw high: 0,3,4 -> B: 0; N: 5,6,7,8; S: 1,2,3,4
    assert dynamic_strata(acc, yaw).tolist() == ["B", "S", "S", "S", "S", "N", "N", "N", "N"]
    assert proportional_quotas(np.array([5, 3, 2]), 7).tolist() == [4, 2, 1]  # 3.5, 2.1, 1.4 -> largest remainder
    assert proportional_quotas(np.array([1, 1, 1]), 2).tolist() == [1, 1, 0]


def singleton_pool(n=120, seed=0):
    """Scenes without log names (each its own clip): known lighting/weather and dynamics per scene."""
    rng = np.random.default_rng(seed)
    ids, egos, light, wet = [], [], [], []
    for i in range(n):
        s, y = float(rng.uniform(0, 2)), float(rng.uniform(0, 1))
        ids.append(f"s{i:03d}")
        egos.append({"accel_lat": [0.0, s, 0.0, -s], "heading": [0.0, y, 0.0, y], "accel": [0.0] * 4, "speed": [5.0] * 4})
        light.append(["day", "night", "day", ""][i % 4])
        wet.append(["sunny", "sunny", "rainy", "rainy", "sunny"][i % 5])
    meta = ["{}"] * n
    return ArrayPool(ids, {"ego": egos, "lighting": light, "weather": wet, "meta": meta, "current_index": [3] * n})


def test_initial_selection_is_stratified_proportionally():
    pool = singleton_pool()
    egos, light, wet = pool.column("ego"), pool.column("lighting"), pool.column("weather")
    acc = np.array([np.std(e["accel_lat"]) for e in egos])
    yaw = np.array([3 * e["heading"][1] for e in egos])  # |Δheading| summed: y + y + y
    static = [("N" if l == "night" else "D") + ("R" if w == "rainy" else "S") for l, w in zip(light, wet)]
    cells = np.array([f"{s}-{d}" for s, d in zip(static, dynamic_strata(acc, yaw))])
    sizes = np.array([(cells == c).sum() for c in STRATA])
    sel = SEAD(n_rounds=1, progress=False, random_state=3).select(pool, 37)
    got = {c: sum(1 for i in sel.ids if cells[int(i[1:])] == c) for c in STRATA}
    expected = dict(zip(STRATA, proportional_quotas(sizes, 37).tolist()))
    assert got == expected and sum(got.values()) == 37
    assert sel.state["rounds"][0]["quotas"] == expected
    assert {c: v["scenes"] for c, v in sel.state["strata"].items()} == dict(zip(STRATA, sizes.tolist()))
    assert all(cells[int(i[1:])] == s for i, s in zip(sel.ids, sel.extra["stratum"]))
    assert [f["what"] for f in sel.fallbacks] == ["no_clips", "unknown_static"]  # unknown lighting -> day, recorded
    # another seed: same quotas, different scenes
    other = SEAD(n_rounds=1, progress=False, random_state=4).select(pool, 37)
    assert set(other.ids) != set(sel.ids)
    with pytest.raises(SelectionError, match="budget: 121 scenes requested but the pool has only 120"):
        SEAD(n_rounds=1).select(pool, 121)


# a clip whose ego drives at 2 m/s (1 m per frame, ego at x = k in frame k) past a parked car at x = 1.5 (near
# until t = 3.0 s) and one at x = 14.25 (near from t = 5.0 s): key frames 0-6 and 10-11; a quiet clip without agents
# on the same road. Nearest car per frame: 1.5, 0.5, 0.5, 1.5, 2.5, 3.5, 4.5 | 5.5, 6.25, 5.25 | 4.25, 3.25 m, so
# no frame is within 0.25 m of the 5 m threshold
def key_clip_pool():
    rows = log_rows("key", 12, speed=2.0, agents=[("p1", 1.5, 0.0, 0.0, 0.0), ("p2", 14.25, 0.0, 0.0, 0.0)])
    rows += log_rows("quiet", 12, speed=2.0)
    return ScenePool.from_rows(rows)


@pytest.fixture(scope="module")
def kpool():
    return key_clip_pool()


def test_key_frames_from_ground_truth_on_a_constructed_clip(kpool):
    frames = [(kpool.index_of(f"key_{k:03d}"), 3) for k in range(12)]
    sets = ground_truth_sets(kpool, frames)
    nearest = [float(np.hypot(xy[:, 0], xy[:, 1]).min()) for xy in sets.det_xy]
    assert nearest == pytest.approx([1.5, 0.5, 0.5, 1.5, 2.5, 3.5, 4.5, 5.5, 6.25, 5.25, 4.25, 3.25])
    flags = key_frame_flags(sets.det_xy, sets.det_conf)
    assert np.flatnonzero(flags).tolist() == [0, 1, 2, 3, 4, 5, 6, 10, 11]  # nearer than 5 m
    assert longest_run(flags) == (0, 7)


def test_round_takes_the_longest_key_frame_run_of_the_top_clip(kpool):
    sel = SEAD(n_rounds=2, initial_fraction=0.0, progress=False).select(kpool, 7)
    assert sel.ids == [f"key_{k:03d}" for k in range(7)]
    assert sel.extra["round"] == [1] * 7 and "key frames 0-6" in sel.reasons[0]
    r1 = sel.state["rounds"][1]
    assert r1["top_fs"][0] > r1["top_fs"][1]  # the clip with moving agents shifts more than the quiet one
    assert sel.state["feature_source"].startswith("ground truth")
    # a larger round: the quiet clip has no key frames, so the round is filled from the top clip (recorded)
    sel = SEAD(n_rounds=2, initial_fraction=0.0, progress=False).select(kpool, 9)
    assert sel.ids[:7] == [f"key_{k:03d}" for k in range(7)] and sel.ids[7:] == ["key_007", "key_008"]
    assert [f["what"] for f in sel.fallbacks] == ["round_fill"]
    # without key frames the whole clip is taken in time order
    whole = SEAD(n_rounds=2, initial_fraction=0.0, key_frames=False, progress=False).select(kpool, 9)
    assert whole.ids == [f"key_{k:03d}" for k in range(9)] and not whole.fallbacks


class RecordingPilot:
    """A fake pilot (tests only): records what it is trained on; scores = training-set size / 100."""

    def __init__(self):
        self.calls = []

    def fit_and_score(self, ids):
        self.calls.append(list(ids))
        return {"score": len(ids) / 100}


class QuietIsInterestingModel(RecordingPilot):
    """A fake model (tests only) whose features say the quiet clip changes a lot and detects a car at 1 m there."""

    def set_features(self, ids, frames):
        agents, maps, xy, conf = [], [], [], []
        for i in ids:
            k = int(i[-3:])
            quiet = i.startswith("quiet")
            agents.append(np.array([[10.0 * k if quiet else 0.0, 0.0]]))
            maps.append(np.zeros((1, 2)))
            xy.append(np.array([[1.0, 0.0]]) if quiet else np.zeros((0, 2)))
            conf.append(np.array([0.9]) if quiet else np.zeros(0))
        return FrameSets(agents, maps, xy, conf)


def test_rounds_retrain_from_scratch_on_all_selected(kpool):
    pilot = RecordingPilot()
    sel = SEAD(n_rounds=3, progress=False, random_state=0).select(kpool, 12, pilot=pilot)
    rounds = np.array(sel.extra["round"])
    assert sel.state["round_budgets"] == [4, 4, 4] and np.bincount(rounds).tolist() == [4, 4, 4]
    # trained before rounds 1 and 2 on everything chosen so far, then once more on the final set
    assert [len(c) for c in pilot.calls] == [4, 8, 12]
    assert pilot.calls[0] == sel.ids[:4] and pilot.calls[1] == sel.ids[:8] and pilot.calls[2] == sel.ids
    assert sel.state["rounds"][1]["pilot_metrics_before"]["score"] == pytest.approx(0.04)
    assert sel.state["final_pilot_metrics"]["score"] == pytest.approx(0.12)


def test_model_features_drive_the_ranking(kpool):
    model = QuietIsInterestingModel()
    sel = SEAD(n_rounds=2, initial_fraction=0.0, progress=False).select(kpool, 5, pilot=model)
    assert sel.ids == [f"quiet_{k:03d}" for k in range(5)]
    assert "QuietIsInterestingModel" in sel.state["feature_source"]


def test_bad_clip_metadata_is_refused():
    rows = log_rows("dup", 2)
    rows[1]["meta"] = json.dumps({"log_name": "dup", "timestamp_s": 0.0})
    with pytest.raises(SelectionError, match="two scenes share meta.timestamp_s"):
        SEAD(n_rounds=1, progress=False).select(ScenePool.from_rows(rows), 1)
    rows = log_rows("notime", 2)
    rows[0]["meta"] = json.dumps({"log_name": "notime"})
    with pytest.raises(SelectionError, match="scene 'notime_000': field meta.timestamp_s"):
        SEAD(n_rounds=1, progress=False).select(ScenePool.from_rows(rows), 1)
    with pytest.raises(SelectionError, match="fs_mode"):
        SEAD(fs_mode="l2").select(ScenePool.from_rows(log_rows("x", 2)), 1)


def test_a_larger_key_frame_distance_marks_more_key_frames(kpool):
    """Issue #20: the key-frame distance is the constructor's `distance_threshold` (config key `sead.distance_threshold`),
    default the paper's 5 m. On the constructed clip (nearest car per frame, by hand above: 1.5, 0.5, 0.5, 1.5, 2.5,
    3.5, 4.5, 5.5, 6.25, 5.25, 4.25, 3.25 m): < 5 m marks frames 0-6 and 10-11 (9 frames, longest run 0-6);
    < 5.75 m adds 7 (5.5) and 9 (5.25): 11 frames, longest run 0-7; < 7 m marks all 12, one run 0-11."""
    assert SEAD().get_params()["distance_threshold"] == 5.0
    frames = [(kpool.index_of(f"key_{k:03d}"), 3) for k in range(12)]
    sets = ground_truth_sets(kpool, frames)
    expected = {5.0: [0, 1, 2, 3, 4, 5, 6, 10, 11], 5.75: [0, 1, 2, 3, 4, 5, 6, 7, 9, 10, 11], 7.0: list(range(12))}
    for d, want in expected.items():
        assert np.flatnonzero(key_frame_flags(sets.det_xy, sets.det_conf, distance_threshold=d)).tolist() == want
    # through the selector: the round takes the longest key-frame run of the top clip
    for d, run, budget in ((5.75, (0, 7), 8), (7.0, (0, 11), 12)):
        sel = SEAD(n_rounds=2, initial_fraction=0.0, distance_threshold=d, progress=False).select(kpool, budget)
        assert sel.ids == [f"key_{k:03d}" for k in range(run[0], run[1] + 1)]
        assert f"key frames {run[0]}-{run[1]}" in sel.reasons[0] and sel.config["distance_threshold"] == d
    with pytest.raises(SelectionError, match="distance_threshold .* must be a positive number, got -1"):
        SEAD(n_rounds=2, initial_fraction=0.0, distance_threshold=-1, progress=False).select(kpool, 8)
