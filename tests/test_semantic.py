"""Semantic scoring (curation/semantic.py, curation/scene_encoder.py): known answers and the selector end to end."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from curation.scene_encoder import SceneEncoder, percentile_positives, supcon_loss
from curation.selection import Selection, SelectionError
from curation.semantic import (SemanticScorer, SemanticSelector, embedding_safety_correlation, error_patterns, mc_uncertainty, min_distances,
                               rarity, safety_criticality, safety_descriptors, value_score)
from datasets_cfg.schema import Scene, ScenePool
from tests.semantic_autoscale_fixtures import mixed_pool, scene

# ----------------------------------------------------------------------------------------------
# error patterns and safety descriptors


def test_error_pattern_picks_the_worst_window_and_applies_weights():
    gt = np.zeros((2, 8, 2))
    pred = np.zeros((2, 8, 2))
    pred[0, 6, 0] = 3.0  # step 7 only: windows t=2 (steps 3..7) and t=3 (4..8) both hold it -> earliest, t*=2
    pred[1, :, 1] = np.arange(8)  # growing lateral error -> last window, t*=3
    pat, t_star, D = error_patterns(pred, gt, horizon=5)
    assert t_star.tolist() == [2, 3]
    assert D.shape == (2, 4)
    np.testing.assert_allclose(D[1], [np.sqrt(sum(k * k for k in range(t, t + 5))) for t in range(4)])
    np.testing.assert_allclose(pat[0], pred[0, 2:7])
    np.testing.assert_allclose(pat[1], pred[1, 3:8])
    w = np.array([1.0, 0.5, 0.25, 0.0, 2.0])
    pat_w, t_w, D_w = error_patterns(pred, gt, 5, w)
    np.testing.assert_allclose(D_w[1, 0], np.sqrt(np.sum(w * np.arange(5) ** 2)))
    np.testing.assert_allclose(pat_w[1], w[:, None] * pred[1, t_w[1]:t_w[1] + 5])


def test_error_pattern_with_several_reference_times():
    pred = np.zeros((1, 3, 6, 2))
    gt = np.zeros((1, 3, 6, 2))
    pred[0, 1, :5, 0] = 1.0  # reference time 1 deviates over its first 5 steps
    pred[0, 2, 5, 0] = 9.0  # beyond the horizon: ignored
    pat, t_star, D = error_patterns(pred, gt, 5)
    assert t_star.tolist() == [1]
    np.testing.assert_allclose(D[0], [0.0, np.sqrt(5.0), 0.0])
    np.testing.assert_allclose(pat[0, :, 0], np.ones(5))
    with pytest.raises(SelectionError, match="horizon"):
        error_patterns(np.zeros((1, 3, 2)), np.zeros((1, 3, 2)), 5)


def test_min_distance_and_soft_collision_cost_by_hand():
    # agent box 4 x 2 centred 10 m ahead in the ego lane, moving with the ego (10 m/s): bumper gap 10 - 4 = 6 m
    row = scene("a", speed=10.0, agents=[("car", 10.0, 0.0, 10.0, 0.0), ("far", 0.0, 100.0, 0.0, 0.0)])
    sc = Scene(row)
    path_ego = np.stack([10.0 * np.arange(1, 9) * 0.5, np.zeros(8), np.zeros(8)], 1)  # the logged future
    d = min_distances(sc, path_ego[:5], (np.arange(5) + 1) * 0.5)
    np.testing.assert_allclose(d, 6.0, atol=1e-9)
    s, dmin = safety_descriptors([sc], path_ego[None], np.array([0]), horizon=5, sigma=1.0)
    np.testing.assert_allclose(s[0], np.exp(-6.0))
    s2, _ = safety_descriptors([sc], path_ego[None], np.array([0]), horizon=5, sigma=2.0)
    np.testing.assert_allclose(s2[0], np.exp(-3.0))
    # a plan that stays put: the agent drives away, the gap grows 10 m/s from 6 m
    d_stop = min_distances(sc, np.zeros((5, 3)), (np.arange(5) + 1) * 0.5)
    np.testing.assert_allclose(d_stop, 6.0 + 10.0 * (np.arange(5) + 1) * 0.5, atol=1e-9)
    # past the row's last frame (4 s), agents are extrapolated at constant velocity from the current frame
    d_far = min_distances(sc, np.array([[50.0, 0.0, 0.0]]), np.array([5.0]))
    np.testing.assert_allclose(d_far, [10.0 + 10.0 * 5.0 - 50.0 - 4.0], atol=1e-9)


def test_no_agents_gives_zero_cost():
    sc = Scene(scene("empty"))
    s, dmin = safety_descriptors([sc], np.zeros((1, 8, 3)), np.array([1]), 5)
    assert np.isinf(dmin).all() and (s == 0).all()


# ----------------------------------------------------------------------------------------------
# S, R, U, Q


def test_safety_criticality_known_answer():
    Z = np.array([[0.0, 0.0], [1.0, 0.0], [3.0, 0.0]])
    H = np.array([[0.0, 0.0], [3.0, 1.0]])
    S = safety_criticality(Z, H, tau_s=0.5)
    # exp(-d^2 / (2 * 0.5)) = exp(-d^2): max over the two exemplars
    np.testing.assert_allclose(S, [1.0, max(math.exp(-1.0), math.exp(-5.0)), max(math.exp(-9.0), math.exp(-1.0))])
    assert np.all(np.diff(safety_criticality(np.array([[0.0, 0], [0.5, 0], [2, 0]]), H[:1])) < 0)  # monotone in distance


def test_rarity_known_answer():
    Z = np.array([[0.0], [1.0], [2.0], [10.0]])
    R, bw, k = rarity(Z, k=2)
    # 2nd-NN distances: 2, 1, 2, 9 -> median 2
    assert k == 2 and bw == pytest.approx(2.0)
    g = lambda d: math.exp(-d * d / (2 * 4.0))  # noqa: E731
    expect = [-math.log((g(1) + g(2)) / 2), -math.log((g(1) + g(1)) / 2), -math.log((g(1) + g(2)) / 2), -math.log((g(8) + g(9)) / 2)]
    np.testing.assert_allclose(R, expect)
    assert R.argmax() == 3  # the isolated point is the rarest
    R2, bw2, k2 = rarity(Z, k=20, bandwidth=1.0)  # k shrinks to N - 1, bandwidth as given
    assert k2 == 3 and bw2 == 1.0


def test_uncertainty_known_answer():
    Zmc = np.zeros((2, 4, 3))
    Zmc[1, :, 0] = [1.0, -1.0, 1.0, -1.0]  # var (ddof 1) = 4/3
    Zmc[1, :, 2] = [0.0, 0.0, 0.0, 2.0]  # var = (3 * 0.25 + 2.25) / 3 = 1
    np.testing.assert_allclose(mc_uncertainty(Zmc), [0.0, 4.0 / 3.0 + 1.0])
    with pytest.raises(SelectionError):
        mc_uncertainty(np.zeros((2, 1, 3)))


def test_value_score_standardises_and_weights():
    S, R, U = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 1.0]), np.array([0.0, 0.0, 3.0])
    Q, sig = value_score(S, R, U, (1.0, 5.0, 2.0))
    sS, sU = np.std(S), np.std(U)
    assert sig["sigma_R"] == 0.0  # constant component contributes nothing
    np.testing.assert_allclose(Q, S / sS + 2.0 * U / sU)
    Q0, _ = value_score(S, R, U, (0.0, 0.0, 1.0))
    np.testing.assert_allclose(Q0, U / sU)


def test_pearson_check_by_hand():
    Z = np.array([[0.0], [1.0], [3.0], [7.0]])
    c = np.array([0.0, 0.1, 0.3, 0.7])  # criticality grows with position: distance tracks the difference
    res = embedding_safety_correlation(Z, c, k=2)
    d, diff = [], []
    for i in range(4):
        nn = np.argsort(np.abs(Z[:, 0] - Z[i, 0]), kind="stable")[1:3]
        d += list(np.abs(Z[nn, 0] - Z[i, 0]))
        diff += list(np.abs(c[nn] - c[i]))
    assert res["pairs"] == 8
    assert res["pearson_r"] == pytest.approx(np.corrcoef(d, diff)[0, 1])
    assert res["pearson_r"] == pytest.approx(1.0)
    assert math.isnan(embedding_safety_correlation(Z, np.ones(4), k=2)["pearson_r"])


# ----------------------------------------------------------------------------------------------
# the encoder and its loss


def supcon_by_hand(z: np.ndarray, pos: np.ndarray, tau: float) -> float:
    total, count = 0.0, 0
    for i in range(len(z)):
        den = sum(math.exp(z[i] @ z[k] / tau) for k in range(len(z)) if k != i)
        for p in range(len(z)):
            if p != i and pos[i, p]:
                total += -math.log(math.exp(z[i] @ z[p] / tau) / den)
                count += 1
    return total / count


def test_supcon_loss_matches_hand_computation():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(5, 3))
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    pos = np.zeros((5, 5), bool)
    pos[0, 1] = pos[1, 0] = True
    pos[2, 3] = pos[3, 2] = pos[2, 4] = True  # anchor 4 has no positive: skipped
    pos[0, 0] = True  # the diagonal never counts
    for tau in (0.07, 0.5):
        got = float(supcon_loss(torch.tensor(z), torch.tensor(pos), tau))
        assert got == pytest.approx(supcon_by_hand(z, pos, tau), rel=1e-9)
    zero = supcon_loss(torch.tensor(z, requires_grad=True), torch.zeros(5, 5, dtype=torch.bool))
    assert zero.item() == 0.0 and zero.requires_grad


def test_percentile_positives_rule():
    s = torch.tensor([[0.0], [0.1], [0.15], [1.0], [3.0]], dtype=torch.float64)
    pos, delta = percentile_positives(s, 10.0)
    d = np.abs(s.numpy() - s.numpy().T)
    iu = np.triu_indices(5, 1)
    assert delta == pytest.approx(np.percentile(d[iu], 10.0))
    expect = (d <= delta) & ~np.eye(5, dtype=bool)
    assert (pos.numpy() == expect).all() and expect.sum() >= 2


def test_encoder_shapes_unit_norm_and_dropout():
    torch.manual_seed(0)
    enc = SceneEncoder()
    x = torch.randn(6, 5, 2)
    enc.eval()
    z = enc(x)
    assert z.shape == (6, 128)
    torch.testing.assert_close(z.norm(dim=-1), torch.ones(6))
    enc.train()
    assert not torch.allclose(enc(x), enc(x))  # dropout is stochastic in train mode


def test_contrastive_training_groups_safety_levels():
    """Two safety levels with overlapping error patterns: training pulls same-level scenes together."""
    rng = np.random.default_rng(0)
    n = 48
    level = np.arange(n) % 2
    pat = rng.normal(size=(n, 5, 2)) + level[:, None, None] * 1.5
    desc = np.repeat(level[:, None] * 0.9, 5, 1) + rng.uniform(0, 0.01, (n, 5))
    sc = SemanticScorer(epochs=40, batch_size=48, dropout=0.0, mc_samples=3, random_state=0).fit(pat, desc)
    assert sc.loss_history_[-1] < sc.loss_history_[0]
    Z = sc.embed(pat)
    same = np.mean([np.linalg.norm(Z[i] - Z[j]) for i in range(n) for j in range(n) if i != j and level[i] == level[j]])
    other = np.mean([np.linalg.norm(Z[i] - Z[j]) for i in range(n) for j in range(n) if level[i] != level[j]])
    assert same < other
    assert sorted(level[sc.hazard_index_]) == [1] * math.ceil(0.1 * n)  # hazards: the top 10 % by max s
    assert embedding_safety_correlation(Z, desc.max(1))["pearson_r"] > 0
    U = sc.score(pat)["U"]
    assert np.allclose(U, 0.0)  # no dropout -> no MC dispersion


# ----------------------------------------------------------------------------------------------
# the selector


@pytest.fixture(scope="module")
def pool():
    return mixed_pool(40)


def test_selector_end_to_end(pool, tmp_path):
    sel = SemanticSelector(epochs=5, mc_samples=4, random_state=1).select(pool, 8, train_ids=pool.ids[:20], report_dir=tmp_path)
    assert len(sel) == 8 and len(set(sel.ids)) == 8
    assert not set(sel.ids) & set(pool.ids[:20])  # the labelled set is not a candidate
    assert sel.scores == sorted(sel.scores, reverse=True)
    st = sel.state
    assert st["num_train"] == 20 and st["num_candidates"] == 20 and len(st["hazards"]) == 2
    assert {"pearson_r", "pairs", "k"} <= set(st["pearson_check"])
    # Q recomputed from the recorded components and sigmas
    S, R, U = (np.array(sel.extra[k]) for k in "SRU")
    Q = S / st["sigma_S"] + R / st["sigma_R"] + U / st["sigma_U"]
    np.testing.assert_allclose(Q, sel.scores, rtol=1e-6)
    assert (tmp_path / "semantic_map.png").stat().st_size > 1000
    csv = (tmp_path / "semantic_scores.csv").read_text().splitlines()
    assert len(csv) == 21 and csv[0].startswith("id,S,R,U,Q")
    assert [f["what"] for f in sel.fallbacks] == ["no_predictions"]
    sel.write(tmp_path / "m.jsonl")
    back = Selection.read(tmp_path / "m.jsonl")
    assert back.ids == sel.ids and back.method == "semantic"


def test_selector_uses_given_predictions_and_finds_the_hazard(pool, tmp_path):
    # the lead-car scenes (s001, s005, ...) are near-collisions; their planner overshoots along x, the others wobble
    hazard_ids = {pool.ids[i] for i in range(1, 40, 4)}
    k = np.arange(1, 9)
    preds = {}
    for i, sid in enumerate(pool.ids):
        gt = pool[sid].future_trajectory(8, 0.5, "ego")
        err = np.stack([0.4 * k, 0 * k], 1) if sid in hazard_ids else np.stack([0 * k, 0.3 * np.sin(k + i)], 1)
        preds[sid] = np.concatenate([gt[:, :2] + err, gt[:, 2:]], 1)
    sel = SemanticSelector(epochs=30, mc_samples=3, weights=(1.0, 0.0, 0.0)).select(pool, 5, predictions=preds, report_dir=tmp_path)
    assert sel.fallbacks == []
    hazards = sel.state["hazards"]
    assert len(hazards) == 4 and len(set(hazards) & hazard_ids) >= 3  # the top 10 % by max s: mostly the lead-car scenes
    assert sel.state["hazard_min_criticality"] > 0.1  # within ~2 m of a car
    # The lead-car scenes share one error pattern, so each sits on an exemplar: S = 1, the top of the ranking. A few
    # wobbling scenes also reach S = 1 to float rounding, so which of the tied scenes fill the budget is not asserted:
    # only that every lead-car scene is in the top tier, that they are most of it, and that the budget is taken from it.
    rows = (tmp_path / "semantic_scores.csv").read_text().splitlines()[1:]
    S = {r.split(",")[0]: float(r.split(",")[1]) for r in rows}
    top_tier = {sid for sid, v in S.items() if v >= max(S.values()) - 1e-6}
    assert hazard_ids <= top_tier and len(hazard_ids) > len(top_tier) / 2
    assert set(sel.ids) <= top_tier and np.allclose(sel.extra["S"], max(S.values()), atol=1e-6)
    assert sel.state["pearson_check"]["pearson_r"] > 0


@pytest.mark.parametrize("kwargs, match", [
    ({"safety_path": "road"}, "safety_path"), ({"weights": (1.0, -1.0, 1.0)}, "weights"), ({"positive_percentile": 0}, "percentile"),
    ({"num_poses": 4}, "num_poses"),
])
def test_selector_bad_parameters(pool, kwargs, match):
    with pytest.raises(SelectionError, match=match):
        SemanticSelector(epochs=1, **kwargs).select(pool, 3)


def test_selector_bad_inputs(pool):
    with pytest.raises(SelectionError, match="predictions missing for 39"):
        SemanticSelector(epochs=1).select(pool, 3, predictions={pool.ids[0]: np.zeros((8, 3))})
    with pytest.raises(SelectionError, match="train id"):
        SemanticSelector(epochs=1).select(pool, 3, train_ids=["nope"])
    with pytest.raises(SelectionError, match="budget"):
        SemanticSelector(epochs=1).select(pool, 41)
    with pytest.raises(SelectionError, match=r"expected 8 finite poses"):
        SemanticSelector(epochs=1).select(pool, 3, predictions={s: np.zeros((3, 3)) for s in pool.ids})


def test_short_future_scenes_are_left_out():
    rows = [scene(f"x{i}", agents=[("c", 12.0 + i, 0.0, 8.0, 0.0)]) for i in range(6)]
    short = scene("short")
    for k in short["ego"]:
        short["ego"][k] = short["ego"][k][:6]  # 1 s of future only
    short["agents"] = {k: [] for k in short["agents"]}
    p = ScenePool.from_rows(rows + [short])
    sel = SemanticSelector(epochs=2, mc_samples=2).select(p, 6)
    assert "short" not in sel.ids
    assert any(f["what"] == "short_future" for f in sel.fallbacks)
