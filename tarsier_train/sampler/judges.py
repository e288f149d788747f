"""Judges for the preference sampler: score a description against a clip's ground truth as event recall and
precision. `ToyWorldJudge` matches toy-world events exactly; `AutoDQJudge` is Tarsier's AutoDQ (an LLM
extracts events from both texts, then checks each side's events for entailment by the other text)."""

from __future__ import annotations

import dataclasses
import email.utils
import hashlib
import http.client
import ipaddress
import json
import logging
import os
import random
import re
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from tarsier_train.config.types import NonNegativeFloat, NonNegativeInt, PositiveFloat
from tarsier_train.data.record_check import extra_info
from tarsier_train.eval.benchmark_records import reference_text
from tarsier_train.eval.event_f1 import EventScore, reference_events, score_description
from tarsier_train.eval.judge_cache import JudgeCache, cache_key

log = logging.getLogger(__name__)


class ScoreLike(Protocol):
    @property
    def recall(self) -> float: ...

    @property
    def precision(self) -> float: ...


class Judge(Protocol):
    def score(self, prediction: str, record: dict[str, Any]) -> ScoreLike:
        """Recall and precision of `prediction` against the ground truth of `record` (a Tarsier-format record)."""
        ...


class ToyWorldJudge:
    """Exact event matching against the events a toy-world record carries in `extra_info.events`. `ordered`:
    events count only in the reference order, so a description that tells the right events in the wrong order
    (what the exchange and reverse corruptions provoke) scores lower instead of the same."""

    def __init__(self, ordered: bool = False):
        self.ordered = ordered

    def score(self, prediction: str, record: dict[str, Any]) -> EventScore:
        events = reference_events(record)
        if events is None:
            raise ValueError("ToyWorldJudge needs a toy-world record with extra_info.events; use AutoDQJudge for "
                             "records that only have a reference description")
        return score_description(prediction, events, ordered=self.ordered)

    def provenance(self) -> dict[str, Any]:
        return {"judge": "toy-world exact events", "ordered": self.ordered}


# ---- AutoDQ ---------------------------------------------------------------------------------------------------
# The prompts, in one place. Paraphrased from Tarsier's DREAM-1K evaluator (AutoDQ); both ask for JSON only.
EXTRACT_EVENTS_PROMPT = """Below is a description of a video clip.

Extract at most 10 key events from the description. Rules:
- An event is an action, motion or movement, never static information; do not repeat events.
- Write each event as one short sentence (at most 10 words) with a subject, a verb and optionally an object;
  leave out appearance details.
- Each event must be atomic: it cannot be split into smaller events.
- Scene cuts and camera motion are not events.
- Replace pronouns by the nouns they refer to.

Answer with JSON only, no other text: {{"events": ["event 1", "event 2", ...]}}

Description:
{description}"""

ENTAILMENT_PROMPT = """Below are a video description and a list of events. For each event, classify how the
description relates to it:
- "entailment": the description entails the event;
- "contradiction": some detail of the description contradicts the event;
- "neutral": neither.

Answer with JSON only, no other text, one entry per event in the same order:
{{"events": [{{"event": "the event", "relationship": "entailment|neutral|contradiction"}}, ...]}}

Description:
{description}

Events:
{events}"""

RELATIONSHIPS = ("entailment", "neutral", "contradiction")


def prompt_version() -> str:
    """A short hash of both prompt templates (read when asked, so an edited template is seen): part of every
    cached answer's key, and of the judge's provenance."""
    templates = json.dumps([EXTRACT_EVENTS_PROMPT, ENTAILMENT_PROMPT]).encode()
    return hashlib.sha256(templates).hexdigest()[:16]


class JudgeError(RuntimeError):
    """The judge cannot work at all (refused credentials, a wrong endpoint, a redirect or URL that would leak the
    key): every clip would fail the same way, so the run stops."""


