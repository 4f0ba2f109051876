"""Selection manifests, baselines (random, coreset, uncertainty), scores files and the `mose curate` CLI."""
import json
import math
import os

import numpy as np
import pytest

from curation.baselines import CoresetSelector, RandomSelector, UncertaintySelector
from curation.features import ArrayPool
from curation.kcenter import covering_radius, kcenter_greedy
from curation.scores import read_scores, score_quantity, write_difficulty
from curation.selection import Selection, SelectionError, check_budget, manifest_paths
from datasets_cfg.schema import ScenePool
from pipelines.cli import main
from tests.curation_helpers import small_pool


def _selection(n=5):
    return Selection(ids=[f"s{i}" for i in range(n)], scores=[0.5, float("nan"), 2.0, -1.0, 3.0][:n],
                     reasons=[f"because {i}" for i in range(n)], method="test", budget=n, seed=7,
                     config={"k": 1}, state={"a": np.array([1.0, 2.0]), "nested": {"x": np.float32(0.25)}},
                     fallbacks=[{"what": "x", "why": "y"}], extra={"domain": ["d0", "d1", "d0", "d1", "d0"][:n]})


# ---------------------------------------------------------------------------------------------- manifests

def test_manifest_round_trip(tmp_path):
    sel = _selection()
    rows_path = sel.write(tmp_path / "sel.jsonl")
    assert manifest_paths(rows_path) == (tmp_path / "sel.jsonl", tmp_path / "sel.header.json")
    for path in (rows_path, tmp_path / "sel.header.json"):
        back = Selection.read(path)
        assert back.ids == sel.ids and back.reasons == sel.reasons and back.extra == sel.extra
        assert back.scores[0] == 0.5 and math.isnan(back.scores[1]) and back.scores[2:] == [2.0, -1.0, 3.0]
        assert back.state == {"a": [1.0, 2.0], "nested": {"x": 0.25}} and back.fallbacks == sel.fallbacks
        assert (back.method, back.budget, back.seed, back.config) == ("test", 5, 7, {"k": 1})
    header = json.loads((tmp_path / "sel.header.json").read_text())
    assert header["num_selected"] == 5 and header["rows_file"] == "sel.jsonl"
    assert [json.loads(l)["rank"] for l in rows_path.read_text().splitlines()] == [0, 1, 2, 3, 4]


