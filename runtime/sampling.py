"""Next-token selection over a batch of logits: greedy, temperature, top-k, top-p, repetition
penalty, all on the host in numpy (V = vocab, B = batch)."""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to choose tokens. ``temperature == 0`` (or ``greedy``) means argmax."""

    max_new_tokens: int = 32
    greedy: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0: no top-k filter
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens} must be >= 1")
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature} must be >= 0 (0 means greedy)")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k} must be >= 0 (0 disables it)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1]")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty={self.repetition_penalty} must be > 0 (1 disables it)")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must not be empty")

    @property
    def is_greedy(self) -> bool:
        return self.greedy or self.temperature == 0


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
                row[idx] = np.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
        if p.is_greedy:
            return logits.argmax(axis=-1)
        logits /= p.temperature
        if p.top_k:
            k = min(p.top_k, logits.shape[-1])
            kth = np.partition(logits, -k, axis=-1)[:, -k, None]  # [B, 1]
            logits = np.where(logits < kth, -np.inf, logits)
        probs = np.exp(logits - logits.max(axis=-1, keepdims=True))  # [B, V]
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
