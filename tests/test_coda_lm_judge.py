"""The judge client against a real HTTP server on loopback: ratings, malformed replies, 500s, timeouts, a restart
resumed from the cache, an endpoint that is down, and the key kept out of every error text."""
from __future__ import annotations

import json
import threading

import pytest

from eval.coda_judge import JudgeClient, parse_rating, parse_rating_official
from tests.coda_lm_fixtures import FakeJudge, free_port_url, rating_from_prediction

SECRET = "sk-test-SECRET-0123456789"


def _msgs(text: str) -> list[dict]:
    return [{"role": "system", "content": "judge"}, {"role": "user", "content": f"[Predicted text]\n{text}"}]


def _client(url, tmp_path=None, **kw) -> JudgeClient:
    # a generous timeout: a slow reply on a loaded machine must not turn into a retry and change the counts asserted
    kw = {"timeout": 30.0, "max_retries": 2, "backoff": 0.01, "workers": 1, **kw}
    return JudgeClient(url, "judge-model", SECRET, cache_path=tmp_path / "cache.jsonl" if tmp_path else None, **kw)


@pytest.mark.parametrize("text,expected", [
    ("Fine. Rating: [[7]]", 7), ("Rating: [[10]]", 10), ("Rating: [[1]]", 1), ("Rating: [[7]] and again Rating: [[7]]", 7),
    ("Rating: [[0]]", None), ("Rating: [[11]]", None), ("Rating: [[7]] ... Rating: [[3]]", None), ("rating: [[7]]", None),
    ("Rating: [7]", None), ("[[7]]", None), ("Rating: [[ 7 ]]", None), ("Rating: [[7.5]]", None), ("", None), (None, None),
])
def test_parse_rating_is_strict(text, expected):
    assert parse_rating(text) == expected


# Expected values by hand from the official rule (DLUT-LYZ/CODA-LM@24544cc evaluation/stage1_eval_batch.py:210-219,
# the same in stage2:208-217 and stage3:255-264): int(reply.split(M)[1].split("]]")[0]) for M = "Rating: [[", then
# "rating is: [[", then "[["; the first M that yields an int wins; no range check.
@pytest.mark.parametrize("text,expected", [
    ("Fine. Rating: [[7]]", (7, "rating")),
    ("Rating: [[ 7 ]]", (7, "rating")),  # int(" 7 ") == 7
    ("Rating: [[+7]]", (7, "rating")),  # int("+7") == 7
    ("Rating: [[7]] ... Rating: [[3]]", (7, "rating")),  # split(...)[1]: the text after the first marker only
    ("Rating: [[11]]", (11, "rating")), ("Rating: [[0]]", (0, "rating")), ("Rating: [[-2]]", (-2, "rating")),  # kept: no range check
    ("The rating is: [[6]]", (6, "rating_is")),  # rule 1 absent, rule 2 reads
    ("Rating: [[7.5]] so the rating is: [[8]]", (8, "rating_is")),  # int("7.5") fails -> rule 2
    ("I'd give [[4]] out of ten", (4, "first_brackets")),  # only the bare brackets
    ("rating: [[9]]", (9, "first_brackets")),  # lower-case "rating:" is not rule 1 (case-sensitive), rule 3 reads it
    ("Rating: [[n/a]] then [[5]]", (None, None)),  # rule 3 takes the FIRST "[[" (the "n/a" one) and fails
    ("Score [[x]]", (None, None)), ("Rating: [7]", (None, None)), ("I cannot decide.", (None, None)), ("", (None, None)), (None, (None, None)),
    ("Rating: [[8", (8, "rating")),  # no "]]": split("]]")[0] is the whole rest, int("8") == 8
    ("Rating: [[7 Rating: [[8]]", (7, "rating")),  # split(M)[1] is "7 " (the piece up to the second marker): int("7 ") == 7
])
def test_parse_rating_official_rules(text, expected):
    assert parse_rating_official(text) == expected


def test_lenient_and_out_of_range_replies_are_kept_and_flagged():
    replies = {"a": "Rating: [[7]]", "b": "the rating is: [[6]]", "c": "[[4]]", "d": "Rating: [[12]]", "e": "no number"}

    def behave(body, headers, attempt):
        return 200, replies[body["messages"][-1]["content"].split("\n", 1)[1]], 0

    with FakeJudge(behave) as fake:
        out = _client(fake.url).judge_many([(k, _msgs(k)) for k in replies], progress=False)
    got = {k: (j.status, j.rating, j.rule, j.lenient_only, j.out_of_range) for k, j in out.items()}
    assert got == {"a": ("ok", 7, "rating", False, False), "b": ("ok", 6, "rating_is", True, False), "c": ("ok", 4, "first_brackets", True, False),
                   "d": ("ok", 12, "rating", True, True), "e": ("unparseable", None, None, False, False)}


