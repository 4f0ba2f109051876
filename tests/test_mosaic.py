"""MOSAIC: the saturating law, its fit, the greedy allocation (paper example, brute force), BRMR, the selector."""
import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from curation.features import ArrayPool
from curation.mosaic import MOSAIC, base_score_note
from curation.scaling import allocate, allocate_heap, bounded_gain, brmr, fit_saturating, marginal_gain, predicted_gain, saturating
from curation.selection import PilotError, Selection, SelectionError

# ---------------------------------------------------------------------------------------------- allocation

def test_paper_worked_example_exact_greedy():
    # Urban a=10 tau=200, Highway a=6 tau=400, Curves a=8 tau=150; budget 4.
    # δ_i(b) = a e^{-b/τ}(1 - e^{-1/τ}) by hand:
    d = lambda a, t, b: a * math.exp(-b / t) * (1 - math.exp(-1 / t))  # noqa: E731
    urban0, highway0 = d(10, 200, 0), d(6, 400, 0)
    curves = [d(8, 150, b) for b in range(4)]
    assert round(urban0, 5) == 0.04988 and round(highway0, 5) == 0.01498
    assert [round(c, 5) for c in curves] == [0.05316, 0.05280, 0.05245, 0.05210]
    # every Curves step beats Urban's first step, so the exact greedy gives (0, 0, 4) — the paper's text says
    # "converges toward (1, 0, 3)", which its own numbers do not support (the example is marked illustrative).
    assert min(curves) > urban0 > highway0
    res = allocate([10, 6, 8], [200, 400, 150], 4)
    assert res["allocation"].tolist() == [0, 0, 4]
    assert res["order_domain"].tolist() == [2, 2, 2, 2]
    np.testing.assert_allclose(res["gain"], curves, rtol=1e-12)
    heap_alloc, steps = allocate_heap([10, 6, 8], [200, 400, 150], 4)
    assert heap_alloc.tolist() == [0, 0, 4] and [s[0] for s in steps] == [2, 2, 2, 2]
    # with a larger budget Urban joins once Curves' marginal gain drops below 0.04988
    b_switch = next(b for b in range(1000) if d(8, 150, b) < urban0)
    assert allocate([10, 6, 8], [200, 400, 150], b_switch + 1)["allocation"].tolist() == [1, 0, b_switch]


def test_marginal_gain_is_the_difference_of_the_law():
    a, tau, b = 3.0, 17.0, np.arange(50)
    np.testing.assert_allclose(marginal_gain(a, tau, b), saturating(b + 1, a, tau) - saturating(b, a, tau), rtol=1e-10)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 5), st.floats(0.3, 30), st.integers(0, 6)), min_size=1, max_size=4), st.data())
def test_allocation_matches_brute_force_optimum(domains, data):
    a, tau, caps = (np.array(x) for x in zip(*domains))
    budget = data.draw(st.integers(0, int(caps.sum())))
    res = allocate(a, tau, budget, caps)
    alloc = res["allocation"]
    assert alloc.sum() == budget and (alloc <= caps).all() and (alloc >= 0).all()
    best = max(sum(saturating(b, a, tau)) for b in itertools.product(*[range(c + 1) for c in caps]) if sum(b) == budget)
    assert sum(saturating(alloc, a, tau)) == pytest.approx(best, abs=1e-9)
    # the greedy order lists non-increasing marginal gains
    assert np.all(np.diff(res["gain"]) <= 1e-15)


def test_tied_top_gains_do_not_overshoot_the_budget():
    # found by hypothesis: identical laws, one scene each, budget 1 (exp(log(x)) < x made both domains count)
    for m, budget in ((2, 1), (3, 2), (4, 3)):
        res = allocate([1.5] * m, [6.0] * m, budget, caps=[1] * m)
        assert res["allocation"].sum() == budget and res["allocation"].tolist() == allocate_heap([1.5] * m, [6.0] * m, budget, [1] * m)[0].tolist()


def test_water_filling_equals_heap_greedy_on_large_budgets():
    rng = np.random.default_rng(3)
    for _ in range(5):
        m = int(rng.integers(2, 12))
        a, tau = rng.uniform(0.1, 10, m), rng.uniform(5, 5000, m)
        caps = rng.integers(100, 3000, m)
        budget = int(rng.integers(1, caps.sum()))
        res = allocate(a, tau, budget, caps)
        heap, steps = allocate_heap(a, tau, budget, caps)
        assert res["allocation"].tolist() == heap.tolist()
        assert res["order_domain"].tolist() == [s[0] for s in steps]


