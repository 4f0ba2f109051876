"""Batched generation with a tiny LLaVA built offline: answers keyed by question id, an interrupted run resumed."""
from __future__ import annotations

import json
import random

import pytest

from datasets_cfg.sources.coda_lm import read_split
from eval.coda_generate import Generator, read_predictions_log
from eval.coda_prompts import own_prompts
from eval.coda_questions import QuestionBuilder
from pipelines.cli import main
from tests.coda_lm_fixtures import FakeJudge, coda_tree, tiny_llava


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = tmp_path_factory.mktemp("gen")
    root = coda_tree(base / "coda")
    model = tiny_llava(base / "tiny-llava")
    qs = QuestionBuilder(own_prompts(), base / "q").build(read_split(root / "CODA-LM/Mini", root, "Mini", progress=False))
    ref = base / "reference.jsonl"
    Generator(str(model), batch_size=2, max_new_tokens=6, device="cpu").run(qs, ref, progress=False)
    return root, model, qs, {k: v["answer"] for k, v in read_predictions_log(ref).items()}


def _lines(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_one_answer_per_question_id(setup):
    _, model, qs, ref = setup
    assert set(ref) == {q["question_id"] for q in qs} and len(qs) == 9
    assert all(isinstance(a, str) for a in ref.values())
    assert len(set(ref.values())) > 1  # answers depend on the question, so the id checks below can fail


def test_shuffled_questions_give_the_same_answer_per_id(setup, tmp_path):
    _, model, qs, ref = setup
    shuffled = qs[:]
    random.Random(1).shuffle(shuffled)
    out = tmp_path / "p.jsonl"
    Generator(str(model), batch_size=3, max_new_tokens=6, device="cpu").run(shuffled, out, progress=False)
    lines = _lines(out)
    assert [r["question_id"] for r in lines] == [q["question_id"] for q in shuffled]
    assert {r["question_id"]: r["answer"] for r in lines} == ref
    assert {r["question_id"]: r["task"] for r in lines} == {q["question_id"]: q["task"] for q in qs}


def test_interrupted_run_resumes_where_it_stopped(setup, tmp_path):
    _, model, qs, ref = setup
    out = tmp_path / "p.jsonl"
    g = Generator(str(model), batch_size=2, max_new_tokens=6, device="cpu").load()
    real, calls = g.model_.generate, []

    def crash_on_second_batch(**kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(**kw)

    g.model_.generate = crash_on_second_batch
    with pytest.raises(KeyboardInterrupt):
        g.run(qs, out, progress=False)
    assert [r["question_id"] for r in _lines(out)] == [q["question_id"] for q in qs[:2]]
    with open(out, "a") as f:  # a crash in the middle of writing a line
        f.write('{"question_id": "test_0002:gen')

    g2 = Generator(str(model), batch_size=2, max_new_tokens=6, device="cpu").load()
    real2, calls2 = g2.model_.generate, []
    g2.model_.generate = lambda **kw: calls2.append(kw["input_ids"].shape[0]) or real2(**kw)
    assert g2.run(qs, out, progress=False) == {"already_done": 2, "generated": 7}
    assert calls2 == [2, 2, 2, 1]  # only the 7 unanswered questions, in batches of 2
    lines = _lines(out)  # the cut line is gone, every id once, same answers as an uninterrupted run
    assert sorted(r["question_id"] for r in lines) == sorted(ref) and {r["question_id"]: r["answer"] for r in lines} == ref

    g3 = Generator(str(model), batch_size=2)
    assert g3.run(qs, out, progress=False) == {"already_done": 9, "generated": 0}
    assert not hasattr(g3, "model_")  # nothing left to do: the model is not even loaded


def test_cli_with_model_generates_and_judges(setup, tmp_path, capsys):
    root, model, qs, ref = setup
    out = tmp_path / "eval"
    with FakeJudge() as fake:  # gibberish has no "rated N": the fake judge answers without a rating
        rc = main(["eval", "coda", "--annotations", str(root / "CODA-LM/Mini"), "--images", str(root), "--model", str(model), "--out", str(out),
                   "--batch-size", "4", "--max-new-tokens", "6", "--device", "cpu", "--judge-url", fake.url, "--judge-model", "m"])
        assert rc == 0 and len(fake.requests) == 9
    preds = {r["question_id"]: r["answer"] for r in _lines(out / "predictions.jsonl")}
    assert preds == ref
    scores = json.loads((out / "scores.json").read_text())
    g = scores["judge_scores"]["general"]
    assert (g["judged"], g["unparseable"], g["score"], g["score_failures_as_1"]) == (0, 2, None, 10.0)
    assert scores["inputs"]["model"] == str(model) and scores["prompts"]["source"] == "own"


def test_resume_refuses_another_model_or_reworded_questions(setup, tmp_path):
    _, model, qs, _ = setup
    out = tmp_path / "p.jsonl"
    Generator(str(model), batch_size=4, max_new_tokens=2, device="cpu").run(qs[:2], out, progress=False)
    with pytest.raises(ValueError, match="answered by model .*tiny-llava.*; expected 'other-model'"):
        Generator("other-model").run(qs, out, progress=False)
    reworded = [{**q, "question": q["question"] + " Be brief."} for q in qs]
    with pytest.raises(ValueError, match="answered by a differently worded question"):
        Generator(str(model)).run(reworded, out, progress=False)
