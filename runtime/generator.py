"""The batch API over the executor, and what every request shares: errors, results, prompts.

``Generator.generate(prompts, params)`` checks the batch as a whole (its size against the build's
``max_batch``, the longest prompt against ``max_seq_len``), then submits each prompt to an
:class:`~mixtral_trt.runtime.executor.Executor` and waits for all: the executor owns the static
KV cache as ``max_batch`` slots, one request per slot, each at its own position (see there).
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Callable, Sequence

import numpy as np

from .sampling import SamplingParams
from .tokenizer import Tokenizer

Prompt = str | Sequence[int]
OnToken = Callable[[int, int, str], None]  # (row, token id, text delta)


class GenerationError(ValueError):
    """A request the build cannot serve: names the offending value and the limit."""


@dataclasses.dataclass
class Result:
    prompt_ids: list[int]
    output_ids: list[int]  # generated ids only (EOS included when it ended the sequence)
    text: str | None
    finish_reason: str  # "eos" | "stop" | "length" | "cancelled"
    prefill_ms: float  # from taking a slot to the first token (the prompt's chunks and the steps between)
    decode_tokens_per_s: float
    queue_ms: float = 0.0  # waiting for a free slot
    ttft_ms: float = 0.0  # submission to first token
    token_ms: list[float] = dataclasses.field(default_factory=list)  # gap before each token after the first

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class Generator:
    """``generate`` for a batch of prompts, through the executor (created here unless given)."""

    def __init__(self, backend, tokenizer: Tokenizer | None = None, eos_id: int | None = 2, executor=None,
                 **executor_options) -> None:  # fmt: skip
        from .executor import Executor

        self.backend, self.tokenizer = backend, tokenizer
        self.executor = executor or Executor(backend, tokenizer, eos_id, **executor_options)

    @property
    def eos_id(self) -> int | None:
        return self.executor.eos_id

    @eos_id.setter
    def eos_id(self, value: int | None) -> None:
        self.executor.eos_id = value

    def encode(self, prompts: Sequence[Prompt]) -> list[list[int]]:
        """Token ids of each prompt, validated against the build's vocab, batch and length limits."""
        if isinstance(prompts, (str, bytes, bytearray)) or not isinstance(prompts, Sequence):
            kind = type(prompts).__name__
            raise GenerationError(f"prompts must be a list of strings or of token-id lists, not {kind}")
        if not prompts:
            raise GenerationError("no prompts given")
        if len(prompts) > self.backend.max_batch:
            raise GenerationError(f"batch of {len(prompts)} prompts exceeds the build's max_batch={self.backend.max_batch}")
        return [encode_prompt(prompt, self.tokenizer, self.backend.vocab_size, n) for n, prompt in enumerate(prompts)]

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
        return self.executor.generate(ids, params, on_token)


def encode_prompt(prompt: Prompt, tokenizer: Tokenizer | None, vocab_size: int, n: int | None = None) -> list[int]:
    """One prompt's token ids (text through the tokenizer), checked against the vocabulary. ``n``:
    its place in a batch, for messages ("prompt 3 is empty")."""
    name = "prompt" if n is None else f"prompt {n}"
    if isinstance(prompt, (str, bytes, bytearray)):
        if tokenizer is None:
            raise GenerationError("text prompts need a tokenizer in the build directory; pass token ids")
        text = _text(name, prompt)
        if not text:
            raise GenerationError(f"{name} is empty")
        ids = tokenizer.encode(text)
    else:
        ids = _token_ids(name, prompt)
    if not ids:
        raise GenerationError(f"{name} is empty")
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        raise GenerationError(f"{name} has token id {bad[0]} outside the vocabulary [0, {vocab_size})")
    return ids


def _text(name: str, prompt: str | bytes | bytearray) -> str:
    """The prompt as valid Unicode: bytes must be UTF-8, a str must hold no lone surrogate (the
    tokenizer cannot encode one; a command line turns undecodable bytes into such surrogates)."""
    if not isinstance(prompt, str):
        try:
            return bytes(prompt).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise GenerationError(f"{name} is not valid UTF-8: byte {exc.object[exc.start]:#04x} at offset "
                                  f"{exc.start}; give text as str or UTF-8 bytes") from None  # fmt: skip
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as exc:
        code = ord(prompt[exc.start])
        # U+DC80..U+DCFF: how Python's surrogateescape carries an undecodable byte of argv.
        escaped = 0xDC80 <= code <= 0xDCFF
        what = f"the invalid UTF-8 byte {code - 0xDC00:#04x}" if escaped else f"a lone surrogate U+{code:04X}"
        raise GenerationError(
            f"{name} holds {what} at character {exc.start}, not valid text; give UTF-8 text"
        ) from None
    return prompt


def _token_ids(name: str, prompt) -> list[int]:
    """A prompt of token ids as Python ints: integers only (numpy integers too; never floats, which
    would be truncated, nor bools)."""
    if isinstance(prompt, np.ndarray) and prompt.ndim == 1:
        prompt = prompt.tolist()
    if not isinstance(prompt, Sequence):
        raise GenerationError(f"{name} is a {type(prompt).__name__}; give a string or a list of token ids")
    for pos, i in enumerate(prompt):
        if isinstance(i, (bool, np.bool_)) or not isinstance(i, numbers.Integral):
            shown = repr(i) if len(repr(i)) <= 40 else repr(i)[:37] + "..."
            raise GenerationError(f"{name} has {shown} at position {pos}, not an integer token id")
    return [int(i) for i in prompt]
