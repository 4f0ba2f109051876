"""`mose demo` end to end at the hidden test scale (in-process, offline), and its parts.

One run of the whole pipeline per session (module fixture); re-run, changed-config and failure behaviour run on
copies of that run folder so each test sees the same starting point."""
from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from pipelines.demo import STEP_NAMES, STEPS, load_demo_config, read_marker, step_hash

PACKAGED = Path(__file__).resolve().parents[1] / "pipelines" / "demo.yaml"


JUDGE_ENV: dict = {}  # the fake judge's settings, the same for every run of the module (they are part of the evaluate hash)
SECRET = "sk-demo-test-secret"


def run_cli(out: Path, *extra: str) -> tuple[int, str, str]:
    from pipelines.cli import main

    so, se = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(so), contextlib.redirect_stderr(se):
        for k, v in JUDGE_ENV.items():
            mp.setenv(k, v)
        code = main(["demo", "--out", str(out), "--scale", "test", "--no-progress", *extra])
    return code, so.getvalue(), se.getvalue()


def config_with(tmp: Path, changes: dict) -> Path:
    """The packaged demo.yaml with `changes` (dotted keys) applied to the test scale."""
    raw = yaml.safe_load(PACKAGED.read_text())
    for key, value in changes.items():
        node = raw["scales"]["test"]
        *path, last = key.split(".")
        for p in path:
            node = node.setdefault(p, {})
        node[last] = value
    p = tmp / "demo.yaml"
    p.write_text(yaml.safe_dump(raw))
    return p


def markers(out: Path) -> dict:
    return {s: (read_marker(out / s), (out / s / ".done.json").stat().st_mtime_ns) for s in STEP_NAMES}


@pytest.fixture(scope="module")
def judge():
    """A fake OpenAI-compatible judge on loopback (tests/coda_lm_fixtures.py) that rates every answer 7."""
    from tests.coda_lm_fixtures import FakeJudge

    with FakeJudge(lambda body, headers, attempt: (200, "Partly right. Rating: [[7]]", 0.0)) as fake:
        JUDGE_ENV.update(MOSE_JUDGE_URL=fake.url, MOSE_JUDGE_MODEL="fake-judge", MOSE_JUDGE_API_KEY=SECRET)
        yield fake
    JUDGE_ENV.clear()


@pytest.fixture(scope="module")
def demo(tmp_path_factory, judge):
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices on a shared 2-core machine
    out = tmp_path_factory.mktemp("demo") / "run"
    code, stdout, stderr = run_cli(out)
    torch.set_num_threads(n)
    assert code == 0, stderr[-3000:]
    return out, stdout


def copy_run(demo, tmp_path) -> Path:
    out, _ = demo
    dst = tmp_path / "run"
    shutil.copytree(out, dst, symlinks=True)
    return dst


# ----------------------------------------------------------------------------------------------
# the first run


def test_progress_headers_and_final_line(demo):
    out, stdout = demo
    lines = stdout.splitlines()
    for i, name in enumerate(STEP_NAMES, 1):
        assert any(l.startswith(f"[{i}/{len(STEPS)}] {name}: ") and "not run yet" in l for l in lines), name
        assert any(l.startswith(f"[{i}/{len(STEPS)}] {name}: done in ") for l in lines), name
    assert lines[-1] == f"report: {out.resolve() / 'report' / 'report.md'}"


def _table_row(md: str, first_cell: str, header_has: str) -> dict:
    """The row starting with `first_cell` of the first table whose header contains `header_has`, as {header: cell}."""
    blocks = re.split(r"\n\s*\n", md)
    for b in blocks:
        lines = [l for l in b.strip().splitlines() if l.startswith("|")]
        if len(lines) < 3 or header_has not in lines[0]:
            continue
        head = [c.strip() for c in lines[0].strip("|").split("|")]
        for l in lines[2:]:
            cells = [c.strip() for c in l.strip("|").split("|")]
            if cells[0] == first_cell:
                return dict(zip(head, cells))
    raise AssertionError(f"no row {first_cell!r} in a table with {header_has!r}")


def _csv_scores(path: Path) -> tuple[list[dict], dict]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return rows[:-1], rows[-1]


