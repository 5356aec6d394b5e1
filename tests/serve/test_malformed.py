"""The server under bad input and bad clients: 1,000 malformed requests, a full queue, clients
that walk away. Every refusal is a 4xx in OpenAI's error shape, and no slot is left held."""

from __future__ import annotations

import json
import random
import socket
import threading
import time

import pytest

from .conftest import scrape

httpx = pytest.importorskip("httpx")

GOOD = {"prompt": [1, 415, 2936], "max_tokens": 3, "temperature": 0}
NAN, INF = float("nan"), float("inf")
BIG = 10**30  # beyond int64
# field -> values of the wrong JSON type (strict: no "5" for 5, no 1 for true, no 1.0 for a count)
WRONG_TYPE = {
    "prompt": [5, 1.5, True, None, {"text": "a"}, [1.5], [True], [None], [[1, "a"]], [{"a": 1}], [1, [2]]],
    "max_tokens": ["5", 5.0, 1.5, True, [5], {"n": 5}],
    "temperature": ["0.5", True, [0.5], {}],
    "top_p": ["1", False, [1.0]],
    "top_k": [1.0, "3", True, [3]],
    "seed": [1.5, "7", True, [7], 1e3],
    "stop": [5, [1], [None], {"s": 1}, True, [["x"]]],
    "stream": [1, "true", None, []],
    "model": [5, True, ["tiny"]],
    "stream_options": [True, "x", [1]],
    "repetition_penalty": ["1", True],
    "user": [5, ["u"]],
    "n": [1.0, "1"],
    "echo": [1, "no"],
    "logit_bias": [[1], {"1": "x"}],
    "suffix": [5],
}
# field -> values of the right type but out of range (the message names the field and the limit)
OUT_OF_RANGE = {
    "max_tokens": [0, -1, -(2**63), 10**6, 2**63 - 1, 2**63, BIG],
    "temperature": [-0.1, -1e300, NAN, INF, -INF],
    "top_p": [0, 0.0, 1.5, -1, NAN, INF],
    "top_k": [-1, -(2**63), BIG],
    "seed": [-1, BIG],
    "repetition_penalty": [0, -1.0, NAN],
    "stop": ["", [""], ["a", ""]],
    "prompt": ["", [], [-1], [32000], [2**40], [[]], ["a", "b"], [[1], [2]], [""], "word " * 40],
    "n": [2, 0],
    "best_of": [3],
    "echo": [True],
    "logprobs": [1, 5],
    "presence_penalty": [0.5, NAN],
    "frequency_penalty": [-1.0],
    "logit_bias": [{"1": 5.0}],
    "suffix": ["x"],
}


def body_of(obj) -> bytes:
    return json.dumps(obj).encode()  # NaN, Infinity written as such (Python's json allows them)


def malformed(rng: random.Random):
    """(method, path, body, headers, statuses it may get, params the error may name: None = any)."""
    kind = rng.randrange(9)
    json_type = {"content-type": "application/json"}
    if kind == 0:
        field = rng.choice(list(WRONG_TYPE))
        value = rng.choice(WRONG_TYPE[field])
        extra = {"stream": True} if field == "stream_options" else {}
        return "POST", body_of({**GOOD, **extra, field: value}), json_type, {400}, {field}
    if kind == 1:
        field = rng.choice(list(OUT_OF_RANGE))
        value = rng.choice(OUT_OF_RANGE[field])
        names = {field, "max_tokens"} if field == "prompt" else {field}  # a long prompt: prompt + max_tokens > 24
        return "POST", body_of({**GOOD, field: value}), json_type, {400}, names
    if kind == 2:
        name = rng.choice(["foo", "max_new_tokens", "prompts", "tools", "Temperature", "greedy", "x" * 300])
        return "POST", body_of({**GOOD, name: rng.choice([1, "a", None])}), json_type, {400}, {name}
    if kind == 3:  # truncated body: a proper prefix of a JSON object is never valid JSON
        text = body_of({**GOOD, "stop": ["\n", "é"], "seed": rng.randrange(100)})
        return "POST", text[: rng.randrange(len(text))], json_type, {400}, {None}
    if kind == 4:
        bad = rng.choice([b"\xff\xfe{}", b"{'prompt': 'a'}", b'{"prompt": "a",}', b"NaN", b'{"prompt": "a"}}',
                          b'{"prompt": [1, 2,]}', b"\x00", "{\"prompt\": \"\udc80\"}".encode("utf-8", "surrogatepass")])
        return "POST", bad, json_type, {400}, {None}
    if kind == 5:
        return "POST", rng.choice([b"[]", b'"x"', b"1", b"null", b"true", b"[" + body_of(GOOD) + b"]"]), json_type, \
            {400}, {None}  # fmt: skip
    if kind == 6:
        kind_ = rng.choice(["text/plain", "application/x-www-form-urlencoded", "multipart/form-data", "text/json"])
        return "POST", body_of(GOOD), {"content-type": kind_}, {415}, {None}
    if kind == 7:
        return "POST", body_of({**GOOD, "model": rng.choice(["gpt-4", "", "tiny ", "TINY"])}), json_type, {404}, \
            {"model"}  # fmt: skip
    return "POST", body_of({**GOOD, "stream_options": {"include_usage": True}}), json_type, {400}, {"stream_options"}