def test_manifest_writes_are_atomic_and_checked(tmp_path):
    path = tmp_path / "sel.jsonl"
    _selection().write(path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    bad = _selection()
    bad.extra["domain"][2] = object()  # not JSON-serialisable: the write fails half-way through the rows
    with pytest.raises(TypeError):
        bad.write(path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # old manifest intact, no temp files
    # a rows file that does not belong to its header is refused
    path.write_text(path.read_text().replace("because 0", "edited"))
    with pytest.raises(SelectionError, match="checksum does not match"):
        Selection.read(path)
    os.remove(tmp_path / "sel.header.json")
    with pytest.raises(FileNotFoundError, match="selection header missing"):
        Selection.read(path)
    with pytest.raises(SelectionError, match="ids must be unique"):
        Selection(ids=["a", "a"], scores=[1, 2], reasons=["", ""], method="m", budget=2)


def test_check_budget_messages():
    assert check_budget(3, 5) == 3
    with pytest.raises(SelectionError, match="budget: 6 scenes requested but the pool has only 5"):
        check_budget(6, 5)
    with pytest.raises(SelectionError, match="positive"):
        check_budget(0, 5)
    with pytest.raises(SelectionError, match="integer"):
        check_budget(True, 5)


# ---------------------------------------------------------------------------------------------- baselines

def test_random_selector_is_seeded():
    pool = ArrayPool([f"s{i}" for i in range(100)])
    a, b, c = (RandomSelector(random_state=s).select(pool, 20) for s in (1, 1, 2))
    assert a.ids == b.ids and a.ids != c.ids and len(set(a.ids)) == 20
    assert np.all(np.diff(a.scores) >= 0)  # ordered by the uniform draw that chose them
    # over many seeds every scene is picked about equally often (20 % each)
    counts = np.zeros(100)
    for s in range(200):
        for i in RandomSelector(random_state=s).select(pool, 20).ids:
            counts[int(i[1:])] += 1
    assert counts.min() > 20 and counts.max() < 65


def _naive_kcenter(X, k, first):
    chosen = [first]
    for _ in range(k - 1):
        d = [min(np.linalg.norm(x - X[c]) for c in chosen) for x in X]
        chosen.append(int(np.argmax(d)))
    return chosen


def test_kcenter_exact_matches_naive_greedy_and_partitioned_bounds_radius():
    rng = np.random.default_rng(0)
    X = np.concatenate([rng.normal(c, 0.3, size=(60, 3)) for c in ((0, 0, 0), (5, 0, 0), (0, 6, 1), (3, 3, 3))])
    res = kcenter_greedy(X, 12, initial=[7], method="exact")
    ref = _naive_kcenter(X, 13, 7)
    assert res["order"].tolist() == ref[1:]
    assert res["radius_upper_bound"] == pytest.approx(covering_radius(X, ref))
    np.testing.assert_allclose(res["gain"][0], np.linalg.norm(X - X[7], axis=1).max())
    # without `initial` the first centre is a seeded random point, the rest is the greedy
    r1 = kcenter_greedy(X, 5, method="exact", random_state=4)
    assert r1["order"].tolist() == _naive_kcenter(X, 5, int(r1["order"][0])) and math.isinf(r1["gain"][0])
    part = kcenter_greedy(X, 24, method="partitioned", cell_centres=4, neighbours=2, random_state=1)
    assert len(set(part["order"].tolist())) == 24
    assert covering_radius(X, part["order"]) <= part["radius_upper_bound"] + 1e-9
    # duplicates are never chosen twice
    D = np.repeat(X[:3], 4, axis=0)
    for m in ("exact", "partitioned"):
        assert len(set(kcenter_greedy(D, 6, method=m)["order"].tolist())) == 6


def test_coreset_selector_covers_feature_clusters():
    rng = np.random.default_rng(1)
    X = np.concatenate([rng.normal(c, 0.1, size=(50, 2)) for c in ((0, 0), (10, 0), (0, 10), (10, 10))])
    pool = ArrayPool([f"s{i}" for i in range(200)], {"emb": X.tolist()})
    sel = CoresetSelector(features="emb", standardize=False).select(pool, 4)
    assert sorted(int(i[1:]) // 50 for i in sel.ids) == [0, 1, 2, 3]  # one scene per cluster
    assert sel.state["kcenter_method"] == "exact" and sel.state["covering_radius"] < 1.0
    more = CoresetSelector(features="emb").select(pool, 3, initial_ids=["s0", "s50", "s100"])
    assert all(int(i[1:]) // 50 == 3 for i in more.ids[:1]) and not {"s0", "s50", "s100"} & set(more.ids)
    with pytest.raises(SelectionError, match="budget: 198 scenes requested but the pool"):
        CoresetSelector(features="emb").select(pool, 198, initial_ids=["s0", "s1", "s2"])


def test_uncertainty_selector_and_scores_files(tmp_path):
    pool = ArrayPool([f"s{i}" for i in range(6)])
    csv = tmp_path / "u.csv"
    csv.write_text("token,score\ns0,0.1\ns1,0.9\ns2,0.5\ns3,0.9\ns4,0.0\ns5,0.3\naverage,0.45\n")
    sel = UncertaintySelector().select(pool, 3, scores=str(csv))
    assert sel.ids == ["s1", "s3", "s2"] and sel.scores == [0.9, 0.9, 0.5]  # ties keep pool order
    (tmp_path / "u.json").write_text(json.dumps({"s0": 3, "s1": 1, "s2": 2}))
    with pytest.raises(SelectionError, match="3 of 6 scenes have no finite score"):
        UncertaintySelector().select(pool, 2, scores=str(tmp_path / "u.json"))
    filled = UncertaintySelector(missing="last").select(pool, 4, scores=str(tmp_path / "u.json"))
    assert filled.ids == ["s0", "s2", "s1", "s3"] and filled.fallbacks[0]["what"] == "missing_scores"
    (tmp_path / "u.jsonl").write_text('{"id": "s0", "unc": 1}\n{"id": "s1", "unc": "high"}\n')
    with pytest.raises(SelectionError, match="id 's1': field 'unc': expected a number"):
        read_scores(tmp_path / "u.jsonl", column="unc")


# ---------------------------------------------------------------------------------------------- the CLI

@pytest.fixture(scope="module")
def pool_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("pool") / "pool"
    small_pool(8, 8).save(d)
    return d


def test_cli_random_coreset_uncertainty(pool_dir, tmp_path, capsys):
    out = tmp_path / "r.jsonl"
    assert main(["curate", "--method", "random", "--pool", str(pool_dir), "--budget", "10", "--out", str(out), "--seed", "3"]) == 0
    sel = Selection.read(out)
    assert len(sel) == 10 and sel.seed == 3 and sel.pool["path"] == str(pool_dir.resolve()) and sel.pool["size"] == 64
    assert main(["curate", "--method", "coreset", "--pool", str(pool_dir), "--budget", "8", "--out", str(tmp_path / "c.jsonl")]) == 0
    c = Selection.read(tmp_path / "c.jsonl")
    assert c.state["features"] == "kind:scene" and len(c) == 8
    assert list((pool_dir / "features").glob("scene-*.npy"))  # features cached next to the pool
    scores = tmp_path / "s.json"
    scores.write_text(json.dumps({sid: float(i % 7) for i, sid in enumerate(sel.ids + [f"log{i}_{k:03d}" for i in range(8) for k in range(8)])}))
    assert main(["curate", "--method", "uncertainty", "--pool", str(pool_dir), "--budget", "5", "--out", str(tmp_path / "u.jsonl"), "--scores", str(scores)]) == 0
    assert Selection.read(tmp_path / "u.jsonl").scores == [6.0] * 5
    assert "uncertainty selected 5 of 64 scenes" in capsys.readouterr().out


def test_cli_bad_input(pool_dir, tmp_path, capsys):
    out = str(tmp_path / "x.jsonl")
    assert main(["curate", "--method", "random", "--pool", str(pool_dir), "--budget", "65", "--out", out]) == 2
    assert "budget: 65 scenes requested but the pool has only 64" in capsys.readouterr().err
    cfg = tmp_path / "c.yaml"
    cfg.write_text("mosaic:\n  n_domain: 3\n")
    assert main(["curate", "--method", "mosaic", "--pool", str(pool_dir), "--budget", "5", "--out", out, "--config", str(cfg)]) == 2
    assert "section 'mosaic': unknown parameter(s) ['n_domain']" in capsys.readouterr().err
    cfg.write_text("mosiac: {}\n")
    assert main(["curate", "--method", "mosaic", "--pool", str(pool_dir), "--budget", "5", "--out", out, "--config", str(cfg)]) == 2
    assert "unknown section(s) ['mosiac']" in capsys.readouterr().err
    assert main(["curate", "--method", "uncertainty", "--pool", str(pool_dir), "--budget", "5", "--out", out]) == 2
    assert "needs per-scene scores" in capsys.readouterr().err
    assert main(["curate", "--method", "random", "--pool", str(tmp_path / "nope"), "--budget", "5", "--out", out]) == 2
    assert "not a ScenePool directory" in capsys.readouterr().err
    assert main(["curate", "--pool", str(pool_dir), "--out", out]) == 2
    assert "--method, --budget required (or --plan" in capsys.readouterr().err
    assert not (tmp_path / "x.jsonl").exists()


# ------------------------------------------------------------------------- what a scores file holds

def test_uncertainty_refuses_the_navsim_epdms_csv_and_takes_named_or_unnamed_files(tmp_path, capsys):
    """Issue #20: an EPDMS CSV (high = best driven) must not be ranked as uncertainty; named / unnamed files are."""
    from eval.navsim import fixtures as F
    from pipelines.cli import main as cli

    pool_dir = tmp_path / "pool"
    scenes = F.log_scenes(3, ego=F.constant_accel(speed=10.0), agents_fn=lambda t0: [F.vehicle("lead", 22 + 4 * t0, 0.0, vx=4.0)])
    ScenePool.from_rows([s.row for s in scenes]).save(pool_dir)
    epdms = tmp_path / "human.csv"
    assert cli(["eval", "navsim", "--pool", str(pool_dir), "--agent", "human", "--out", str(epdms), "--no-progress"]) == 0
    capsys.readouterr()
    assert score_quantity(epdms) == "epdms"  # recognised by its columns (token, valid, sub-metrics, score, metric)
    ids = ScenePool.load(pool_dir).ids
    out = str(tmp_path / "u.jsonl")
    assert cli(["curate", "--method", "uncertainty", "--pool", str(pool_dir), "--budget", "2", "--out", out, "--scores", str(epdms)]) == 2
    err = capsys.readouterr().err
    assert str(epdms) in err and "quantity 'epdms'" in err and "'uncertainty'" in err and "write_difficulty" in err
    assert not (tmp_path / "u.jsonl").exists()  # nothing written on refusal
    # the conversion offered: difficulty = 1 - EPDMS, accepted
    diff = write_difficulty(epdms, tmp_path / "difficulty.json")
    d, q = read_scores(diff, with_quantity=True)
    e = read_scores(epdms)  # the average row left out
    assert q == "difficulty" and sorted(d) == sorted(ids) and all(abs(d[k] - (1.0 - e[k])) < 1e-12 for k in ids)
    assert cli(["curate", "--method", "uncertainty", "--pool", str(pool_dir), "--budget", "2", "--out", out, "--scores", str(diff)]) == 0
    capsys.readouterr()
    # a file naming "uncertainty": a CSV column, and the JSON header form; ranked by the scores given
    pool = ArrayPool(["a", "b", "c"])
    named = tmp_path / "named.csv"
    named.write_text("id,score,quantity\na,0.2,uncertainty\nb,0.7,uncertainty\nc,0.1,uncertainty\n")
    assert UncertaintySelector().select(pool, 1, scores=str(named)).ids == ["b"]
    (tmp_path / "named.json").write_text(json.dumps({"quantity": "Uncertainty", "scores": {"a": 3, "b": 1, "c": 2}}))
    assert UncertaintySelector().select(pool, 2, scores=str(tmp_path / "named.json")).ids == ["a", "c"]
    # unnamed: accepted as before
    (tmp_path / "plain.json").write_text(json.dumps({"a": 0.0, "b": 0.5, "c": 0.9}))
    assert UncertaintySelector().select(pool, 1, scores=str(tmp_path / "plain.json")).ids == ["c"]
    # a named driving score in a plain CSV, and a file mixing quantities, are refused
    (tmp_path / "p.csv").write_text("id,score,quantity\na,1,pdms\nb,0,pdms\nc,0.5,pdms\n")
    with pytest.raises(SelectionError, match=r"p\.csv: holds quantity 'pdms'; uncertainty expects one of"):
        UncertaintySelector().select(pool, 1, scores=str(tmp_path / "p.csv"))
    (tmp_path / "mix.jsonl").write_text('{"id": "a", "score": 1, "quantity": "uncertainty"}\n{"id": "b", "score": 0, "quantity": "epdms"}\n')
    with pytest.raises(SelectionError, match="expected one quantity for the whole file"):
        read_scores(tmp_path / "mix.jsonl")
