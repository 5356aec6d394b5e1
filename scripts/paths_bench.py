#!/usr/bin/env python3
"""Where each MoETop2 path and option wins, at Mixtral dims on this GPU: the numbers behind the
kernels' defaults (which prefill GEMMs from how many tokens, which decode options).

Two sweeps, every variant timed in this process against the first one of its group:

* prefill: for fp16 and bf16, token counts around the decode/prefill crossover and up to 512,
  the forced decode path, the mma.sync prefill and (on sm_90 with a library built with the path)
  the sm_90a CUTLASS prefill;
* decode: for fp16, bf16 and int8 (bf16 activations), 1 to 32 tokens (64 for int8), each
  combination of MOE_FLAG_PDL and MOE_FLAG_DECODE_FUSED, enqueued eagerly and replayed from a
  CUDA graph.

Correctness is scripts/gpu_check.py's job; this only times. Prints one line per timing and a
summary of the fastest variant per token count; with $OUT set, also writes paths_bench.json there.

    MIXTRAL_TRT_KERNELS_LIB=build/gpu/libmixtral_moe_top2.so python scripts/paths_bench.py
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_check as gc  # noqa: E402  (the problems, the timer, the workspace and graph helpers)

PREFILL_TOKENS = (16, 24, 32, 40, 48, 64, 96, 128, 192, 256, 384, 512)
DECODE_TOKENS = {"fp16": (1, 2, 4, 8, 16, 32), "bf16": (1, 2, 4, 8, 16, 32), "int8-bf16": (1, 2, 4, 8, 16, 32, 64)}


def time_variant(rows: list, sweep: str, wmode: str, T: int, variant: str, fn, warmup: int, reps: int) -> None:
    """Times ``fn``, adds its row (its time over that of the first variant timed for the same
    sweep, weights and tokens) and prints it."""
    us = gc.bench(fn, warmup, reps)
    group = (sweep, wmode, T)
    base = next((r["us"] for r in rows if (r["sweep"], r["wmode"], r["T"]) == group), us)
    rows.append(dict(sweep=sweep, wmode=wmode, T=T, variant=variant, us=us, vs_first=us / base))
    print(f"{sweep:7s} {wmode:9s} T={T:4d} {variant:18s} {us:9.1f} us  {us / base:5.2f}x", flush=True)


def prefill_sweep(kernels, problems, sm90_ok: bool, rows: list) -> None:
    import torch

    variants = [("decode", kernels.FLAG_FORCE_DECODE), ("mma.sync", kernels.FLAG_FORCE_PREFILL)]
    if sm90_ok:
        variants.append(("sm90", kernels.FLAG_FORCE_PREFILL | kernels.FLAG_PREFILL_SM90))
    for wmode in ("fp16", "bf16"):
        for T in PREFILL_TOKENS:
            p = gc.first_tokens(problems[wmode], T)
            ws = gc.workspace_for(kernels, p, kernels.FLAG_PREFILL_SM90 if sm90_ok else 0)
            out = torch.empty_like(p["hidden"])
            for name, flags in variants:
                time_variant(rows, "prefill", wmode, T, name, gc.enqueuer(kernels, p, ws, out, flags), 3, 30)
            del ws, out


def decode_sweep(kernels, problems, rows: list) -> None:
    import torch

    pdl, fused = kernels.FLAG_PDL, kernels.FLAG_DECODE_FUSED
    combos = (("plain", 0), ("pdl", pdl), ("fused", fused), ("pdl+fused", pdl | fused))
    for wmode, tokens in DECODE_TOKENS.items():
        for T in tokens:
            p = gc.first_tokens(problems[wmode], T)
            ws = gc.workspace_for(kernels, p)
            out = torch.empty_like(p["hidden"])
            for name, flags in combos:
                for how, fn in (("eager", gc.enqueuer(kernels, p, ws, out, flags)),
                                ("graph", gc.graph_call(kernels, p, ws, out, flags))):  # fmt: skip
                    if fn is not None:
                        time_variant(rows, "decode", wmode, T, f"{name}, {how}", fn, 5, 50)
            del ws, out


def summary(rows: list) -> None:
    print("\nfastest variant per (sweep, weights, tokens), and its time over the first variant's:")
    groups: dict[tuple, list] = {}
    for r in rows:
        groups.setdefault((r["sweep"], r["wmode"], r["T"]), []).append(r)
    for (sweep, wmode, T), rs in groups.items():
        best = min(rs, key=lambda r: r["us"])
        print(f"  {sweep:7s} {wmode:9s} T={T:4d}: {best['variant']:18s} {best['us']:9.1f} us "
              f"({best['vs_first']:.2f}x of {rs[0]['variant']})")  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sweep", choices=("prefill", "decode"), action="append", help="run only these sweeps")
    args = ap.parse_args()
    why = gc.unready()
    if why:
        print(f"paths_bench: {why}", file=sys.stderr)
        return 2
    import torch

    _, kernels, _ = gc.import_plugins()
    kernels.load_library()
    sm90_why = gc.sm90_unavailable(kernels)
    print(f"device {torch.cuda.get_device_name()}; sm90 path: {sm90_why or 'available'}", flush=True)
    problems = gc.mixtral_problems(("fp16", "bf16", "int8-bf16"))
    rows: list = []
    sweeps = args.sweep or ["prefill", "decode"]
    try:
        if "prefill" in sweeps:
            prefill_sweep(kernels, problems, sm90_why is None, rows)
        if "decode" in sweeps:
            decode_sweep(kernels, problems, rows)
    finally:
        if os.environ.get("OUT"):
            Path(os.environ["OUT"], "paths_bench.json").write_text(json.dumps(rows, indent=1))
    summary(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
