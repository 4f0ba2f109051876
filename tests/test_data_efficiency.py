"""benchmarks/data_efficiency.py --quick on a tiny hand-built pool: table structure, BRMR against an independent
recomputation from the per-run files, held-out splits, resume, and the nested-order shortcut."""
import json
import math
from pathlib import Path

import numpy as np
import pytest

from datasets_cfg.schema import ScenePool
from tests.curation_helpers import log_rows

ENVS = ("highway", "merge", "roundabout")
BUDGETS = (6, 12, 24, 36)


def tiny_pool(path: Path) -> ScenePool:
    """16 logs x 6 scenes: 10 real, 6 synthetic, three environments, varied motion and traffic."""
    rng = np.random.default_rng(3)
    rows = []
    for i in range(16):
        agents = [(f"a{i}_{j}", float(rng.uniform(8, 50)), float(rng.choice([0.0, 3.5])), float(rng.uniform(2, 12)), 0.0)
                  for j in range(int(rng.integers(0, 3)))]
        rows += log_rows(f"log{i:02d}", 6, speed=float(rng.uniform(5, 14)), yaw_rate=float(rng.uniform(-0.06, 0.06)),
                         wiggle=float(rng.uniform(0, 0.2)), agents=agents, lighting=["day", "night"][i % 2],
                         weather=["sunny", "rainy"][(i // 2) % 2], location=ENVS[i % 3],
                         source="synthetic" if i % 8 >= 5 else "real")
    ScenePool.from_rows(rows).save(path)
    return ScenePool.load(path)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from benchmarks.data_efficiency import main

    root = tmp_path_factory.mktemp("de")
    pool = tiny_pool(root / "pool")
    argv = ["--out", str(root / "out"), "--pool", str(root / "pool"), "--quick", "--budgets", ",".join(map(str, BUDGETS)),
            "--seeds", "0,1", "--test-size", "12", "--val-size", "12", "--no-progress",
            "--methods", "random,coreset,uncertainty,mosaic,sead,semantic,autoscale"]
    return main(argv), root, pool, argv


def needed(budgets, means, target):
    """Independent reference: first budget where the running max reaches target, log-linear in budget."""
    best = np.maximum.accumulate(means)
    if target > best[-1]:
        return None, "more_than"
    if target <= best[0]:
        return budgets[0], ("at_most" if target < best[0] else None)
    j = int(np.argmax(best >= target))
    f = (target - best[j - 1]) / (best[j] - best[j - 1])
    return math.exp(math.log(budgets[j - 1]) + f * (math.log(budgets[j]) - math.log(budgets[j - 1]))), None


def test_table_and_brmr_match_the_runs(run):
    res, root, pool, _ = run
    out = root / "out"
    methods = list(res["methods"])
    assert methods == ["random", "coreset", "uncertainty", "mosaic", "sead", "semantic", "autoscale"]
    held = set(json.loads((out / "splits.json").read_text())["test"]) | set(json.loads((out / "splits.json").read_text())["val"])
    # per-seed scores straight from the cached run files
    runs = {m: {b: [] for b in BUDGETS} for m in methods}
    for f in sorted((out / "runs").glob("*/seed*/b*.json")):
        rec = json.loads(f.read_text())
        assert len(rec["ids"]) == rec["budget"] == len(set(rec["ids"])) and not set(rec["ids"]) & held
        runs[rec["method"]][rec["budget"]].append(rec["score"])
    for m in methods:
        for b in BUDGETS:
            assert len(runs[m][b]) == 2, (m, b)
            s = res["methods"][m]["scores"][str(b)]
            assert s["mean"] == pytest.approx(np.mean(runs[m][b]), abs=1e-12)
            assert s["std"] == pytest.approx(np.std(runs[m][b], ddof=1), abs=1e-12)
    r_means = [np.mean(runs["random"][b]) for b in BUDGETS]
    target = r_means[-1]
    assert res["target"]["score"] == pytest.approx(target)
    r_need, _ = needed(BUDGETS, r_means, target)
    assert res["target"]["random_needed_budget"] == pytest.approx(r_need if r_need is not None else BUDGETS[0])
    assert res["methods"]["random"]["brmr"] == 1.0 and res["methods"]["random"]["brmr_bound"] is None
    for m in methods[1:]:
        nb, bound = needed(BUDGETS, [np.mean(runs[m][b]) for b in BUDGETS], target)
        got = res["methods"][m]
        assert got["brmr_bound"] == bound, m
        expect = (BUDGETS[-1] if nb is None else nb) / BUDGETS[-1]  # relative to random's budget for the target
        assert got["brmr"] == pytest.approx(expect, rel=1e-9), m
    # the markdown table: header with every budget, one row per method with its mean ± std and BRMR
    lines = (out / "table.md").read_text().splitlines()
    assert lines[0] == "| method | " + " | ".join(f"B = {b}" for b in BUDGETS) + " | needed | BRMR ↓ | 90 % interval |"
    for m in methods:
        row = next(line for line in lines if line.startswith(f"| {m} |"))
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert len(cells) == len(BUDGETS) + 4
        for b, cell in zip(BUDGETS, cells[1:]):
            mean, std = (float(x) for x in cell.split("±"))
            assert mean == pytest.approx(np.mean(runs[m][b]), abs=5e-5) and std == pytest.approx(np.std(runs[m][b], ddof=1), abs=5e-5)
        brmr_cell = cells[len(BUDGETS) + 2]
        assert float(brmr_cell.lstrip("><≤ ")) == pytest.approx(res["methods"][m]["brmr"], abs=5e-3)
        assert brmr_cell.startswith("> ") == (res["methods"][m]["brmr_bound"] == "more_than")
    assert (out / "data_efficiency.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_splits_are_fixed_whole_real_logs(run):
    res, root, pool, _ = run
    sp = json.loads((root / "out" / "splits.json").read_text())
    meta = {sid: json.loads(m)["log_name"] for sid, m in zip(pool.ids, pool.column("meta"))}
    src = dict(zip(pool.ids, pool.column("source")))
    test, val, train = set(sp["test"]), set(sp["val"]), set(sp["train"])
    assert not (test & val) and not (test & train) and not (val & train) and test | val | train == set(pool.ids)
    assert len(test) >= 12 and len(val) >= 12
    assert all(src[s] == "real" for s in test | val)
    held_logs = {meta[s] for s in test | val}
    assert not any(meta[s] in held_logs for s in train)  # whole logs only
    # the references: the pilot on the whole training pool and on its real scenes only, refitted independently
    from eval.pilot import FastPilot

    pilot_cfg = {k: v for k, v in res["config"]["pilot"].items()}
    ref = FastPilot(pool, sp["test"], **pilot_cfg)
    assert res["full_pool_score"] == pytest.approx(ref.fit_and_score(sp["train"])["score"], abs=1e-12)
    assert res["real_pool_score"] == pytest.approx(ref.fit_and_score([s for s in sp["train"] if src[s] == "real"])["score"], abs=1e-12)
    assert f"{res['real_pool_score']:.4f}" in (root / "out" / "table.md").read_text()


def test_rerun_resumes_from_the_cached_runs(run):
    from benchmarks.data_efficiency import main

    res, root, _, argv = run
    files = {f: f.stat().st_mtime_ns for f in (root / "out" / "runs").rglob("*.json")}
    again = main(argv)
    assert {f: f.stat().st_mtime_ns for f in (root / "out" / "runs").rglob("*.json")} == files
    assert again["pilot_runs"]["validation"] == 0
    for m in res["methods"]:
        assert again["methods"][m]["scores"] == res["methods"][m]["scores"]


def test_nested_order_shortcut_matches_direct_selection(run):
    """random and coreset rank independently of the budget: the head of the largest selection is the small one."""
    from curation.baselines import CoresetSelector, RandomSelector

    _, _, pool, _ = run
    for sel in (RandomSelector(random_state=1), CoresetSelector(random_state=1)):
        big, small = sel.select(pool, 30).ids, sel.select(pool, 9).ids
        assert big[:9] == small