def test_good_ratings_and_protocol():
    with FakeJudge() as fake:
        c = _client(fake.url)
        j = c.ask(_msgs("a car, rated 8"))
        assert (j.status, j.rating, j.attempts, j.cached) == ("ok", 8, 1, False)
        path, body, headers = fake.requests[0]
        assert path == "/v1/chat/completions"
        assert body["model"] == "judge-model" and body["temperature"] == 0 and body["messages"] == _msgs("a car, rated 8")
        assert headers["Authorization"] == f"Bearer {SECRET}"
        assert SECRET not in repr(c) and SECRET not in json.dumps(c.describe())


def test_full_url_and_no_key():
    with FakeJudge() as fake:
        c = JudgeClient(fake.url + "/chat/completions", "m", None, backoff=0.01)
        assert c.ask(_msgs("rated 3")).rating == 3
        assert "Authorization" not in fake.requests[0][2]


def test_malformed_replies():
    def behave(body, headers, attempt):
        text = body["messages"][-1]["content"]
        if "garbage" in text:
            return 200, b"<html>not json</html>", 0
        if "nochoices" in text:
            return 200, json.dumps({"object": "chat.completion", "choices": []}).encode(), 0
        if "flaky" in text and attempt == 1:
            return 200, b"{trunc", 0
        return 200, rating_from_prediction(body), 0

    with FakeJudge(behave) as fake:
        c = _client(fake.url)
        g = c.ask(_msgs("garbage"))
        assert g.status == "failed" and g.attempts == 3 and "malformed reply" in g.error
        assert c.ask(_msgs("nochoices")).status == "failed"
        f = c.ask(_msgs("flaky, rated 4"))  # malformed once, then fine
        assert (f.status, f.rating, f.attempts) == ("ok", 4, 2)
        u = c.ask(_msgs("no rating here"))  # a real reply without a rating: unparseable, not failed
        assert (u.status, u.rating, u.reply) == ("unparseable", None, "I cannot decide.")
        eleven = c.ask(_msgs("rated 11"))  # read as upstream reads it (no range check), and flagged
        assert (eleven.status, eleven.rating, eleven.out_of_range) == ("ok", 11, True)


def test_500s_are_retried_and_4xx_are_not():
    def behave(body, headers, attempt):
        text = body["messages"][-1]["content"]
        if "always" in text:
            return 500, "boom", 0
        if "denied" in text:
            return 401, "bad key", 0
        if "busy" in text and attempt <= 2:
            return 503 if attempt == 1 else 429, "try later", 0
        return 200, rating_from_prediction(body), 0

    with FakeJudge(behave) as fake:
        c = _client(fake.url, max_retries=3)
        b = c.ask(_msgs("busy, rated 6"))
        assert (b.status, b.rating, b.attempts) == ("ok", 6, 3)
        a = c.ask(_msgs("always"))
        assert a.status == "failed" and a.attempts == 4 and "HTTP 500" in a.error
        n = len(fake.requests)
        d = c.ask(_msgs("denied"))
        assert d.status == "failed" and "HTTP 401" in d.error and len(fake.requests) == n + 1  # no retry


def test_timeouts_are_retried():
    # the first request for a message is held until the test ends, so it always times out, whatever the machine's
    # load; the retry is answered at once and has the whole timeout to arrive
    release = threading.Event()

    def behave(body, headers, attempt):
        if attempt == 1:
            release.wait(60)
        return 200, rating_from_prediction(body), 0.0

    with FakeJudge(behave) as fake:
        try:
            c = _client(fake.url, timeout=1.5)
            j = c.ask(_msgs("slow, rated 5"))
            assert (j.status, j.rating, j.attempts) == ("ok", 5, 2)
            k = _client(fake.url, timeout=1.0, max_retries=0).ask(_msgs("slow again, rated 5"))
            assert k.status == "failed" and "timed out" in k.error.lower()
        finally:
            release.set()


def test_restart_mid_run_resumes_from_cache(tmp_path):
    items = [(f"q{i}", _msgs(f"item {i}, rated {i + 1}")) for i in range(6)]
    served = {"n": 0}

    def dies_after_three(body, headers, attempt):
        served["n"] += 1
        return (200, rating_from_prediction(body), 0) if served["n"] <= 3 else (500, "server crashed", 0)

    with FakeJudge(dies_after_three) as fake:
        first = _client(fake.url, tmp_path, max_retries=0).judge_many(items, progress=False)
    assert [first[f"q{i}"].status for i in range(6)] == ["ok"] * 3 + ["failed"] * 3
    # a crash while writing the cache leaves a cut line: it must be ignored, not break the resume
    with open(tmp_path / "cache.jsonl", "a") as f:
        f.write('{"key": "abc", "reply": "Rat')

    with FakeJudge() as fresh:  # the restarted endpoint
        c = _client(fresh.url, tmp_path)
        second = c.judge_many(items, progress=False)
        assert len(fresh.requests) == 3  # only the three without a cached reply
        assert c.cache_hits_ == 3 and c.requests_ == 3
    assert [second[f"q{i}"].rating for i in range(6)] == [1, 2, 3, 4, 5, 6]
    assert [second[f"q{i}"].cached for i in range(6)] == [True] * 3 + [False] * 3

    with FakeJudge() as third:  # a re-run costs nothing
        again = _client(third.url, tmp_path).judge_many(items, progress=False)
        assert third.requests == [] and [again[f"q{i}"].rating for i in range(6)] == [1, 2, 3, 4, 5, 6]
    assert SECRET not in (tmp_path / "cache.jsonl").read_text()


