"""LLM-judge reward against a stub OpenAI-compatible server on 127.0.0.1 (no network, no new dependencies)."""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from crossroute.core.errors import CrossrouteError
from crossroute.domains import judge
from crossroute.domains.judge import JudgeConfig, check_endpoint, judge_reward, parse_score

MAX_REQUESTS = 64  # the stub refuses (HTTP 500, flagged) beyond this: a runaway retry loop fails fast


@dataclass
class Stub:
    """Scripted replies: `script` is consumed first, then `default(request_json)` answers."""

    url: str = ""
    script: list[tuple[int, dict[str, str], str]] = field(default_factory=list)
    default: Callable[[dict[str, Any]], tuple[int, dict[str, str], str]] | None = None
    requests: list[dict[str, Any]] = field(default_factory=list)
    auth: list[str | None] = field(default_factory=list)
    delay: float = 0.0
    in_flight: int = 0
    max_in_flight: int = 0
    overflow: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)


def chat(content: str) -> tuple[int, dict[str, str], str]:
    body = {"id": "x", "object": "chat.completion",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}}]}
    return 200, {"Content-Type": "application/json"}, json.dumps(body)


def echo_score(req: dict[str, Any]) -> tuple[int, dict[str, str], str]:
    """Reply with the number after 'SCORE=' in the completion the judge was shown."""
    m = re.search(r"SCORE=(\S+)", req["messages"][-1]["content"])
    return chat(m.group(1) if m else "10")


@pytest.fixture
def stub() -> Iterator[Stub]:
    state = Stub(default=echo_score)

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:  # keep test output clean
            pass

        def do_POST(self) -> None:  # noqa: N802 (http.server API)
            req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with state.lock:
                state.requests.append(req)
                state.auth.append(self.headers.get("Authorization"))
                state.in_flight += 1
                state.max_in_flight = max(state.max_in_flight, state.in_flight)
                if len(state.requests) > MAX_REQUESTS:
                    state.overflow = True
                    status, headers, body = 500, {}, "too many requests to the stub"
                elif self.path != "/v1/chat/completions":
                    status, headers, body = 404, {}, "not found"
                elif state.script:
                    status, headers, body = state.script.pop(0)
                else:
                    assert state.default is not None
                    status, headers, body = state.default(req)
            time.sleep(state.delay)
            data = body.encode()
            with state.lock:  # answered from here on: the client may send its next request as soon as it reads this,
                state.in_flight -= 1  # before this thread runs again on a loaded machine
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
    assert not state.overflow, "stub got more requests than MAX_REQUESTS"


