"""`mixtral-build serve` through real clients: the `openai` package, plain httpx, and the command
itself in a subprocess. The oracle for every token is a separate model's lone ``generate``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from .conftest import NAME, scrape

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

PROMPTS = ["The capital of France is", [1, 415, 2936, 9060], "Hello", [1, 22557, 1526, 13, 28705]]


def client(served):
    return openai.OpenAI(base_url=f"{served.url}/v1", api_key="x", max_retries=0, timeout=60)


def alone(oracle, prompt, **sampling):
    [result] = oracle.generate([prompt], **sampling)
    return result


def test_openai_completions_equal_generate(served, oracle):
    api = client(served)
    for prompt in PROMPTS:
        want = alone(oracle, prompt, max_new_tokens=8, greedy=True)
        got = api.completions.create(model=NAME, prompt=prompt, max_tokens=8, temperature=0)
        [choice] = got.choices
        assert choice.token_ids == want.output_ids
        assert choice.text == want.text and choice.finish_reason == "length"
        assert (got.usage.prompt_tokens, got.usage.completion_tokens) == (len(want.prompt_ids), 8)
        assert got.usage.total_tokens == len(want.prompt_ids) + 8
    sampled = dict(temperature=0.9, top_p=0.95, seed=11)
    for seed in (11, 12):
        want = alone(oracle, PROMPTS[0], max_new_tokens=10, top_k=50, **{**sampled, "seed": seed})
        got = api.completions.create(model=NAME, prompt=PROMPTS[0], max_tokens=10, extra_body={"top_k": 50},
                                     **{**sampled, "seed": seed})  # fmt: skip
        assert got.choices[0].token_ids == want.output_ids and got.choices[0].text == want.text


def test_openai_stop_string_and_list_prompt(served, oracle):
    full = alone(oracle, PROMPTS[0], max_new_tokens=12, greedy=True).text
    stop = full[len(full) // 2 : len(full) // 2 + 3]  # a piece of what it would write: generation ends there
    want = alone(oracle, PROMPTS[0], max_new_tokens=12, greedy=True, stop=[stop])
    assert want.finish_reason == "stop"
    got = client(served).completions.create(model=NAME, prompt=[PROMPTS[0]], max_tokens=12, temperature=0, stop=stop)
    assert got.choices[0].text == want.text and got.choices[0].finish_reason == "stop"
    assert stop not in got.choices[0].text


def test_openai_streaming_equals_generate(served, oracle):
    for prompt, sampling in ((PROMPTS[0], {"temperature": 0}), (PROMPTS[1], {"temperature": 0.8, "seed": 5})):
        want = alone(oracle, prompt, max_new_tokens=9, **({"greedy": True} if sampling == {"temperature": 0} else
                                                           sampling))  # fmt: skip
        chunks = list(client(served).completions.create(model=NAME, prompt=prompt, max_tokens=9, stream=True,
                                                        stream_options={"include_usage": True}, **sampling))  # fmt: skip
        texts = [c.choices[0].text for c in chunks if c.choices]
        ids = [i for c in chunks if c.choices for i in c.choices[0].token_ids]
        assert ids == want.output_ids and "".join(texts) == want.text
        assert len(texts) == 9 + 1  # a chunk per token, then the one with the finish reason
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 9


def test_concurrent_requests_each_equal_generate(served, oracle):
    """More clients than slots (2): every one still gets its lone result, and the decode steps
    ran several slots at once."""
    jobs = [(PROMPTS[n % 4], {"temperature": 0} if n % 2 else {"temperature": 0.7, "seed": n}) for n in range(8)]

    def one(job):
        prompt, sampling = job
        body = {"prompt": prompt, "max_tokens": 10, **sampling}
        return httpx.post(f"{served.url}/v1/completions", json=body, timeout=60).json()

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(one, jobs))
    for (prompt, sampling), answer in zip(jobs, answers):
        options = {"greedy": True} if "seed" not in sampling else sampling
        assert answer["choices"][0]["token_ids"] == alone(oracle, prompt, max_new_tokens=10, **options).output_ids
    served.wait_idle()
    assert served.executor.free_slots() == served.executor.slots


def test_plain_http_endpoints_and_metrics(served, oracle):
    with httpx.Client(base_url=served.url, timeout=30) as http:
        assert http.get("/health").json() == {"status": "ok"}
        [card] = http.get("/v1/models").json()["data"]
        assert card["id"] == NAME and card["object"] == "model" and card["max_model_len"] == 24
        assert http.get(f"/v1/models/{NAME}").json()["id"] == NAME
        before = scrape(served.url)
        answer = http.post("/v1/completions", json={"prompt": PROMPTS[3], "max_tokens": 6, "temperature": 0}).json()
        assert answer["object"] == "text_completion" and answer["model"] == NAME
        assert answer["choices"][0]["token_ids"] == alone(oracle, PROMPTS[3], max_new_tokens=6, greedy=True).output_ids
        after = scrape(served.url)
    grew = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    assert grew["mixtral_generated_tokens_total"] == 6
    assert grew["mixtral_time_to_first_token_seconds_count"] == 1
    assert grew["mixtral_inter_token_latency_seconds_count"] == 5  # the gaps between 6 tokens
    assert grew["mixtral_requests_total{finish_reason=length}"] == 1
    assert after["mixtral_slots"] == 2 and after["mixtral_running_slots"] == 0 and after["mixtral_queue_depth"] == 0
    buckets = sorted((float(k.split("le=")[1].rstrip("}")), v) for k, v in after.items()
                     if k.startswith("mixtral_inter_token_latency_seconds_bucket"))  # fmt: skip
    assert [v for _, v in buckets] == sorted(v for _, v in buckets)  # cumulative
    assert buckets[-1] == (float("inf"), after["mixtral_inter_token_latency_seconds_count"])


def test_small_responses_are_not_delayed(served):
    """Each answer (and each streamed token) leaves at once: no ~40 ms wait for a delayed ACK
    (Nagle's algorithm on a socket asyncio did not recognise as TCP)."""
    with httpx.Client(base_url=served.url, timeout=30) as http:
        took = []
        for _ in range(15):
            start = time.perf_counter()
            http.get("/health")
            took.append(time.perf_counter() - start)
    assert sorted(took)[len(took) // 2] < 0.02, took


def test_errors_have_openai_shape(served):
    api = client(served)
    with pytest.raises(openai.BadRequestError) as bad:
        api.completions.create(model=NAME, prompt="hi", max_tokens=0)
    assert bad.value.body["param"] == "max_tokens" and ">= 1" in bad.value.body["message"]
    with pytest.raises(openai.BadRequestError) as bad:
        api.completions.create(model=NAME, prompt="hi", max_tokens=100)
    assert "max_seq_len=24" in bad.value.body["message"]
    with pytest.raises(openai.NotFoundError) as missing:
        api.completions.create(model="gpt-4", prompt="hi", max_tokens=2)
    assert missing.value.body["code"] == "model_not_found" and missing.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError) as bad:
        api.completions.create(model=NAME, prompt="hi", extra_body={"top_k": -1})
    assert bad.value.body["param"] == "top_k"


def test_help_needs_no_server_packages():
    """`--help` works where fastapi and uvicorn are missing, and `serve` then says what to install."""
    code = ("import sys; sys.modules.update(fastapi=None, uvicorn=None); from mixtral_trt.cli import main; "
            "main(sys.argv[1:])")  # fmt: skip
    run = lambda *a: subprocess.run([sys.executable, "-c", code, *a], capture_output=True, text=True, timeout=60)  # noqa: E731
    helped = run("serve", "--help")
    assert helped.returncode == 0 and "--max-queue" in helped.stdout
    refused = run("serve", "nowhere")
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert "pip install 'mixtral-trt[serve]'" in refused.stderr and "fastapi, uvicorn" in refused.stderr


def test_busy_port_is_one_error_line(served, build):
    from click.testing import CliRunner

    from mixtral_trt.cli import main

    port = served.url.rsplit(":", 1)[1]
    result = CliRunner().invoke(main, ["serve", str(build), "--port", port, "--no-verify"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert f"cannot listen on 127.0.0.1:{port}" in result.output and "--port 0" in result.output


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT])
def test_command_serves_and_stops_cleanly(build, oracle, stop):
    """The real `mixtral-build serve` in a subprocess: serves, and a requested stop exits 0."""
    cmd = [sys.executable, "-m", "mixtral_trt.cli", "serve", str(build), "--port", "0", "--no-verify",
           "--model-name", "m"]  # fmt: skip
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})  # fmt: skip
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 60
        while not any("serving" in line for line in lines):
            assert proc.poll() is None and time.monotonic() < deadline, f"serve did not start: {lines}"
            time.sleep(0.05)
        url = next(line for line in lines if "serving" in line).split(" on ")[1].split()[0]
        answer = httpx.post(f"{url}/completions", json={"model": "m", "prompt": PROMPTS[1], "max_tokens": 4,
                                                         "temperature": 0}, timeout=60).json()  # fmt: skip
        assert answer["choices"][0]["token_ids"] == alone(oracle, PROMPTS[1], max_new_tokens=4, greedy=True).output_ids
        proc.send_signal(stop)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    reader.join(10)
    assert lines[-1].strip() == "stopped" and not any("Traceback" in line for line in lines), lines


def test_sse_wire_format(served):
    """The raw stream: `data: {json}` events separated by blank lines, ending with `data: [DONE]`."""
    body = {"prompt": PROMPTS[1], "max_tokens": 3, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{served.url}/v1/completions", json=body, timeout=30) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = response.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    payloads = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
    assert all(e.startswith("data: ") for e in events[:-1]) and len(payloads) == 4
    assert len({p["id"] for p in payloads}) == 1 and payloads[-1]["choices"][0]["finish_reason"] == "length"
