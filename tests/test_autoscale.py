"""AutoScale (curation/autoscale.py, curation/scene_graph.py, eval/autoscale_feedback.py)."""
from __future__ import annotations

import math

import numpy as np
import pytest

from curation.autoscale import AutoScaleSelector, ClusterGA, allocate_budget, feedback_score, retrieval_order, softmax
from curation.scene_graph import RELATIONS, GraphRAEEncoder, build_scene_graph
from curation.selection import Selection, SelectionError
from datasets_cfg.schema import Scene
from tests.semantic_autoscale_fixtures import FakeRatioFeedback, mixed_pool, scene

# ----------------------------------------------------------------------------------------------
# budget apportionment and retrieval


def test_allocate_budget_known_answers():
    np.testing.assert_array_equal(allocate_budget([0.5, 0.3, 0.2], [100, 100, 100], 10), [5, 3, 2])
    np.testing.assert_array_equal(allocate_budget([0.5, 0.3, 0.2], [2, 100, 100], 10), [2, 5, 3])  # overflow re-apportioned 0.3:0.2
    np.testing.assert_array_equal(allocate_budget([1.0, 0.0, 0.0], [3, 4, 10], 10), [3, 2, 5])  # zero-weight cells filled by room
    c = allocate_budget([0.34, 0.33, 0.33], [10, 10, 10], 10)
    assert c.sum() == 10 and sorted(c) == [3, 3, 4]
    rng = np.random.default_rng(0)
    for _ in range(50):
        w, cap = rng.random(6), rng.integers(0, 20, 6)
        b = int(rng.integers(0, cap.sum() + 1))
        c = allocate_budget(w, cap, b)
        assert c.sum() == b and (c <= cap).all() and (c >= 0).all()
    with pytest.raises(SelectionError, match="exceeds"):
        allocate_budget([1, 1], [1, 1], 3)


