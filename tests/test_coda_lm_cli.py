"""`mose eval coda` end to end with predictions files and a fake judge on loopback: hand-computed scores, id
matching with shuffled files, failures counted, bad predictions, a down endpoint, and the key never written."""
from __future__ import annotations

import json
import random

import pytest

from pipelines.cli import main
from tests.coda_lm_fixtures import FakeJudge, coda_tree, free_port_url, make_image, official_checkout, rating_from_prediction, sim_pool

SECRET = "sk-test-SECRET-do-not-write-4242"
# the rating the fake judge gives each question (it reads "rated N" from the prediction)
RATINGS = {
    "test_0001:general": 8, "test_0002:general": 5,  # mean 6.5 -> 65
    "test_0001:region:1": 9, "test_0001:region:2": 3, "test_0002:region:1": 7, "test_0002:region:2": 4, "test_0002:region:3": 2,  # 5 -> 50
    "test_0001:suggestion": 6, "test_0002:suggestion": 10,  # 8 -> 80
}


@pytest.fixture()
def root(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    return coda_tree(tmp_path / "coda")


def _preds(path, answers: dict, order=None):
    ids = order or list(answers)
    path.write_text("".join(json.dumps({"question_id": q, "answer": answers[q]}) + "\n" for q in ids))
    return path


def _args(root, preds, out, *extra):
    return ["eval", "coda", "--annotations", str(root / "CODA-LM/Mini"), "--images", str(root), "--predictions", str(preds), "--out", str(out),
            "--judge-retries", "1", "--judge-backoff", "0.01", "--judge-timeout", "30", *extra]  # no test waits on it: a slow reply is not a retry


def _scores(out):
    return json.loads((out / "scores.json").read_text())


def _all_written_text(folder):
    return "".join(p.read_bytes().decode("utf-8", "replace") for p in folder.rglob("*") if p.is_file() and p.suffix != ".jpg")


def test_scores_match_hand_computed_means_and_ids_not_order(root, tmp_path, capsys):
    answers = {q: f"The answer for {q}, rated {r}" for q, r in RATINGS.items()}
    ordered = _preds(tmp_path / "ordered.jsonl", answers)
    order = list(answers)
    random.Random(3).shuffle(order)
    shuffled = _preds(tmp_path / "shuffled.jsonl", answers, order)
    results = []
    with FakeJudge() as fake:
        for name, preds in (("a", ordered), ("b", shuffled)):
            assert main(_args(root, preds, tmp_path / name, "--judge-url", fake.url, "--judge-model", "judge-x")) == 0
            results.append(_scores(tmp_path / name))
    js = results[0]["judge_scores"]
    assert js == results[1]["judge_scores"]
    assert (js["general"]["score"], js["region"]["score"], js["suggestion"]["score"]) == (65.0, 50.0, 80.0)
    assert js["final"] == {"score": pytest.approx(65.0), "score_failures_as_1": pytest.approx(65.0),
                           "mean_rating": pytest.approx(6.5), "mean_rating_failures_as_1": pytest.approx(6.5)}
    assert (js["general"]["mean_rating"], js["region"]["mean_rating"], js["suggestion"]["mean_rating"]) == (6.5, 5.0, 8.0)  # 1-10, official
    assert set(results[0]["scale"]) == {"mean_rating", "score"} and results[0]["partial"]["partial"] is False
    per_class = js["region"]["per_class"]
    assert (per_class["traffic_cone"]["score"], per_class["miscellaneous"]["score"], per_class["vehicle"]["score"]) == (80.0, 35.0, 20.0)
    assert per_class["vru"]["questions"] == 0 and "other" not in per_class
    judged = {r["question_id"]: r["rating"] for r in map(json.loads, (tmp_path / "b/judgements.jsonl").read_text().splitlines())}
    assert judged == RATINGS
    s = results[0]
    assert s["judge"]["model"] == "judge-x" and s["judge"]["api_key"] == "set" and s["prompts"]["source"] == "own"
    assert s["offline"]["general"]["n"] == 2 and s["offline"]["region"]["missing"] == 0
    assert 0 <= s["offline"]["general"]["rouge_l"] <= 1 and s["offline"]["object_recall"]["scenes"] == 2
    assert (tmp_path / "a/scores.png").stat().st_size > 0
    printed = capsys.readouterr().out
    assert "final       mean  6.50 /10 = score 65.00" in printed and "general     n=2" in printed and "PARTIAL" not in printed


def test_failures_are_counted_and_scored_as_one(root, tmp_path):
    answers = {q: f"answer, rated {r}" for q, r in RATINGS.items()}
    answers["test_0001:general"] = "no rating in this one"  # -> unparseable
    answers["test_0002:region:3"] = "explode"  # -> the endpoint returns 500 for it, every time
    del answers["test_0002:suggestion"]  # -> missing

    def behave(body, headers, attempt):
        if "explode" in body["messages"][-1]["content"]:
            return 500, "internal error", 0
        return 200, rating_from_prediction(body), 0

    with FakeJudge(behave) as fake:
        assert main(_args(root, _preds(tmp_path / "p.jsonl", answers), tmp_path / "o", "--judge-url", fake.url, "--judge-model", "m",
                          "--allow-partial")) == 0  # a failed item and a missing prediction: the run goes on
    assert _scores(tmp_path / "o")["partial"] == {"partial": True, "missing_predictions": 1, "questions": 9}
    js = _scores(tmp_path / "o")["judge_scores"]
    g, r, s = js["general"], js["region"], js["suggestion"]
    assert (g["judged"], g["unparseable"], g["score"], g["score_failures_as_1"]) == (1, 1, 50.0, 30.0)  # [5]; (5+1)/2
    assert (r["judged"], r["failed"], r["score"], r["score_failures_as_1"]) == (4, 1, 57.5, 48.0)  # [9,3,7,4]; (23+1)/5
    assert (s["missing"], s["judged"], s["score"], s["score_failures_as_1"]) == (1, 1, 60.0, 35.0)  # [6]; (6+1)/2
    assert r["per_class"]["vehicle"]["score"] is None and r["per_class"]["vehicle"]["failed"] == 1
    assert js["final"]["score"] == pytest.approx((50 + 57.5 + 60) / 3)
    assert js["final"]["score_failures_as_1"] == pytest.approx((30 + 48 + 35) / 3)
    recs = {x["question_id"]: x for x in map(json.loads, (tmp_path / "o/judgements.jsonl").read_text().splitlines())}
    assert recs["test_0002:region:3"]["status"] == "failed" and "HTTP 500" in recs["test_0002:region:3"]["error"]
    assert recs["test_0001:general"]["status"] == "unparseable" and "test_0002:suggestion" not in recs


def test_key_never_written_and_rerun_costs_nothing(root, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MY_JUDGE_KEY", SECRET)
    monkeypatch.delenv("OPENAI_API_KEY")
    answers = {q: f"answer, rated {r}" for q, r in RATINGS.items()}
    answers["test_0001:region:2"] = "explode"
    answers["test_0002:general"] = "echo, rated 5"

    def echo_key_on_error(body, headers, attempt):  # a server that leaks the header back in its error body and a reply
        text = body["messages"][-1]["content"]
        if "explode" in text:
            return 500, f"bad request with header {headers.get('Authorization')}", 0
        if "echo" in text:
            return 200, f"You sent {headers.get('Authorization')}. Rating: [[5]]", 0
        return 200, rating_from_prediction(body), 0

    preds = _preds(tmp_path / "p.jsonl", answers)
    out = tmp_path / "o"
    args = _args(root, preds, out, "--judge-key-env", "MY_JUDGE_KEY", "--judge-model", "m")
    with FakeJudge(echo_key_on_error) as fake:
        assert main(args + ["--judge-url", fake.url]) == 0
        assert fake.requests[0][2]["Authorization"] == f"Bearer {SECRET}"
    first = _scores(out)
    with FakeJudge(echo_key_on_error) as again:
        assert main(args + ["--judge-url", again.url]) == 0
        assert len(again.requests) == 2  # only the failed item is asked again (1 try + 1 retry); the rest come from the cache
    assert _scores(out)["judge_scores"] == first["judge_scores"] and _scores(out)["judge"]["cache_hits"] == 8
    written = _all_written_text(out)
    captured = capsys.readouterr()
    assert "Bearer ***" in written  # the leaked header was redacted, not dropped silently
    assert SECRET not in written and SECRET not in captured.out and SECRET not in captured.err


@pytest.mark.parametrize("case,line,reason", [
    ("unknown", '{"question_id": "test_9999:general", "answer": "x"}', "unknown id"),
    ("duplicate", '{"question_id": "test_0001:general", "answer": "again"}', "duplicate id"),
    ("malformed", '{"question_id": "test_0001:gene', "malformed JSON"),
    ("wrong type", '{"question_id": "test_0002:general", "answer": 7}', "wrong type"),
])
def test_bad_predictions(root, tmp_path, capsys, case, line, reason):
    answers = {q: f"a, rated {r}" for q, r in RATINGS.items() if q != "test_0002:general"}
    preds = _preds(tmp_path / "p.jsonl", answers)
    with open(preds, "a") as f:
        f.write(line + "\n")
    n = len(answers) + 1
    assert main(_args(root, preds, tmp_path / "o")) == 1
    err = capsys.readouterr().err
    assert f"p.jsonl:{n}" in err and ("question_id" in err or "answer" in err or "malformed" in err), err
    assert not (tmp_path / "o/scores.json").exists()
    assert main(_args(root, preds, tmp_path / "o", "--skip-invalid", "--allow-partial")) == 0
    s = _scores(tmp_path / "o")
    assert s["inputs"]["predictions_skipped"]["skipped_by_reason"] == {reason: 1}
    assert s["offline"]["general"]["missing"] == 1  # test_0002:general never had a valid prediction: counted, not dropped


def test_endpoint_down(root, tmp_path, capsys):
    preds = _preds(tmp_path / "p.jsonl", {q: f"a, rated {r}" for q, r in RATINGS.items()})
    with free_port_url() as url:
        rc = main(_args(root, preds, tmp_path / "o", "--judge-url", url, "--judge-model", "m", "--judge-workers", "1"))
    assert rc == 1
    assert "cannot be reached" in capsys.readouterr().err
    s = _scores(tmp_path / "o")  # offline metrics are still there, and every judgement is counted as failed
    assert s["judge"]["endpoint_down"] and s["judge"]["requests"] == 1 * 2  # the first item (1 try + 1 retry) is refused; the rest not sent
    assert sum(s["judge_scores"][t]["failed"] for t in ("general", "region", "suggestion")) == 9
    assert s["judge_scores"]["general"]["score"] is None and s["judge_scores"]["general"]["score_failures_as_1"] == 10.0
    assert s["offline"]["general"]["bleu4"] is not None


def test_official_prompts_are_used_and_reported(root, tmp_path):
    ck = official_checkout(tmp_path / "CODA-LM-repo")
    preds = _preds(tmp_path / "p.jsonl", {q: f"a, rated {r}" for q, r in RATINGS.items()})
    with FakeJudge() as fake:
        assert main(_args(root, preds, tmp_path / "o", "--official-prompts", str(ck), "--judge-url", fake.url, "--judge-model", "m")) == 0
        general = [b for _, b, _ in fake.requests if b["messages"][0]["content"].startswith("FAKE official judge for stage 1")]
        assert len(general) == 2 and len(general[0]["messages"]) == 6
    s = _scores(tmp_path / "o")
    assert s["prompts"]["source"] == "official" and s["prompts"]["origin"] == str(ck.resolve())
    assert s["prompts"]["few_shot_examples"] == {"general": 2, "suggestion": 2}
    assert s["judge_scores"]["general"]["score"] == 65.0
    qs = [json.loads(x) for x in (tmp_path / "o/questions.jsonl").read_text().splitlines()]
    assert {q["question"] for q in qs if q["task"] == "general"} == {"FAKE official general question."}


def test_bad_annotations_and_arguments(root, tmp_path, capsys):
    preds = _preds(tmp_path / "p.jsonl", {q: f"a, rated {r}" for q, r in RATINGS.items() if q.startswith("test_0001")})
    (root / "test/images/0002.jpg").unlink()
    assert main(_args(root, preds, tmp_path / "o", "--strict-import")) == 1
    assert "test_0002.json: field 'image (test_0002.json encodes test/images/0002.jpg)': expected an existing image file" in capsys.readouterr().err
    assert main(_args(root, preds, tmp_path / "o", "--skip-invalid", "--strict-import")) == 0
    s = _scores(tmp_path / "o")
    assert s["inputs"]["annotation_files_skipped"] == {"missing image": 1} and s["counts"] == {"general": 1, "region": 2, "suggestion": 1}
    # default (lenient) import: judging needs no image, so the scene is kept, its missing image counted as a warning
    full = _preds(tmp_path / "full.jsonl", {q: f"a, rated {r}" for q, r in RATINGS.items()})
    assert main(_args(root, full, tmp_path / "lenient")) == 0
    s = _scores(tmp_path / "lenient")
    assert s["counts"] == {"general": 2, "region": 5, "suggestion": 2} and s["inputs"]["annotation_files_skipped"] == {}
    assert s["inputs"]["annotation_warnings"] == {"missing image": 1} and s["inputs"]["question_warnings"] == {"missing image": 1}
    assert main(_args(root, preds, tmp_path / "o2", "--judge-url", "http://127.0.0.1:9/v1")) == 2  # no --judge-model
    assert "go together" in capsys.readouterr().err


def test_simulator_pool_without_images_flag(tmp_path):
    pool = sim_pool(tmp_path)
    preds = _preds(tmp_path / "p.jsonl", {"s1:general": "cars, rated 9", "s1:region:0": "a car, rated 4", "s1:suggestion": "x, rated 5",
                                          "s2:general": "a truck and cones, rated 7"})
    with FakeJudge() as fake:
        rc = main(["eval", "coda", "--annotations", str(pool), "--predictions", str(preds), "--out", str(tmp_path / "o"),
                   "--judge-url", fake.url, "--judge-model", "m", "--allow-partial"])
    assert rc == 0
    js = _scores(tmp_path / "o")["judge_scores"]
    assert (js["general"]["score"], js["region"]["score"], js["suggestion"]["score"]) == (80.0, 40.0, 50.0)
    assert js["region"]["per_class"]["vehicle"]["score"] == 40.0
    rec = _scores(tmp_path / "o")["offline"]["object_recall"]
    assert rec["per_class_recall"] == {"vehicle": 1.0, "traffic_cone": 1.0} and rec["recall"] == 1.0


def test_region_box_outside_image_in_a_pool(tmp_path, capsys):
    from datasets_cfg.schema import ScenePool, new_row
    from tests.coda_lm_fixtures import pool_qa

    make_image(tmp_path / "pool/images/a.jpg")
    rows = [new_row("a", "sim", "x", images=[{"frame": 0, "camera": "front", "path": "images/a.jpg"}],
                    qa=[pool_qa("a:region:1", "region", "x", "car", (60, 40, 10, 10)), pool_qa("a:suggestion", "suggestion", "y")])]
    ScenePool.from_rows(rows).save(tmp_path / "pool")
    preds = _preds(tmp_path / "p.jsonl", {"a:suggestion": "slow"})
    assert main(["eval", "coda", "--annotations", str(tmp_path / "pool"), "--predictions", str(preds), "--out", str(tmp_path / "o")]) == 1
    assert "field 'qa[a:region:1].box': expected a box inside the 64x48 image" in capsys.readouterr().err


def test_typed_api_writes_what_the_command_writes(root, tmp_path, capsys):
    """`evaluate(CodaEvalOptions(...))` without argparse: the same result, files and exit code as `mose eval coda`."""
    from eval.coda_lm import CodaEvalOptions, evaluate

    answers = {q: f"The answer for {q}, rated {r}" for q, r in RATINGS.items()}
    answers["test_0001:general"] = "no rating in this one"  # an unparseable judgement, to compare that path too
    preds = _preds(tmp_path / "p.jsonl", answers)
    typed = dict(annotations=root / "CODA-LM/Mini", images=root, predictions=preds, judge_retries=1, judge_backoff=0.01, judge_timeout=5,
                 judge_model="judge-x")
    with FakeJudge() as fake:
        assert main(_args(root, preds, tmp_path / "cli", "--judge-url", fake.url, "--judge-model", "judge-x")) == 0
        result = evaluate(CodaEvalOptions(out=tmp_path / "api", judge_url=fake.url, **typed))
    assert result.exit_code == 0 and not result.judge_endpoint_down
    assert result.scores == _scores(tmp_path / "api")
    in_out = lambda folder, obj: json.loads(json.dumps(obj).replace(str(tmp_path / folder), "OUT"))  # noqa: E731 (the judge cache's path)
    assert in_out("api", result.scores) == in_out("cli", _scores(tmp_path / "cli"))
    assert result.scores["judge_scores"]["general"]["unparseable"] == 1
    written = {p.relative_to(tmp_path / "cli") for p in (tmp_path / "cli").rglob("*") if p.is_file()}
    assert written == {p.relative_to(tmp_path / "api") for p in (tmp_path / "api").rglob("*") if p.is_file()}
    assert {"questions.jsonl", "judgements.jsonl", "judge_cache.jsonl", "scores.json", "scores.png"} <= {str(p) for p in written}
    for rel in written:  # JSON lines as sets: the judge cache is appended in the order the parallel replies come
        if rel.suffix in (".jsonl", ".json"):
            lines = {name: sorted((tmp_path / name / rel).read_text().replace(str(tmp_path / name), "OUT").splitlines()) for name in ("cli", "api")}
            assert lines["api"] == lines["cli"], rel

    # a judge that is down: exit code 1 and the command's message, offline metrics still written
    capsys.readouterr()
    with free_port_url() as url:
        down = evaluate(CodaEvalOptions(out=tmp_path / "down", judge_url=url, judge_workers=1, **typed))
    assert down.judge_endpoint_down and down.exit_code == 1 and "cannot be reached" in capsys.readouterr().err
    assert down.scores["offline"]["general"]["bleu4"] is not None and _scores(tmp_path / "down") == down.scores


def test_typed_options_have_the_command_defaults_and_check_their_pairs(tmp_path):
    import argparse
    from dataclasses import fields

    from eval.coda_lm import CodaEvalOptions, add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--annotations", "A", "--out", "O", "--predictions", "P"])
    options = CodaEvalOptions.from_args(args)
    assert options == CodaEvalOptions(annotations="A", out="O", predictions="P")
    assert {f.name for f in fields(CodaEvalOptions)} == {k for k in vars(args)}  # every option of the command, no other
    for bad, says in ((dict(), "exactly one of model and predictions"), (dict(model="M", predictions="P"), "exactly one of model and predictions"),
                      (dict(predictions="P", judge_url="http://127.0.0.1:9/v1"), "judge_url and judge_model go together"),
                      (dict(predictions="P", box_encoding="box"), "box_encoding")):
        with pytest.raises(ValueError, match=says):
            CodaEvalOptions(annotations="A", out=tmp_path, **bad)


# ----------------------------------------------------------------------------------------------
# issue 19: the official reading of replies, per-item failures, partial predictions, the official formats and
# the official region table, each end to end against the loopback judge


def test_every_official_reply_format_counts_and_is_flagged(root, tmp_path):
    # the judge answers each general / suggestion question in another format; the expected ratings are the official
    # rules' by hand (stage1_eval_batch.py:210-219: "Rating: [[", then "rating is: [[", then the first "[["; int(); no range check)
    formats = {"test_0001:general": ("Rating: [[8]]", 8), "test_0002:general": ("So the rating is: [[5]].", 5),
               "test_0001:suggestion": ("I give it [[6]].", 6), "test_0002:suggestion": ("Rating: [[12]]", 12)}
    answers = {q: f"answer {q}, rated {r}" for q, r in RATINGS.items()}

    def behave(body, headers, attempt):
        text = body["messages"][-1]["content"]
        for q, (reply, _) in formats.items():
            if f"answer {q}," in text:
                return 200, reply, 0
        return 200, rating_from_prediction(body), 0

    with FakeJudge(behave) as fake:
        assert main(_args(root, _preds(tmp_path / "p.jsonl", answers), tmp_path / "o", "--judge-url", fake.url, "--judge-model", "m")) == 0
    js = _scores(tmp_path / "o")["judge_scores"]
    g, s = js["general"], js["suggestion"]
    assert (g["judged"], g["mean_rating"], g["score"], g["lenient_only"], g["out_of_range"]) == (2, 6.5, 65.0, 1, 0)  # (8+5)/2
    assert g["by_rule"] == {"rating": 1, "rating_is": 1, "first_brackets": 0}
    assert (s["judged"], s["mean_rating"], s["lenient_only"], s["out_of_range"]) == (2, 9.0, 2, 1)  # (6+12)/2: 12 kept, flagged
    assert s["by_rule"] == {"rating": 1, "rating_is": 0, "first_brackets": 1}
    recs = {r["question_id"]: r for r in map(json.loads, (tmp_path / "o/judgements.jsonl").read_text().splitlines())}
    assert (recs["test_0002:suggestion"]["rating"], recs["test_0002:suggestion"]["out_of_range"]) == (12, True)
    assert (recs["test_0002:general"]["rule"], recs["test_0002:general"]["lenient_only"]) == ("rating_is", True)


def test_one_bad_scene_is_counted_and_the_run_goes_on(root, tmp_path, capsys):
    answers = {q: f"answer {q}, rated {r}" for q, r in RATINGS.items()}

    def behave(body, headers, attempt):  # every item of scene test_0002 always gets HTTP 500
        return (500, "boom", 0) if "answer test_0002:" in body["messages"][-1]["content"] else (200, rating_from_prediction(body), 0)

    with FakeJudge(behave) as fake:
        rc = main(_args(root, _preds(tmp_path / "p.jsonl", answers), tmp_path / "o", "--judge-url", fake.url, "--judge-model", "m",
                        "--judge-workers", "1"))
    assert rc == 0 and "5 item(s) failed after retries" in capsys.readouterr().err
    s = _scores(tmp_path / "o")
    js = s["judge_scores"]
    assert not s["judge"]["endpoint_down"]
    assert (js["general"]["score"], js["general"]["failed"]) == (80.0, 1)
    assert (js["region"]["mean_rating"], js["region"]["failed"]) == (6.0, 3)  # test_0001's regions [9, 3]
    assert (js["suggestion"]["score"], js["suggestion"]["failed"]) == (60.0, 1)


def test_missing_or_empty_predictions_are_refused_unless_allowed(root, tmp_path, capsys):
    from eval.coda_lm import CodaEvalOptions, evaluate

    some = {q: f"a, rated {r}" for q, r in RATINGS.items() if q != "test_0002:region:3"}
    assert main(_args(root, _preds(tmp_path / "p.jsonl", some), tmp_path / "o")) == 1
    assert "1 of 9 questions have no prediction (region 1); pass --allow-partial" in capsys.readouterr().err
    assert not (tmp_path / "o/scores.json").exists()
    (tmp_path / "empty.jsonl").write_text("")
    assert main(_args(root, tmp_path / "empty.jsonl", tmp_path / "o")) == 1
    assert "9 of 9 questions have no prediction" in capsys.readouterr().err
    with FakeJudge() as fake:
        assert main(_args(root, tmp_path / "p.jsonl", tmp_path / "o", "--allow-partial", "--judge-url", fake.url, "--judge-model", "m")) == 0
        out = capsys.readouterr().out
        typed = evaluate(CodaEvalOptions(annotations=root / "CODA-LM/Mini", images=root, predictions=tmp_path / "p.jsonl", out=tmp_path / "api",
                                         allow_partial=True))
    assert "PARTIAL: 1 of 9 questions have no prediction" in out
    assert _scores(tmp_path / "o")["partial"] == {"partial": True, "missing_predictions": 1, "questions": 9}
    assert typed.scores["partial"]["partial"] is True
    with pytest.raises(Exception, match="1 of 9 questions have no prediction"):
        evaluate(CodaEvalOptions(annotations=root / "CODA-LM/Mini", images=root, predictions=tmp_path / "p.jsonl", out=tmp_path / "api2"))


def _official_folder(folder, answers_by_qid: dict):
    """The official submission files for the Mini fixture, written by hand from the official rules:
    general / suggestion: question_id = index of the annotation file in sorted order (stage1_eval_batch.py:177-191):
    test_0001.json -> 0, test_0002.json -> 1. Region: image "XXXX_object_K.jpg" (convert2eval.py:28-32); lines in a
    shuffled order (stage3_eval_batch.py:25 sorts them by question_id)."""
    folder.mkdir(parents=True)
    a = answers_by_qid
    (folder / "general_perception_answer.jsonl").write_text("".join(json.dumps(r) + "\n" for r in (
        {"question_id": 1, "answer": a["test_0002:general"]}, {"question_id": 0, "answer": a["test_0001:general"]})))
    (folder / "driving_suggestion_answer.jsonl").write_text("".join(json.dumps(r) + "\n" for r in (
        {"question_id": 0, "answer": a["test_0001:suggestion"]}, {"question_id": 1, "answer": a["test_0002:suggestion"]})))
    region = [(3, "0002_object_1.jpg", "test_0002:region:1"), (0, "0001_object_1.jpg", "test_0001:region:1"), (4, "0002_object_2.jpg", "test_0002:region:2"),
              (1, "0001_object_2.jpg", "test_0001:region:2"), (2, "0002_object_3.jpg", "test_0002:region:3")]
    (folder / "region_perception_answer.jsonl").write_text("".join(
        json.dumps({"question_id": k, "image": f"CODA/images_w_boxes/{img}", "question": "q", "answer": a[q]}) + "\n" for k, img, q in region))
    return folder


def test_official_format_predictions_give_the_same_scores(root, tmp_path):
    answers = {q: f"The answer for {q}, rated {r}" for q, r in RATINGS.items()}
    official = _official_folder(tmp_path / "official", answers)
    with FakeJudge() as fake:
        assert main(_args(root, official, tmp_path / "o", "--judge-url", fake.url, "--judge-model", "m")) == 0
    s = _scores(tmp_path / "o")
    js = s["judge_scores"]
    assert s["inputs"]["predictions_skipped"]["format"] == "official"
    assert (js["general"]["score"], js["region"]["score"], js["suggestion"]["score"]) == (65.0, 50.0, 80.0)  # as with our ids
    judged = {r["question_id"]: r["rating"] for r in map(json.loads, (tmp_path / "o/judgements.jsonl").read_text().splitlines())}
    assert judged == RATINGS


def test_official_region_answers_pair_by_position_within_their_class(root, tmp_path):
    # stage3_eval_batch.py:92-101 pairs the k-th answer of a class with the k-th question of that class; the image name only
    # gives the class. Two cone answers whose image names are swapped are still paired by their sorted position.
    answers = {q: f"The answer for {q}, rated {r}" for q, r in RATINGS.items()}
    folder = _official_folder(tmp_path / "official", answers)
    lines = [json.loads(x) for x in (folder / "region_perception_answer.jsonl").read_text().splitlines()]
    for rec in lines:
        rec["image"] = {"CODA/images_w_boxes/0001_object_1.jpg": "0002_object_1.jpg",
                        "CODA/images_w_boxes/0002_object_1.jpg": "0001_object_1.jpg"}.get(rec["image"], rec["image"])
    (folder / "region_perception_answer.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert main(_args(root, folder, tmp_path / "o", "--convert", "ours")) == 0
    ours = {r["question_id"]: r["answer"] for r in map(json.loads, (tmp_path / "o/predictions_ours.jsonl").read_text().splitlines())}
    assert ours == answers  # question_id 0 (cone) -> test_0001:region:1, question_id 3 (cone) -> test_0002:region:1, as before


def test_convert_both_ways_round_trips(root, tmp_path, capsys):
    answers = {q: f"The answer for {q}, rated {r}" for q, r in RATINGS.items()}
    assert main(_args(root, _preds(tmp_path / "p.jsonl", answers), tmp_path / "a", "--convert", "official")) == 0
    folder = tmp_path / "a/official_predictions"
    general = [json.loads(x) for x in (folder / "general_perception_answer.jsonl").read_text().splitlines()]
    assert general == [{"question_id": 0, "answer": answers["test_0001:general"]}, {"question_id": 1, "answer": answers["test_0002:general"]}]
    region = [json.loads(x) for x in (folder / "region_perception_answer_w_label.jsonl").read_text().splitlines()]
    assert [(r["question_id"], r["image"], r["label_name"]) for r in region] == [
        (0, "0001_object_1.jpg", "traffic_cone"), (1, "0001_object_2.jpg", "dog"), (2, "0002_object_1.jpg", "traffic_cone"),
        (3, "0002_object_2.jpg", "dog"), (4, "0002_object_3.jpg", "truck")]
    assert main(_args(root, folder, tmp_path / "b", "--convert", "ours")) == 0
    back = {r["question_id"]: r["answer"] for r in map(json.loads, (tmp_path / "b/predictions_ours.jsonl").read_text().splitlines())}
    assert back == answers and "converted 9 predictions (official -> ours)" in capsys.readouterr().out
    assert not (tmp_path / "b/scores.json").exists()


def test_bad_official_files_name_file_and_line(root, tmp_path, capsys):
    answers = {q: f"a {q}, rated {r}" for q, r in RATINGS.items()}
    folder = _official_folder(tmp_path / "official", answers)
    with open(folder / "general_perception_answer.jsonl", "a") as f:
        f.write(json.dumps({"question_id": 2, "answer": "x"}) + "\n")
    assert main(_args(root, folder, tmp_path / "o")) == 1
    assert "general_perception_answer.jsonl:3: field 'question_id': expected an index 0..1 of the 2 annotation files" in capsys.readouterr().err
    (folder / "general_perception_answer.jsonl").write_text(json.dumps({"question_id": "0", "answer": "x"}) + "\n")
    assert main(_args(root, folder, tmp_path / "o")) == 1
    assert "general_perception_answer.jsonl:1: field 'question_id': expected an integer" in capsys.readouterr().err


def test_region_scores_use_the_official_table_and_its_drops(root, tmp_path):
    # test_0002 region 3 is renamed "Car": the official lookup is exact and case-sensitive (stage3_eval_batch.py:49-70), so it
    # falls in no class and out of the region score (stage3_eval_batch.py:243-279); our extended view lower-cases it to vehicle
    path = root / "CODA-LM/Mini/test_0002.json"
    data = json.loads(path.read_text())
    data["region_perception"]["3"]["category_name"] = "Car"
    path.write_text(json.dumps(data))
    answers = {q: f"answer {q}, rated {r}" for q, r in RATINGS.items()}
    with FakeJudge() as fake:
        assert main(_args(root, _preds(tmp_path / "p.jsonl", answers), tmp_path / "o", "--judge-url", fake.url, "--judge-model", "m",
                          "--region-extended")) == 0
    js = _scores(tmp_path / "o")["judge_scores"]
    r, x = js["region"], js["region_extended"]
    assert (r["questions"], r["mean_rating"], r["score"]) == (4, 5.75, 57.5)  # (9+3+7+4)/4, the "Car" item (2) dropped
    assert r["dropped"] == {"questions": 1, "by_category": {"Car": 1}} and r["per_class"]["vehicle"]["questions"] == 0
    assert (x["questions"], x["score"], x["per_class"]["vehicle"]["score"]) == (5, 50.0, 20.0)  # (9+3+7+4+2)/5
    assert js["final"]["score"] == pytest.approx((65 + 57.5 + 80) / 3)  # the final score uses the official region score


def test_quirky_box_is_read_by_default_and_refused_when_strict(root, tmp_path, capsys):
    path = root / "CODA-LM/Mini/test_0002.json"
    data = json.loads(path.read_text())
    data["region_perception"]["3"]["box"] = [60, 40, 10, 10]  # reaches 6 px past the 64x48 image: the official scripts never check
    path.write_text(json.dumps(data))
    preds = _preds(tmp_path / "p.jsonl", {q: f"a, rated {r}" for q, r in RATINGS.items()})
    assert main(_args(root, preds, tmp_path / "o")) == 0
    s = _scores(tmp_path / "o")
    assert s["counts"]["region"] == 5 and s["inputs"]["import_mode"] == "lenient"
    assert s["inputs"]["annotation_warnings"] == {"box outside image": 1}
    qs = {q["question_id"]: q for q in map(json.loads, (tmp_path / "o/questions.jsonl").read_text().splitlines())}
    assert qs["test_0002:region:3"]["box"] == [60.0, 40.0, 10.0, 10.0] and "region_images" in qs["test_0002:region:3"]["image"]
    assert main(_args(root, preds, tmp_path / "strict", "--strict-import")) == 1
    assert "region_perception.3.box': expected a box inside the 64x48 image" in capsys.readouterr().err
