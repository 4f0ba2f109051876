"""An LLM judge behind any OpenAI-compatible chat-completions endpoint (OpenAI, vLLM, llama.cpp server, ...).

- POST ``{url}/chat/completions`` (or ``url`` itself if it already ends so) with ``{"model", "messages",
  "temperature": 0}``; the key, if any, goes in an ``Authorization: Bearer`` header and nowhere else: it is
  redacted from every error text and reply and never written (the cache holds only hashes and replies).
- Transient failures (connection refused/reset, timeouts, HTTP 408/409/425/429/5xx, a body that is not a
  chat-completions reply) are retried with exponential backoff ``backoff * 2**attempt`` (capped); other HTTP
  errors (401, 404, ...) fail at once. An item that still fails after its retries is counted as failed and the
  run goes on with the next items (upstream, too, skips items it got no reply for:
  stage1_eval_batch.py:97-101,204-207). Only an endpoint that cannot be reached at all (connection refused, or
  the host name does not resolve) stops the run early: once one item failed so after its retries, the items not
  yet sent are not sent (reported as failed, "not sent") and `endpoint_down_` is set; a re-run resumes from
  the cache.
- Replies are cached in a JSONL file keyed by sha256(model + messages + temperature), so a re-run (or a run
  resumed after a crash) asks only what it has no reply for. Only real replies are cached, failures are not.
- Ratings are read as the official scripts read them (`parse_rating_official`: ``Rating: [[n]]``, else
  ``rating is: [[n]]``, else the first ``[[n]]``, Python ``int()`` of the text up to the next ``]]``, no range
  check); a reply none of the three rules reads is "unparseable" (counted; upstream prints and skips it). Each
  judgement records which rule read it and whether the rating lies outside 1..10 (kept, as upstream keeps it, and
  counted). `parse_rating` is our strict reading (exactly one distinct ``Rating: [[n]]``, 1 <= n <= 10): a reply
  the official rules read but the strict one does not (or reads differently) is counted as "lenient only".
"""
from __future__ import annotations

import hashlib
import http.client
import json
import re
import socket
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

_RATING = re.compile(r"Rating: \[\[(\d+)\]\]")
_RETRY_STATUS = {408, 409, 425, 429}


def _public(url: str) -> str:
    from urllib.parse import urlsplit, urlunsplit

    p = urlsplit(url)
    return urlunsplit((p.scheme, p.hostname + (f":{p.port}" if p.port else "") if p.hostname else p.netloc, p.path, "", ""))


# The official rules, in the official order: DLUT-LYZ/CODA-LM@24544cc evaluation/stage1_eval_batch.py:210-219
# (the same in stage2_eval_batch.py:208-217 and stage3_eval_batch.py:255-264):
#   int(output.split(MARKER)[1].split("]]")[0]) for MARKER = "Rating: [[", then "rating is: [[", then "[[".
OFFICIAL_RULES = (("rating", "Rating: [["), ("rating_is", "rating is: [["), ("first_brackets", "[["))


def parse_rating_official(text: str | None) -> tuple[int | None, str | None]:
    """(rating, rule) as the official scripts read a reply; (None, None) when no rule reads it.

    Each rule takes the text between the first occurrence of its marker (case-sensitive) and the next
    occurrence of the marker or the first "]]", whichever comes first (or the end), and applies Python's int() to it — so " 7 " and "+7" read as 7, "7.5" does not, and
    no range check is made (0 or 15 are kept). A rule that fails hands over to the next one."""
    if not isinstance(text, str):
        return None, None
    for rule, marker in OFFICIAL_RULES:
        if marker not in text:
            continue
        inner = text.split(marker)[1].split("]]")[0]  # [1]: the piece between the first and any second marker
        try:
            return int(inner), rule
        except ValueError:
            continue
    return None, None


def parse_rating(text: str) -> int | None:
    """Our strict reading: n from ``Rating: [[n]]`` (1..10); None if absent, out of range or ambiguous."""
    found = {int(m) for m in _RATING.findall(text or "")}
    if len(found) != 1:
        return None
    n = found.pop()
    return n if 1 <= n <= 10 else None