class JudgeFailed(JudgeError):
    """The judge gave no usable answer for this clip in time (outage, rate limit, malformed answers): the sampler
    records the clip as failed and goes on; a rerun retries it."""


class _Retryable(Exception):
    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s  # the server's Retry-After, a floor for the next wait


# Client errors that say the configuration is wrong (credentials, endpoint, method), not this clip's request.
_FATAL_HTTP = frozenset({401, 403, 404, 405})
_MAX_REDIRECTS = 5


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """urllib would follow a 301/302/303 as a GET carrying the Authorization header to any host; redirects are
    handled by AutoDQJudge._post instead, which follows them only within the endpoint's own origin."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None  # urllib then raises the 3xx as an HTTPError


_OPENER = urllib.request.build_opener(_NoRedirects)


@dataclasses.dataclass(frozen=True)
class AutoDQScore:
    """AutoDQ's two ratios, with the events and verdicts behind them (for the pair's provenance)."""

    recall: float
    precision: float
    reference_events: tuple[str, ...]
    predicted_events: tuple[str, ...]
    recall_verdicts: tuple[str, ...]  # per reference event: entailed by the prediction?
    precision_verdicts: tuple[str, ...]  # per predicted event: entailed by the reference?


class AutoDQJudge:
    """AutoDQ against any OpenAI-compatible endpoint. `base_url` includes the API version, as the OpenAI client's
    does (`https://api.openai.com/v1`, `http://localhost:8000/v1` for vLLM); requests go to
    `{base_url}/chat/completions`. The key is read from the `api_key_env` variable at each request, never
    stored; without it no Authorization header is sent (local servers). The key goes only to the endpoint's own
    origin (redirects elsewhere are refused) and never over plain http to a host other than this machine.

    5xx, 429, timeouts, refused connections and malformed answers (non-JSON, `null` content, the wrong schema) are
    retried with exponential backoff and full jitter (a wait drawn from [0, backoff_s * 2^n], at most
    `max_backoff_s`, and never shorter than the server's `Retry-After`), up to `max_retries` times and within
    `deadline_s` for one question; then `JudgeFailed`. `sleep`, `clock` and `rng` are injectable for tests.

    `cache_dir`: every question and answer is kept there (`JudgeCache`), keyed by the model, the prompt templates'
    version, the sampling settings and the full prompt; an answer found there is reused without a request, so a
    rescore from a complete cache needs no endpoint and gives the same numbers. None: nothing on disk (the
    sampler's default). Thread-safe: one judge may score many records at once."""

    def __init__(self, base_url: str, model: str, api_key_env: str = "OPENAI_API_KEY",
                 timeout_s: PositiveFloat = 60.0, max_retries: NonNegativeInt = 8, backoff_s: NonNegativeFloat = 1.0,
                 max_backoff_s: NonNegativeFloat = 60.0, deadline_s: PositiveFloat = 600.0,
                 temperature: NonNegativeFloat = 0.0, cache_size: NonNegativeInt = 1024,
                 cache_dir: str | None = None, sleep: Callable[[float], None] = time.sleep,
                 clock: Callable[[], float] = time.monotonic, rng: random.Random | None = None) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"AutoDQJudge base_url must start with http:// or https://, got {base_url!r}")
        if max_retries < 0 or timeout_s <= 0 or deadline_s <= 0:
            raise ValueError(f"AutoDQJudge needs max_retries >= 0, timeout_s > 0 and deadline_s > 0, got "
                             f"{max_retries}, {timeout_s}, {deadline_s}")
        self.base_url, self.model, self.api_key_env = base_url.rstrip("/"), model, api_key_env
        self.timeout_s, self.max_retries, self.deadline_s = timeout_s, max_retries, deadline_s
        self.backoff_s, self.max_backoff_s = backoff_s, max_backoff_s
        self.temperature, self.cache_size = temperature, cache_size
        self._sleep, self._clock, self._rng = sleep, clock, rng or random.Random()
        self._reference_cache: dict[str, tuple[str, ...]] = {}  # each reference is judged twice (chosen, rejected)
        self._answers = JudgeCache(cache_dir) if cache_dir is not None else None
        self._served_by: set[str] = set()  # the model ids the endpoint reported for the answers used
        self._lock = threading.Lock()  # for the two sets above and the jitter's rng, shared by scoring threads
        self._headers(self.base_url)  # a key that would go over plain http fails here, before any compute

    def __repr__(self) -> str:
        return f"AutoDQJudge(base_url={self.base_url!r}, model={self.model!r}, api_key_env={self.api_key_env!r})"

    def provenance(self) -> dict[str, Any]:
        """What produced the scores (JSON-able, no secret): the model asked for and the ids the endpoint reported
        for the answers used, the prompts' version, the sampling settings, where the answers are kept."""
        with self._lock:
            served_by = sorted(self._served_by)
        return {"judge": "AutoDQ", "model": self.model, "endpoint_models": served_by,
                "prompt_version": prompt_version(), "sampling": self._sampling(),
                "cache": str(self._answers.path) if self._answers is not None else None,
                "base_url": _without_credentials(self.base_url)}

    def score(self, prediction: str, record: dict[str, Any]) -> AutoDQScore:
        reference = reference_text(record)  # a benchmark record's is beside the blank answer, in "reference"
        ref_events = self._reference_events(reference, record)
        pred_events = tuple(self.extract_events(prediction))
        recall_verdicts = tuple(self.entailment(prediction, ref_events))
        precision_verdicts = tuple(self.entailment(reference, pred_events))
        return AutoDQScore(_entailed_share(recall_verdicts), _entailed_share(precision_verdicts),
                           ref_events, pred_events, recall_verdicts, precision_verdicts)

    def extract_events(self, description: str) -> list[str]:
        return self._ask_json(EXTRACT_EVENTS_PROMPT.format(description=description), validate=_event_list)

    def entailment(self, description: str, events: Sequence[str]) -> list[str]:
        """One of RELATIONSHIPS per event: how `description` relates to it. No events: no request."""
        if not events:
            return []
        prompt = ENTAILMENT_PROMPT.format(description=description, events=json.dumps(list(events)))
        return self._ask_json(prompt, validate=lambda answer: _verdicts(answer, len(events)))

    def _reference_events(self, reference: str, record: dict[str, Any]) -> tuple[str, ...]:
        given = extra_info(record).get("events")
        if isinstance(given, list):  # Tarsier's evaluator uses annotated events when a record has a list (even [])
            return tuple(e if isinstance(e, str) else e["text"] for e in given)
        with self._lock:
            known = self._reference_cache.get(reference)
        if known is not None:
            return known
        events = tuple(self.extract_events(reference))
        with self._lock:
            if reference not in self._reference_cache and len(self._reference_cache) >= self.cache_size:
                self._reference_cache.pop(next(iter(self._reference_cache)))
            return self._reference_cache.setdefault(reference, events)

    def _sampling(self) -> dict[str, Any]:
        return {"temperature": self.temperature}  # everything the request body sets besides model and prompt

    def _ask_json(self, prompt: str, validate: Callable[[Any], Any]) -> Any:
        """The validated JSON answer to one question: from the cache when it holds one, else asked."""
        if self._answers is None:
            return self._use(self._ask(prompt, validate), validate)
        key = cache_key(self.model, prompt_version(), self._sampling(), prompt)
        entry = self._answers.get(key)
        if entry is None:
            asked = self._ask(prompt, validate)  # another thread asking the same prompt may store its answer first
            entry = self._answers.put(key, {"model": self.model, "prompt_version": prompt_version(),
                                            "sampling": self._sampling(), "prompt": prompt, **asked})
        return self._use(entry, validate)

    def _ask(self, prompt: str, validate: Callable[[Any], Any]) -> dict[str, Any]:
        """Send one chat request; retry on transient failures and unusable answers. {answer, endpoint_model}."""
        url = f"{self.base_url}/chat/completions"
        give_up_at = self._clock() + self.deadline_s
        for attempt in range(self.max_retries + 1):
            try:
                answer, served_by = self._post(url, prompt, give_up_at)
                validate(_parse_json_answer(answer))
                return {"answer": answer, "endpoint_model": served_by}
            except _Retryable as error:
                log.warning("AutoDQ judge %s: attempt %d/%d failed: %s", url, attempt + 1, self.max_retries + 1, error)
                wait = self._backoff(attempt, error.retry_after_s)
                if attempt == self.max_retries or self._clock() + wait >= give_up_at:
                    raise JudgeFailed(f"AutoDQ judge at {self.base_url} failed after {attempt + 1} attempts "
                                      f"(max_retries={self.max_retries}, deadline_s={self.deadline_s}): {error}") from None
                self._sleep(wait)
        raise AssertionError("unreachable: the last attempt returns or raises")

    def _use(self, entry: dict[str, Any], validate: Callable[[Any], Any]) -> Any:
        """An answer's validated JSON, noting who served it. A cached answer that no longer validates (a changed
        parser) fails the question rather than being guessed at."""
        self._note_served_by(entry.get("endpoint_model"))
        try:
            return validate(_parse_json_answer(entry["answer"]))
        except _Retryable as error:
            raise JudgeFailed(f"AutoDQ judge: an answer cached under {self._answers.path if self._answers else '-'} "
                              f"is unusable ({error}); delete that cache to ask again") from None

    def _note_served_by(self, served_by: str | None) -> None:
        if served_by is not None:
            with self._lock:
                self._served_by.add(served_by)

    def _backoff(self, attempt: int, retry_after_s: float | None) -> float:
        """Full jitter (clients that failed together do not retry together), at least what the server asked."""
        with self._lock:
            jittered = self._rng.uniform(0.0, min(self.max_backoff_s, self.backoff_s * 2 ** attempt))
        return max(jittered, retry_after_s or 0.0)

    def _headers(self, url: str) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.api_key_env)
        if key:
            if not _may_carry_key(url):
                raise JudgeError(f"AutoDQ judge at {url}: refusing to send ${self.api_key_env} over plain http to a "
                                 "host other than this machine; use https, or unset the key for a keyless server")
            headers["Authorization"] = f"Bearer {key}"
        return headers

    def _post(self, url: str, prompt: str, give_up_at: float) -> tuple[str, str | None]:
        """(the answer's text, the model id the endpoint reported serving it with)."""
        body = json.dumps({"model": self.model, "temperature": self.temperature,
                           "messages": [{"role": "user", "content": prompt}]}).encode()
        for _ in range(_MAX_REDIRECTS + 1):
            request = urllib.request.Request(url, data=body, headers=self._headers(url), method="POST")
            timeout = max(0.001, min(self.timeout_s, give_up_at - self._clock()))  # the deadline bounds a hung call
            try:
                with _OPENER.open(request, timeout=timeout) as response:
                    return _completion(response.read(), url)
            except urllib.error.HTTPError as error:
                if 300 <= error.code < 400:
                    url = self._redirect_target(url, error)
                    continue
                raise self._http_failure(url, error) from None
            except (urllib.error.URLError, http.client.HTTPException, TimeoutError, ConnectionError) as error:
                raise _Retryable(f"cannot reach {url}: {getattr(error, 'reason', error)}") from None
        raise JudgeError(f"AutoDQ judge at {self.base_url}: more than {_MAX_REDIRECTS} redirects")

    def _redirect_target(self, url: str, error: urllib.error.HTTPError) -> str:
        """Where a redirect points, if it stays on the endpoint's origin (scheme, host, port): the key may go
        there. Anywhere else the key must not follow, and the endpoint is misconfigured: stop."""
        target = urllib.parse.urljoin(url, error.headers.get("Location", ""))
        if _origin(target) != _origin(url):
            raise JudgeError(f"AutoDQ judge at {self.base_url}: HTTP {error.code} redirects to another origin "
                             f"({_origin(target)}); not followed, so the API key is not sent there. Set base_url to "
                             "the final endpoint")
        return target

    def _http_failure(self, url: str, error: urllib.error.HTTPError) -> Exception:
        detail = f"HTTP {error.code} from {url}: {error.read()[:200]!r}"
        if error.code >= 500 or error.code == 429:
            return _Retryable(detail, _retry_after_s(error.headers.get("Retry-After")))
        if error.code in _FATAL_HTTP:
            return JudgeError(f"AutoDQ judge at {self.base_url}: {detail}")
        return JudgeFailed(f"AutoDQ judge at {self.base_url}: {detail}")  # e.g. 400: this request, not the setup


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urllib.parse.urlsplit(url)
    return parts.scheme.lower(), (parts.hostname or "").lower(), parts.port or {"http": 80, "https": 443}.get(parts.scheme)