def test_cache_is_keyed_by_model_and_prompt(tmp_path):
    with FakeJudge() as fake:
        _client(fake.url, tmp_path).ask(_msgs("x, rated 2"))
        JudgeClient(fake.url, "another-model", cache_path=tmp_path / "cache.jsonl", backoff=0.01).ask(_msgs("x, rated 2"))
        _client(fake.url, tmp_path).ask(_msgs("x, rated 2 (changed)"))
        _client(fake.url, tmp_path).ask(_msgs("x, rated 2"))
        assert len(fake.requests) == 3


def test_failing_items_are_counted_and_the_run_goes_on():
    # 8 items that always get HTTP 500 in a row (one bad scene): each fails after its retries, and every other item is still judged
    def behave(body, headers, attempt):
        text = body["messages"][-1]["content"]
        return (500, "boom", 0) if "bad" in text else (200, rating_from_prediction(body), 0)

    items = [(f"bad{i}", _msgs(f"bad {i}")) for i in range(8)] + [(f"q{i}", _msgs(f"item {i}, rated {i + 1}")) for i in range(4)]
    with FakeJudge(behave) as fake:
        c = _client(fake.url, max_retries=1)
        out = c.judge_many(items, progress=False)
    assert [out[f"bad{i}"].status for i in range(8)] == ["failed"] * 8 and all(out[f"bad{i}"].attempts == 2 for i in range(8))
    assert [out[f"q{i}"].rating for i in range(4)] == [1, 2, 3, 4]
    assert not c.endpoint_down_ and c.requests_ == 8 * 2 + 4


def test_unreachable_endpoint_stops_sending_and_a_rerun_resumes(tmp_path):
    items = [(f"q{i}", _msgs(f"rated {i + 1}")) for i in range(5)]
    with FakeJudge() as fake:  # two items answered and cached first
        _client(fake.url, tmp_path).judge_many(items[:2], progress=False)
    with free_port_url() as url:  # connection refused
        c = _client(url, tmp_path, max_retries=1)
        out = c.judge_many(items, progress=False)
    assert [out[f"q{i}"].status for i in range(5)] == ["ok", "ok", "failed", "failed", "failed"]  # cached replies still read
    assert [out[f"q{i}"].attempts for i in range(5)] == [0, 0, 2, 0, 0] and "not sent" in out["q4"].error
    assert "Connection" in out["q2"].error or "URLError" in out["q2"].error
    assert c.endpoint_down_ and c.requests_ == 2
    with FakeJudge() as back:
        again = _client(back.url, tmp_path).judge_many(items, progress=False)
        assert len(back.requests) == 3  # only the three never answered
    assert [again[f"q{i}"].rating for i in range(5)] == [1, 2, 3, 4, 5]


def test_key_is_redacted_from_errors():
    def echo_auth(body, headers, attempt):
        return 500, f"unauthorised header was {headers.get('Authorization')}", 0

    with FakeJudge(echo_auth) as fake:
        j = _client(fake.url, max_retries=1).ask(_msgs("x"))
    assert j.status == "failed" and "Bearer ***" in j.error and SECRET not in j.error


def test_parallel_workers_keep_items_apart(tmp_path):
    items = [(f"q{i}", _msgs(f"item {i}, rated {i % 10 + 1}")) for i in range(12)]
    with FakeJudge() as fake:
        out = _client(fake.url, tmp_path, workers=4).judge_many(items, progress=False)
    assert {q: j.rating for q, j in out.items()} == {f"q{i}": i % 10 + 1 for i in range(12)}
    assert len((tmp_path / "cache.jsonl").read_text().splitlines()) == 12


def test_url_credentials_are_not_shown():
    c = JudgeClient("http://user:pa55@127.0.0.1:9/v1?token=abc", "m")
    assert c.describe()["url"] == "http://127.0.0.1:9/v1" and "pa55" not in repr(c) and "abc" not in repr(c)


def test_only_refused_connections_and_unknown_hosts_count_as_unreachable():
    import socket
    import urllib.error

    from eval.coda_judge import _unreachable

    assert _unreachable(urllib.error.URLError(ConnectionRefusedError(111, "Connection refused")))
    assert _unreachable(urllib.error.URLError(socket.gaierror(-2, "Name or service not known")))  # DNS
    assert _unreachable(ConnectionRefusedError(111, "Connection refused"))
    assert not _unreachable(urllib.error.URLError(ConnectionResetError(104, "reset")))  # a flaky server: per-item failure
    assert not _unreachable(urllib.error.URLError(TimeoutError("timed out")))
    assert not _unreachable(socket.timeout("timed out"))