def test_zero_gain_budget_is_split_by_remaining_capacity():
    # domain 0 has a positive law but only 3 scenes; domains 1 and 2 are flat with 10 and 30 scenes
    res = allocate([1.0, 0.0, 0.0], [5.0, 1.0, 1.0], 11, caps=[3, 10, 30])
    assert res["allocation"].tolist() == [3, 2, 6] and res["zero_gain_fill"] == 8
    with pytest.raises(ValueError, match="exceeds the total capacity"):
        allocate([1.0], [1.0], 5, caps=[4])


# ---------------------------------------------------------------------------------------------- fit

def test_pilots_far_below_tau_are_flagged_not_saturating():
    """Pilot sizes 4..32 on a curve with tau = 2000 (the pilots see 1.6 % of the saturation, 1 - e^{-32/2000}):
    ΔU is a straight line to within 0.8 % there, so a line through the origin fits as well as the saturating law
    and the fit is flagged (kept, not a fallback); well-sampled curves stay "ok"."""
    rng = np.random.default_rng(3)
    n = np.array([4, 8, 16, 32.0])
    y = saturating(n, 0.3, 2000.0) + rng.normal(0, 2e-4, len(n))
    f = fit_saturating(n, y)
    assert f.status == "not_saturating" and not f.is_fallback and f.n_max == 32.0
    assert "extrapolated" in f.note
    ok = fit_saturating(np.array([10, 20, 40, 80, 160.0]), saturating(np.array([10, 20, 40, 80, 160.0]), 0.2, 40.0))
    assert ok.status == "ok" and ok.n_max == 160.0


def test_fit_recovers_known_parameters_from_noisy_pilots():
    rng = np.random.default_rng(0)
    n = np.array([10, 20, 40, 80, 160, 320, 640.0])
    for a, tau in ((0.08, 60.0), (0.3, 250.0), (2.0, 30.0)):
        noise = 0.01 * a
        y = saturating(n, a, tau) + rng.normal(0, noise, len(n))
        f = fit_saturating(n, y)
        assert f.status == "ok" and f.r2 > 0.98
        assert f.a == pytest.approx(a, rel=0.08) and f.tau == pytest.approx(tau, rel=0.15)
        assert abs(f.a - a) < 4 * f.a_std + 1e-12 and abs(f.tau - tau) < 4 * f.tau_std
        assert f.resid_std == pytest.approx(noise, rel=1.5)


def test_fit_fallbacks_flat_noisy_and_single_point():
    n = np.array([8, 16, 32, 64.0])
    flat = fit_saturating(n, [0.0, -0.01, 0.0, -0.02])
    assert flat.status == "flat" and flat.a == 0.0 and flat.is_fallback
    noisy = fit_saturating(n, [0.05, -0.04, 0.06, -0.05])
    assert noisy.status == "poor_fit" and noisy.a == pytest.approx(0.06) and noisy.tau == pytest.approx(64 / 3)
    single = fit_saturating([16], [0.1])
    assert single.status == "too_few_points" and single.a == pytest.approx(0.1)
    linear = fit_saturating(n, 1e-3 * n)  # a straight line: a runs to its bound, the initial slope a/τ stays close
    assert linear.status == "at_bound" and linear.a / linear.tau == pytest.approx(1e-3, rel=0.1)


# ---------------------------------------------------------------------------------------------- BRMR

def test_brmr_interpolation_and_bounds():
    rb, rs = [100, 200, 400, 800], [0.70, 0.75, 0.80, 0.85]
    rows = brmr([100, 100, 100, 100], [0.775, 0.80, 0.90, 0.60], rb, rs, interpolation="log")
    # 0.775 is halfway between 200 and 400 in score: log-interpolated budget = sqrt(200 * 400)
    assert rows[0]["random_budget"] == pytest.approx(math.sqrt(200 * 400)) and rows[0]["brmr"] == pytest.approx(100 / math.sqrt(80000))
    assert rows[1]["brmr"] == pytest.approx(0.25) and rows[1]["bound"] is None
    assert rows[2]["bound"] == "upper" and rows[2]["brmr"] == pytest.approx(100 / 800)
    assert rows[3]["bound"] == "lower" and rows[3]["brmr"] == pytest.approx(1.0)
    lin = brmr([100], [0.775], rb, rs, interpolation="linear")[0]
    assert lin["random_budget"] == pytest.approx(300.0)
    # a non-monotone random curve is made monotone first (running maximum)
    assert brmr([50], [0.78], [100, 200, 400], [0.8, 0.7, 0.9])[0]["random_budget"] == pytest.approx(100.0)