def test_retrieval_returns_the_nearest_synthetic_scenes():
    rng = np.random.default_rng(1)
    real = rng.normal(size=(5, 4))
    synth = rng.normal(size=(40, 4)) * 3
    order, dist = retrieval_order(real, synth)
    brute = np.sqrt(((synth[:, None, :] - real[None]) ** 2).sum(-1)).min(1)
    np.testing.assert_allclose(dist, np.sort(brute), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(order[:10], np.argsort(brute, kind="stable")[:10])
    near = real[2] + 1e-3  # a synthetic scene almost on a real one comes first
    order2, _ = retrieval_order(real, np.vstack([synth, near]))
    assert order2[0] == 40


# ----------------------------------------------------------------------------------------------
# Cluster-GA


W_STAR = np.array([0.5, 0.3, 0.15, 0.05])


def concave(theta):
    return -float(np.sum((softmax(theta) - W_STAR) ** 2))


@pytest.mark.parametrize("gradient", ["spsa", "fd", "leave_out"])
def test_cluster_ga_climbs_a_concave_score(gradient):
    ga = ClusterGA(gradient=gradient, max_rounds=12, patience=12, tol=0.0, spsa_samples=2, random_state=3)
    res = ga.optimize(concave, np.zeros(4))
    start = concave(np.zeros(4))
    assert res.best_score > start + 0.8 * (0.0 - start)  # most of the way to the optimum (0)
    w = softmax(res.best_theta)
    assert np.abs(w - W_STAR).sum() < np.abs(np.full(4, 0.25) - W_STAR).sum() / 2
    assert res.rounds[0]["score"] == pytest.approx(start)
    assert res.evaluations == res.rounds[-1]["evaluations"] or res.stop_reason


def test_cluster_ga_stopping_rules_and_return_point():
    flat = ClusterGA(gradient="fd", max_rounds=5).optimize(lambda t: 1.0, np.zeros(3))
    assert "zero gradient" in flat.stop_reason and len(flat.rounds) == 1

    def peak(theta):  # 1-D, peak at 0.3: a unit step from 0 overshoots to 1.0, which is worse
        return -float((theta[0] - 0.3) ** 2)

    res = ClusterGA(gradient="fd", max_rounds=5, patience=1, tol=0.0, step_size=1.0).optimize(peak, np.zeros(1))
    assert "no improvement" in res.stop_reason and len(res.rounds) == 2
    assert res.best_round == 0 and res.best_theta[0] == 0.0 and res.final_theta[0] == pytest.approx(1.0)
    last = ClusterGA(gradient="fd", max_rounds=1, step_size=1.0, return_point="last").optimize(peak, np.zeros(1))
    assert last.best_theta[0] == pytest.approx(1.0) and last.best_score == pytest.approx(-0.49)
    decayed = ClusterGA(gradient="fd", max_rounds=3, patience=3, tol=0.0, step_size=1.0, step_decay=1.0).optimize(peak, np.zeros(1))
    assert [r["step"] for r in decayed.rounds[1:]] == pytest.approx([1.0, 0.5, 1.0 / 3.0])
    for kw, match in (({"gradient": "adam"}, "gradient"), ({"step_size": 0}, "step_size"), ({"return_point": "mean"}, "return_point")):
        with pytest.raises(SelectionError, match=match):
            ClusterGA(**kw).optimize(concave, np.zeros(2))


# ----------------------------------------------------------------------------------------------
# scene graphs and Graph-RAE


def test_scene_graph_structure():
    row = scene("g", speed=10.0, agents=[("near", 8.0, 0.0, 9.0, 0.0), ("left", 30.0, 3.5, 9.0, 0.0), ("far", 500.0, 0.0, 0.0, 0.0)], n_lanes=2)
    g = build_scene_graph(Scene(row), radius=50.0, lane_spacing=10.0, proximity_m=20.0)
    assert g.x[0, 0] == 1.0 and g.x[0, 7] == pytest.approx(0.5)  # ego, speed 10 / 20
    agents = np.flatnonzero(g.x[:, 1] == 1)
    lanes = np.flatnonzero(g.x[:, 2] == 1)
    assert len(agents) == 2  # "far" is outside the radius
    assert len(lanes) > 0 and (np.hypot(g.x[lanes, 3], g.x[lanes, 4]) <= 1.0 + 1e-9).all()
    prox, on_lane, succ, nb = (g.adj[RELATIONS.index(r)] for r in RELATIONS)
    assert (g.adj == g.adj.transpose(0, 2, 1)).all() and (np.diagonal(g.adj, axis1=1, axis2=2) == 0).all()
    near_i, left_i = agents[np.argsort(g.x[agents, 3])]
    assert prox[0, near_i] == 1 and prox[0, left_i] == 0  # 8 m vs ~30 m from the ego
    # each vehicle sits on a lane element of its lane (y = 0 or 3.5)
    for i, y in ((0, 0.0), (near_i, 0.0), (left_i, 3.5)):
        j = np.flatnonzero(on_lane[i])
        assert len(j) == 1 and g.x[j[0], 4] * 50.0 == pytest.approx(y)
    # successor edges chain each lane; neighbour edges join the two parallel lanes
    assert succ.sum() / 2 == len(lanes) - 2  # two lanes, each a chain
    assert nb.sum() > 0 and all(abs(g.x[i, 4] - g.x[j, 4]) * 50 == pytest.approx(3.5) for i, j in zip(*np.nonzero(nb)))


def two_scene_types(n: int = 16):
    busy = [scene(f"busy{i}", speed=25.0, n_lanes=3, agents=[(f"c{j}", 10.0 * j - 20 + i, 3.5 * (j % 3), 24.0, 0.0) for j in range(8)])
            for i in range(n)]
    quiet = [scene(f"quiet{i}", speed=5.0, n_lanes=1, curve=0.01 + 0.001 * i) for i in range(n)]
    return [build_scene_graph(Scene(r)) for r in busy + quiet], np.array([0] * n + [1] * n)


def test_graph_rae_loss_decreases_and_separates_scene_types():
    graphs, label = two_scene_types()
    enc = GraphRAEEncoder(hidden=32, embed_dim=16, epochs=25, batch_size=16, random_state=0)
    Z = enc.fit_transform(graphs)
    first, last = enc.loss_history_[0], enc.loss_history_[-1]
    assert last["total"] < 0.7 * first["total"]
    assert last["adjacency"] < first["adjacency"] and last["features"] < first["features"]
    assert {"contrastive", "metric", "summary"} <= set(last)
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_rand_score

    assert adjusted_rand_score(label, KMeans(2, n_init=4, random_state=0).fit_predict(Z)) == 1.0
    d = np.linalg.norm(Z[:, None] - Z[None], axis=-1)
    within = d[label[:, None] == label[None]].mean()
    between = d[label[:, None] != label[None]].mean()
    assert between > 2 * within


# ----------------------------------------------------------------------------------------------
# the selector with a fake (toy) feedback


class FakePilot:
    def __init__(self, good):
        self.good = set(good)

    def fit_and_score(self, ids):
        return {"score": float(np.mean([i in self.good for i in ids]))}


class NaNFeedback:
    def evaluate(self, ids):
        return {"score": math.nan}


@pytest.fixture(scope="module")
def pool():
    return mixed_pool(40)


def test_autoscale_moves_the_ratio_toward_what_the_feedback_rewards(pool, tmp_path):
    fb = FakeRatioFeedback(pool)
    sel = AutoScaleSelector(n_clusters=2, rae_epochs=3, max_rounds=8, patience=8, step_size=0.8, spsa_samples=2,
                            random_state=0).select(pool, 16, evaluator=fb, report_dir=tmp_path)
    st = sel.state
    assert len(sel) == 16 and len(set(sel.ids)) == 16
    assert st["rounds"][0]["synthetic_fraction"] == pytest.approx(0.5)  # start: cells by size (the pool is half synthetic)
    assert abs(st["synthetic_fraction"] - 0.25) < abs(0.5 - 0.25)
    assert st["best_score"] > st["initial_score"]
    assert st["real"] + st["synthetic"] == 16 and st["ratio"] == f"{st['real']}:{st['synthetic']}"
    src = dict(zip(pool.ids, pool.column("source")))
    assert sum(src[i] == "synthetic" for i in sel.ids) == st["synthetic"] == sum(s == "synthetic" for s in sel.extra["source"])
    for r in st["rounds"]:  # every round's mixture is recorded with its ratio and fills the budget
        assert sum(r["counts"]) == 16 and r["ratio"] == f"{r['real']}:{r['synthetic']}" and len(r["weights"]) == len(st["cells"])
    assert st["evaluations"] == fb.calls <= st["objective_calls"]  # identical allocations are evaluated once
    assert (tmp_path / "autoscale_rounds.png").stat().st_size > 1000
    sel.write(tmp_path / "m.jsonl")
    assert Selection.read(tmp_path / "m.jsonl").ids == sel.ids


def test_autoscale_with_a_pilot_trainer_and_an_embedding_column(pool):
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(len(pool), 4))
    p = pool.with_column("emb", emb.tolist())
    good = [i for i, s in zip(p.ids, p.column("source")) if s == "real"]
    sel = AutoScaleSelector(n_clusters=2, embedding="emb", gradient="leave_out", max_rounds=3, step_size=1.0)
    res = sel.select(p, 10, evaluator=FakePilot(good), exclude=p.ids[:4])
    assert not set(res.ids) & set(p.ids[:4])
    assert res.state["embedding"] == "column:emb" and res.state["excluded"] == 4
    assert res.state["synthetic_fraction"] < 0.5 and res.state["best_score"] >= res.state["initial_score"]