def test_report_numbers_come_from_the_step_outputs(demo):
    out, _ = demo
    md = (out / "report" / "report.md").read_text()
    results = json.loads((out / "evaluate" / "results.json").read_text())
    heldout = json.loads((out / "simulate" / "summary.json").read_text())["heldout"]["num_scenes"]
    for model, label in (("mose", "MoSE"), ("dense", "dense baseline")):
        row = _table_row(md, label, "EPDMS (invalid = 0)")
        plan = results["models"][model]["planning"]
        per_scene, avg = _csv_scores(out / "evaluate" / "planning" / model / "epdms_scores.csv")
        # the report cell = the JSON value = the mean of the per-scene CSV scores with invalid rows as 0 (recomputed)
        recomputed = float(np.mean([float(r["score"]) if r["valid"] == "True" else 0.0 for r in per_scene]))
        assert float(row["EPDMS (invalid = 0)"]) == pytest.approx(plan["mean_score"], abs=5e-5)
        assert plan["mean_score"] == pytest.approx(recomputed, abs=1e-12)
        assert float(avg["score"]) == pytest.approx(recomputed, abs=1e-12)
        # nothing dropped: one row per held-out scene, every invalid one with its reason
        assert len(per_scene) == heldout == int(row["scenes"])
        invalid = [r for r in per_scene if r["valid"] != "True"]
        assert int(row["invalid"]) == len(invalid) == plan["invalid"]
        assert all(r["reason"] for r in invalid)
        answers = [json.loads(l) for l in (out / "evaluate" / "planning" / model / "answers.jsonl").read_text().splitlines()]
        assert sorted(a["question_id"] for a in answers) == sorted(r["token"] for r in per_scene)
        # constrained decoding: every planned answer parses with 8 poses, within the test scale's cap of the budget from the data
        assert plan["format"]["format_ok"] == plan["format"]["trajectory_complete"] == len(per_scene)
        assert plan["budget"]["max_new_tokens"] == 160 < plan["budget"]["longest_target_tokens"]
    closed = json.loads((out / "closed_loop" / "results.json").read_text())
    for model in ("mose", "dense"):
        d = closed["planners"][model]["decisions"]
        assert d["model_calls"] >= 1 and d["format_ok"] == d["trajectory_parsed"] == d["model_calls"]
    # a reference agent's EPDMS too (the logged human future: valid on every scene)
    row = _table_row(md, "human (logged future)", "EPDMS (invalid = 0)")
    per_scene, _ = _csv_scores(out / "evaluate" / "planning" / "ref_human_scores.csv")
    assert float(row["EPDMS over valid"]) == pytest.approx(np.mean([float(r["score"]) for r in per_scene if r["valid"] == "True"]), abs=5e-5)
    # wall time per step = the markers
    for s in STEP_NAMES[:-1]:
        assert float(_table_row(md, s, "seconds")["seconds"]) == pytest.approx(read_marker(out / s)["seconds"], abs=0.051)
    # MOSAIC allocation: the table's cells are the manifest header's allocation and add up to the stage budget
    header = json.loads((out / "curate" / "skill_tune.header.json").read_text())
    alloc = next(iter(header["state"]["method_state"].values()))["allocation"]
    for dom, n in alloc.items():
        assert int(_table_row(md, dom, "allocated")["allocated"]) == n
    assert sum(alloc.values()) == header["budget"]
    # training steps as configured
    cfg = load_demo_config(None, "test")
    for st, keys in cfg["train"]["stages"].items():
        rows = [l for l in md.splitlines() if l.startswith(f"| MoSE | {st} |")]
        assert rows and int(rows[0].split("|")[3]) == keys["max_steps"]


def test_routing_is_compared_with_the_token_identity_router(demo):
    """The routing table has the learned router next to the token-identity reference (hand-checkable: its accuracy is
    a share of the held-out labelled tokens), and the sentence under it says which is higher."""
    out, _ = demo
    md = (out / "report" / "report.md").read_text()
    rt = json.loads((out / "evaluate" / "routing" / "routing.json").read_text())
    tir = rt["token_identity_router"]
    assert 0.0 <= tir["coarse_accuracy"] <= 1.0 and tir["train_tokens"] > 0
    # every held-out labelled token counted once (the learned router's count is tokens x MoE layers: 2 layers)
    assert tir["coarse_tokens"] * 2 == rt["coarse_tokens"]
    row = _table_row(md, "token identity only (reference)", "coarse top-1 in group")
    assert float(row["coarse top-1 in group"]) == pytest.approx(tir["coarse_accuracy"], abs=5e-5)
    verdict = "beats" if rt["coarse_accuracy"] > tir["coarse_accuracy"] else "does not beat"
    assert f"The learned router {verdict} the token-identity reference" in md


