"""eval/pilot.py: the fast pilot planner, scored by our EPDMS, and MOSAIC / SEAD running through it."""
import json

import numpy as np
import pytest

from curation.mosaic import MOSAIC
from curation.sead import SEAD
from curation.selection import PilotTrainer, SampleScorer
from datasets_cfg.schema import Scene, ScenePool
from eval.navsim.scorer import mean_score, score_scenes
from eval.pilot import FastPilot, constant_rollout
from pipelines.cli import main
from tests.curation_helpers import scene_row, small_pool


@pytest.fixture(scope="module")
def pool():
    return small_pool(10, 10)


@pytest.fixture(scope="module")
def pilot(pool):
    return FastPilot.from_pool(pool, eval_fraction=0.3, random_state=0)


def test_constant_rollout():
    straight = Scene(scene_row("s", speed=8.0))
    np.testing.assert_allclose(constant_rollout(straight)[:, 0], 8.0 * 0.5 * np.arange(1, 9), atol=1e-6)
    turning = Scene(scene_row("t", speed=10.0, yaw_rate=0.2))
    p = constant_rollout(turning)
    r = 10.0 / 0.2  # a circle of radius v / w around (0, r)
    np.testing.assert_allclose(np.hypot(p[:, 0], p[:, 1] - r), r, rtol=1e-3)
    np.testing.assert_allclose(p[:, 2], 0.2 * 0.5 * np.arange(1, 9), rtol=1e-3)


def test_held_out_logs_and_protocols(pool, pilot):
    assert isinstance(pilot, PilotTrainer) and isinstance(pilot, SampleScorer)
    logs = {json.loads(pool[i]["meta"])["log_name"] for i in pilot.eval_ids}
    assert len(pilot.eval_ids) == 30 and len(logs) == 3  # whole logs of 10 scenes
    with pytest.raises(ValueError, match="held-out evaluation scenes"):
        pilot.fit(pilot.eval_ids[:2])


def test_pilot_learns_and_scores_with_our_epdms(pool, pilot):
    train = [i for i in pool.ids if i not in pilot.eval_ids]
    rng = np.random.default_rng(0)
    small = pilot.fit_and_score(list(rng.permutation(train)[:2]))
    full = pilot.fit_and_score(train)
    assert 0.0 <= small["score"] <= 1.0 and 0.0 <= full["score"] <= 1.0
    assert full["score"] > small["score"] + 0.3 and full["n_train"] == 70 and full["n_eval"] == 30
    # the score is our EPDMS of its predictions on the held-out scenes, computed the same way here
    preds = pilot.predict(pilot.eval_ids)
    rows = score_scenes([pool[i] for i in pilot.eval_ids], preds, metric="epdms", tracking=False)
    assert full["score"] == pytest.approx(mean_score(rows))
    # trained on everything, its held-out error is below the constant-speed rollout's
    ade = lambda f: np.mean([np.linalg.norm(f(pool[i])[:, :2] - pool[i].future_trajectory()[:, :2], axis=1).mean() for i in pilot.eval_ids])  # noqa: E731
    assert ade(lambda s: preds[s.id]) < ade(constant_rollout)
    per = pilot.score_samples(pilot.eval_ids[:10])
    assert per.shape == (10,) and per.tolist() == pytest.approx([r["score"] for r in rows[:10]], abs=1e-9)


def test_training_scenes_without_future_are_skipped(pool, pilot):
    short = ScenePool.from_rows([scene_row(f"n{k}", log="nf", t0=0.5 * k, future=2) for k in range(3)])
    both = ScenePool.concatenate([pool, short])
    p = FastPilot(both, pilot.eval_ids)
    m = p.fit_and_score(["n0", "n1", "log0_000", "log0_001"])
    assert m["n_train"] == 2 and m["n_skipped"] == 2
    with pytest.raises(ValueError, match="none of the 2 training scenes has 4 s of future"):
        p.fit(["n0", "n1"])


def test_mosaic_and_sead_run_through_the_pilot(pool, tmp_path):
    pilot = FastPilot.from_pool(pool, eval_size=10, random_state=1)
    sel = MOSAIC(domain_key="location", pilot_sizes=[4, 16], pilot_base=6, progress=False).select(
        pool, 20, pilot=pilot, exclude=pilot.eval_ids)
    assert len(sel) == 20 and not set(sel.ids) & set(pilot.eval_ids)
    pts = sel.state["pilot"]["points"]
    assert set(pts) == {"city", "hill", "town"} and all(p["n"] == [4, 16] for p in pts.values())
    assert sel.state["importance"]["source"] == "pilot model fitted on the base set"
    for name, x in sel.state["allocation"].items():  # every domain's largest pilot run had 16 scenes
        assert sel.state["allocation_over_largest_pilot"][name] == pytest.approx(x / 16, abs=1e-3)
    s = SEAD(n_rounds=2, progress=False).select(pool, 12, pilot=pilot, exclude=pilot.eval_ids)
    assert len(s) == 12 and s.state["rounds"][1]["pilot_metrics_before"]["n_train"] == 6
    assert 0.0 <= s.state["final_pilot_metrics"]["score"] <= 1.0


