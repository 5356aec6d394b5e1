#!/usr/bin/env python3
"""Serving throughput and latency through ``mixtral-build serve``: concurrent streaming clients
against the same clients served one at a time, same server, same requests, same process. Prints
one table row per (clients, mode) and the ratios (concurrent / one at a time).

    mixtral-build tiny ckpt --hidden 512 --intermediate 1024 --layers 4 --heads 8 --kv-heads 2
    mixtral-build --model ckpt --precision fp32 --target onnxruntime --max-batch 16 --max-seq-len 320 --out b-fp32
    python scripts/bench_serve.py --build b-fp32                 # 1, 2, 4, 8, 16 clients
    python scripts/bench_serve.py --build b-fp32 --quick         # smoke run: 1 and 2 clients, short requests
    python scripts/bench_serve.py --cache-scaling --model ckpt   # decode step time vs cache capacity

Each client is a thread with its own httpx connection that streams its completions (token-id
prompts, greedy), so time to first token (request sent -> first token event) and inter-token
latency (gaps between token events) are measured on the client side. "one at a time": the same
client threads and requests, but each waits for the previous request to finish (one lock held
for a whole request), i.e. what a server that runs one request at a time gives.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

LEVELS = (1, 2, 4, 8, 16)


def start_server(build: Path) -> tuple[subprocess.Popen, str]:
    """``mixtral-build serve BUILD --port 0`` in a child process (its own GIL); returns it and its URL."""
    cmd = [sys.executable, "-m", "mixtral_trt.cli", "serve", str(build), "--port", "0", "--no-verify"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        if m := re.search(r"on (http://[^ ]+)/v1", line):
            threading.Thread(target=proc.stdout.read, daemon=True).start()  # drain, never block the server
            return proc, m.group(1)
    raise RuntimeError(f"the server exited ({proc.wait()}) before it listened: {line.strip()}")


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()


def make_requests(n: int, lengths: tuple[int, int], vocab: int, seed: int) -> list[list[int]]:
    """n prompts of random ids (BOS first), lengths uniform in [lo, hi], seeded."""
    rng = np.random.default_rng(seed)
    return [[1, *rng.integers(3, vocab, int(rng.integers(lengths[0], lengths[1] + 1)) - 1).tolist()] for _ in range(n)]


def stream_one(client, url: str, prompt: list[int], new_tokens: int) -> dict:
    """One streamed greedy completion: client-side TTFT (s), inter-token gaps (s), token count."""
    body = {"prompt": prompt, "max_tokens": new_tokens, "temperature": 0, "stream": True}
    sent = time.perf_counter()
    stamps = []
    with client.stream("POST", f"{url}/v1/completions", json=body, timeout=600) as response:
        if response.status_code != 200:
            raise RuntimeError(f"the server answered {response.status_code}: {response.read().decode()[:300]}")
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                raise RuntimeError(f"the server failed a request: {event['error']}")
            choices = event.get("choices") or [{}]
            stamps += [time.perf_counter()] * len(choices[0].get("token_ids") or [])
    return {"ttft": stamps[0] - sent, "itl": np.diff(stamps).tolist(), "tokens": len(stamps), "end": stamps[-1]}


def run_level(url: str, prompts: list[list[int]], clients: int, new_tokens: int, one_at_a_time: bool) -> dict:
    """``clients`` threads take the prompts in order until none is left; with ``one_at_a_time``
    each holds a shared lock for its whole request."""
    import httpx

    todo = list(enumerate(prompts))
    take, serial, results, errors = threading.Lock(), threading.Lock(), [], []

    def client() -> None:
        with httpx.Client() as http:
            while True:
                with take:
                    if not todo:
                        return
                    _, prompt = todo.pop(0)
                try:
                    if one_at_a_time:
                        with serial:
                            results.append(stream_one(http, url, prompt, new_tokens))
                    else:
                        results.append(stream_one(http, url, prompt, new_tokens))
                except Exception as exc:  # noqa: BLE001  reported after the level
                    errors.append(exc)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(f"{len(errors)} of {len(prompts)} requests failed; the first: {errors[0]}")
    wall = max(r["end"] for r in results) - start
    ttft = [r["ttft"] for r in results]
    itl = [g for r in results for g in r["itl"]]
    tokens = sum(r["tokens"] for r in results)
    return {"clients": clients, "mode": "one at a time" if one_at_a_time else "concurrent", "requests": len(results),
            "tokens": tokens, "wall": wall, "tok_s": tokens / wall,
            "ttft50": np.percentile(ttft, 50) * 1e3, "ttft99": np.percentile(ttft, 99) * 1e3,
            "itl50": np.percentile(itl, 50) * 1e3, "itl99": np.percentile(itl, 99) * 1e3}  # fmt: skip


def print_row(row: dict) -> None:
    print(f"{row['clients']:>7} {row['mode']:>14} {row['requests']:>8} {row['tokens']:>7} {row['tok_s']:>8.1f} "
          f"{row['ttft50']:>9.1f} {row['ttft99']:>9.1f} {row['itl50']:>8.1f} {row['itl99']:>8.1f}", flush=True)


def bench(build: Path, levels, lengths, new_tokens: int, per_level, seed: int) -> list[dict]:
    from mixtral_trt.manifest import read_manifest
    from mixtral_trt.pipeline import resolve_build

    resolved, _ = resolve_build(build, "onnxruntime")
    manifest = read_manifest(resolved, ("export", "optimize", "engine"), verify=False)
    vocab, slots = int(manifest["config"]["vocab_size"]), int(manifest["export"]["max_batch"])
    proc, url = start_server(build)
    rows = []
    try:
        run_level(url, make_requests(2, lengths, vocab, seed + 999), 2, new_tokens, False)  # warm-up
        print(f"build {resolved} ({slots} slots), prompts {lengths[0]}-{lengths[1]} tokens, {new_tokens} new tokens, "
              "greedy, streamed")  # fmt: skip
        print(f"{'clients':>7} {'mode':>14} {'requests':>8} {'tokens':>7} {'tok/s':>8} {'TTFT p50':>9} "
              f"{'TTFT p99':>9} {'ITL p50':>8} {'ITL p99':>8}   (times in ms)")  # fmt: skip
        for clients in levels:
            prompts = make_requests(per_level(clients), lengths, vocab, seed + clients)
            for one_at_a_time in (True, False):
                rows.append(run_level(url, prompts, clients, new_tokens, one_at_a_time))
                print_row(rows[-1])
    finally:
        stop_server(proc)
    return rows


def summarize(rows: list[dict]) -> None:
    by = {(r["clients"], r["mode"]): r for r in rows}
    for clients in sorted({r["clients"] for r in rows}):
        con, one = by[clients, "concurrent"], by[clients, "one at a time"]
        print(f"{clients:>2} clients: throughput {con['tok_s'] / one['tok_s']:.2f}x one at a time, "
              f"p99 inter-token {con['itl99'] / by[min(c for c, _ in by), 'concurrent']['itl99']:.2f}x the "
              "single-client one")  # fmt: skip
    if (8, "concurrent") in by:
        gain = by[8, "concurrent"]["tok_s"] / by[8, "one at a time"]["tok_s"]
        itl = by[8, "concurrent"]["itl99"] / by[1, "concurrent"]["itl99"]
        met = gain >= 3 and itl <= 3
        print(f"target (>= 3x throughput at 8 clients, p99 inter-token <= 3x single client): "
              f"{gain:.2f}x, {itl:.2f}x -> {'met' if met else 'NOT met'}")  # fmt: skip


def decode_step_ms(build: Path, rows: int, live: int, steps: int) -> float:
    """Median time of one decode step over ``rows`` rows with ``live`` tokens already in the cache."""
    from mixtral_trt import runtime

    backend = runtime.load(build, verify=False).backend
    rng = np.random.default_rng(0)
    for r in range(rows):  # fill each row's first `live` slots
        ids = rng.integers(3, backend.vocab_size, (1, live))
        backend.step_rows(r, ids, np.arange(live)[None], np.zeros(1, np.int64))
    ids = rng.integers(3, backend.vocab_size, (rows, 1))
    where = np.full(rows, live, np.int64)
    times = []
    for _ in range(steps + 3):  # the first 3: warm-up
        start = time.perf_counter()
        backend.step_rows(0, ids, where[:, None], where)
        times.append(time.perf_counter() - start)
    return float(np.median(times[3:])) * 1e3


def cache_scaling(model: Path, capacities, rows_list, live: int, steps: int) -> None:
    from mixtral_trt.export.onnx_export import export
    from mixtral_trt.export.tiny import resolve_model

    ckpt = resolve_model(str(model))
    print(f"decode step time (ms, median of {steps}), model {model}, fp32 export, {live} live tokens per row")
    print(f"{'rows':>5}" + "".join(f"{f'capacity {c}':>15}" for c in capacities) + f"{'ratio':>8}")
    with tempfile.TemporaryDirectory() as tmp:
        builds = {c: export(ckpt, Path(tmp) / f"cap{c}", max_batch=max(rows_list), max_seq_len=c, progress=False)
                  for c in capacities}  # fmt: skip
        for rows in rows_list:
            ms = [decode_step_ms(builds[c], rows, live, steps) for c in capacities]
            print(f"{rows:>5}" + "".join(f"{t:>15.3f}" for t in ms) + f"{ms[-1] / ms[0]:>7.2f}x", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--build", type=Path, help="a build (the main job's OUT, or an export/optimize directory)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 1 and 2 clients, 2 requests each, short")
    ap.add_argument("--prompt-tokens", default="64-256", help="prompt lengths LO-HI (uniform, seeded)")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--requests", type=int, default=8, help="requests per level: max(this, 2 x clients)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache-scaling", action="store_true", help="decode step time at two cache capacities instead")
    ap.add_argument("--model", type=Path, help="checkpoint for --cache-scaling")
    ap.add_argument("--capacities", default="256,4096")
    ap.add_argument("--live", type=int, default=128, help="live tokens per row for --cache-scaling")
    args = ap.parse_args()

    if args.cache_scaling:
        if args.model is None:
            ap.error("--cache-scaling needs --model CHECKPOINT")
        rows = (1, 2) if args.quick else (1, 8, 16)
        cache_scaling(args.model, [int(c) for c in args.capacities.split(",")], rows, args.live, 5 if args.quick else 30)
        return
    if args.build is None:
        ap.error("give --build DIR (see the commands at the top of --help)")
    lo, hi = (int(x) for x in args.prompt_tokens.split("-"))
    levels, per_level = LEVELS, lambda c: max(args.requests, 2 * c)
    if args.quick:
        levels, per_level = (1, 2), lambda c: 2
    rows = bench(args.build, levels, (lo, hi), args.new_tokens, per_level, args.seed)
    summarize(rows)


if __name__ == "__main__":
    main()