def test_judge_runs_when_configured_and_its_key_is_never_written(demo, judge):
    out, _ = demo
    md = (out / "report" / "report.md").read_text()
    assert "LLM judge fake-judge" in md
    for model, label in (("mose", "MoSE"), ("dense", "dense baseline")):
        scores = json.loads((out / "evaluate" / "coda" / model / "scores.json").read_text())["judge_scores"]
        rows = [l for l in md.splitlines() if l.startswith(f"| {label} | general |") and l.count("|") == 7]
        assert rows and float(rows[0].split("|")[3]) == pytest.approx(scores["general"]["score"], abs=5e-5) == 70.0
    assert judge.requests and all(body["model"] == "fake-judge" for _, body, _ in judge.requests)
    assert all(h.get("Authorization") == f"Bearer {SECRET}" for _, _, h in judge.requests)
    for f in out.rglob("*"):
        if f.is_file() and f.suffix in (".json", ".jsonl", ".md", ".yaml", ".csv"):
            assert SECRET not in f.read_text(errors="ignore"), f


def test_report_figures_are_readable_pngs(demo):
    from PIL import Image

    out, _ = demo
    md = (out / "report" / "report.md").read_text()
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    names = {Path(l).name for l in links}
    assert {"skill_coverage.png", "mosaic_fits.png", "mosaic_allocation.png", "routing_heatmap.png", "training_loss.png",
            "scores_vs_dense.png"} <= names
    for link in links:
        path = out / "report" / link
        with Image.open(path) as im:
            assert im.format == "PNG" and im.width >= 200 and im.height >= 150
            px = np.asarray(im.convert("L"), dtype=float)
        assert px.std() > 1.0, f"{link} is blank"


def test_held_out_logs_are_disjoint_and_dense_is_dense(demo):
    from datasets_cfg.schema import ScenePool
    from mose.config import MoSEConfig

    out, _ = demo
    logs = {n: {json.loads(m)["log_name"] for m in ScenePool.load(out / "skills" / n).column("meta")} for n in ("train", "heldout")}
    assert logs["train"] and logs["heldout"] and not logs["train"] & logs["heldout"]
    dense = MoSEConfig.from_pretrained(str(out / "train_dense" / "skill_tune" / "final"))
    mose = MoSEConfig.from_pretrained(str(out / "train" / "skill_tune" / "final"))
    assert (dense.num_experts, dense.num_experts_per_tok) == (1, 1) and mose.num_experts == 4
    # the dense FFN has MoSE's activated width (top_k experts): activated parameters equal up to MoSE's routers
    from mose.modeling import MoSEForConditionalGeneration
    from mose.presets import count_parameters

    routers = {m: sum(p.numel() for n, p in MoSEForConditionalGeneration.from_pretrained(str(out / m / "skill_tune" / "final")).named_parameters()
                      if ".router." in n) for m in ("train", "train_dense")}  # the dense model's 1-expert router is a constant
    assert routers["train"] > routers["train_dense"] > 0
    assert (count_parameters(mose, method="meta")["activated"] - count_parameters(dense, method="meta")["activated"]
            == routers["train"] - routers["train_dense"])
    assert dense.trajectory_decoder == mose.trajectory_decoder == "head"  # pipelines/demo.yaml train.trajectory_decoder
    # same data: both trained on the same manifests (scenes per stage)
    a, b = (json.loads((out / s / "summary.json").read_text())["stages"] for s in ("train", "train_dense"))
    assert {k: (v["scenes"], v["items"], v["steps"]) for k, v in a.items()} == {k: (v["scenes"], v["items"], v["steps"]) for k, v in b.items()}
    for summ in (a, b):  # the test scale refits the head after skill_tune only (20 steps)
        assert summ["skill_tune"]["plan_refit"]["steps"] == 20 and summ["skill_tune"]["plan_refit"]["items"] > 0
        assert summ["align"]["plan_refit"] is None
    ev = json.loads((out / "evaluate" / "results.json").read_text())
    assert {ev["models"][m]["planning"]["decoder"] for m in ("mose", "dense")} == {"head"}
    assert "Trajectory decoder" in (out / "report" / "report.md").read_text()