def test_cli_mosaic_with_the_fast_pilot(pool, tmp_path):
    pool.save(tmp_path / "pool")
    cfg = tmp_path / "c.yaml"
    cfg.write_text("mosaic: {n_domains: 2, n_pilot_sizes: 2, pilot_base: 6}\npilot: {eval_size: 10}\n")
    out = tmp_path / "m.jsonl"
    assert main(["curate", "--method", "mosaic", "--pool", str(tmp_path / "pool"), "--budget", "15", "--out", str(out),
                 "--config", str(cfg), "--no-progress"]) == 0
    header = json.loads((tmp_path / "m.header.json").read_text())
    assert header["num_selected"] == 15 and len(header["state"]["pilot_eval_ids"]) == 10
    assert not set(header["state"]["pilot_eval_ids"]) & {json.loads(l)["id"] for l in out.read_text().splitlines()}
    assert (tmp_path / "m_plots" / "mosaic_fits.png").is_file() and header["config"]["pilot"]["metric"] == "epdms"


# ----------------------------------------------------------------------------------------------
# SEAD's per-frame sets from the trained pilot (curation.sead.SetFeatureModel)


def test_agent_features_are_the_fitted_planners_response_to_each_agent(pool, pilot):
    """For the ridge planner f(x) = W ((x - mu) / sigma) + b (StandardScaler then Ridge), an agent's embedding
    f(x with the agent in the nearest slot) - f(x with the slot padded at (100, 0, 0, 0)) is, by linearity,
    W[:, s] ((a - pad) / sigma[s]) over the slot's 4 inputs s: derived here from the fitted coefficients."""
    from curation.features import agent_set, planner_input_layout
    from curation.sead import SetFeatureModel

    train = [s for s in pool.ids if s not in set(pilot.eval_ids)]
    pilot.fit(train)
    assert isinstance(pilot, SetFeatureModel)
    ids = [s for s in train if len(agent_set(pool[s])) >= 2][:3]
    assert ids, "the fixture pool needs scenes with agents"
    fs = pilot.set_features(ids, [pool[s].current_index for s in ids])
    scaler, ridge = pilot.estimator_[0], pilot.estimator_[-1]
    slot = np.arange(planner_input_layout()["agents"].start, planner_input_layout()["agents"].start + 4)
    pad = np.array([100.0, 0.0, 0.0, 0.0])
    for sid, emb, xy, conf in zip(ids, fs.agents, fs.det_xy, fs.det_conf):
        a = agent_set(pool[sid])
        want = ((a[:, :4] - pad) / scaler.scale_[slot]) @ ridge.coef_[:, slot].T
        np.testing.assert_allclose(emb, want, rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(xy, a[:, :2]) and np.testing.assert_array_equal(conf, np.ones(len(a)))
    assert fs.source["agents"].startswith("model") and fs.source["map"].startswith("ground truth")


def test_sead_selection_follows_the_pilots_features(pool):
    """Two pilots that differ only in whether they react to agents (the second one's ridge weights on the agent
    inputs are zeroed after every fit, so its agent embeddings are 0) give SEAD different feature shifts and so
    different selections; a pilot without set_features is a recorded fallback to ground-truth sets."""
    from curation.features import planner_input_layout
    from curation.sead import SEAD
    from tests.test_sead import RecordingPilot

    class AgentBlindPilot(FastPilot):
        def fit(self, ids):
            super().fit(ids)
            self.estimator_[-1].coef_[:, planner_input_layout()["agents"]] = 0.0
            return self

    def select(pilot):
        return SEAD(n_rounds=3, progress=False, random_state=0).select(pool, 24, pilot=pilot, exclude=pilot.eval_ids)

    reacting = FastPilot.from_pool(pool, eval_size=20, random_state=0)
    deaf = AgentBlindPilot.from_pool(pool, eval_size=20, random_state=0)
    a, b = select(reacting), select(deaf)
    some = [s for s in b.ids if s not in set(deaf.eval_ids)][:5]
    assert all(np.allclose(e, 0) for e in deaf.set_features(some).agents)  # the premise: it ignores agents
    assert any(np.abs(e).sum() > 0 for e in reacting.set_features(some).agents)
    assert a.ids[:8] == b.ids[:8]  # round 0 is stratified random: no model involved yet
    assert a.ids != b.ids
    assert a.state["feature_source"].startswith("model (FastPilot.set_features)")
    assert "map: ground truth" in a.state["feature_source"]
    assert [f["what"] for f in a.fallbacks if f["what"].startswith("feature_source")] == ["feature_source_partial"]
    rec = RecordingPilot()
    rec.eval_ids = reacting.eval_ids
    c = select(rec)
    assert c.state["feature_source"].startswith("ground truth")
    assert [f["what"] for f in c.fallbacks if f["what"].startswith("feature_source")] == ["feature_source"]
