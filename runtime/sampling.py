"""Next-token selection over a batch of logits: greedy, temperature, top-k, top-p, repetition
penalty, all on the host in numpy (V = vocab, B = batch)."""

from __future__ import annotations

import dataclasses
import math
import numbers

import numpy as np

_FLOAT_MAX = np.finfo(np.float64).max


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to choose tokens. ``temperature == 0`` (or ``greedy``) means argmax.

    Counts are integers (numpy integers too, never bools or floats), the other values finite
    real numbers; ``seed`` is None or an integer >= 0; ``stop`` is one string or a list of
    strings (a single string is one stop string, not its characters). Values are normalised to
    Python ``int``/``float``/``tuple`` here, so everything past this point sees plain types.
    """

    max_new_tokens: int = 32
    greedy: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0: no top-k filter
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        fields = {
            "max_new_tokens": _integer("max_new_tokens", self.max_new_tokens, 1),
            "greedy": _flag("greedy", self.greedy),
            "temperature": _real("temperature", self.temperature, lambda v: v >= 0, ">= 0 (0 means greedy)"),
            "top_k": _integer("top_k", self.top_k, 0, "(0 disables it)"),
            "top_p": _real("top_p", self.top_p, lambda v: 0 < v <= 1, "in (0, 1]"),
            "repetition_penalty": _real("repetition_penalty", self.repetition_penalty, lambda v: v > 0,
                                        "> 0 (1 disables it)"),  # fmt: skip
            "seed": None if self.seed is None else _integer("seed", self.seed, 0, "or None"),
            "stop": _stop_strings(self.stop),
        }
        for name, value in fields.items():
            object.__setattr__(self, name, value)

    @property
    def is_greedy(self) -> bool:
        return self.greedy or self.temperature == 0


def _show(value) -> str:
    """A value for a message: its repr, cut short (a prompt-sized string must not flood the error)."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _integer(name: str, value, low: int, note: str = "") -> int:
    # bool is an int subclass, but max_new_tokens=True is a mistake, not a count of 1.
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name}={_show(value)} must be an integer >= {low} {note}".rstrip())
    if value < low:
        raise ValueError(f"{name}={int(value)} must be >= {low} {note}".rstrip())
    return int(value)


def _real(name: str, value, ok, domain: str) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name}={_show(value)} must be a number {domain}")
    try:
        number = float(value)
    except OverflowError:  # an int or Fraction beyond float's range
        number = math.inf if value > 0 else -math.inf
    if not math.isfinite(number):
        raise ValueError(f"{name}={number} must be a finite number {domain}")
    if not ok(number):
        raise ValueError(f"{name}={number} must be {domain}")
    return number


def _flag(name: str, value) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name}={_show(value)} must be True or False")
    return bool(value)


def _stop_strings(stop) -> tuple[str, ...]:
    if stop is None:
        return ()
    if isinstance(stop, str):  # one stop string, not a set of one-character ones
        stop = (stop,)
    if not isinstance(stop, (list, tuple, set, frozenset)):
        raise ValueError(f"stop={_show(stop)} must be a string or a list of strings")
    out = tuple(stop)
    for n, s in enumerate(out):
        if not isinstance(s, str):
            raise ValueError(f"stop string {n} is {_show(s)}, not a str")
        if not s:
            raise ValueError("stop strings must not be empty")
        if not _is_unicode(s):
            raise ValueError(f"stop string {n} ({_show(s)}) holds a lone surrogate; give valid Unicode text")
    return out


def _is_unicode(text: str) -> bool:
    """False for strings holding lone surrogates (they cannot be encoded, so no text ever matches them)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class Sampler:
    """Stateful only in its random generator, so a seed reproduces a whole generation."""

    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        self.rng = np.random.default_rng(params.seed)

    def __call__(self, logits: np.ndarray, history: list[list[int]]) -> np.ndarray:
        """logits [B, V] (float) and each row's previous tokens -> next token ids [B]."""
        p = self.params
        logits = logits.astype(np.float64, copy=True)  # [B, V]
        if p.repetition_penalty != 1.0:
            for row, seen in zip(logits, history):
                idx = np.unique(np.asarray(seen, dtype=np.int64))
                vals = row[idx]
                with np.errstate(over="ignore", under="ignore"):  # extreme penalties: ±inf, clipped below
                    row[idx] = np.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
        if p.is_greedy:
            return logits.argmax(axis=-1)
        with np.errstate(over="ignore", under="ignore"):
            # Any finite temperature and penalty must give a distribution: clip what a tiny
            # penalty pushed to ±inf, and shift by the row maximum before dividing by the
            # temperature, so no step computes inf - inf (which would be NaN).
            np.clip(logits, -_FLOAT_MAX, _FLOAT_MAX, out=logits)
            logits = (logits - logits.max(axis=-1, keepdims=True)) / p.temperature  # [B, V], <= 0
            if p.top_k:
                k = min(p.top_k, logits.shape[-1])
                kth = np.partition(logits, -k, axis=-1)[:, -k, None]  # [B, 1]
                logits = np.where(logits < kth, -np.inf, logits)
            probs = np.exp(logits)  # [B, V]; the maximum is exp(0) = 1, so each row sums to >= 1
        probs /= probs.sum(axis=-1, keepdims=True)
        if p.top_p < 1.0:
            probs = _top_p(probs, p.top_p)
        return np.array([self.rng.choice(len(row), p=row) for row in probs], dtype=np.int64)


def _top_p(probs: np.ndarray, top_p: float) -> np.ndarray:
    """Keep the smallest set of most likely tokens whose mass reaches ``top_p`` (at least one)."""
    order = np.argsort(-probs, axis=-1, kind="stable")  # [B, V]
    sorted_p = np.take_along_axis(probs, order, axis=-1)
    keep_sorted = np.cumsum(sorted_p, axis=-1) - sorted_p < top_p  # mass before this token < top_p
    keep = np.zeros_like(keep_sorted)
    np.put_along_axis(keep, order, keep_sorted, axis=-1)
    probs = np.where(keep, probs, 0.0)
    return probs / probs.sum(axis=-1, keepdims=True)