# ----------------------------------------------------------------------------------------------
# re-runs


def test_rerun_reuses_every_step(demo, tmp_path):
    out = copy_run(demo, tmp_path)
    before = markers(out)
    code, stdout, _ = run_cli(out)
    assert code == 0
    for i, name in enumerate(STEP_NAMES, 1):
        assert f"[{i}/{len(STEPS)}] {name}: reused" in stdout
    assert markers(out) == before
    code, stdout, _ = run_cli(out, "--from", "report")  # forced: only the report runs again
    after = markers(out)
    assert code == 0 and [s for s in STEP_NAMES if after[s] != before[s]] == ["report"]


def test_changed_config_reruns_from_the_changed_step(demo, tmp_path):
    out = copy_run(demo, tmp_path)
    before = markers(out)
    cfg = config_with(tmp_path, {"closed_loop.duration_s": 2.0})
    code, stdout, stderr = run_cli(out, "--config", str(cfg))
    assert code == 0, stderr[-2000:]
    after = markers(out)
    changed = [s for s in STEP_NAMES if after[s] != before[s]]
    assert changed == ["closed_loop", "report"]
    assert "closed_loop: closed-loop rollouts in highway-env (configuration or inputs changed)" in stdout
    res = json.loads((out / "closed_loop" / "results.json").read_text())
    assert res["duration_s"] == 2.0
    assert "2.0 s per planner" in (out / "report" / "report.md").read_text()


def test_failed_step_keeps_previous_outputs_and_says_why(demo, tmp_path):
    out = copy_run(demo, tmp_path)
    before = markers(out)
    manifest = (out / "curate" / "skill_tune.jsonl").read_bytes()
    cfg = config_with(tmp_path, {"curate.stages.skill_tune.budget": 100000})
    code, stdout, stderr = run_cli(out, "--config", str(cfg))
    assert code == 1
    assert "step 3/8 'curate' failed" in stderr and "budget" in stderr and "100000" in stderr
    assert "[4/8]" not in stdout
    assert markers(out) == before  # every finished step (the failed one's previous version too) is untouched
    assert (out / "curate" / "skill_tune.jsonl").read_bytes() == manifest
    assert not list(out.glob(".*previous*"))
    code, stdout, _ = run_cli(out)  # the old settings again: nothing to redo
    assert code == 0 and stdout.count(": reused") == len(STEPS)


# ----------------------------------------------------------------------------------------------
# parts


def test_step_hash_covers_config_and_upstream():
    cfg = load_demo_config(None, "test")
    hashes = {}
    for st in STEPS:
        hashes[st.name] = step_hash(st, cfg, hashes)
    changed = json.loads(json.dumps(cfg))
    changed["curate"]["stages"]["align"]["budget"] += 1
    new = {}
    for st in STEPS:
        new[st.name] = step_hash(st, changed, new)
    assert [s for s in STEP_NAMES if new[s] != hashes[s]] == ["curate", "train", "train_dense", "evaluate", "closed_loop", "report"]
    # a judge configured later re-runs the evaluation (and the report), nothing before it
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MOSE_JUDGE_URL", "http://127.0.0.1:9/v1")
        mp.setenv("MOSE_JUDGE_MODEL", "m")
        judged = load_demo_config(None, "test")
    new = {}
    for st in STEPS:
        new[st.name] = step_hash(st, judged, new)
    assert [s for s in STEP_NAMES if new[s] != hashes[s]] == ["evaluate", "report"]


def test_config_errors_name_file_and_key(tmp_path):
    with pytest.raises(ValueError, match=r"demo\.yaml: scales\.huge: no such scale"):
        load_demo_config(None, "huge")
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"defaults": {"seed": 0}, "scales": {"tiny": {}, "test": {}}}))
    with pytest.raises(ValueError, match=r"bad\.yaml: defaults\.simulate: section missing"):
        load_demo_config(bad, "tiny")
    code, _, stderr = run_cli(tmp_path / "x", "--config", str(bad))
    assert code == 2 and "defaults.simulate" in stderr


