"""Backend-agnostic text generation over a static KV cache: batched prefill, then decode.

Rows are right-padded; token s of row b sits in cache slot (= position) s. Each decode step
feeds every row's newest token at slot ``len_b + t``; rows that finished keep stepping (their
outputs are ignored) so the batch stays rectangular.
"""

from __future__ import annotations

import dataclasses
import numbers
import time
from collections.abc import Callable, Sequence

import numpy as np

from .sampling import Sampler, SamplingParams
from .tokenizer import StreamDecoder, Tokenizer

Prompt = str | Sequence[int]
OnToken = Callable[[int, int, str], None]  # (row, token id, text delta)


class GenerationError(ValueError):
    """A request the build cannot serve: names the offending value and the limit."""


@dataclasses.dataclass
class Result:
    prompt_ids: list[int]
    output_ids: list[int]  # generated ids only (EOS included when it ended the sequence)
    text: str | None
    finish_reason: str  # "eos" | "stop" | "length"
    prefill_ms: float
    decode_tokens_per_s: float

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class Generator:
    def __init__(self, backend, tokenizer: Tokenizer | None = None, eos_id: int | None = 2) -> None:
        self.backend, self.tokenizer = backend, tokenizer
        self.eos_id = tokenizer.eos_id if tokenizer is not None else eos_id

    def encode(self, prompts: Sequence[Prompt]) -> list[list[int]]:
        """Token ids of each prompt, validated against the build's vocab, batch and length limits."""
        if isinstance(prompts, (str, bytes, bytearray)) or not isinstance(prompts, Sequence):
            kind = type(prompts).__name__
            raise GenerationError(f"prompts must be a list of strings or of token-id lists, not {kind}")
        if not prompts:
            raise GenerationError("no prompts given")
        if len(prompts) > self.backend.max_batch:
            raise GenerationError(f"batch of {len(prompts)} prompts exceeds the build's max_batch={self.backend.max_batch}")
        out = []
        for n, prompt in enumerate(prompts):
            if isinstance(prompt, (str, bytes, bytearray)):
                if self.tokenizer is None:
                    raise GenerationError("text prompts need a tokenizer in the build directory; pass token ids")
                text = _text(n, prompt)
                if not text:
                    raise GenerationError(f"prompt {n} is empty")
                ids = self.tokenizer.encode(text)
            else:
                ids = _token_ids(n, prompt)
            if not ids:
                raise GenerationError(f"prompt {n} is empty")
            bad = [i for i in ids if not 0 <= i < self.backend.vocab_size]
            if bad:
                raise GenerationError(
                    f"prompt {n} has token id {bad[0]} outside the vocabulary [0, {self.backend.vocab_size})"
                )
            out.append(ids)
        return out

    def generate(self, prompts: Sequence[Prompt], params: SamplingParams, on_token: OnToken | None = None) -> list[Result]:
        ids = self.encode(prompts)
        if params.stop and self.tokenizer is None:
            raise GenerationError("stop strings need a tokenizer in the build directory")
        longest = max(len(p) for p in ids)
        if longest + params.max_new_tokens > self.backend.max_seq_len:
            raise GenerationError(
                f"prompt of {longest} tokens + max_new_tokens={params.max_new_tokens} = "
                f"{longest + params.max_new_tokens} exceeds the build's max_seq_len={self.backend.max_seq_len}"
            )
        return _Run(self, ids, params, on_token).run()