@dataclass
class Judgement:
    status: str  # "ok" | "unparseable" | "failed"
    rating: int | None = None
    reply: str | None = None
    error: str | None = None
    attempts: int = 0
    cached: bool = False
    rule: str | None = None  # the official rule that read the rating (OFFICIAL_RULES), None if none did
    out_of_range: bool = False  # rating read but outside 1..10 (kept, as upstream keeps it)
    lenient_only: bool = False  # read by the official rules, not (or differently) by our strict parse_rating
    unreachable: bool = False  # failed because the endpoint could not be reached (refused / DNS) on the last attempt


def judgement_from_reply(reply: str, **kw) -> Judgement:
    """A Judgement for a real reply: status "ok" when the official rules read a rating, else "unparseable"."""
    rating, rule = parse_rating_official(reply)
    if rating is None:
        return Judgement("unparseable", None, reply, **kw)
    return Judgement("ok", rating, reply, rule=rule, out_of_range=not 1 <= rating <= 10,
                     lenient_only=parse_rating(reply) != rating, **kw)


class _Transient(Exception):
    pass


class _Unreachable(_Transient):
    """Connection refused or the host name does not resolve: the endpoint itself cannot be reached."""


def _unreachable(e: BaseException) -> bool:
    reason = getattr(e, "reason", e)
    return isinstance(reason, (ConnectionRefusedError, socket.gaierror))