def test_answer_to_poses_reads_the_planning_segment():
    from eval.vlm_planner import answer_to_poses, headings_from_xy
    from mose.skill_format import Segment, format_trajectory, render_target
    from mose.skills import Taxonomy

    tax = Taxonomy.load()
    xy = np.array([[2.0, 0.0], [4.0, 0.0], [6.0, 1.0], [8.0, 2.0], [10.0, 2.0], [12.0, 2.0], [14.0, 2.0], [16.0, 2.0]])
    text, _ = render_target([Segment("vehicles", "1 vehicle ahead."), Segment("agent_intent", "It keeps its speed."),
                             Segment("longitudinal_control", "Keep 4 m/s."), Segment("trajectory", format_trajectory(xy))], tax)
    poses, info = answer_to_poses(text, tax)
    assert info["format_ok"] and info["trajectory_points"] == 8
    np.testing.assert_allclose(poses[:, :2], xy)
    # heading of each step's direction, by hand: 0, 0, atan2(1, 2), atan2(1, 2), 0, ...
    expect = [0.0, 0.0, math.atan2(1, 2), math.atan2(1, 2), 0.0, 0.0, 0.0, 0.0]
    np.testing.assert_allclose(poses[:, 2], expect, atol=1e-12)
    np.testing.assert_allclose(headings_from_xy([[0.0, 0.01], [0.0, 3.0]]), [0.0, math.pi / 2])  # a tiny step keeps the heading
    # truncated or missing trajectories: no poses, a reason
    poses, info = answer_to_poses(text.split("[trajectory]")[0] + "[trajectory] [(2.00, 0.00), (4.00", tax)
    assert poses is None and info["reason"].startswith("unparseable model output") and info["trajectory_points"] == 1
    poses, info = answer_to_poses("........", tax)
    assert poses is None and "no trajectory" in info["reason"]


def test_topdown_drawing_places_ego_and_agents():
    from datasets_cfg.schema import Scene, new_row
    from eval.vlm_planner import EGO, OTHER, ROAD, VIEW_METERS, draw_topdown

    ego = {"t": [0.0], "x": [100.0], "y": [50.0], "heading": [0.0], "speed": [5.0], "accel": [0.0], "accel_lat": [0.0], "yaw_rate": [0.0]}
    agents = {"frame": [0], "track_id": ["a"], "category": ["vehicle"], "x": [100.0 + 1.461 + 20.0], "y": [50.0 + 10.0], "heading": [0.0],
              "length": [5.0], "width": [2.0], "height": [1.5], "vx": [0.0], "vy": [0.0]}
    im = np.asarray(draw_topdown(Scene(new_row("s", "sim", "t", ego=ego, agents=agents, meta=json.dumps({"ego_size": {"length": 5.0, "width": 2.0, "rear_axle_to_center": 1.461}}))), 150))
    ppm = 150 / VIEW_METERS  # 2 px per metre
    assert tuple(im[75, 75]) == EGO
    # 20 m ahead (+x: right), 10 m to the left (+y: up in the image)
    assert tuple(im[int(75 - 10 * ppm), int(75 + 20 * ppm)]) == OTHER
    assert tuple(im[5, 5]) == ROAD


def test_model_planner_follows_its_last_plan_between_replans():
    from datasets_cfg.schema import Scene, new_row
    from eval.vlm_planner import ModelPlanner
    from mose.skills import Taxonomy

    def obs(x, t):
        ego = {"t": [0.0], "x": [x], "y": [0.0], "heading": [0.0], "speed": [4.0], "accel": [0.0], "accel_lat": [0.0], "yaw_rate": [0.0]}
        return Scene(new_row(f"s{t}", "sim", "t", ego=ego, meta=json.dumps({"log_name": "ep", "timestamp_s": t})))

    planner = ModelPlanner("unused", replan_every=2, taxonomy=Taxonomy.load())  # no model call happens within a replanning period
    plan = np.column_stack([2.0 * np.arange(1, 9), np.zeros(8), np.zeros(8)])  # 2 m per 0.5 s straight ahead
    planner._last = ("ep", 0.0, np.array([0.0, 0.0, 0.0]), plan, "")
    poses = planner(obs(2.0, 0.5))  # one step later the ego is at x = 2: the rest of the plan, then the last step again
    np.testing.assert_allclose(poses[:, 0], 2.0 * np.arange(1, 9))
    np.testing.assert_allclose(poses[:, 1:], 0.0, atol=1e-12)
    planner._last = ("ep", 0.0, np.array([0.0, 0.0, 0.0]), None, "unparseable model output: no trajectory")
    with pytest.raises(ValueError, match="unparseable"):
        planner(obs(2.0, 0.5))
    assert [d["followed_last_plan"] for d in planner.decisions_] == [True, True]


