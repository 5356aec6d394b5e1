"""The server's ``GET /metrics``: Prometheus text exposition format (version 0.0.4), written here
(a few gauges, counters and histograms need no client library)."""

from __future__ import annotations

import bisect
import threading

# seconds; time to first token includes queueing and the prompt's prefill, hence the longer tail
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
PREFIX = "mixtral_"


class Histogram:
    def __init__(self, name: str, help_text: str, buckets: tuple[float, ...]) -> None:
        self.name, self.help, self.buckets = PREFIX + name, help_text, buckets
        self.counts = [0] * (len(buckets) + 1)  # the last: above every bound (+Inf only)
        self.sum, self.count = 0.0, 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1  # le is inclusive: value == bound counts
        self.sum += value
        self.count += 1

    def lines(self) -> list[str]:
        out = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        total = 0
        for bound, n in zip((*map(_number, self.buckets), "+Inf"), self.counts):
            total += n
            out.append(f'{self.name}_bucket{{le="{bound}"}} {total}')
        return out + [f"{self.name}_sum {_number(self.sum)}", f"{self.name}_count {self.count}"]


class Metrics:
    """Per-request figures recorded by the server; the executor's gauges read at each scrape."""

    def __init__(self, executor) -> None:
        self.executor = executor
        self._lock = threading.Lock()
        self.ttft = Histogram("time_to_first_token_seconds", "Time from a request's arrival to its first token.",
                              TTFT_BUCKETS)  # fmt: skip
        self.itl = Histogram("inter_token_latency_seconds", "Time between consecutive tokens of a request.",
                             TOKEN_BUCKETS)  # fmt: skip
        self.queue = Histogram("queue_wait_seconds", "Time a request waited for a free slot.", TTFT_BUCKETS)
        self.finished: dict[str, int] = {}
        self.rejected: dict[int, int] = {}

    def record(self, result) -> None:
        """A request that ended with a Result (finish_reason as the runtime names it)."""
        with self._lock:
            if result.output_ids:
                self.ttft.observe(result.ttft_ms / 1e3)
                self.queue.observe(result.queue_ms / 1e3)
            for ms in result.token_ms:
                self.itl.observe(ms / 1e3)
            self.finished[result.finish_reason] = self.finished.get(result.finish_reason, 0) + 1

    def ended(self, reason: str) -> None:
        """A request that ended without a Result to read (a client that went away, an error)."""
        with self._lock:
            self.finished[reason] = self.finished.get(reason, 0) + 1

    def reject(self, status: int) -> None:
        with self._lock:
            self.rejected[status] = self.rejected.get(status, 0) + 1

    def render(self) -> str:
        stats = self.executor.stats()
        lines = []
        for name, kind, help_text, value in (
            ("queue_depth", "gauge", "Requests waiting for a slot.", stats["queue_depth"]),
            ("running_slots", "gauge", "Slots held by a request (prefilling or decoding).", stats["running"]),
            ("slots", "gauge", "Slots of the executor (the build's max_batch).", stats["slots"]),
            ("generated_tokens_total", "counter", "Tokens generated since start.", stats["generated_tokens"]),
            ("iterations_total", "counter", "Executor iterations (admit, prefill, decode) since start.",
             stats["iterations"]),
        ):  # fmt: skip
            lines += [f"# HELP {PREFIX}{name} {help_text}", f"# TYPE {PREFIX}{name} {kind}", f"{PREFIX}{name} {value}"]
        with self._lock:
            lines += _labelled("requests_total", "Requests that ended, by finish reason.", "finish_reason", self.finished)
            lines += _labelled("rejected_requests_total", "Requests refused before they were queued, by HTTP status.",
                               "status", self.rejected)  # fmt: skip
            for histogram in (self.ttft, self.itl, self.queue):
                lines += histogram.lines()
        return "\n".join(lines) + "\n"


def _labelled(name: str, help_text: str, label: str, values: dict) -> list[str]:
    lines = [f"# HELP {PREFIX}{name} {help_text}", f"# TYPE {PREFIX}{name} counter"]
    return lines + [f'{PREFIX}{name}{{{label}="{key}"}} {n}' for key, n in sorted(values.items())]


def _number(value: float) -> str:
    return repr(float(value))
