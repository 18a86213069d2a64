"""LLM-judge reward for writing domains: any OpenAI-compatible chat endpoint, standard library only.

`judge_reward(config)` returns a TRL-shaped reward `f(prompts, completions, **kw) -> list[float]`
that asks the judge model to score each completion 0-10 and maps the score to [0, 1]. Transient
failures (connection errors, timeouts, HTTP 429 and 5xx) are retried with exponential backoff and
jitter (honouring a capped Retry-After); an endpoint still down after every try raises one
CrossrouteError line naming the URL and the fix. A reply with no readable score gives 0.0 and its
reason is recorded in `f.last_results` (never an exception). `check_endpoint(config)` is the
preflight to run before training starts: it sends one real scoring request and requires a readable score.

The API key is never stored in the config: `api_key_env` names the environment variable holding it.
"""

from __future__ import annotations

import email.utils
import http.client
import json
import logging
import math
import os
import random
import re
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from crossroute.core.errors import CrossrouteError

log = logging.getLogger(__name__)

DEFAULT_TEMPLATE = (
    "You are grading a piece of writing.\n\n"
    "Task given to the writer:\n{prompt}\n\n"
    "The writer's response:\n{completion}\n\n"
    "Rate how well the response fulfils the task on a scale from 0 (useless) to 10 (excellent). "
    'Reply with only the number, or with JSON {"score": <0-10>}.'
)
CONFIG_ERRORS = (401, 403, 404)  # 4xx meaning the judge config is wrong: raise, never retried
MAX_BACKOFF_S = 30.0  # cap on one exponential-backoff sleep
_sleep = time.sleep  # indirection so tests can record the delays without waiting


class JudgeConfig(BaseModel):
    """Where and how to ask the judge; `retries` is the total number of tries per request (>= 1)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    base_url: str = Field(description="OpenAI-compatible API root, e.g. http://127.0.0.1:8000/v1")
    model: str = Field(min_length=1)
    api_key_env: str | None = Field(None, description="name of the env var holding the API key")
    timeout_s: float = Field(30.0, gt=0)
    retries: int = Field(3, ge=1, description="tries per request, the first included")
    backoff_s: float = Field(1.0, ge=0, description="first retry delay; doubles per try, jittered")
    retry_after_cap_s: float = Field(60.0, ge=0, description="longest Retry-After honoured")
    max_concurrency: int = Field(4, ge=1)
    max_tokens: int = Field(64, ge=1)
    template: str = DEFAULT_TEMPLATE

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, v: str) -> str:
        v = v.strip().rstrip("/")
        if not re.match(r"^https?://[^/\s]+", v):
            raise ValueError(f"{v!r} is not an http(s) URL; use e.g. http://127.0.0.1:8000/v1")
        return v

    @field_validator("template")
    @classmethod
    def _placeholders(cls, v: str) -> str:
        for p in ("{prompt}", "{completion}"):
            if p not in v:
                raise ValueError(f"the rubric template must contain the placeholder {p}")
        return v

    @field_validator("api_key_env")
    @classmethod
    def _env_name(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", v):
            raise ValueError("api_key_env is the NAME of an environment variable (e.g. "
                             "JUDGE_API_KEY), not the key itself")
        return v

    @property
    def url(self) -> str:
        return f"{self.base_url}/chat/completions"


@dataclass
class JudgeResult:
    """One judged completion: the reward in [0, 1], the judge's reply and, if 0 by failure, why."""

    reward: float
    reply: str | None
    reason: str | None = None


# ----------------------------------------------------------------------------- score parsing

_NUM = r"[-+]?\d+(?:\.\d+)?"
_PATTERNS = (
    re.compile(rf"\bscore\b\W{{0,5}}({_NUM})", re.IGNORECASE),  # "score: 7", "**Score**: 7"
    re.compile(rf"({_NUM})\s*(?:/|out\s+of)\s*10\b", re.IGNORECASE),  # "7/10", "7 out of 10"
)
_FIRST = re.compile(rf"(?<![\w.]){_NUM}(?![\w.]|\.\d)")


def _in_range(x: Any) -> float | None:
    if isinstance(x, bool):
        return None
    if isinstance(x, str):
        try:
            x = float(x.strip())
        except ValueError:
            return None
    if not isinstance(x, int | float):
        return None
    x = float(x)
    return x / 10.0 if math.isfinite(x) and 0.0 <= x <= 10.0 else None


def _json_score(text: str) -> float | None:
    for m in re.finditer(r"\{[^{}]*\}", text):
        try:
            obj = json.loads(m.group(0))
        except ValueError:
            continue
        if isinstance(obj, dict):
            for key, val in obj.items():
                if isinstance(key, str) and key.lower() in ("score", "rating"):
                    return _in_range(val)
    return None