class JudgeClient:
    """Parameters are plain values (scikit-learn style); `requests_`, `cache_hits_` count what a run did."""

    def __init__(self, url: str, model: str, api_key: str | None = None, timeout: float = 60.0, max_retries: int = 4,
                 backoff: float = 1.0, max_backoff: float = 30.0, cache_path=None, workers: int = 4):
        if not url or not model:
            raise ValueError("a judge needs both an endpoint URL and a model name")
        self.url = url
        self.model = model
        self._key = api_key or None  # private: never in repr, describe() or any file
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.cache_path = Path(cache_path) if cache_path else None
        self.workers = max(1, int(workers))
        self.endpoint_ = url.rstrip("/") if url.rstrip("/").endswith("/chat/completions") else url.rstrip("/") + "/chat/completions"
        self.public_url_ = _public(url)  # what messages and outputs show: no user:password@, no query string
        self.requests_ = 0
        self.cache_hits_ = 0
        self.endpoint_down_ = False
        self._lock = threading.Lock()
        self._cache = self._load_cache()

    def __repr__(self) -> str:
        return f"JudgeClient(url={self.public_url_!r}, model={self.model!r}, key={'set' if self._key else 'none'})"

    def describe(self) -> dict:
        return {"url": self.public_url_, "model": self.model, "temperature": 0, "api_key": "set" if self._key else "none",
                "requests": self.requests_, "cache_hits": self.cache_hits_, "endpoint_down": self.endpoint_down_,
                "cache": str(self.cache_path) if self.cache_path else None}

    # cache ------------------------------------------------------------------------------------
    def key(self, messages: list[dict]) -> str:
        body = json.dumps({"model": self.model, "messages": messages, "temperature": 0}, sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(body.encode("utf-8")).hexdigest()

    def _load_cache(self) -> dict:
        cache = {}
        if self.cache_path and self.cache_path.is_file():
            data = self.cache_path.read_bytes()
            if data and not data.endswith(b"\n"):  # a line cut short by a crash: drop it (that item is asked again)
                data = data[: data.rfind(b"\n") + 1]
                with open(self.cache_path, "r+b") as f:
                    f.truncate(len(data))
            for line in data.decode("utf-8", "replace").splitlines():
                try:
                    rec = json.loads(line)
                    cache[rec["key"]] = rec["reply"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue
        return cache

    def _store(self, key: str, reply: str) -> None:
        with self._lock:
            self._cache[key] = reply
            if self.cache_path:
                self.cache_path.parent.mkdir(parents=True, exist_ok=True)
                with open(self.cache_path, "a", encoding="utf-8") as f:
                    f.write(json.dumps({"key": key, "model": self.model, "reply": reply}) + "\n")

    # one request ------------------------------------------------------------------------------
    def _redact(self, text: str) -> str:
        return text.replace(self._key, "***") if self._key else text

    def _post(self, messages: list[dict]) -> str:
        body = json.dumps({"model": self.model, "messages": messages, "temperature": 0}).encode("utf-8")
        headers = {"Content-Type": "application/json"}
        if self._key:
            headers["Authorization"] = f"Bearer {self._key}"
        req = urllib.request.Request(self.endpoint_, data=body, headers=headers, method="POST")
        with self._lock:
            self.requests_ += 1
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as e:
            detail = e.read()[:200].decode("utf-8", "replace") if e.fp else ""
            msg = f"HTTP {e.code} from {_public(self.endpoint_)}: {detail}"
            if e.code in _RETRY_STATUS or e.code >= 500:
                raise _Transient(msg) from None
            raise RuntimeError(msg) from None
        except (urllib.error.URLError, socket.timeout, TimeoutError, ConnectionError, http.client.HTTPException, OSError) as e:
            kind = _Unreachable if _unreachable(e) else _Transient
            raise kind(f"{type(e).__name__} calling {_public(self.endpoint_)}: {getattr(e, 'reason', e)}") from None
        try:
            content = json.loads(raw)["choices"][0]["message"]["content"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, IndexError, TypeError):
            raise _Transient(f"malformed reply from {_public(self.endpoint_)} (not a chat-completions JSON body): {raw[:120]!r}") from None
        if not isinstance(content, str):
            raise _Transient(f"malformed reply from {_public(self.endpoint_)}: message content is {type(content).__name__}, expected a string")
        return content

    def ask(self, messages: list[dict]) -> Judgement:
        """One judgement: from the cache, or from the endpoint with retries."""
        key = self.key(messages)
        if key in self._cache:
            with self._lock:
                self.cache_hits_ += 1
            return judgement_from_reply(self._cache[key], cached=True)
        error, unreachable = None, False
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(min(self.max_backoff, self.backoff * 2 ** (attempt - 1)))
            try:
                reply = self._redact(self._post(messages))  # a server echoing the header must not get the key written
            except _Transient as e:
                error, unreachable = str(e), isinstance(e, _Unreachable)
                continue
            except RuntimeError as e:
                return Judgement("failed", error=self._redact(str(e)), attempts=attempt + 1)
            self._store(key, reply)
            return judgement_from_reply(reply, attempts=attempt + 1)
        return Judgement("failed", error=self._redact(f"gave up after {self.max_retries + 1} attempts: {error}"), attempts=self.max_retries + 1,
                         unreachable=unreachable)

    # many -------------------------------------------------------------------------------------
    def judge_many(self, items: list[tuple[str, list[dict]]], progress: bool = True) -> dict[str, Judgement]:
        """{item id: Judgement} for (id, messages) pairs. An item failing after its retries is counted and the run
        goes on; once an item fails because the endpoint cannot be reached, the items not yet sent are not sent."""
        from tqdm import tqdm

        out: dict[str, Judgement] = {}
        bar = tqdm(total=len(items), desc="judge", disable=not progress, leave=False)

        def one(item):
            if self.endpoint_down_:
                key = self.key(item[1])
                if key not in self._cache:  # what is cached is still read: only sending stops
                    return item[0], Judgement("failed", error=f"not sent: the endpoint {self.public_url_} cannot be reached", unreachable=True)
            j = self.ask(item[1])
            if j.unreachable:
                with self._lock:
                    self.endpoint_down_ = True
            return item[0], j

        with ThreadPoolExecutor(max_workers=self.workers) as pool:
            for qid, j in pool.map(one, items):
                out[qid] = j
                bar.update()
        bar.close()
        return out


def judgement_record(qid: str, j: Judgement) -> dict:
    return {"question_id": qid, **asdict(j)}
