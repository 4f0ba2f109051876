"""`mose curate` wiring of the semantic method, and the pilot's MLP option."""
import numpy as np

from curation.selection import Selection
from pipelines.cli import main
from tests.semantic_autoscale_fixtures import mixed_pool


def test_curate_semantic_through_the_cli(tmp_path):
    pool = mixed_pool(40, seed=1)
    pool.save(tmp_path / "pool")
    out = tmp_path / "sem.jsonl"
    assert main(["curate", "--method", "semantic", "--pool", str(tmp_path / "pool"), "--budget", "8", "--out", str(out), "--seed", "0"]) == 0
    sel = Selection.read(out)
    assert sel.method == "semantic" and len(sel.ids) == 8 and len(set(sel.ids)) == 8
    assert set(sel.ids) <= set(pool.ids)
    assert all(a >= b for a, b in zip(sel.scores, sel.scores[1:]))  # highest Q first


def test_fast_pilot_mlp_model_fits_and_scores():
    from eval.pilot import FastPilot

    pool = mixed_pool(40, seed=2)
    ids = pool.ids
    pilot = FastPilot(pool, ids[-8:], model="mlp", random_state=0)
    metrics = pilot.fit_and_score(ids[:30])
    assert 0.0 <= metrics["score"] <= 1.0
    preds = pilot.predict(ids[-8:])
    assert all(np.asarray(p).shape == (8, 3) and np.isfinite(p).all() for p in preds.values())
