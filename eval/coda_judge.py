"""An LLM judge behind any OpenAI-compatible chat-completions endpoint (OpenAI, vLLM, llama.cpp server, ...).

- POST ``{url}/chat/completions`` (or ``url`` itself if it already ends so) with ``{"model", "messages",
  "temperature": 0}``; the key, if any, goes in an ``Authorization: Bearer`` header and nowhere else: it is
  redacted from every error text and reply and never written (the cache holds only hashes and replies).
- Transient failures (connection refused/reset, timeouts, HTTP 408/409/425/429/5xx, a body that is not a
  chat-completions reply) are retried with exponential backoff ``backoff * 2**attempt`` (capped); other HTTP
  errors (401, 404, ...) fail at once. After `max_consecutive_failures` items failed in a row the endpoint is
  taken as down: the remaining items are not sent and are reported as failed.
- Replies are cached in a JSONL file keyed by sha256(model + messages + temperature), so a re-run (or a run
  resumed after a crash) asks only what it has no reply for. Only real replies are cached, failures are not.
- `parse_rating` is strict: the reply must contain ``Rating: [[n]]`` with an integer n in 1..10; no rating, an
  out-of-range one or several different ones make the item "unparseable" (counted, never guessed).
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


def parse_rating(text: str) -> int | None:
    """n from ``Rating: [[n]]`` (1..10); None if absent, out of range or ambiguous."""
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


class _Transient(Exception):
    pass


class JudgeClient:
    """Parameters are plain values (scikit-learn style); `requests_`, `cache_hits_` count what a run did."""

    def __init__(self, url: str, model: str, api_key: str | None = None, timeout: float = 60.0, max_retries: int = 4,
                 backoff: float = 1.0, max_backoff: float = 30.0, cache_path=None, workers: int = 4, max_consecutive_failures: int = 3):
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
        self.max_consecutive_failures = max_consecutive_failures
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
            raise _Transient(f"{type(e).__name__} calling {_public(self.endpoint_)}: {getattr(e, 'reason', e)}") from None
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
            reply = self._cache[key]
            rating = parse_rating(reply)
            return Judgement("ok" if rating else "unparseable", rating, reply, cached=True)
        error = None
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(min(self.max_backoff, self.backoff * 2 ** (attempt - 1)))
            try:
                reply = self._redact(self._post(messages))  # a server echoing the header must not get the key written
            except _Transient as e:
                error = str(e)
                continue
            except RuntimeError as e:
                return Judgement("failed", error=self._redact(str(e)), attempts=attempt + 1)
            self._store(key, reply)
            rating = parse_rating(reply)
            return Judgement("ok" if rating else "unparseable", rating, reply, attempts=attempt + 1)
        return Judgement("failed", error=self._redact(f"gave up after {self.max_retries + 1} attempts: {error}"), attempts=self.max_retries + 1)

    # many -------------------------------------------------------------------------------------
    def judge_many(self, items: list[tuple[str, list[dict]]], progress: bool = True) -> dict[str, Judgement]:
        """{item id: Judgement} for (id, messages) pairs. Stops sending once the endpoint looks down."""
        from tqdm import tqdm

        out: dict[str, Judgement] = {}
        streak = [0]
        bar = tqdm(total=len(items), desc="judge", disable=not progress, leave=False)

        def one(item):
            if self.endpoint_down_:
                return item[0], Judgement("failed", error=f"not sent: the endpoint failed {self.max_consecutive_failures} items in a row")
            j = self.ask(item[1])
            if j.attempts:  # cache hits say nothing about the endpoint
                with self._lock:
                    streak[0] = streak[0] + 1 if j.status == "failed" else 0
                    if streak[0] >= self.max_consecutive_failures:
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