def parse_score(text: Any) -> float | None:
    """A 0-10 score in a judge reply mapped to [0, 1]; None when the reply holds no such score.

    Tried in order: JSON {"score": x}; "score: x"; "x/10" or "x out of 10"; the first standalone
    number in the text that lies in 0-10. Never raises."""
    if not isinstance(text, str) or not text.strip():
        return None
    try:
        text = text[:20_000]
        got = _json_score(text)
        if got is not None:
            return got
        for pat in _PATTERNS:
            for m in pat.finditer(text):
                got = _in_range(m.group(1))
                if got is not None:
                    return got
        for m in _FIRST.finditer(text):
            got = _in_range(m.group(0))
            if got is not None:
                return got
    except (ValueError, OverflowError, RecursionError):
        return None
    return None


# ----------------------------------------------------------------------------- HTTP


class _Retryable(Exception):
    """A transient failure: `why` for the final error line, `wait` a server-requested delay."""

    def __init__(self, why: str, wait: float | None = None) -> None:
        super().__init__(why)
        self.why, self.wait = why, wait


class _Rejected(Exception):
    """A 4xx other than 429: not retried; a config error (401/403/404) or a per-request refusal."""

    def __init__(self, code: int, detail: str) -> None:
        super().__init__(f"HTTP {code}")
        self.code, self.detail = code, detail

    def error(self, config: JudgeConfig) -> CrossrouteError:
        fix = {401: "set judge.api_key_env to the variable holding a valid key",
               403: "set judge.api_key_env to the variable holding a valid key",
               404: "check judge.base_url (it should end in /v1) and judge.model"}.get(
            self.code, "check judge.model, judge.max_tokens and the rubric template")
        return CrossrouteError(f"judge endpoint {config.url} answered HTTP {self.code}"
                               + (f" ({self.detail})" if self.detail else "") + f"; {fix}")


def _api_key(config: JudgeConfig) -> str | None:
    if config.api_key_env is None:
        return None
    key = os.environ.get(config.api_key_env)
    if not key:
        raise CrossrouteError(f"judge.api_key_env names the environment variable "
                              f"{config.api_key_env}, which is not set; export it with the judge "
                              "endpoint's API key")
    return key


def _retry_after(value: str | None, cap: float) -> float | None:
    if not value:
        return None
    try:
        secs = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when is None:
            return None
        secs = when.timestamp() - time.time()
    if not math.isfinite(secs):
        return None
    return min(max(secs, 0.0), cap)


def _reason(exc: BaseException) -> str:
    r = getattr(exc, "reason", exc)
    if isinstance(r, ConnectionRefusedError):
        return "connection refused"
    if isinstance(r, TimeoutError | socket.timeout):
        return "timed out"
    if isinstance(r, socket.gaierror):
        return "host name not resolved"
    text = str(getattr(r, "strerror", None) or r) or type(r).__name__
    return " ".join(text.split())[:200]