class FakeStepFailure(RuntimeError):
    """Raised by the fake step functions below."""


def test_step_protocol_keeps_the_last_finished_output(tmp_path, monkeypatch):
    import os

    from pipelines import demo_steps
    from pipelines.demo import Step, StepContext, run_step

    step = Step("fake", "a fake step", "fake_step", ("seed",))
    d = tmp_path / "fake"
    ctx = StepContext(step, d, tmp_path, {"seed": 0}, False, lambda m: None)

    def writes(text, fail=False, expect_partial=False):
        def fn(c):
            if expect_partial:
                assert (c.dir / "out.txt").read_text() == "partial"  # an interrupted run of the same settings resumes
            (c.dir / "out.txt").write_text(text)
            if fail:
                raise FakeStepFailure("boom")
            return {"text": text}
        monkeypatch.setattr(demo_steps, "fake_step", fn, raising=False)

    writes("v1")
    assert run_step(step, ctx, "h1", {})["hash"] == "h1"
    writes("v2", fail=True)
    with pytest.raises(FakeStepFailure):
        run_step(step, ctx, "h2", {})
    assert (d / "out.txt").read_text() == "v1" and read_marker(d)["hash"] == "h1" and not (tmp_path / ".fake.previous").exists()
    # a kill after the finished version was moved aside: the partial new one resumes, the old one is still the fallback
    os.replace(d, tmp_path / ".fake.previous")
    d.mkdir()
    (d / "out.txt").write_text("partial")
    (d / ".started.json").write_text(json.dumps({"hash": "h2"}))
    writes("v2", fail=True, expect_partial=True)
    with pytest.raises(FakeStepFailure):
        run_step(step, ctx, "h2", {})
    assert (d / "out.txt").read_text() == "v1" and read_marker(d)["hash"] == "h1"
    writes("v2")
    assert run_step(step, ctx, "h2", {})["hash"] == "h2"
    assert (d / "out.txt").read_text() == "v2" and json.loads((d / "summary.json").read_text()) == {"text": "v2"}
    assert not (tmp_path / ".fake.previous").exists() and not (d / ".started.json").exists()


# ----------------------------------------------------------------------------------------------
# the report's honesty rules, on synthetic step outputs (no pipeline run)


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def _cl_episode(crashed: bool, epdms: float) -> dict:
    return {"env": "highway", "seed": 0, "crashed": crashed, "crash_time_s": 1.0 if crashed else None, "offroad": False,
            "progress_m": 50.0, "route_completion": 0.5, "comfort": 1.0, "epdms": epdms, "planner_failures": 0}