def test_autoscale_bad_input(pool):
    with pytest.raises(SelectionError, match="needs closed-loop feedback"):
        AutoScaleSelector(rae_epochs=1).select(pool, 5)
    with pytest.raises(SelectionError, match="init"):
        AutoScaleSelector(init="half").select(pool, 5, evaluator=FakeRatioFeedback(pool))
    with pytest.raises(SelectionError, match="budget"):
        AutoScaleSelector().select(pool, 41, evaluator=FakeRatioFeedback(pool))
    with pytest.raises(SelectionError, match="finite 'score'"):
        feedback_score(NaNFeedback(), ["a"])
    with pytest.raises(SelectionError, match="evaluate"):
        feedback_score(object(), ["a"])


# ----------------------------------------------------------------------------------------------
# the simulator feedback (eval/autoscale_feedback.py)


def test_route_command():
    from eval.autoscale_feedback import route_command

    assert route_command(Scene(scene("s", curve=0.0))) == "straight"
    assert route_command(Scene(scene("l", curve=0.02))) == "left"
    assert route_command(Scene(scene("r", curve=-0.02))) == "right"


def test_closed_loop_feedback_trains_and_drives(pool):
    from eval.autoscale_feedback import ClosedLoopFeedback

    fb = ClosedLoopFeedback(pool, envs=("highway",), episodes=1, duration_s=2.0, seed=3)
    out = fb.evaluate(pool.ids[:20])
    assert 0.0 <= out["score"] <= 1.0 and out["n_train"] == 20.0
    assert out["cl_episodes"] == 1.0 and {"cl_crash_rate", "cl_offroad_rate", "cl_epdms"} <= set(out)
    assert fb.calls == 1 and fb.history[0] is out
    with pytest.raises(ValueError, match="metric"):
        ClosedLoopFeedback(pool, metric="speed")


def test_closed_loop_feedback_sums_the_simulator_warnings_over_its_calls():
    """eval/autoscale_feedback.py: each evaluate()'s closed-loop warnings are added up for one summary at the end."""
    from types import SimpleNamespace

    from datasets_cfg.sim.world import SimWarnings
    from eval.autoscale_feedback import ClosedLoopFeedback

    fb = ClosedLoopFeedback(None, envs=("highway",), episodes=1)
    calls = iter([3, 4])

    def closed_loop(pilot):
        w = SimWarnings()
        for _ in range(next(calls)):
            w.add("Route ('a', 'b', 0) does not start after current road ('c', 'd', 0).")
        return SimpleNamespace(episodes=[{"crashed": False, "epdms": 0.5}], means={}, sim_warnings=w)

    fb.fit = lambda ids: SimpleNamespace(n_train_=len(ids))
    fb.closed_loop = closed_loop
    assert fb.evaluate(["x"])["sim_warnings"] == 3.0 and fb.evaluate(["x", "y"])["sim_warnings"] == 4.0
    assert fb.sim_warnings.total == 7 and fb.sim_warnings.summary("mose curate").startswith("mose curate: 7 simulator warning(s)")