# ---------------------------------------------------------------------------------------------- the selector

TRUE = {"a": (0.30, 0.10, 0.20), "tau": (40.0, 10.0, 80.0)}


class FakeLawPilot:
    """A fake pilot (tests only): score = Σ_domain a_d (1 - e^{-n_d/τ_d}) of the training ids' domains + noise."""

    def __init__(self, domain_of, noise=0.002, fail_sizes=(), fail_base=False, seed=0):
        self.domain_of, self.noise, self.fail_sizes, self.fail_base = domain_of, noise, set(fail_sizes), fail_base
        self.rng = np.random.default_rng(seed)
        self.calls = []

    def fit_and_score(self, ids):
        self.calls.append(list(ids))
        if self.fail_base and len(self.calls) == 1:
            raise RuntimeError("out of memory (simulated)")
        counts = np.bincount([self.domain_of[i] for i in ids], minlength=3)
        if len(ids) in self.fail_sizes:
            raise RuntimeError("diverged (simulated)")
        return {"score": float(np.sum(saturating(counts, np.array(TRUE["a"]), np.array(TRUE["tau"]))) + self.rng.normal(0, self.noise))}


def law_pool(sizes=(400, 300, 500)):
    ids, loc = [], []
    for d, n in enumerate(sizes):
        ids += [f"d{d}_{k}" for k in range(n)]
        loc += [f"loc{d}"] * n
    return ArrayPool(ids, {"location": loc}), {i: int(i[1]) for i in ids}


def test_mosaic_fits_pilot_laws_and_allocates_like_the_true_curves(tmp_path):
    pool, dom = law_pool()
    pilot = FakeLawPilot(dom)
    sel = MOSAIC(domain_key="location", pilot_base=0, pilot_sizes=[5, 10, 20, 40, 80, 160, 300], progress=False,
                 random_state=1).select(pool, 150, pilot=pilot)
    fits = sel.state["fits"]
    for d in range(3):
        f = fits[f"loc{d}"]
        assert f["status"] in ("ok", "at_bound")
        assert f["a"] == pytest.approx(TRUE["a"][d], rel=0.1) and f["tau"] == pytest.approx(TRUE["tau"][d], rel=0.2)
    true_alloc = allocate(TRUE["a"], TRUE["tau"], 150, caps=[400, 300, 500])["allocation"]
    got = np.array([sel.state["allocation"][f"loc{d}"] for d in range(3)])
    assert np.abs(got - true_alloc).sum() <= 6  # a few scenes move with fit noise
    assert len(sel) == 150 and len(set(sel.ids)) == 150
    assert sorted(set(sel.extra["domain"])) == ["loc0", "loc1", "loc2"]
    # pilot runs: 1 base + 3 domains x 7 sizes, each adding exactly n scenes of its domain
    assert len(pilot.calls) == 22 and sorted(len(c) for c in pilot.calls[1:8]) == [5, 10, 20, 40, 80, 160, 300]


def test_mosaic_importance_orders_each_domain(tmp_path):
    pool, dom = law_pool((50, 50, 50))
    scores = {i: float(k) for k, i in enumerate(pool.ids)}
    fits = [{"a": 1.0, "tau": 10.0}, {"a": 1.0, "tau": 10.0}, {"a": 1.0, "tau": 10.0}]
    for order in ("high", "low"):
        sel = MOSAIC(domain_key="location", fits=fits, importance=order, progress=False).select(pool, 30, scores=scores)
        for d in range(3):
            mine = [scores[i] for i in sel.ids if dom[i] == d]
            members = sorted((scores[i] for i in pool.ids if dom[i] == d), reverse=order == "high")
            assert sorted(mine, reverse=order == "high") == members[: len(mine)] and len(mine) == 10
        assert sel.state["importance"] == {"source": "scores", "order": order}


