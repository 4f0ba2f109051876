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


def test_curate_semantic_reads_a_navsim_predictions_file(tmp_path, capsys):
    """--predictions: the planner's poses from a NAVSIM predictions file (here the logged futures, written by
    eval/navsim/predictions.py) replace the constant-turn-rate fallback, and select exactly what the API selects
    with the same poses; a method that takes no predictions refuses the flag."""
    from curation.semantic import SemanticSelector
    from eval.navsim.predictions import write_predictions

    pool = mixed_pool(40, seed=1)
    pool.save(tmp_path / "pool")
    futures = {s.id: s.future_trajectory(8, 0.5, "ego") for s in pool}
    write_predictions(tmp_path / "pred.json", futures)
    args = ["curate", "--method", "semantic", "--pool", str(tmp_path / "pool"), "--budget", "8", "--seed", "0"]
    assert main(args + ["--out", str(tmp_path / "with.jsonl"), "--predictions", str(tmp_path / "pred.json")]) == 0
    capsys.readouterr()
    assert main(args + ["--out", str(tmp_path / "without.jsonl")]) == 0
    said = capsys.readouterr().out  # the fallbacks are named, with the file that holds them
    assert "no_predictions" in said and f"read them under 'fallbacks' in {tmp_path / 'without.header.json'}" in said
    with_, without = Selection.read(tmp_path / "with.jsonl"), Selection.read(tmp_path / "without.jsonl")
    assert "no_predictions" not in [f["what"] for f in with_.fallbacks]
    assert "no_predictions" in [f["what"] for f in without.fallbacks]
    api = SemanticSelector(random_state=0, progress=False).select(pool, 8, predictions=futures)
    assert with_.ids == api.ids
    assert main(["curate", "--method", "random", "--pool", str(tmp_path / "pool"), "--budget", "4", "--out", str(tmp_path / "r.jsonl"),
                 "--predictions", str(tmp_path / "pred.json")]) == 2
