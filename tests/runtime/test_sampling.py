"""Sampling filters against direct numpy computations of what each option means."""

from __future__ import annotations

import numpy as np
import pytest

from mixtral_trt.runtime.sampling import Sampler, SamplingParams


def _draws(params: SamplingParams, logits: np.ndarray, n: int = 400, history=None) -> set[int]:
    sampler = Sampler(params)
    rows = np.repeat(logits[None], n, axis=0)
    return set(sampler(rows, history or [[]] * n).tolist())


def test_greedy_is_argmax_and_temperature_zero_is_greedy():
    logits = np.random.default_rng(0).standard_normal((4, 50))
    expected = logits.argmax(-1).tolist()
    assert Sampler(SamplingParams(greedy=True))(logits, [[]] * 4).tolist() == expected
    assert Sampler(SamplingParams(temperature=0))(logits, [[]] * 4).tolist() == expected


def test_top_k_limits_support_to_the_k_largest():
    logits = np.random.default_rng(1).standard_normal(30)
    top3 = set(np.argsort(-logits)[:3].tolist())
    assert _draws(SamplingParams(top_k=3, temperature=5.0, seed=0), logits) == top3


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = np.array([0.5, 0.3, 0.15, 0.05])
    logits = np.log(probs)
    assert _draws(SamplingParams(top_p=0.7, seed=0), logits) == {0, 1}  # 0.5 < 0.7 ≤ 0.8
    assert _draws(SamplingParams(top_p=0.5, seed=0), logits) == {0}
    assert _draws(SamplingParams(top_p=0.81, seed=0), logits) == {0, 1, 2}


def test_sampling_frequencies_follow_the_softmax():
    logits = np.log(np.array([0.6, 0.3, 0.1]))
    sampler = Sampler(SamplingParams(seed=3))
    draws = sampler(np.repeat(logits[None], 20000, axis=0), [[]] * 20000)
    freq = np.bincount(draws, minlength=3) / len(draws)
    np.testing.assert_allclose(freq, [0.6, 0.3, 0.1], atol=0.015)


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits():
    logits = np.array([[2.0, 1.9, -1.0, -0.9]])
    # Without penalty token 0 wins; penalising 0 (2.0 / 2 = 1.0) makes token 1 win.
    assert Sampler(SamplingParams(greedy=True, repetition_penalty=2.0))(logits, [[0]]).tolist() == [1]
    # A negative seen logit gets more negative: -0.9 * 2 < -1.0, so among 2 and 3, 2 wins.
    sub = np.array([[-1.0, -0.9]])
    assert Sampler(SamplingParams(greedy=True, repetition_penalty=2.0))(sub, [[1]]).tolist() == [0]


def test_same_seed_same_draws_and_different_seed_differs():
    logits = np.zeros((1, 1000))
    a = [Sampler(SamplingParams(seed=5))(logits, [[]]).item() for _ in range(3)]
    b = [Sampler(SamplingParams(seed=5))(logits, [[]]).item() for _ in range(3)]
    assert a == b
    s1, s2 = Sampler(SamplingParams(seed=1)), Sampler(SamplingParams(seed=2))
    assert [s1(logits, [[]]).item() for _ in range(5)] != [s2(logits, [[]]).item() for _ in range(5)]


@pytest.mark.parametrize(
    "field, value, words",
    [("max_new_tokens", 0, "max_new_tokens=0"), ("temperature", -1.0, "temperature=-1.0"),
     ("top_k", -2, "top_k=-2"), ("top_p", 0.0, "top_p=0.0"), ("top_p", 1.5, "top_p=1.5"),
     ("repetition_penalty", 0.0, "repetition_penalty=0.0"), ("stop", ("",), "stop strings")],
)  # fmt: skip
def test_bad_parameters_are_named(field, value, words):
    with pytest.raises(ValueError, match=words.replace("(", r"\(").replace(".", r"\.")):
        SamplingParams(**{field: value})