def test_mosaic_bad_input_and_fallbacks(tmp_path):
    pool, dom = law_pool((60, 60, 60))
    with pytest.raises(SelectionError, match="budget: 500 scenes requested but the pool has only 180"):
        MOSAIC(domain_key="location", fits=[{"a": 1, "tau": 1}] * 3).select(pool, 500)
    with pytest.raises(SelectionError, match="needs a pilot"):
        MOSAIC(domain_key="location").select(pool, 10)
    with pytest.raises(PilotError, match="base run.*out of memory"):
        MOSAIC(domain_key="location", progress=False).select(pool, 10, pilot=FakeLawPilot(dom, fail_base=True))
    # failed pilot runs are skipped and recorded; with "raise" they stop the run
    sel = MOSAIC(domain_key="location", pilot_base=4, pilot_sizes=[4, 8, 16, 32], progress=False).select(
        pool, 30, pilot=FakeLawPilot(dom, fail_sizes={4 + 8}))
    failed = [f for f in sel.fallbacks if f["what"] == "pilot_failed"]
    assert len(failed) == 3 and all(f["n"] == 8 for f in failed)
    assert all(8 not in p["n"] for p in sel.state["pilot"]["points"].values())
    with pytest.raises(PilotError, match="diverged"):
        MOSAIC(domain_key="location", pilot_base=4, pilot_sizes=[4, 8], on_pilot_error="raise", progress=False).select(
            pool, 30, pilot=FakeLawPilot(dom, fail_sizes={12}))
    # every domain flat -> proportional split, recorded
    flat = MOSAIC(domain_key="location", fits=[{"a": 0, "tau": 1}] * 3, progress=False).select(pool, 30)
    assert sorted(flat.state["allocation"].values()) == [10, 10, 10]
    assert any(f["what"] == "all_domains_flat" for f in flat.fallbacks)
    assert any(f["what"] == "no_importance" for f in flat.fallbacks)
    # excluded ids (a pilot's held-out set) are never selected
    ex = pool.ids[:60]
    sel = MOSAIC(domain_key="location", fits=[{"a": 1, "tau": 5}] * 2, progress=False).select(pool, 100, exclude=ex)
    assert not set(sel.ids) & set(ex) and sel.state["domains"]["sizes"] == [60, 60]


