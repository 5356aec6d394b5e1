"""One request's life in the executor: its state while it owns a slot, and the caller's handle.

A :class:`Handle` is what :meth:`Executor.submit` returns: iterate it (``for delta in handle``
or ``async for delta in handle``) for :class:`Delta`s as tokens are chosen, ``result()`` for the
final :class:`Result`, ``cancel()`` to end it early. Joining every delta's text gives the
result's text: text that could still become a stop string, or an incomplete UTF-8 sequence, is
held back until it is decided.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import threading
import time

from .generator import Result
from .sampling import Sampler, SamplingParams

_ids = itertools.count()


@dataclasses.dataclass(frozen=True)
class Delta:
    token_id: int
    text: str  # new text this token made final ("" while held back; always "" without a tokenizer)
    index: int  # 0 for the first generated token


class Handle:
    """A submitted request. Thread-safe; every iterator sees every delta from the first."""

    def __init__(self, executor, request_id: int) -> None:
        self.request_id = request_id
        self._executor = executor
        self._cond = threading.Condition()
        self._deltas: list[Delta] = []
        self._result: Result | None = None
        self._error: BaseException | None = None
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future]] = []
        self.cancelled = False

    @property
    def done(self) -> bool:
        return self._result is not None or self._error is not None

    def cancel(self) -> None:
        """End the request now: it leaves the queue, or its slot is freed (at the latest after the step
        in progress). Its result keeps the tokens chosen so far, finish_reason "cancelled"."""
        self.cancelled = True
        self._executor._cancel(self)

    def result(self, timeout: float | None = None) -> Result:
        """The final result (waits for it); raises the error that ended the request, if one did."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while not self.done:
                if not self._executor.running:
                    self._cond.release()
                    try:
                        self._executor._drive()
                    finally:
                        self._cond.acquire()
                    continue
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise TimeoutError(f"request {self.request_id} did not finish within {timeout} s")
                self._cond.wait(left)
        if self._error is not None:
            raise self._error
        return self._result

    def __iter__(self):
        n = 0
        while True:
            with self._cond:
                while n >= len(self._deltas) and not self.done and self._executor.running:
                    self._cond.wait(0.5)  # re-check: the loop thread may have been stopped meanwhile
                ready, finished = self._deltas[n:], self.done
            for delta in ready:
                yield delta
            n += len(ready)
            if finished and n >= len(self._deltas):
                break
            if not ready and not self._executor.running:
                self._executor._drive()  # no loop thread: this caller runs the executor
        self.result()  # raise the request's error, if any

    async def __aiter__(self):
        loop = asyncio.get_running_loop()
        n = 0
        while True:
            with self._cond:
                ready, finished = self._deltas[n:], self.done
                future = None
                if not ready and not finished and self._executor.running:
                    future = loop.create_future()
                    self._waiters.append((loop, future))
            for delta in ready:
                yield delta
            n += len(ready)
            if finished and n >= len(self._deltas):
                break
            if future is not None:
                await future
            elif not ready:
                await asyncio.to_thread(self._executor._drive)  # no loop thread: step it off the event loop
        if self._error is not None:
            raise self._error

    # -- called by the executor --------------------------------------------------------------

    def _push(self, delta: Delta) -> None:
        with self._cond:
            self._deltas.append(delta)
            self._wake()

    def _finish(self, result: Result | None, error: BaseException | None = None) -> None:
        with self._cond:
            self._result, self._error = result, error
            self._wake()

    def _wake(self) -> None:
        self._cond.notify_all()
        for loop, future in self._waiters:
            loop.call_soon_threadsafe(_resolve, future)
        self._waiters.clear()


def _resolve(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)


class Request:
    """The executor's state for one request: prompt, sampler, tokens, text, timings, slot."""

    def __init__(self, executor, ids: list[int], params: SamplingParams) -> None:
        self.ids, self.params = ids, params
        self.handle = Handle(executor, next(_ids))
        self.sampler = Sampler(params)  # its own generator: a seed reproduces the request whatever else runs
        self.tokenizer = executor.tokenizer
        self.outputs: list[int] = []
        self.emitted = ""  # text already sent in deltas
        self.text: str | None = None  # final text, once finished
        self.reason: str | None = None
        self.row: int | None = None
        self.fed = 0  # prompt tokens written to the cache (= the next prefill write index)
        self.submitted = time.perf_counter()
        self.admitted = self.first = self.last = None
        self.token_ms: list[float] = []

    @property
    def decoding(self) -> bool:
        return self.fed == len(self.ids) and self.reason is None

    @property
    def position(self) -> int:
        """Slot (= position) of the newest token, which the next decode step feeds."""
        return len(self.ids) + len(self.outputs) - 1

    def accept(self, token: int, eos_id: int | None) -> Delta:
        """Record a chosen token; decides whether the request ends (eos, stop string, length)."""
        now = time.perf_counter()
        if self.first is None:
            self.first = now
        else:
            self.token_ms.append((now - self.last) * 1e3)
        self.last = now
        self.outputs.append(token)
        text = self.tokenizer.decode(self.outputs) if self.tokenizer is not None else None
        if token == eos_id:
            self.reason = "eos"
        elif self.params.stop and text is not None and self._cut(text) is not None:
            text, self.reason = text[: self._cut(text)], "stop"
        elif len(self.outputs) == self.params.max_new_tokens:
            self.reason = "length"
        return Delta(token, self._delta(text), len(self.outputs) - 1)

    def _cut(self, text: str) -> int | None:
        return min((text.find(s) for s in self.params.stop if s in text), default=None)

    def _delta(self, text: str | None) -> str:
        if text is None:
            return ""
        if self.reason is not None:
            visible = self.text = text  # the end: everything is decided
        elif text.endswith("\ufffd"):  # a multi-byte character is not complete yet
            visible = self.emitted
        else:
            visible = text[: len(text) - _held(text, self.params.stop)]
        if not visible.startswith(self.emitted):  # decoding more tokens changed earlier text: send nothing
            return ""
        delta, self.emitted = visible[len(self.emitted):], visible
        return delta

    def result(self, reason: str | None = None) -> Result:
        reason = reason or self.reason or "length"
        text = self.text
        if text is None and self.tokenizer is not None:
            text = self.tokenizer.decode(self.outputs)
        decode_s = sum(self.token_ms) / 1e3
        rate = len(self.token_ms) / decode_s if decode_s > 0 else 0.0
        ms = lambda a, b: (b - a) * 1e3 if a is not None and b is not None else 0.0  # noqa: E731
        return Result(self.ids, self.outputs, text, reason, prefill_ms=ms(self.admitted, self.first),
                      decode_tokens_per_s=rate, queue_ms=ms(self.submitted, self.admitted),
                      ttft_ms=ms(self.submitted, self.first), token_ms=list(self.token_ms))  # fmt: skip


def _held(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest end of ``text`` that begins some stop string (it may still become one)."""
    held = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), held, -1):
            if text.endswith(s[:k]):
                held = k
                break
    return held