def _may_carry_key(url: str) -> bool:
    """https anywhere; plain http only to this machine (loopback), where nobody on the network can read it."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "https":
        return True
    host = (parts.hostname or "").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _retry_after_s(value: str | None) -> float | None:
    """Retry-After as seconds from now: delta-seconds or an HTTP date; None when absent or unreadable."""
    if not value:
        return None
    if value.strip().isdigit():
        return float(value.strip())
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _without_credentials(url: str) -> str:
    """`url` without user:password@ and without a query (where some gateways take a key)."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    netloc = (f"[{host}]" if ":" in host else host) + (f":{parts.port}" if parts.port else "")
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def _completion(raw: bytes, url: str) -> tuple[str, str | None]:
    """choices[0].message.content of a chat completion, with its "model" (the id the endpoint served it with);
    anything else (non-JSON, `null` content) is malformed."""
    try:
        completion = json.loads(raw)
        content = completion["choices"][0]["message"]["content"]
    except json.JSONDecodeError as error:
        raise _Retryable(f"{url} answered non-JSON: {error}") from None
    except (KeyError, IndexError, TypeError):
        raise _Retryable(f"{url} answered without choices[0].message.content: {raw[:200]!r}") from None
    if not isinstance(content, str):
        raise _Retryable(f"{url} answered content {content!r:.100} instead of text")
    served_by = completion.get("model")
    return content, served_by if isinstance(served_by, str) else None


