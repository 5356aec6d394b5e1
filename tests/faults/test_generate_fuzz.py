"""Random requests against ``generate``: every one ends in a result or a clean error, never another
exception or a traceback, and the model answers a good request the same way afterwards.

Each random value comes from a pool labelled good or bad by the documented parameter domain
(README: Generate text), so the test also knows which outcome each request must have: a bad
value that is silently accepted fails it as surely as a crash does.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
from click.testing import CliRunner

from mixtral_trt import runtime
from mixtral_trt.cli import main

from ._generate_build import MAX_SEQ, VOCAB

NAN, INF = float("nan"), float("inf")

# (good values, bad values) of each keyword of Model.generate.
SAMPLING = {
    "max_new_tokens": ([1, 2, 4, np.int64(3)], [0, -1, 2.5, 3.0, True, "3", None, NAN]),
    "greedy": ([True, False, np.bool_(True)], ["yes", 1, None]),
    "temperature": ([0, 0.0, 0.7, 1, 1e-310, 1e300, np.float32(0.5)],
                    [NAN, INF, -INF, -0.1, "1", None, True, 10**400]),
    "top_k": ([0, 1, 5, 10**30, np.int32(3)], [-1, 2.5, True, "5", None, NAN]),
    "top_p": ([1.0, 0.5, 1e-300, 1, np.float64(0.9)], [0, 0.0, 1.5, NAN, -INF, INF, "0.5", None]),
    "repetition_penalty": ([1.0, 1.3, 0.5, 1e-310, 1e300], [0, -1, NAN, INF, True, "x", None]),
    "seed": ([None, 0, 7, 2**70, np.int64(3)], [-1, 1.5, "x", True, NAN]),
    "stop": ([(), ["\n"], "ab", ("x", "yz"), None, ["é"]], [[""], "", [1], [None], ["\ud800"], 5, b"ab"]),
}  # fmt: skip
GOOD_PROMPTS = ["Hello", "Paris is", "é ü 日本", "\x00", b"caf\xc3\xa9", [1, 415], (1, 2, 3), np.array([1, 5]),
                [np.int64(4), np.int32(9)], [0], [VOCAB - 1]]  # fmt: skip
BAD_PROMPTS = ["", b"", [], [1.5], [1, True], [None], [[1]], [-1], [VOCAB], [2**64], None, {}, 3, "\ud800", b"\xff",
               "a\udcffb", [NAN], np.array([1.0]), np.array([[1]]), [1] * (MAX_SEQ + 1), "word " * 40]  # fmt: skip


@pytest.fixture(scope="module")
def reference(model):
    """The good request asked after every failure, and its greedy tokens on the fresh model."""
    return model.generate([[1, 415, 2936]], max_new_tokens=3, greedy=True)[0].output_ids


def _pick(rng: random.Random, good: list, bad: list, p_bad: float):
    if rng.random() < p_bad:
        return rng.choice(bad), False
    return rng.choice(good), True


def _request(rng: random.Random):
    """(prompts, keyword arguments, whether each is inside the documented domain)."""
    ok, kwargs = True, {}
    for name, (good, bad) in SAMPLING.items():
        if rng.random() < 0.4:
            kwargs[name], fine = _pick(rng, good, bad, 0.15)
            ok &= fine
    kwargs.setdefault("max_new_tokens", 2)  # short generations keep the test fast
    if rng.random() < 0.03:
        kwargs["temprature"], ok = 0.5, False  # a misspelt option
    prompts, prompts_ok = [], True
    for _ in range(rng.choice([1, 1, 2])):
        prompt, fine = _pick(rng, GOOD_PROMPTS, BAD_PROMPTS, 0.2)
        prompts.append(prompt)
        prompts_ok &= fine
    roll = rng.random()
    if roll < 0.03:
        prompts, prompts_ok = prompts * 3, False  # beyond max_batch
    elif roll < 0.06:
        prompts, prompts_ok = rng.choice([[], "Hello", None, b"ab", 7]), False
    return prompts, kwargs, prompts_ok, ok


def _check_results(results, prompts, kwargs):
    assert len(results) == len(prompts)
    limit = int(kwargs.get("max_new_tokens", 32))
    for r in results:
        assert 1 <= len(r.output_ids) <= limit
        assert all(isinstance(t, int) and 0 <= t < VOCAB for t in r.output_ids)
        assert r.finish_reason in ("eos", "stop", "length")


def test_random_api_requests(model, reference):
    rng = random.Random(20261203)
    outcomes = {"result": 0, "error": 0}
    for n in range(300):
        prompts, kwargs, prompts_ok, kwargs_ok = _request(rng)
        use_logits = rng.random() < 0.15
        ok = prompts_ok and (use_logits or kwargs_ok)  # logits takes no sampling options
        try:
            if use_logits:
                out = model.logits(prompts)
                assert ok, (n, prompts)
                assert all(o.shape[-1] == VOCAB and np.isfinite(o).all() for o in out)
            else:
                results = model.generate(prompts, **kwargs)
                assert ok, (n, prompts, kwargs)
                _check_results(results, prompts, kwargs)
            outcomes["result"] += 1
        except runtime.GenerationError as exc:
            assert not ok, (n, prompts, kwargs, exc)
            assert "\n" not in str(exc) and str(exc)
            outcomes["error"] += 1
            assert model.generate([[1, 415, 2936]], max_new_tokens=3, greedy=True)[0].output_ids == reference
    assert min(outcomes.values()) > 50, outcomes  # both kinds of outcome were exercised


# --- the command line ----------------------------------------------------------------------------

CLI_OPTIONS = {
    "--max-new-tokens": (["1", "3"], ["0", "-2", "2.5", "x", "nan", ""]),
    "--temperature": (["0", "0.7", "1e-310"], ["nan", "inf", "-1", "x", "-inf"]),
    "--top-p": (["0.5", "1"], ["0", "1.5", "nan", "inf"]),
    "--top-k": (["0", "5"], ["-1", "2.5", "x"]),
    "--repetition-penalty": (["1", "1.2", "1e300"], ["0", "nan", "inf", "-1"]),
    "--seed": (["0", "5"], ["-1", "1.5", "x"]),
    "--stop": (["\n", "ab"], [""]),
}
CLI_TEXT = (["Hello", "é", "Paris is"], ["", "\ud800", "\udcff"])
CLI_IDS = (["1,415", " 1, 2 ", "1,2,"], ["1.5", "1,x", str(VOCAB), "-1", "\uff11", "1_0", "", "-", "--5", "1e3"])


def _cli_request(rng: random.Random):
    ok, args = True, []
    for option, (good, bad) in CLI_OPTIONS.items():
        if rng.random() < 0.3:
            value, fine = _pick(rng, good, bad, 0.15)
            args += [option, value]
            ok &= fine
    if not any(a == "--max-new-tokens" for a in args):
        args += ["--max-new-tokens", "2"]
    option, (good, bad) = rng.choice([("--prompt", CLI_TEXT), ("--prompt-ids", CLI_IDS)])
    for _ in range(rng.choice([1, 1, 2])):
        value, fine = _pick(rng, good, bad, 0.15)
        args += [option, value]
        ok &= fine
    sampled = any(a in ("--temperature", "--top-p", "--top-k") for a in args)
    if rng.random() < 0.1:
        args.append("--greedy")
        ok &= not sampled
    if rng.random() < 0.3:
        args.append("--json")
    return args, ok


def _assert_clean_failure(result, args):
    """Exit 1 with exactly one 'Error: ...' line: alone (our errors) or after click's usage line
    and hint (a bad option); never a traceback or an escaped exception."""
    assert isinstance(result.exception, SystemExit), (args, result.exception)
    assert "Traceback" not in result.output, (args, result.output)
    lines = result.output.strip().splitlines()
    assert result.exit_code == 1, (args, result.exit_code, result.output)
    assert sum(line.startswith("Error: ") for line in lines) == 1, (args, result.output)
    assert len(lines) == 1 or lines[0].startswith("Usage: "), (args, result.output)


def test_random_cli_requests(build, model, reference, monkeypatch):
    # The CLI under test is everything but the load itself (timed separately in the targeted
    # tests): every call gets the one loaded model, which must stay usable.
    monkeypatch.setattr(runtime, "load", lambda *a, **k: model)
    rng = random.Random(7)
    runner = CliRunner()
    outcomes = {"ok": 0, "refused": 0}
    for n in range(48):
        args, ok = _cli_request(rng)
        result = runner.invoke(main, ["generate", str(build), *args])
        if ok:
            assert result.exit_code == 0, (n, args, result.output)
            assert "Traceback" not in result.output
            assert not any(line.startswith("Error:") for line in result.output.splitlines()), (args, result.output)
            outcomes["ok"] += 1
        else:
            _assert_clean_failure(result, args)
            outcomes["refused"] += 1
            assert model.generate([[1, 415, 2936]], max_new_tokens=3, greedy=True)[0].output_ids == reference
    assert min(outcomes.values()) >= 10, outcomes