def assert_openai_error(response, statuses, params) -> None:
    assert response.status_code in statuses, (response.status_code, response.text)
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"] and error["type"] == "invalid_request_error"
    assert error["param"] in params, (error, params)


def test_a_thousand_malformed_requests(served, oracle):
    rng = random.Random(0)
    [want] = oracle.generate([GOOD["prompt"]], max_new_tokens=3, greedy=True)
    with httpx.Client(base_url=served.url, timeout=30) as http:
        for n in range(1000):
            method, body, headers, statuses, params = malformed(rng)
            assert_openai_error(http.request(method, "/v1/completions", content=body, headers=headers), statuses,
                                params)  # fmt: skip
            if n % 100 == 99:  # and still serves
                good = http.post("/v1/completions", json=GOOD)
                assert good.status_code == 200 and good.json()["choices"][0]["token_ids"] == want.output_ids
        for path, method, status in (("/v1/nothing", "GET", 404), ("/v1/completions", "GET", 405),
                                     ("/v1/models/other", "GET", 404)):  # fmt: skip
            response = http.request(method, path)
            assert response.status_code == status and set(response.json()["error"]) == {"message", "type", "param",
                                                                                         "code"}  # fmt: skip
        too_big = http.post("/v1/completions", content=body_of({"prompt": "x" * (5 << 20)}))
        assert too_big.status_code == 413 and too_big.json()["error"]["code"] == "body_too_large"
    served.wait_idle()
    assert served.executor.free_slots() == served.executor.slots and served.executor.stats()["queue_depth"] == 0


def test_messages_name_the_field_and_limit(served):
    cases = {
        json.dumps({**GOOD, "top_p": 1.5}): ("top_p", "(0, 1]"),
        json.dumps({**GOOD, "max_tokens": 30}): ("max_tokens", "max_seq_len=24"),
        json.dumps({**GOOD, "max_tokens": -2}): ("max_tokens", ">= 1"),
        json.dumps({**GOOD, "temperature": NAN}): ("temperature", "finite"),
        json.dumps({**GOOD, "seed": BIG}): ("seed", "9223372036854775807"),
        json.dumps({**GOOD, "prompt": [32000]}): ("prompt", "[0, 32000)"),
        json.dumps({**GOOD, "max_tokens": "3"}): ("max_tokens", "integer"),
        json.dumps({**GOOD, "n": 2}): ("n", "n=1"),
    }
    for body, (param, limit) in cases.items():
        error = httpx.post(f"{served.url}/v1/completions", content=body, timeout=30).json()["error"]
        assert error["param"] == param and limit in error["message"], (body, error)


def test_bodies_cut_off_by_the_client(served):
    """A client that announces more body than it sends and hangs up gets nothing back, and the
    server goes on serving (truncation on the wire, not only in the JSON)."""
    host, port = served.url.removeprefix("http://").split(":")
    for n in range(10):
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            body = body_of(GOOD)
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n" % (len(body) + 50) + body[: n * 3])  # fmt: skip
    assert httpx.post(f"{served.url}/v1/completions", json=GOOD, timeout=30).status_code == 200
    served.wait_idle()
    assert served.executor.free_slots() == served.executor.slots