def _parse_json_answer(content: str) -> Any:
    """The JSON object in a model's answer, tolerating ```json fences and text around it."""
    match = re.search(r"\{.*\}", content, flags=re.DOTALL)
    try:
        return json.loads(match.group(0) if match else content)
    except json.JSONDecodeError:
        raise _Retryable(f"answer is not JSON: {content!r:.200}") from None


def _event_list(answer: Any) -> list[str]:
    events = answer.get("events") if isinstance(answer, dict) else None
    if not isinstance(events, list) or not all(isinstance(e, str) for e in events):
        raise _Retryable(f"expected {{'events': [str, ...]}}, got {answer!r:.200}")
    return events


def _verdicts(answer: Any, num_events: int) -> list[str]:
    entries = answer.get("events") if isinstance(answer, dict) else None
    if not isinstance(entries, list) or len(entries) != num_events:
        raise _Retryable(f"expected {num_events} verdicts, got {answer!r:.200}")
    verdicts = [str(e.get("relationship", "")).strip().lower() if isinstance(e, dict) else "" for e in entries]
    if any(v not in RELATIONSHIPS for v in verdicts):
        raise _Retryable(f"verdicts must be one of {RELATIONSHIPS}, got {verdicts}")
    return verdicts


def _entailed_share(verdicts: Sequence[str]) -> float:
    """Share of events judged "entailment" (neutral counts as a miss on both sides, as in Tarsier's evaluator);
    no events scores 1.0, as there."""
    return sum(v == "entailment" for v in verdicts) / len(verdicts) if verdicts else 1.0