@pytest.fixture
def delays(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Record retry sleeps instead of waiting."""
    got: list[float] = []
    monkeypatch.setattr(judge, "_sleep", got.append)
    return got


def cfg(url: str, **kw: Any) -> JudgeConfig:
    return JudgeConfig(base_url=url, model="judge-model", timeout_s=5, backoff_s=0.001, **kw)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- the reward


def test_scores_mapped_to_unit_interval(stub: Stub) -> None:
    f = judge_reward(cfg(stub.url))
    out = f(["p1", "p2", "p3"], ["a SCORE=7", "b SCORE=10", "c SCORE=0"])
    assert out == [0.7, 1.0, 0.0]
    assert f.__name__ == "reward_judge"
    assert all(r.reason is None for r in f.last_results)
    req = stub.requests[0]
    assert req["model"] == "judge-model" and req["temperature"] == 0 and req["max_tokens"] == 64
    assert stub.auth == [None, None, None]


def test_chat_shaped_prompts_and_completions(stub: Stub) -> None:
    f = judge_reward(cfg(stub.url))
    out = f([[{"role": "user", "content": "Write a haiku"}]],
            [[{"role": "assistant", "content": "leaves fall SCORE=4"}]], answer=["x"], rubric=["{}"])
    assert out == [0.4]
    shown = stub.requests[0]["messages"][0]["content"]
    assert "Write a haiku" in shown and "leaves fall" in shown


def test_api_key_from_env(stub: Stub, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CROSSROUTE_TEST_JUDGE_KEY", "sk-test")
    judge_reward(cfg(stub.url, api_key_env="CROSSROUTE_TEST_JUDGE_KEY"))(["p"], ["SCORE=5"])
    assert stub.auth == ["Bearer sk-test"]


def test_missing_api_key_env_is_one_line_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CROSSROUTE_TEST_JUDGE_KEY", raising=False)
    with pytest.raises(CrossrouteError, match="CROSSROUTE_TEST_JUDGE_KEY, which is not set"):
        judge_reward(cfg("http://127.0.0.1:1/v1", api_key_env="CROSSROUTE_TEST_JUDGE_KEY"))


def test_retries_after_503(stub: Stub, delays: list[float]) -> None:
    stub.script = [(503, {}, "overloaded"), (503, {}, "overloaded")]
    assert judge_reward(cfg(stub.url))(["p"], ["SCORE=8"]) == [0.8]
    assert len(stub.requests) == 3
    assert len(delays) == 2 and delays[1] > delays[0] * 0.9  # exponential (with jitter in [0.5, 1])


def test_503_every_time_raises_after_retries(stub: Stub, delays: list[float]) -> None:
    stub.default = lambda req: (503, {}, "down")
    with pytest.raises(CrossrouteError) as ei:
        judge_reward(cfg(stub.url, retries=3))(["p"], ["c"])
    assert len(stub.requests) == 3
    assert str(ei.value) == (f"judge endpoint {stub.url} unreachable after 3 tries (HTTP 503); "
                             "start the server or set judge.base_url")


def test_429_honours_retry_after(stub: Stub, delays: list[float]) -> None:
    stub.script = [(429, {"Retry-After": "2"}, "slow down")]
    assert judge_reward(cfg(stub.url))(["p"], ["SCORE=6"]) == [0.6]
    assert delays == [2.0] and len(stub.requests) == 2


def test_429_retry_after_is_capped(stub: Stub, delays: list[float]) -> None:
    stub.script = [(429, {"Retry-After": "3600"}, ""), (429, {"Retry-After": "soon"}, "")]
    assert judge_reward(cfg(stub.url, retry_after_cap_s=5))(["p"], ["SCORE=6"]) == [0.6]
    assert delays[0] == 5.0 and delays[1] < 5.0  # unparsable Retry-After: normal backoff


def test_garbage_reply_gives_zero_with_reason(stub: Stub) -> None:
    stub.default = lambda req: chat("I would rather not grade this essay.")
    f = judge_reward(cfg(stub.url))
    assert f(["p", "q"], ["c", "d"]) == [0.0, 0.0]
    assert f.unscored == 2 and len(stub.requests) == 2  # no retry for a bad reply
    assert all("no 0-10 score" in r.reason for r in f.last_results)
    assert f.last_results[0].reply == "I would rather not grade this essay."


def test_non_openai_body_gives_zero_with_reason(stub: Stub) -> None:
    stub.default = lambda req: (200, {"Content-Type": "text/html"}, "<html>hello</html>")
    f = judge_reward(cfg(stub.url))
    assert f(["p"], ["c"]) == [0.0]
    assert "not an OpenAI chat completion" in f.last_results[0].reason


def test_400_not_retried_gives_zero(stub: Stub, delays: list[float]) -> None:
    stub.default = lambda req: (400, {}, "context length exceeded")
    f = judge_reward(cfg(stub.url))
    assert f(["p"], ["c"]) == [0.0]
    assert len(stub.requests) == 1 and delays == []
    assert "HTTP 400" in f.last_results[0].reason


def test_401_not_retried_raises(stub: Stub, delays: list[float]) -> None:
    stub.default = lambda req: (401, {}, "bad key")
    with pytest.raises(CrossrouteError, match=r"answered HTTP 401 \(bad key\); set judge.api_key_env"):
        judge_reward(cfg(stub.url))(["p"], ["c"])
    assert len(stub.requests) == 1 and delays == []


def test_connection_refused_one_line_error_quickly() -> None:
    url = f"http://127.0.0.1:{free_port()}/v1"
    t0 = time.monotonic()
    with pytest.raises(CrossrouteError) as ei:
        judge_reward(cfg(url, retries=3))(["p", "q"], ["c", "d"])
    assert time.monotonic() - t0 < 5
    assert str(ei.value) == (f"judge endpoint {url} unreachable after 3 tries (connection refused); "
                             "start the server or set judge.base_url")


def test_timeout_is_retried_then_reported(stub: Stub, delays: list[float]) -> None:
    stub.delay = 0.5
    with pytest.raises(CrossrouteError, match=r"unreachable after 2 tries \(timed out\)"):
        judge_reward(JudgeConfig(base_url=stub.url, model="m", timeout_s=0.1, retries=2,
                                 backoff_s=0.001))(["p"], ["c"])
    assert len(stub.requests) == 2


def test_concurrency_is_bounded(stub: Stub) -> None:
    stub.delay = 0.05
    out = judge_reward(cfg(stub.url, max_concurrency=2))(["p"] * 6, ["SCORE=3"] * 6)
    assert out == [0.3] * 6 and stub.max_in_flight <= 2


# ----------------------------------------------------------------------------- preflight and config


def test_check_endpoint(stub: Stub) -> None:
    assert check_endpoint(cfg(stub.url)) == "10"
    req = stub.requests[0]  # a real scoring request: the config's template, model and token budget
    assert req["max_tokens"] == 64 and req["model"] == "judge-model"
    assert req["messages"][-1]["content"].startswith("You are grading a piece of writing.")
    assert judge.PREFLIGHT_COMPLETION in req["messages"][-1]["content"]


@pytest.mark.parametrize("reply", ["banana", "", "I would rather not say.", "42"])
def test_check_endpoint_refuses_a_judge_that_gives_no_score(stub: Stub, reply: str) -> None:
    """A judge answering without a 0-10 score would train the stage on reward 0: refused before training."""
    stub.default = lambda req: chat(reply)
    with pytest.raises(CrossrouteError) as e:
        check_endpoint(cfg(stub.url))
    msg = str(e.value)
    assert f"judge endpoint {stub.url}/chat/completions (model judge-model)" in msg, msg
    assert f"no 0-10 score: {reply!r}" in msg and "judge.template" in msg, msg
    assert len(stub.requests) == 1  # a readable reply without a score is not retried


def test_check_endpoint_wrong_path(stub: Stub) -> None:
    with pytest.raises(CrossrouteError, match=r"HTTP 404.*judge.base_url"):
        check_endpoint(cfg(stub.url.removesuffix("/v1")))


def test_check_endpoint_not_openai(stub: Stub) -> None:
    stub.default = lambda req: (200, {}, "<html>a web page</html>")
    with pytest.raises(CrossrouteError, match="did not answer like an OpenAI-compatible"):
        check_endpoint(cfg(stub.url))


def test_check_endpoint_down() -> None:
    url = f"http://127.0.0.1:{free_port()}/v1"
    with pytest.raises(CrossrouteError, match="unreachable after 1 try"):
        check_endpoint(cfg(url, retries=1))


@pytest.mark.parametrize("bad", [{"base_url": "file:///etc/passwd"}, {"template": "no placeholders"},
                                 {"api_key_env": "sk-live-1234"}, {"retries": 0}])
def test_config_validation(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        JudgeConfig(**{"base_url": "http://127.0.0.1:8000/v1", "model": "m", **bad})


def test_template_braces_in_text_are_safe(stub: Stub) -> None:
    out = judge_reward(cfg(stub.url))(["{completion} {0}"], ['{"score": 1} SCORE=9'])
    assert out == [0.9]


# ----------------------------------------------------------------------------- the parser


@pytest.mark.parametrize(("text", "want"), [
    ("7", 0.7), ("8.5", 0.85), ('{"score": 6}', 0.6), ('```json\n{"score": "9"}\n```', 0.9),
    ("Score: 4/10", 0.4), ("On a scale of 0 to 10 I give it 7 out of 10.", 0.7),
    ("**Score**: 3", 0.3), ("10/10!", 1.0), ("The essay has 25 lines; I rate it 6", 0.6),
    ("no number here", None), ("", None), ("42", None), ("-3", None), ('{"score": NaN}', None),
    ('{"score": true}', None), ("v1.2.3", None),
])
def test_parse_score_examples(text: str, want: float | None) -> None:
    got = parse_score(text)
    assert got == pytest.approx(want) if want is not None else got is None


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(), st.text(alphabet="0123456789.-+eE{}\":score/ outf10naNI"),
                 st.builds(lambda x: json.dumps({"score": x}),
                           st.one_of(st.floats(allow_nan=True), st.integers(), st.text(), st.booleans())),
                 st.none(), st.integers()))
def test_parse_score_fuzz(text: Any) -> None:
    got = parse_score(text)
    assert got is None or (isinstance(got, float) and 0.0 <= got <= 1.0)