class _Run:
    """The state of one generate() call."""

    def __init__(self, gen: Generator, ids: list[list[int]], params: SamplingParams, on_token: OnToken | None):
        self.gen, self.ids, self.params, self.on_token = gen, ids, params, on_token
        self.sampler = Sampler(params)
        self.lengths = np.array([len(p) for p in ids], np.int64)  # [B]
        self.outputs: list[list[int]] = [[] for _ in ids]
        self.reasons: list[str | None] = [None] * len(ids)
        self.texts: list[str | None] = [None] * len(ids)
        self.decode_time = np.zeros(len(ids))
        tok = gen.tokenizer
        self.streams = [StreamDecoder(tok) for _ in ids] if tok is not None else None

    def run(self) -> list[Result]:
        B, S = len(self.ids), int(self.lengths.max())
        padded = np.full((B, S), self.gen.eos_id or 0, np.int64)
        for b, p in enumerate(self.ids):
            padded[b, : len(p)] = p
        start = time.perf_counter()
        logits = self.gen.backend.step(padded, np.tile(np.arange(S), (B, 1)), np.zeros(B, np.int64))
        prefill_ms = (time.perf_counter() - start) * 1e3
        last = logits[np.arange(B), self.lengths - 1]  # [B, V]
        for t in range(self.params.max_new_tokens):
            self._accept(self.sampler(last, [p + o for p, o in zip(self.ids, self.outputs)]))
            if all(self.reasons):
                break
            tokens = np.array([o[-1] for o in self.outputs], np.int64)[:, None]  # [B, 1]
            start = time.perf_counter()
            logits = self.gen.backend.step(tokens, (self.lengths + t)[:, None], self.lengths + t)
            elapsed = time.perf_counter() - start
            self.decode_time += np.where([r is None for r in self.reasons], elapsed, 0.0)
            last = logits[:, 0]
        return [self._result(b, prefill_ms) for b in range(B)]

    def _accept(self, tokens: np.ndarray) -> None:
        for b, token in enumerate(tokens.tolist()):
            if self.reasons[b] is not None:
                continue
            self.outputs[b].append(token)
            delta = self.streams[b].push(token) if self.streams is not None else ""
            if token == self.gen.eos_id:
                self.reasons[b] = "eos"
            elif self.params.stop and self._hit_stop(b):
                self.reasons[b] = "stop"
            elif len(self.outputs[b]) == self.params.max_new_tokens:
                self.reasons[b] = "length"
            if self.on_token is not None:
                self.on_token(b, token, delta)

    def _hit_stop(self, b: int) -> bool:
        text = self.gen.tokenizer.decode(self.outputs[b])
        cut = min((text.find(s) for s in self.params.stop if s in text), default=-1)
        if cut < 0:
            return False
        self.texts[b] = text[:cut]
        return True

    def _result(self, b: int, prefill_ms: float) -> Result:
        text = self.texts[b]
        if text is None and self.gen.tokenizer is not None:
            text = self.gen.tokenizer.decode(self.outputs[b])
        steps = len(self.outputs[b]) - 1
        rate = float(steps / self.decode_time[b]) if steps and self.decode_time[b] > 0 else 0.0
        return Result(self.ids[b], self.outputs[b], text, self.reasons[b] or "length", prefill_ms, rate)


def _text(n: int, prompt: str | bytes | bytearray) -> str:
    """The prompt as valid Unicode: bytes must be UTF-8, a str must hold no lone surrogate (the
    tokenizer cannot encode one; a command line turns undecodable bytes into such surrogates)."""
    if not isinstance(prompt, str):
        try:
            return bytes(prompt).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise GenerationError(f"prompt {n} is not valid UTF-8: byte {exc.object[exc.start]:#04x} at offset "
                                  f"{exc.start}; give text as str or UTF-8 bytes") from None  # fmt: skip
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as exc:
        code = ord(prompt[exc.start])
        # U+DC80..U+DCFF: how Python's surrogateescape carries an undecodable byte of argv.
        escaped = 0xDC80 <= code <= 0xDCFF
        what = f"the invalid UTF-8 byte {code - 0xDC00:#04x}" if escaped else f"a lone surrogate U+{code:04X}"
        raise GenerationError(
            f"prompt {n} holds {what} at character {exc.start}, not valid text; give UTF-8 text"
        ) from None
    return prompt


def _token_ids(n: int, prompt) -> list[int]:
    """A prompt of token ids as Python ints: integers only (numpy integers too; never floats, which
    would be truncated, nor bools)."""
    if isinstance(prompt, np.ndarray) and prompt.ndim == 1:
        prompt = prompt.tolist()
    if not isinstance(prompt, Sequence):
        raise GenerationError(f"prompt {n} is a {type(prompt).__name__}; give a string or a list of token ids")
    for pos, i in enumerate(prompt):
        if isinstance(i, (bool, np.bool_)) or not isinstance(i, numbers.Integral):
            shown = repr(i) if len(repr(i)) <= 40 else repr(i)[:37] + "..."
            raise GenerationError(f"prompt {n} has {shown} at position {pos}, not an integer token id")
    return [int(i) for i in prompt]