def test_closed_loop_table_ranks_a_crashing_planner_below_a_safe_one(tmp_path):
    from pipelines.demo_report import build_report

    run = tmp_path / "run"
    # constant velocity crashes in half its episodes (rows as older runs wrote them: a crash before the first scored scene
    # is NaN, a later one keeps the mean of its scenes) and scores 0.95 otherwise; PDM-Closed never crashes and scores 0.80.
    # Skipping the NaN crashes, constant velocity would average (0.95 + 0.95 + 0.9) / 3 = 0.933 and rank first.
    episodes = {"constant_velocity": [_cl_episode(False, 0.95), _cl_episode(True, math.nan), _cl_episode(False, 0.95), _cl_episode(True, 0.90)],
                "pdm_closed": [_cl_episode(False, 0.80)] * 4}
    planners = {}
    for name, eps in episodes.items():
        _write_json(run / "closed_loop" / f"{name}.json", {"episodes": eps, "means": {"epdms": 0.933 if name == "constant_velocity" else 0.8}})
        planners[name] = {"means": {"episodes": 4, "epdms": 0.933 if name == "constant_velocity" else 0.8}, "file": f"closed_loop/{name}.json"}
    _write_json(run / "closed_loop" / "summary.json", {"envs": ["highway"], "episodes": 4, "duration_s": 6.0, "planners": planners})
    res = build_report(run, run / "report")
    md = (run / "report" / "report.md").read_text()
    cv = _table_row(md, "1", "crashed episodes"), _table_row(md, "2", "crashed episodes")
    assert [r["planner"] for r in cv] == ["PDM-Closed", "constant velocity"]
    safe, crashing = cv
    # by hand: (0.95 + 0 + 0.95 + 0) / 4 = 0.475 < 0.80
    assert float(crashing["EPDMS (executed, crash = 0)"]) == pytest.approx(0.475, abs=5e-5) and crashing["crashed episodes"] == "2 of 4"
    assert float(safe["EPDMS (executed, crash = 0)"]) == pytest.approx(0.80, abs=5e-5) and safe["crashed episodes"] == "0 of 4"
    assert res["numbers"]["closed_loop_constant_velocity_epdms"] == pytest.approx(0.475)


def _synthetic_eval() -> dict:
    """evaluate/summary.json of two models and three references; MoSE's general answers are all degenerate text that
    mentions "car", the dense baseline's are well-formed and name half the annotated classes."""
    from eval.coda_scores import object_recall

    qs = [{"question_id": f"s{i}:general", "annotated_classes": ["vehicle", "vru"]} for i in range(3)]
    preds = {"mose": {q["question_id"]: "car car car car car car car car" for q in qs},
             "dense": {q["question_id"]: "A white car ahead in the same lane slows down, keep the distance." for q in qs}}
    models = {}
    for m in ("mose", "dense"):
        off = {"general": {"n": 3, "missing": 0, "bleu4": 1.0, "rouge_l": 0.1, "cider_d": 0.1}, "object_recall": object_recall(qs, preds[m])}
        models[m] = {"coda": {"offline": off}, "planning": {"scenes": 3, "valid": 3, "invalid": 0, "mean_score": 0.5}}
    refs = {r: {"scenes": 3, "valid": 3, "invalid": 0, "mean_score": v} for r, v in (("human", 0.9), ("pdm_closed", 0.8), ("constant_velocity", 0.7))}
    return {"heldout_scenes": 3, "models": models, "references": refs}


def _artist_colours(fig) -> dict:
    """label -> set of RGBA colours of the bars and lines drawn under that label, over every axes of `fig`."""
    from matplotlib.colors import to_rgba

    out: dict = {}
    for ax in fig.axes:
        for c in ax.containers:
            for p in c.patches:
                out.setdefault(c.get_label(), set()).add(tuple(np.round(p.get_facecolor(), 6)))
        for ln in ax.lines:
            if not ln.get_label().startswith("_"):
                out.setdefault(ln.get_label(), set()).add(tuple(np.round(to_rgba(ln.get_color()), 6)))
    return out


def test_one_colour_per_planner_in_every_panel_and_figure():
    from matplotlib.colors import to_rgba

    from pipelines.demo_report import losses_figure, planner_color, scores_figure

    ev = _synthetic_eval()
    # the closed-loop panel lists the planners in another order than the EPDMS panel (constant velocity 3rd, not 5th)
    cl = {m: {"route_completion": 0.5, "crash_rate": 0.0, "epdms": 0.6} for m in ("mose", "dense", "constant_velocity", "pdm_closed")}
    scores = scores_figure(ev, cl)
    curve = {"stages": {"align": {"loss_curve": [[1, 3.0], [2, 2.5]]}}}
    losses = losses_figure(curve, curve)
    panels_with_cv = [ax for ax in scores.axes if any(c.get_label() == "constant velocity" and c.patches for c in ax.containers)]
    assert len(panels_with_cv) == 2
    s, l = _artist_colours(scores), _artist_colours(losses)
    for label, key in (("MoSE", "mose"), ("dense baseline", "dense"), ("human (logged future)", "human"), ("PDM-Closed", "pdm_closed"),
                       ("constant velocity", "constant_velocity")):
        assert s[label] == {tuple(np.round(to_rgba(planner_color(key)), 6))}, label  # one colour in every panel
    assert s["MoSE"] == l["MoSE"] and s["dense baseline"] == l["dense baseline"]  # and the same in the other figure
    assert len({planner_color(k) for k in ("mose", "dense", "human", "pdm_closed", "constant_velocity")}) == 5
    import matplotlib.pyplot as plt

    plt.close(scores)
    plt.close(losses)


