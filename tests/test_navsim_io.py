"""Predictions files (JSON, CSV, NAVSIM submission pickle), the scores CSV and the `mose eval navsim` CLI,
plus ground truth vs constant velocity on a small simulator pool."""
import csv
import json
import math
import pickle
import sys
import types
from dataclasses import dataclass

import numpy as np
import pytest

from datasets_cfg.schema import ScenePool
from eval.navsim import agents
from eval.navsim import fixtures as F
from eval.navsim.config import V2_COLUMNS
from eval.navsim.predictions import NavsimPredictionsError, read_predictions, write_predictions
from eval.navsim.scorer import mean_score, score_scenes
from pipelines.cli import main


def trajs():
    rng = np.random.default_rng(0)
    return {"a": rng.normal(size=(8, 3)), "b": rng.normal(size=(8, 3))}


@pytest.mark.parametrize("suffix", [".json", ".csv"])
def test_json_and_csv_round_trip(tmp_path, suffix):
    t = trajs()
    path = write_predictions(tmp_path / f"p{suffix}", t, interval_s=0.5)
    back, interval = read_predictions(path)
    assert set(back) == set(t) and interval == (0.5 if suffix == ".json" else None)
    for k in t:
        np.testing.assert_array_equal(back[k], t[k])


def test_bare_json_mapping_and_bad_files(tmp_path):
    p = tmp_path / "bare.json"
    p.write_text(json.dumps({"x": [[1, 2, 3]] * 8}))
    assert read_predictions(p)[0]["x"].shape == (8, 3)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format": "navsim-trajectories", "frame": "global", "trajectories": {}}))
    with pytest.raises(NavsimPredictionsError, match="frame"):
        read_predictions(bad)
    gap = tmp_path / "gap.csv"
    gap.write_text("token,pose,x,y,heading\na,0,1,2,3\na,2,1,2,3\n")
    with pytest.raises(NavsimPredictionsError, match="without gaps"):
        read_predictions(gap)
    with pytest.raises(NavsimPredictionsError, match="no such"):
        read_predictions(tmp_path / "missing.json")


def _official_pickle(path, t):
    """A submission pickle as the devkit writes it, with stand-in navsim/nuplan classes of the same names."""
    mods = {}
    for name in ("navsim", "navsim.common", "navsim.common.dataclasses", "nuplan", "nuplan.planning", "nuplan.planning.simulation",
                 "nuplan.planning.simulation.trajectory", "nuplan.planning.simulation.trajectory.trajectory_sampling"):
        mods[name] = types.ModuleType(name)

    @dataclass
    class TrajectorySampling:
        num_poses: int = 8
        time_horizon: float = 4.0
        interval_length: float = 0.5

    @dataclass
    class Trajectory:
        poses: np.ndarray
        trajectory_sampling: TrajectorySampling

    TrajectorySampling.__module__ = "nuplan.planning.simulation.trajectory.trajectory_sampling"
    Trajectory.__module__ = "navsim.common.dataclasses"
    TrajectorySampling.__qualname__, Trajectory.__qualname__ = "TrajectorySampling", "Trajectory"
    mods["navsim.common.dataclasses"].Trajectory = Trajectory
    mods["nuplan.planning.simulation.trajectory.trajectory_sampling"].TrajectorySampling = TrajectorySampling
    saved = {k: sys.modules.get(k) for k in mods}
    sys.modules.update(mods)
    try:
        sub = {"team_name": "t", "authors": ["a"], "email": "e", "institution": "i", "country / region": "c",
               "predictions": [{k: Trajectory(v.astype(np.float32), TrajectorySampling()) for k, v in t.items()}]}
        path.write_bytes(pickle.dumps(sub))
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


def test_official_submission_pickle_is_read_without_the_devkit(tmp_path):
    t = trajs()
    _official_pickle(tmp_path / "submission.pkl", t)
    assert "navsim.common.dataclasses" not in sys.modules
    back, interval = read_predictions(tmp_path / "submission.pkl")
    assert interval == 0.5 and set(back) == set(t)
    np.testing.assert_allclose(back["a"], t["a"].astype(np.float32))


class _Evil:
    def __reduce__(self):
        import os

        return (os.system, ("echo pwned",))


def test_pickle_with_other_classes_is_refused(tmp_path):
    p = tmp_path / "evil.pkl"
    p.write_bytes(pickle.dumps({"predictions": [{"a": _Evil()}]}))
    with pytest.raises(NavsimPredictionsError, match="refusing to load"):
        read_predictions(p)


# ----------------------------------------------------------------------------------------------
# CLI