def _post_once(config: JudgeConfig, payload: bytes, key: str | None) -> dict[str, Any]:
    """One POST; returns the decoded JSON body. Raises _Retryable (transient) or _Rejected (4xx)."""
    headers = {"Content-Type": "application/json", "Accept": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    req = urllib.request.Request(config.url, data=payload, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=config.timeout_s) as resp:  # noqa: S310 (http(s) only)
            body = resp.read()
    except urllib.error.HTTPError as e:
        code = e.code
        try:
            detail = " ".join(e.read(300).decode("utf-8", "replace").split()) if e.fp else ""
        except (OSError, http.client.HTTPException):
            detail = ""
        finally:
            e.close()
        if code == 429 or code >= 500:
            wait = _retry_after(e.headers.get("Retry-After") if e.headers else None,
                                config.retry_after_cap_s)
            raise _Retryable(f"HTTP {code}" + (" rate-limited" if code == 429 else ""), wait) from None
        raise _Rejected(code, detail[:120]) from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as e:  # refused, reset, DNS, timeout
        raise _Retryable(_reason(e)) from None
    try:
        out = json.loads(body)
    except ValueError:
        return {"_raw": body[:300].decode("utf-8", "replace")}
    return out if isinstance(out, dict) else {"_raw": str(out)[:300]}


def _post(config: JudgeConfig, messages: list[dict[str, str]], key: str | None,
          max_tokens: int | None = None) -> dict[str, Any]:
    """POST with retries; CrossrouteError naming the URL once every try has failed.

    A 4xx other than 429 is raised at once as _Rejected (never retried)."""
    payload = json.dumps({"model": config.model, "messages": messages, "temperature": 0,
                          "max_tokens": max_tokens or config.max_tokens}).encode()
    last = "no response"
    for attempt in range(config.retries):
        try:
            return _post_once(config, payload, key)
        except _Retryable as e:
            last = e.why
            if attempt + 1 == config.retries:
                break
            delay = e.wait if e.wait is not None else min(
                MAX_BACKOFF_S, config.backoff_s * 2 ** attempt * random.uniform(0.5, 1.0))
            log.debug("judge %s: %s; retry %d in %.2fs", config.url, e.why, attempt + 1, delay)
            _sleep(delay)
    tries = "try" if config.retries == 1 else "tries"
    raise CrossrouteError(f"judge endpoint {config.base_url} unreachable after {config.retries} "
                          f"{tries} ({last}); start the server or set judge.base_url")


def _reply_text(body: dict[str, Any]) -> str | None:
    try:
        content = body["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        return None
    if isinstance(content, list):  # content parts
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return content if isinstance(content, str) else None


def _text(x: Any) -> str:
    """A prompt/completion as TRL passes it: a string or a list of chat messages (last one)."""
    if isinstance(x, str):
        return x
    if isinstance(x, list) and x and isinstance(x[-1], dict):
        return str(x[-1].get("content", ""))
    return str(x)


# ----------------------------------------------------------------------------- public API


def judge_one(config: JudgeConfig, prompt: Any, completion: Any, key: str | None = None) -> JudgeResult:
    """Ask the judge about one completion (retries inside); 0.0 with a reason when unscorable."""
    text = config.template.replace("{prompt}", _text(prompt)).replace("{completion}", _text(completion))
    try:
        body = _post(config, [{"role": "user", "content": text}], key)
    except _Rejected as e:
        if e.code in CONFIG_ERRORS:
            raise e.error(config) from None
        return JudgeResult(0.0, None, f"judge refused the request: HTTP {e.code} {e.detail}".strip())
    reply = _reply_text(body)
    if reply is None:
        raw = body.get("_raw") or json.dumps(body)[:200]
        return JudgeResult(0.0, None, f"response is not an OpenAI chat completion: {raw[:200]!r}")
    score = parse_score(reply)
    if score is None:
        return JudgeResult(0.0, reply, f"no 0-10 score in the judge's reply: {reply[:200]!r}")
    return JudgeResult(score, reply)


def judge_reward(config: JudgeConfig, name: str = "judge") -> Callable[..., list[float]]:
    """A TRL reward function scoring completions with the judge, each in [0, 1].

    The returned function keeps the per-completion outcomes of its latest call in `.last_results`
    (JudgeResult: reward, reply, reason) and counts unscorable replies in `.unscored`."""
    key = _api_key(config)

    def reward(prompts: list[Any], completions: list[Any], **kwargs: Any) -> list[float]:
        pairs = list(zip(prompts, completions, strict=True))
        with ThreadPoolExecutor(max_workers=min(config.max_concurrency, max(1, len(pairs)))) as ex:
            futures = [ex.submit(judge_one, config, p, c, key) for p, c in pairs]
            try:
                results = [f.result() for f in futures]
            except BaseException:
                for f in futures:
                    f.cancel()
                raise
        bad = [r for r in results if r.reason is not None]
        if bad:
            reward.unscored += len(bad)  # type: ignore[attr-defined]
            log.warning("judge: %d of %d completions unscored (reward 0.0); first: %s",
                        len(bad), len(results), bad[0].reason)
        reward.last_results = results  # type: ignore[attr-defined]
        return [r.reward for r in results]

    reward.__name__ = f"reward_{re.sub(r'[^a-zA-Z0-9_]', '_', name)}"
    reward.config = config  # type: ignore[attr-defined]
    reward.last_results = []  # type: ignore[attr-defined]
    reward.unscored = 0  # type: ignore[attr-defined]
    return reward


# The preflight's scoring request: a real one, through the config's own template and max_tokens.
PREFLIGHT_PROMPT = "Write one sentence about the sea."
PREFLIGHT_COMPLETION = "The sea is wide and grey, and the waves roll in all day."


def check_endpoint(config: JudgeConfig) -> str:
    """Preflight before training: the judge answers a real scoring request (the config's template, model and
    max_tokens) with a readable 0-10 score, so a judge that cannot score fails here instead of training on
    reward 0. Returns the judge's reply; raises CrossrouteError (one line naming the endpoint) otherwise."""
    key = _api_key(config)
    text = config.template.replace("{prompt}", PREFLIGHT_PROMPT).replace("{completion}", PREFLIGHT_COMPLETION)
    try:
        body = _post(config, [{"role": "user", "content": text}], key)
    except _Rejected as e:
        raise e.error(config) from None
    reply = _reply_text(body)
    if reply is None:
        raw = body.get("_raw") or json.dumps(body)[:120]
        raise CrossrouteError(f"judge endpoint {config.url} did not answer like an OpenAI-"
                              f"compatible chat completion ({raw[:120]!r}); check judge.base_url "
                              "(it should end in /v1)")
    if parse_score(reply) is None:
        raise CrossrouteError(f"judge endpoint {config.url} (model {config.model}) answered a test scoring request "
                              f"with no 0-10 score: {' '.join(reply.split())[:120]!r}; check judge.model, "
                              "judge.max_tokens and judge.template (it must ask for a score from 0 to 10)")
    return reply