def _wait_for(what, predicate, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def test_full_queue_is_503(gated):
    """Two slots, a queue of one: with the executor held inside a step, the first request holds a
    slot, the second waits, the third is refused with 503; all answered once it moves again."""
    openai = pytest.importorskip("openai")
    backend, stats = gated.model.backend, gated.executor.stats
    backend.gate.clear()
    answers: list = []
    post = lambda: answers.append(httpx.post(f"{gated.url}/v1/completions", json=GOOD, timeout=60))  # noqa: E731
    first = threading.Thread(target=post)
    first.start()
    _wait_for("the first request to take a slot", lambda: stats()["running"] == 1)
    second = threading.Thread(target=post)
    second.start()
    _wait_for("the second request to queue", lambda: stats()["queue_depth"] == 1)
    full = httpx.post(f"{gated.url}/v1/completions", json=GOOD, timeout=30)
    assert full.status_code == 503 and full.headers["retry-after"] == "1"
    error = full.json()["error"]
    assert error["code"] == "queue_full" and error["type"] == "server_error" and "max_queue=1" in error["message"]
    api = openai.OpenAI(base_url=f"{gated.url}/v1", api_key="x", max_retries=0, timeout=30)
    with pytest.raises(openai.InternalServerError) as refused:
        api.completions.create(model="tiny", prompt=GOOD["prompt"], max_tokens=2)
    assert refused.value.status_code == 503
    backend.gate.set()
    first.join(60)
    second.join(60)
    assert [a.status_code for a in answers] == [200, 200]
    gated.wait_idle()
    assert gated.executor.free_slots() == 2


def _cancelled(url: str) -> float:
    return scrape(url).get("mixtral_requests_total{finish_reason=cancelled}", 0)


@pytest.mark.parametrize("stream", [True, False])
def test_client_that_walks_away_frees_its_slot(gated, stream):
    backend, executor = gated.model.backend, gated.executor
    backend.delay = 0.05  # 20 tokens: a second at least, far longer than the client stays
    body = {"prompt": GOOD["prompt"], "max_tokens": 20, "temperature": 0, "stream": stream}
    cancelled, made = _cancelled(gated.url), executor.generated_tokens
    try:
        if stream:
            with httpx.Client(timeout=30) as http, http.stream("POST", f"{gated.url}/v1/completions", json=body) as r:
                first = next(r.iter_lines())
                assert first.startswith("data: ")
        else:  # the whole request sent, then the connection dropped before the answer
            host, port = gated.url.removeprefix("http://").split(":")
            with socket.create_connection((host, int(port)), timeout=10) as sock:
                raw = body_of(body)
                sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                             b"Content-Length: %d\r\n\r\n" % len(raw) + raw)  # fmt: skip
                _wait_for("the request to take a slot", lambda: executor.generated_tokens > made)
        _wait_for("the slot to be freed", lambda: not executor.busy, timeout=5)
    finally:
        backend.delay = 0.0
    assert executor.free_slots() == 2
    assert executor.generated_tokens - made < 20  # cut short, not run to max_tokens
    _wait_for("the cancellation to be counted", lambda: _cancelled(gated.url) == cancelled + 1, timeout=5)


def test_backend_failure_is_500_or_an_error_event(gated):
    """A step that raises ends that request with a 500 in OpenAI's shape (in a stream, after the
    200 status line: an error event and no [DONE]); the slot is freed and the server goes on."""
    backend = gated.model.backend
    backend.fail = "device lost"
    try:
        answer = httpx.post(f"{gated.url}/v1/completions", json=GOOD, timeout=30)
        assert answer.status_code == 500
        error = answer.json()["error"]
        assert error["code"] == "generation_failed" and "device lost" in error["message"]
        with httpx.stream("POST", f"{gated.url}/v1/completions", json={**GOOD, "stream": True}, timeout=30) as r:
            events = [line for line in r.iter_lines() if line]
        assert len(events) == 1 and json.loads(events[0].removeprefix("data: "))["error"]["code"] == "generation_failed"
    finally:
        backend.fail = None
    gated.wait_idle()
    assert gated.executor.free_slots() == 2
    assert httpx.post(f"{gated.url}/v1/completions", json=GOOD, timeout=30).status_code == 200