def test_mosaic_kmeans_domains_empty_clusters_and_plots(tmp_path):
    X = np.repeat(np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]]), 20, axis=0)
    pool = ArrayPool([f"s{i}" for i in range(60)])
    m = MOSAIC(n_domains=5, fits=None, progress=False, plot_dir=str(tmp_path / "plots"), pilot_base=3, pilot_sizes=[2, 4, 8])
    dom = {f"s{i}": i // 20 for i in range(60)}
    with pytest.warns(Warning):  # scikit-learn: fewer distinct points than clusters
        sel = m.select(pool, 12, features=X, pilot=FakeLawPilot(dom))
    assert any(f["what"] == "empty_domain" for f in sel.fallbacks) and len(sel.state["domains"]["names"]) == 3
    # clusters are the three point groups
    assert sorted(sel.state["domains"]["sizes"]) == [20, 20, 20]
    for name in ("fits", "allocation"):
        png = tmp_path / "plots" / f"mosaic_{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and sel.state["plots"][name] == str(png)
    path = sel.write(tmp_path / "m.jsonl")
    back = Selection.read(path)
    assert back.ids == sel.ids and _nan_equal(back.state, sel.state) and back.extra["domain"] == sel.extra["domain"]


def _nan_equal(a, b):
    import json

    from curation.selection import _jsonable

    return json.dumps(_jsonable(a), sort_keys=True) == json.dumps(_jsonable(b), sort_keys=True)


# ---------------------------------------------------------------------------------------------- the reported gain


def test_bounded_gain_respects_the_metric_range():
    # the case: laws summing to 1.06 on a 0-1 metric from U0 = 0 -> at most 1 - 0 = 1
    g = bounded_gain(1.06, 0.0, (0.0, 1.0))
    assert g["predicted_gain"] == 1.0 and g["predicted_gain_raw"] == 1.06 and g["clipped"] and g["predicted_score"] == 1.0
    assert "1.06" in g["note"] and "clipped" in g["note"]
    g = bounded_gain(0.3, 0.9, (0.0, 1.0))  # 0.9 + 0.3 > 1 -> gain 0.1
    assert g["predicted_gain"] == pytest.approx(0.1) and g["clipped"] and g["predicted_score"] == pytest.approx(1.0)
    g = bounded_gain(0.05, 0.9, (0.0, 1.0))  # inside the range: as fitted, nothing said
    assert g["predicted_gain"] == 0.05 and not g["clipped"] and g["note"] == "" and g["predicted_score"] == pytest.approx(0.95)
    g = bounded_gain(3.5, None, (0.0, 1.0))  # no base run (known fits): at most the range
    assert g["predicted_gain"] == 1.0 and g["clipped"] and g["predicted_score"] is None
    g = bounded_gain(3.5, 0.2, None)  # unknown bounds: unbounded, and said
    assert g["predicted_gain"] == 3.5 and not g["clipped"] and g["score_bounds"] is None and "unknown" in g["note"]
    with pytest.raises(ValueError, match="lo < hi"):
        bounded_gain(0.1, 0.0, (1.0, 0.0))


def test_u0_notes():
    assert "empty" in base_score_note(0, 0.0) and "0 by construction" in base_score_note(0, 0.0)
    n = base_score_note(8, 0.0, 0.25)
    assert n.startswith("U₀ = 0: the pilot trained on the 8 base scenes scored 0") and "25%" in n
    assert base_score_note(8, 0.93) == "" and "not measured" in base_score_note(0, None)


class BoundedLawPilot(FakeLawPilot):
    """A pilot on a 0-1 metric whose per-domain laws add up to more than 1: its score saturates at 1."""

    score_bounds = (0.0, 1.0)
    A = (0.6, 0.5, 0.4)

    def fit_and_score(self, ids):
        self.calls.append(list(ids))
        counts = np.bincount([self.domain_of[i] for i in ids], minlength=3)
        return {"score": float(min(1.0, np.sum(saturating(counts, np.array(self.A), np.array(TRUE["tau"])))))}


class UnboundedLawPilot(BoundedLawPilot):
    score_bounds = None


def test_mosaic_reports_a_bounded_gain_and_explains_u0_but_allocates_as_fitted():
    pool, dom = law_pool()
    kw = dict(domain_key="location", pilot_base=0, pilot_sizes=[5, 10, 20, 40, 80, 160, 300], progress=False, random_state=1)
    sel = MOSAIC(**kw).select(pool, 150, pilot=BoundedLawPilot(dom, noise=0.0))
    raw = MOSAIC(**kw).select(pool, 150, pilot=UnboundedLawPilot(dom, noise=0.0))
    st, st_raw = sel.state, raw.state
    # each domain alone stays under 1 (a <= 0.6), so the pilots are exact; the allocation is the laws' own
    assert st["allocation"] == st_raw["allocation"] and sel.ids == raw.ids
    fits = st["fits"]
    law_sum = predicted_gain([fits[f"loc{d}"]["a"] for d in range(3)], [fits[f"loc{d}"]["tau"] for d in range(3)],
                             [st["allocation"][f"loc{d}"] for d in range(3)])
    assert law_sum > 1.0 and st["predicted_gain_raw"] == pytest.approx(law_sum) == st_raw["predicted_gain"]
    assert st["pilot"]["base_score"] == 0.0 and st["predicted_gain"] == 1.0 and st["predicted_gain_clipped"] and st["predicted_score"] == 1.0
    assert st["score_bounds"] == [0.0, 1.0] and "clipped" in st["predicted_gain_note"]
    assert "base set is empty" in st["pilot"]["base_note"]
    assert st_raw["score_bounds"] is None and not st_raw["predicted_gain_clipped"]
    # bounds given to the selector win over the pilot's; bad bounds are refused
    given = MOSAIC(domain_key="location", fits=[{"a": 1, "tau": 5}] * 3, score_bounds=[0, 100], progress=False).select(pool, 30)
    assert given.state["score_bounds"] == [0.0, 100.0] and not given.state["predicted_gain_clipped"]
    with pytest.raises(SelectionError, match="score_bounds"):
        MOSAIC(domain_key="location", fits=[{"a": 1, "tau": 5}] * 3, score_bounds=[1, 0]).select(pool, 30)