@pytest.fixture(scope="module")
def pool_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("pool")
    scenes = F.log_scenes(3, ego=F.constant_accel(speed=10.0), agents_fn=lambda t0: [F.vehicle("lead", 22 + 4 * t0, 0.0, vx=4.0)])
    scenes.append(F.road_scene("nomap", with_map=False))
    ScenePool.from_rows([s.row for s in scenes]).save(d)
    return d


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_cli_scores_an_agent_and_writes_the_official_columns(pool_dir, tmp_path, capsys):
    out = tmp_path / "scores.csv"
    assert main(["eval", "navsim", "--pool", str(pool_dir), "--agent", "constant_velocity", "--out", str(out), "--no-progress",
                 "--save-predictions", str(tmp_path / "cv.json")]) == 0
    summary = json.loads(capsys.readouterr().out)
    rows = read_csv(out)
    header = list(rows[0].keys())
    assert header[:12] == ["token", "valid", *V2_COLUMNS, "score"]
    assert rows[-1]["token"] == "average_all_frames" and len(rows) == 5
    by = {r["token"]: r for r in rows}
    assert by["nomap"]["valid"] == "False" and "no map geometry" in by["nomap"]["reason"]
    assert summary["valid"] == 3 and summary["invalid"] == 1
    assert float(by["average_all_frames"]["score"]) == pytest.approx(sum(float(r["score"]) for r in rows[:4]) / 4)
    assert summary["score"] == pytest.approx(float(by["average_all_frames"]["score"]), abs=1e-6)
    # the official mean skips the invalid row (the devkit's NaN row, run_pdm_score_one_stage.py:293): 3 valid rows
    valid_mean = sum(float(r["score"]) for r in rows[:4] if r["valid"] == "True") / 3
    assert summary["score_official"] == pytest.approx(valid_mean, abs=1e-6) and summary["invalid_in_pool"] == 1
    assert float(by["average_all_frames"]["score_valid_only"]) == pytest.approx(valid_mean)
    assert by["average_all_frames"]["invalid_rows"] == "1" and by["nomap"]["score_valid_only"] == ""
    # the saved predictions score identically through --predictions
    out2 = tmp_path / "again.csv"
    assert main(["eval", "navsim", "--pool", str(pool_dir), "--predictions", str(tmp_path / "cv.json"), "--out", str(out2), "--no-progress"]) == 0
    assert [r["score"] for r in read_csv(out2)] == [r["score"] for r in rows]


def test_cli_reports_unknown_tokens_and_bad_predictions(pool_dir, tmp_path, capsys):
    pool = ScenePool.load(pool_dir)
    t = agents.human([s for s in pool if s.id != "nomap"])
    t["log0_001"] = t["log0_001"][:5]  # wrong pose count
    t["ghost"] = t["log0_000"]
    pred = write_predictions(tmp_path / "p.csv", t)
    out = tmp_path / "s.csv"
    assert main(["eval", "navsim", "--pool", str(pool_dir), "--predictions", str(pred), "--out", str(out), "--metric", "pdms", "--no-tracking", "--no-progress"]) == 0
    summary = json.loads(capsys.readouterr().out)
    by = {r["token"]: r for r in read_csv(out)}
    assert by["ghost"]["valid"] == "False" and by["ghost"]["reason"] == "token not in the pool"
    assert "5 poses; expected 8" in by["log0_001"]["reason"]
    assert by["log0_000"]["tracking"] == "as_given" and by["log0_000"]["metric"] == "pdms" and by["log0_000"]["comfort"] != ""
    assert summary["metric"] == "pdms" and summary["invalid"] == 3  # nomap, the short one, the ghost


def test_cli_bad_file_is_a_clear_error(pool_dir, tmp_path, capsys):
    bad = tmp_path / "x.txt"
    bad.write_text("nope")
    assert main(["eval", "navsim", "--pool", str(pool_dir), "--predictions", str(bad), "--out", str(tmp_path / "o.csv")]) == 2
    assert "unknown predictions format" in capsys.readouterr().err
    assert not (tmp_path / "o.csv").exists()


# ----------------------------------------------------------------------------------------------
# simulator scenes


def test_ground_truth_beats_constant_velocity_on_simulator_scenes(tmp_path):
    """Issue 5: ground-truth trajectories on simulator scenes score >= 0.9 EPDMS on average, constant velocity clearly
    lower. A pool with every default environment (two episodes each) and both sources; the simulated ego drives within
    NAVSIM's comfort bounds and the maps carry NAVSIM route semantics (datasets_cfg/sim/drivers.py, export.py).
    Cruising on a straight road, constant velocity is as good as the logged driving (NAVSIM's navtest drops such
    scenes; we keep them), so the clear gap is asserted where the road turns."""
    sim = pytest.importorskip("datasets_cfg.sim.corpus")
    sim.generate(tmp_path / "sim", 56, seed=1, image_size=32, scenes_per_episode=4, synthetic_fraction=0.3, progress=False)
    scenes = list(ScenePool.load(tmp_path / "sim"))
    assert {s["source"] for s in scenes} == {"real", "synthetic"} and len({s["location"] for s in scenes}) >= 5
    gt_rows = score_scenes(scenes, agents.human(scenes))
    cv_rows = score_scenes(scenes, agents.constant_velocity(scenes))
    assert all(r["valid"] for r in gt_rows + cv_rows)
    gt, cv = mean_score(gt_rows), mean_score(cv_rows)
    assert gt >= 0.9 and cv <= gt - 0.1, (gt, cv)
    turning = [i for i, s in enumerate(scenes) if s["location"] in ("roundabout", "intersection", "u-turn")]
    gt_turn, cv_turn = (np.mean([rows[i]["score"] for i in turning]) for rows in (gt_rows, cv_rows))
    assert len(turning) >= 12 and cv_turn <= gt_turn - 0.2, (gt_turn, cv_turn)
    real = [r["score"] for s, r in zip(scenes, gt_rows) if s["source"] == "real"]
    assert np.mean(real) >= 0.93
    # the logged driving is comfortable by NAVSIM's bounds, and safe, on road and in its direction
    assert np.mean([r["history_comfort"] for r in gt_rows]) >= 0.85
    for c in ("no_at_fault_collisions", "drivable_area_compliance", "driving_direction_compliance", "time_to_collision_within_bound"):
        assert np.nanmean([r[c] for r in gt_rows]) >= 0.95, c
    assert not any(math.isnan(r["score"]) for r in gt_rows + cv_rows)
