"""scripts/bench_serve.py end to end on the tiny build (--quick: the server in a child process,
1 and 2 streaming clients, each mode), and its --cache-scaling table. No timings are asserted:
the tokens each row counts are checked against what its requests get alone through ``generate``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import load_module, make_checkpoint

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_serve.py"
COLUMNS = ["clients", "mode", "requests", "tokens", "tok/s", "TTFT p50", "TTFT p99", "ITL p50", "ITL p99"]
NEW_TOKENS, LENGTHS, SEED = 4, (4, 8), 5


def run_script(*args: str) -> list[str]:
    done = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout.splitlines()


def test_quick_run_prints_every_level_and_mode_with_the_tokens_served(build, oracle):
    lines = run_script("--build", str(build), "--quick", "--prompt-tokens", "4-8", "--new-tokens", str(NEW_TOKENS),
                       "--seed", str(SEED))  # fmt: skip
    header = next(line for line in lines if line.lstrip().startswith("clients"))
    for column in COLUMNS:
        assert column in header, header
    rows = [p for p in map(str.split, lines) if p[:1] in (["1"], ["2"]) and p[1] in ("concurrent", "one")]
    bench = load_module(SCRIPT, "bench_serve")
    vocab = oracle.backend.vocab_size
    seen = set()
    for parts in rows:
        clients, mode = int(parts[0]), "concurrent" if parts[1] == "concurrent" else " ".join(parts[1:5])
        fields = parts[:1] + parts[2 if mode == "concurrent" else 5 :]
        prompts = bench.make_requests(2, LENGTHS, vocab, SEED + clients)
        alone = sum(len(r.output_ids) for r in oracle.generate(prompts, max_new_tokens=NEW_TOKENS, greedy=True))
        assert int(fields[1]) == 2 and int(fields[2]) == alone, parts  # requests, tokens
        assert float(fields[3]) > 0 and all(float(x) >= 0 for x in fields[4:]), parts  # tok/s, latencies
        seen.add((clients, mode))
    assert seen == {(c, m) for c in (1, 2) for m in ("concurrent", "one at a time")}, lines
    assert any(line.startswith(" 2 clients: throughput") for line in lines), lines


def test_cache_scaling_prints_both_capacities_and_their_ratio(tmp_path):
    ckpt = make_checkpoint(tmp_path / "ckpt", num_hidden_layers=1, hidden_size=64, intermediate_size=64,
                           num_local_experts=4, num_attention_heads=2, num_key_value_heads=1, vocab_size=256)  # fmt: skip
    lines = run_script("--cache-scaling", "--quick", "--model", str(ckpt), "--capacities", "16,64", "--live", "8")
    header = next(line for line in lines if line.lstrip().startswith("rows"))
    assert "capacity 16" in header and "capacity 64" in header and "ratio" in header
    table = [line.split() for line in lines[lines.index(header) + 1 :]]
    assert [int(r[0]) for r in table] == [1, 2], lines
    for r in table:
        assert float(r[1]) > 0 and float(r[2]) > 0
        assert float(r[3].rstrip("x")) == pytest.approx(float(r[2]) / float(r[1]), rel=0.1)  # of rounded times, r