def test_object_recall_of_degenerate_answers_is_flagged_not_plotted(tmp_path):
    from pipelines.demo_report import build_report, scores_figure

    ev = _synthetic_eval()
    assert ev["models"]["mose"]["coda"]["offline"]["object_recall"]["recall"] == 0.5  # what a keyword count would report
    fig = scores_figure(ev, {})
    qa = fig.axes[0]
    recall_x = list(qa.get_xticks())[3]
    bars = {c.get_label(): [p for p in c.patches if abs(p.get_x() + p.get_width() / 2 - recall_x) < 0.45] for c in qa.containers}
    assert bars.get("MoSE", []) == []  # no bar for the model whose answers are all degenerate
    assert [round(p.get_height(), 6) for p in bars["dense baseline"]] == [0.5]  # well-formed: vehicle of {vehicle, vru}
    assert "degenerate answers" in [t.get_text() for t in qa.texts]
    import matplotlib.pyplot as plt

    plt.close(fig)
    run = tmp_path / "run"
    _write_json(run / "evaluate" / "summary.json", ev)
    build_report(run, run / "report")
    md = (run / "report" / "report.md").read_text()
    mose = _table_row(md, "MoSE", "object recall (well-formed)")
    assert mose["object recall (well-formed)"] == mose["object precision (well-formed)"] == "degenerate answers"
    assert mose["degenerate answers"] == "3 of 3" and mose["scenes scored"] == "0"
    dense = _table_row(md, "dense baseline", "object recall (well-formed)")
    assert float(dense["object recall (well-formed)"]) == 0.5 and float(dense["object precision (well-formed)"]) == 1.0
    assert dense["degenerate answers"] == "0 of 3"


def test_mosaic_predicted_gain_is_bounded_and_u0_zero_explained(tmp_path):
    from pipelines.demo_report import build_report

    # a stage state as written before the bound existed: the laws' raw sum 1.06 on the pilot's 0-1 EPDMS, U0 = 0
    ms = {"domains": {"source": "kmeans", "names": ["c0", "c1"], "sizes": [10, 10]},
          "fits": {"c0": {"a": 0.6, "tau": 5.0, "status": "ok"}, "c1": {"a": 0.5, "tau": 5.0, "status": "ok"}},
          "allocation": {"c0": 10, "c1": 10}, "predicted_gain": 1.06, "pilot": {"base_size": 8, "base_score": 0.0, "points": {}}}
    run = tmp_path / "run"
    _write_json(run / "curate" / "summary.json", {"stages": {"skill_tune": {"method": "mosaic", "mosaic": ms}}})
    res = build_report(run, run / "report")
    md = (run / "report" / "report.md").read_text()
    assert res["numbers"]["mosaic_skill_tune_predicted_gain"] == 1.0  # 1 - U0
    assert "predicted gain of the allocation 1.0000, the fitted laws' sum 1.0600 clipped" in md
    assert "predicted gain of the allocation 1.06" not in md
    assert "U₀ = 0: the pilot trained on the 8 base scenes scored 0 on every held-out pilot scene" in md
    # a state with the bound recorded is reported as recorded, nothing clipped, no note on a non-zero U0
    ms.update(predicted_gain=0.04, predicted_gain_raw=0.04, predicted_gain_clipped=False, score_bounds=[0.0, 1.0])
    ms["pilot"].update(base_score=0.93, base_note="")
    _write_json(run / "curate" / "summary.json", {"stages": {"skill_tune": {"method": "mosaic", "mosaic": ms}}})
    build_report(run, run / "report")
    line = next(l for l in (run / "report" / "report.md").read_text().splitlines() if l.startswith("ΔU = "))
    assert "predicted gain of the allocation 0.0400, predicted pilot score 0.9700" in line and "clipped" not in line and "U₀ = 0:" not in line
