#!/usr/bin/env python3
"""GPU check of the MoETop2 kernels: correctness against the PyTorch reference, then speed.

The plain run is the kernels' acceptance check and keeps to 5 minutes (--deadline 285, the build
by gpu_check.sh included): fp16/bf16/int8 against the reference for 1...4096 tokens with random
and skewed routing, the sm_90a path's checks, then the speed table at Mixtral's dims against the
PyTorch loop and torch._grouped_mm. --extended (--deadline 540, one 10-minute device call) adds
the opt-in options' checks, their rows in the table and a per-launch profile.

Each section runs in its own subprocess and process group (a kernel fault poisons a CUDA context;
the other sections still report). A section prints each result and table row as it gets it, so
what it measured is kept when it hangs, crashes or is stopped at the deadline, together with
what it wrote to stderr. Prints a PASS/FAIL
summary (INCOMPLETE when the deadline left something out) and exits non-zero unless PASS.

The sm_90a prefill path (MOE_FLAG_PREFILL_SM90, CUTLASS grouped GEMMs) has its own checks
("sm90") and, after the speed table so that a hang there costs none of it, its own rows at
Mixtral dims ("mixtral-sm90": "ours[sm90]" beside the plain enqueue timed again in that process).
Both are skipped, with the reason printed, when the library says the path cannot run here (not
sm_90, built without it); the rows also when the checks failed. A path that is there but fails
is a failure. If the sm90 section fails, its tiny cases run again, after the benchmark and within the deadline, with
synchronous launches (the error then names the step: gather, setup, GEMM1, silu, GEMM2) and under
compute-sanitizer's memcheck where the toolkit has it; every failed comparison prints where the
output is wrong (rows never written, rows left zero, error by expert and by column block).

With --extended: the "pdl" section checks MOE_FLAG_PDL (programmatic dependent launch, sm_90+):
bit-identical to a plain enqueue, eagerly, back to back on one workspace with changing token
counts, and replayed from CUDA graphs; only then does the table add "ours[pdl]" rows. The
"decode-fused" section checks MOE_FLAG_DECODE_FUSED (one router CTA permutes too; GEMM2 applies
the combine), alone and with PDL, before its rows. The "wide" section checks
MOE_FLAG_PREFILL_WIDE (128x256 mma.sync prefill tiles) the same way before "ours[wide]" rows are
timed. The last section ("breakdown") profiles one-token decode (eager and as a CUDA graph, with
and without PDL and fused decode) and 2048-token prefill at Mixtral dims: each launch's time,
their sum, and the gaps between dependent launches.

    python scripts/gpu_check.py                 # the check and the table (MIXTRAL_TRT_KERNELS_LIB or a build)
    python scripts/gpu_check.py --extended      # and the options, and the per-launch profile
    python scripts/gpu_check.py --build-only    # build for this GPU's arch, print the library path
    python scripts/gpu_check.py --section NAME  # one section in this process
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The issue's check (correctness, then the speed table) and, with --extended, the opt-in options'
# checks before the table (so it times them too) and the per-launch profile after it.
SECTIONS = ("decode", "prefill", "int8-decode", "int8-prefill", "special", "sm90", "pdl", "decode-fused", "wide",
            "mixtral", "mixtral-sm90", "breakdown")
CORE_SECTIONS = tuple(s for s in SECTIONS if s not in ("pdl", "decode-fused", "wide", "breakdown"))
DEADLINE = {False: 285, True: 540}  # --extended: default --deadline; the plain run keeps under 5 minutes
EXTRA_SECTIONS = ("sanitize", "sm90-sanitize")  # a few tiny cases, to run under compute-sanitizer
TOKENS = (1, 2, 3, 7, 16, 64, 65, 300, 1024, 4096)
SMALL = dict(H=512, I=1024, E=8)
MIXTRAL = dict(H=4096, I=14336, E=8)
HBM = {"H100 SXM": 3.35e12, "H200": 4.8e12}  # bytes/s
PEAK_TFLOPS = 989  # dense fp16/bf16 tensor-core peak of both: the prefill target is 50% of it
TOL = {"fp16": 1e-2, "bf16": 1e-2, "int8": 2e-2}
# main -> the mixtral and breakdown sections: "1" bench this option, else "0:<why not>"; an option is
# benchmarked only after its own section passed.
GATE_ENV = {"sm90": "MIXTRAL_GPU_CHECK_SM90", "pdl": "MIXTRAL_GPU_CHECK_PDL", "wide": "MIXTRAL_GPU_CHECK_WIDE",
            "decode-fused": "MIXTRAL_GPU_CHECK_DECODE_FUSED"}
SM90_BENCH_TOKENS = (2048, 512, 4096)  # the 2048-token target first, as in BENCH_TOKENS
# The sm90 section takes seconds when it works; a hang there (a GEMM waiting on a TMA barrier)
# must leave time for the speed table within the plain run's 5 minutes.
SECTION_TIMEOUT = {"sm90": 90}
MIN_SECTION_S = 20  # --deadline: a section that would start with less than this left is skipped
UNTIL_ENV = "MIXTRAL_GPU_CHECK_UNTIL"  # main -> a section: the time.time() at which it is stopped
STEP_S = 15  # the mixtral section starts a token count only with this many seconds left


def import_plugins():
    """mixtral_trt.plugins.{build,kernels,reference}, installed or straight from this checkout."""
    try:
        from mixtral_trt.plugins import build, kernels, reference
    except ImportError:
        for name, path in (("mixtral_trt", ROOT / "mixtral_trt"), ("mixtral_trt.plugins", ROOT / "plugins" / "python")):
            spec = importlib.util.spec_from_file_location(name, path / "__init__.py", submodule_search_locations=[str(path)])
            mod = importlib.util.module_from_spec(spec)
            sys.modules[name] = mod
            spec.loader.exec_module(mod)
        from mixtral_trt.plugins import build, kernels, reference
    return build, kernels, reference


def unready() -> str | None:
    """Why this machine cannot run the check (no CUDA GPU, a library that does not load), or None."""
    import torch

    if not torch.cuda.is_available():
        build = f"built for CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        return (f"no CUDA GPU here (torch {torch.__version__}, {build}): run it on a machine with an NVIDIA GPU "
                "and a CUDA build of PyTorch")  # fmt: skip
    if os.environ.get("MIXTRAL_TRT_KERNELS_LIB"):
        _, kernels, _ = import_plugins()
        try:
            kernels.load_library()
        except (kernels.KernelError, OSError) as e:
            return f"the kernel library does not load: {e}"
    return None


def gpu_arch() -> str:
    import torch

    major, minor = torch.cuda.get_device_capability()
    return f"{major}{minor}" + ("a" if (major, minor) == (9, 0) else "")


# --- problems ---------------------------------------------------------------------------------

WMODES = {  # name: (activation dtype, int8 weights?, scale dtype)
    "fp16": ("float16", False, None),
    "bf16": ("bfloat16", False, None),
    "int8": ("float16", True, "float32"),
    "int8-bf16": ("bfloat16", True, "float16"),
}


def make_problem(T, H, I, E, wmode="fp16", routing="random", seed=0, router_fp32=False, device="cuda"):
    import torch
    from mixtral_trt.plugins.reference import quantize_int8

    act, int8, sdt = WMODES[wmode]
    dt = getattr(torch, act)
    g = torch.Generator(device=device).manual_seed(seed)
    hidden = torch.randn(T, H, generator=g, device=device, dtype=torch.float32)
    router = torch.randn(E, H, generator=g, device=device, dtype=torch.float32) / math.sqrt(H)
    if routing == "skew":  # every token: top-1 expert 3, top-2 expert 5 (of 8); the others get nothing
        hidden[:, 0] = 8.0
        router[:, 0] = 0.0
        router[min(3, E - 2), 0], router[min(5, E - 1), 0] = 2.0, 1.0
    elif routing == "starve":  # the last expert (7 of 8) never chosen, the rest random
        hidden[:, 0] = 4.0
        router[:, 0] = 0.0
        router[E - 1, 0] = -3.0
    w13 = torch.randn(E, 2 * I, H, generator=g, device=device, dtype=dt).mul_(1 / math.sqrt(H))
    w2 = torch.randn(E, H, I, generator=g, device=device, dtype=dt).mul_(1 / math.sqrt(I))
    p = dict(hidden=hidden.to(dt), router=router if router_fp32 else router.to(dt), w13=w13, w2=w2,
             w13_scale=None, w2_scale=None)  # fmt: skip
    if int8:
        sd = getattr(torch, sdt)
        p["w13"], p["w13_scale"] = quantize_int8(w13, sd)
        p["w2"], p["w2_scale"] = quantize_int8(w2, sd)
    return p


def check(name, p, flags, wmode, results, kernels, reference, margin_min=1e-4):
    import torch

    out = torch.full_like(p["hidden"], float("nan"))
    try:
        kernels.moe_top2_torch(**p, flags=flags, out=out)
        torch.cuda.synchronize()
    except Exception as e:  # noqa: BLE001 - report and go on
        record(name, False, f"{type(e).__name__}: {e}", results)
        return None
    ref = reference.moe_top2_reference(**p)
    rows = reference.routing_margin(p["hidden"], p["router"]) > margin_min
    err = reference.relative_error(out, ref, rows)
    tol = TOL["int8" if "int8" in wmode else wmode]
    ok = err <= tol
    skipped = int((~rows).sum())
    note = f"{skipped} near-tie tokens excluded" if skipped else ""
    if not ok:
        note = "; ".join(filter(None, [note, diagnose(out, ref, p, reference)]))
    results.append(dict(name=name, ok=ok, err=err, tol=tol, note=note))
    print(f"{'ok  ' if ok else 'FAIL'} {name}: rel err {err:.2e} (tol {tol:.0e}) {note}", flush=True)
    return out


def record(name: str, ok: bool, note: str, results) -> bool:
    """A pass/fail result with no error figure: kept in ``results`` and printed."""
    results.append(dict(name=name, ok=ok, err=None, note=note))
    print(f"{'ok  ' if ok else 'FAIL'} {name}{': ' + note if note else ''}", flush=True)
    return ok


def same_bits(name: str, got, want, results) -> bool:
    import torch

    ok = torch.equal(got, want)
    return record(name, ok, "" if ok else f"max diff {(got.float() - want.float()).abs().max().item():.3e}", results)


def deterministic(name: str, run, results, kernels) -> bool:
    """``run()`` twice gives the same bits; an enqueue it refuses is a failure, reported."""
    import torch

    try:
        a, b = run(), run()
        torch.cuda.synchronize()
    except kernels.KernelError as e:
        return record(name, False, f"{type(e).__name__}: {e}", results)
    return same_bits(name, a, b, results)


def refused(name: str, call, expect: str, results, kernels) -> bool:
    """``call()`` is refused with a KernelError whose message names ``expect``."""
    try:
        call()
        ok, note = False, "accepted"
    except kernels.KernelError as e:
        ok, note = expect in str(e), str(e)
    return record(name, ok, note, results)


def diagnose(out, ref, p, reference) -> str:
    """Where a failed output is wrong, to debug from one run: rows never written (still NaN), rows
    left zero, and the error by each token's first expert and by output column block."""
    import torch

    o, r = out.float(), ref.float()
    scale = float(r.abs().max().clamp_min(1e-30))
    bad = ~torch.isfinite(o)
    row_err = torch.where(bad, torch.full_like(o, float("inf")), (o - r).abs()).amax(dim=1) / scale  # [T]
    parts = [f"{int(bad.any(dim=1).sum())}/{o.shape[0]} rows non-finite",
             f"{int((o == 0).all(dim=1).sum())} rows all zero"]  # fmt: skip
    _, top_e = reference.route(p["hidden"], p["router"], 2)
    by_expert = []
    for e in range(p["w13"].shape[0]):
        sel = top_e[:, 0] == e
        if sel.any():
            by_expert.append(f"e{e}:{int(sel.sum())}t/{float(row_err[sel].max()):.1e}")
    parts.append("worst row error by first expert " + " ".join(by_expert))
    finite = ~bad.any(dim=1)
    if finite.any():
        H, diff = o.shape[1], (o - r).abs()[finite]
        block = max(H // 8, 1)
        col_err = [float(diff[:, c:c + block].max()) / scale for c in range(0, H, block)]
        parts.append(f"finite rows by column block of {block}: " + " ".join(f"{v:.1e}" for v in col_err))
    return "; ".join(parts)


# --- correctness sections ---------------------------------------------------------------------


def section_paths(path: str, wmodes, results, kernels, reference):
    flag = kernels.FLAG_FORCE_DECODE if path == "decode" else kernels.FLAG_FORCE_PREFILL
    forced = (1, 7, 65, 300) if path == "decode" else (1, 3, 16, 64)
    for wmode in wmodes:
        auto = [t for t in TOKENS if kernels.decode_path(t, "int8" in wmode) == (path == "decode")]
        for T in auto:
            check(f"{wmode} T={T} auto[{path}]", make_problem(T, **SMALL, wmode=wmode, seed=T), 0, wmode, results,
                  kernels, reference)  # fmt: skip
        for T in forced:
            check(f"{wmode} T={T} forced {path}", make_problem(T, **SMALL, wmode=wmode, seed=100 + T), flag, wmode,
                  results, kernels, reference)  # fmt: skip


def section_special(results, kernels, reference):
    for routing in ("skew", "starve"):
        for wmode in ("fp16", "int8-bf16"):
            for T in (1, 65, 1024, 4096):
                p = make_problem(T, **SMALL, wmode=wmode, routing=routing, seed=7)
                check(f"{routing} {wmode} T={T}", p, 0, wmode, results, kernels, reference)
            p = make_problem(300, **SMALL, wmode=wmode, routing=routing, seed=8)
            check(f"{routing} {wmode} T=300 forced decode", p, kernels.FLAG_FORCE_DECODE, wmode, results, kernels,
                  reference)  # fmt: skip
    for T in (5, 300):
        for wmode in ("fp16", "bf16"):
            p = make_problem(T, **SMALL, wmode=wmode, router_fp32=True, seed=9)
            check(f"fp32 router {wmode} T={T}", p, 0, wmode, results, kernels, reference)
    for T in (1, 5, 130):  # the built-in tiny model's dims
        check(f"tiny dims H=128 I=256 T={T}", make_problem(T, 128, 256, 8, seed=10), 0, "fp16", results, kernels,
              reference)  # fmt: skip
    check("E=4 H=256 I=192 T=77", make_problem(77, 256, 192, 4, seed=11), 0, "fp16", results, kernels, reference)

    # determinism: the same inputs give the same bits
    for wmode, T in (("fp16", 1), ("fp16", 300), ("int8", 1024)):
        p = make_problem(T, **SMALL, wmode=wmode, seed=12)
        deterministic(f"deterministic {wmode} T={T}", lambda p=p: kernels.moe_top2_torch(**p), results, kernels)

    # CUDA graphs (decode, and 64-token prefill) replayed on new inputs equal eager bit for bit
    graphs_match("plain", 0, results, kernels)

    auto_checks(results, kernels, reference)

    # refused arguments come back as a clear error
    p = make_problem(4, **SMALL, seed=14)
    refused("top_k=3 refused", lambda: kernels.moe_top2_enqueue(
        p["hidden"].data_ptr(), p["router"].data_ptr(), p["w13"].data_ptr(), p["w2"].data_ptr(), None, None,
        p["hidden"].data_ptr(), 0, 4, 512, 1024, 8, 3, kernels.DTYPE_FP16, kernels.DTYPE_FP16, kernels.DTYPE_FP32, 0),
            "top_k", results, kernels)  # fmt: skip


def on_sm90() -> bool:
    import torch

    return torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)


def auto_takes_sm90(kernels, T: int, wmode: str) -> bool:
    """Whether MOE_FLAG_AUTO may take the sm_90a prefill here (moe_top2.h): fp16/bf16 weights, at
    least SM90_MIN_TOKENS tokens, an sm_90 GPU (and a library with the path, not asked here)."""
    return "int8" not in wmode and T >= kernels.SM90_MIN_TOKENS and on_sm90()


def auto_checks(results, kernels, reference) -> None:
    """MOE_FLAG_AUTO, what the TensorRT plugins enqueue: against the reference for every weight
    mode on both sides of its switches (fused decode up to 8 tokens, the sm_90a prefill from
    SM90_MIN_TOKENS on an sm_90 GPU), with skewed routing, bit for bit against flags 0 wherever it
    keeps the summation order (everywhere but the sm_90a prefill), and replayed from CUDA graphs."""
    if (why := missing_flag(kernels, "FLAG_AUTO")) is not None:
        print(f"skip auto: {why}", flush=True)
        return
    auto, first = kernels.FLAG_AUTO, kernels.SM90_MIN_TOKENS
    cases = [(w, T, "random") for w in ("fp16", "bf16", "int8-bf16") for T in (1, 8, 9, 33, first - 1, first, 1024)]
    cases += [("fp16", 1024, "skew"), ("bf16", first, "starve"), ("fp16", 3, "skew")]
    for wmode, T, routing in cases:
        p = make_problem(T, **SMALL, wmode=wmode, routing=routing, seed=700 + T)
        name = f"auto {routing} {wmode} T={T}"
        out = check(name, p, auto, wmode, results, kernels, reference)
        if out is not None and not auto_takes_sm90(kernels, T, wmode):
            same_bits(f"{name} == flags 0", out, kernels.moe_top2_torch(**p), results)
    graphs_match("auto", auto, results, kernels)


def missing_flag(kernels, flag: str) -> str | None:
    """Why an option cannot be checked with these bindings: they lack ``flag`` (None: they have it)."""
    return None if hasattr(kernels, flag) else f"this checkout's kernels.py has no {flag}"


# --- programmatic dependent launch (MOE_FLAG_PDL) ------------------------------------------------


def pdl_unavailable(kernels) -> str | None:
    """Why MOE_FLAG_PDL would change nothing here (None: it takes effect)."""
    import torch

    if (why := missing_flag(kernels, "FLAG_PDL")) is not None:
        return why
    cap = torch.cuda.get_device_capability()
    if cap < (9, 0):
        return f"device {torch.cuda.get_device_name()} is sm_{cap[0]}{cap[1]}; programmatic launch needs sm_90+"
    return None


def option_matches(tag: str, option: int, p, flags: int, wmode: str, results, kernels, reference) -> None:
    """One enqueue with ``option`` added to ``flags``: against the reference, then bit for bit
    against the same enqueue without it."""
    T = p["hidden"].shape[0]
    out = check(f"{tag} {wmode} T={T} flags={flags}", p, flags | option, wmode, results, kernels, reference)
    if out is not None:
        same_bits(f"{tag} {wmode} T={T} flags={flags} == without", out, kernels.moe_top2_torch(**p, flags=flags),
                  results)  # fmt: skip


def sweep(tag: str, option: int, cases, seed: int, results, kernels, reference) -> None:
    """option_matches for every weight mode and every (T, flags) of ``cases`` at the small dims."""
    for wmode in ("fp16", "bf16", "int8", "int8-bf16"):
        for T, flags in cases:
            option_matches(tag, option, make_problem(T, **SMALL, wmode=wmode, seed=seed + T), flags, wmode, results,
                           kernels, reference)  # fmt: skip


def section_pdl(results, kernels, reference) -> str | None:
    """MOE_FLAG_PDL against the reference and bit for bit against the same enqueue without it:
    every path and weight mode, skewed routing, back-to-back enqueues on one workspace with token
    counts (so region offsets) changing between them, and CUDA-graph replays. Returns why skipped."""
    why = pdl_unavailable(kernels)
    if why is not None:
        print(f"skip pdl: {why}", flush=True)
        return why
    pdl = kernels.FLAG_PDL
    sweep("pdl", pdl, ((1, 0), (3, 0), (16, 0), (33, 0), (64, 0), (65, 0), (1024, 0), (300, kernels.FLAG_FORCE_DECODE),
                       (5, kernels.FLAG_FORCE_PREFILL)), 300, results, kernels, reference)  # fmt: skip
    for routing in ("skew", "starve"):
        for T in (1, 65):
            p = make_problem(T, **SMALL, routing=routing, seed=7)
            check(f"pdl {routing} fp16 T={T}", p, pdl, "fp16", results, kernels, reference)

    back_to_back_match("pdl", pdl, results, kernels)
    graphs_match("pdl", pdl, results, kernels)
    return None


def back_to_back_match(tag: str, flags: int, results, kernels, seq=(1, 16, 300, 1, 64, 2048, 3, 1)) -> None:
    """Enqueues with ``flags`` back to back on one workspace, no synchronisation between: each one's
    first kernels may start while the previous one's last drain, over regions at other offsets
    (the token count changes). Each output bit for bit against the same problem alone, plainly."""
    import torch

    problems = [make_problem(T, **SMALL, wmode="fp16", seed=400 + i) for i, T in enumerate(seq)]
    ws = workspace_for(kernels, problems[seq.index(max(seq))], flags)
    outs = [torch.full_like(q["hidden"], float("nan")) for q in problems]
    torch.cuda.synchronize()
    for q, out in zip(problems, outs, strict=True):
        kernels.moe_top2_torch(**q, out=out, workspace=ws, flags=flags)
    torch.cuda.synchronize()
    for i, (q, out) in enumerate(zip(problems, outs, strict=True)):
        same_bits(f"{tag} back to back #{i} T={seq[i]} == alone", out, kernels.moe_top2_torch(**q), results)


def graphs_match(tag: str, flags: int, results, kernels) -> None:
    """CUDA graphs captured with ``flags``, each replayed three times on fresh inputs without
    synchronising: every replay bit for bit against a plain eager enqueue."""
    import torch

    for T in (1, 4, 64):
        p = make_problem(T, **SMALL, wmode="fp16", seed=13)
        static_in = p["hidden"].clone()
        q = dict(p, hidden=static_in)
        ws = workspace_for(kernels, q, flags)
        out = torch.empty_like(static_in)
        replay = graph_call(kernels, q, ws, out, flags=flags)
        if replay is None:
            record(f"{tag} cuda graph T={T}", False, "capture failed", results)
            continue
        fresh = [torch.randn_like(static_in) for _ in range(3)]
        got = []
        try:
            for x in fresh:
                static_in.copy_(x)
                replay()
                got.append(out.clone())
            torch.cuda.synchronize()
        except Exception as e:  # noqa: BLE001 - report and go on
            record(f"{tag} cuda graph T={T}", False, f"{type(e).__name__}: {e}", results)
            continue
        for i, (x, o) in enumerate(zip(fresh, got, strict=True)):
            same_bits(f"{tag} cuda graph T={T} replay {i} == eager without", o,
                      kernels.moe_top2_torch(**dict(p, hidden=x)), results)  # fmt: skip


# --- fused decode (MOE_FLAG_DECODE_FUSED) ---------------------------------------------------------


def fused_unavailable(kernels) -> str | None:
    return missing_flag(kernels, "FLAG_DECODE_FUSED")


def section_fused(results, kernels, reference) -> str | None:
    """MOE_FLAG_DECODE_FUSED (router + permute in one CTA up to 8 tokens, GEMM2 applies the combine)
    against the reference and bit for bit against the five-launch decode: every weight mode at 1–64
    tokens (one router CTA and several), forced decode of 300 (several passes per expert), skewed
    routing (experts with no tokens), an fp32 router, and with MOE_FLAG_PDL where it applies: that
    pair also back to back on one workspace and from CUDA graphs. Returns why skipped."""
    why = fused_unavailable(kernels)
    if why is not None:
        print(f"skip decode-fused: {why}", flush=True)
        return why
    fused, decode = kernels.FLAG_DECODE_FUSED, kernels.FLAG_FORCE_DECODE
    sweep("fused", fused, ((1, 0), (3, 0), (16, 0), (33, 0), (64, 0), (300, decode)), 600, results, kernels, reference)
    for routing in ("skew", "starve"):
        for T in (1, 65):
            option_matches(f"fused {routing}", fused, make_problem(T, **SMALL, routing=routing, seed=7), decode,
                           "fp16", results, kernels, reference)  # fmt: skip
    option_matches("fused H=320 I=192", fused, make_problem(7, 320, 192, 4, seed=601), 0, "fp16", results,
                   kernels, reference)  # fmt: skip
    for T in (5, 20):
        option_matches("fused fp32 router", fused, make_problem(T, **SMALL, wmode="bf16", router_fp32=True, seed=9), 0,
                       "bf16", results, kernels, reference)  # fmt: skip
    if pdl_unavailable(kernels) is None:
        both = fused | kernels.FLAG_PDL
        for wmode in ("fp16", "int8"):
            for T in (1, 16, 64):
                option_matches("pdl+fused", both, make_problem(T, **SMALL, wmode=wmode, seed=610 + T), 0, wmode,
                               results, kernels, reference)  # fmt: skip
        back_to_back_match("pdl+fused", both, results, kernels, seq=(1, 16, 1, 64, 3, 1, 32, 1))
        graphs_match("pdl+fused", both, results, kernels)
    else:
        graphs_match("fused", fused, results, kernels)
    return None


# --- wide prefill tiles (MOE_FLAG_PREFILL_WIDE) --------------------------------------------------


def wide_unavailable(kernels) -> str | None:
    return missing_flag(kernels, "FLAG_PREFILL_WIDE")


def section_wide(results, kernels, reference) -> str | None:
    """MOE_FLAG_PREFILL_WIDE against the reference and bit for bit against the default tiles: every
    weight mode, T = 65…4096 and forced prefill of a few tokens, dims whose last wide tile overhangs
    (H = 320, I = 192: multiples of 64, not of 128 or 256), skewed routing. Returns why skipped."""
    why = wide_unavailable(kernels)
    if why is not None:
        print(f"skip wide: {why}", flush=True)
        return why
    wide, prefill = kernels.FLAG_PREFILL_WIDE, kernels.FLAG_FORCE_PREFILL
    sweep("wide", wide, ((65, 0), (300, 0), (1024, 0), (4096, 0), (1, prefill), (7, prefill)), 500, results, kernels,
          reference)  # fmt: skip
    for wmode in ("fp16", "bf16", "int8", "int8-bf16"):
        option_matches("wide H=320 I=192", wide, make_problem(300, 320, 192, 8, wmode=wmode, seed=501), 0, wmode,
                       results, kernels, reference)  # fmt: skip
    for routing in ("skew", "starve"):
        for T in (65, 1024):
            option_matches(f"wide {routing}", wide, make_problem(T, **SMALL, routing=routing, seed=7), 0, "fp16",
                           results, kernels, reference)  # fmt: skip
    return None


# --- the sm_90a prefill path (MOE_FLAG_PREFILL_SM90) --------------------------------------------


def sm90_unavailable(kernels) -> str | None:
    """Why the sm90 path cannot run here (None: it can). Asks the library with one tiny enqueue."""
    import torch

    cap = torch.cuda.get_device_capability()
    if cap != (9, 0):
        return f"device {torch.cuda.get_device_name()} is sm_{cap[0]}{cap[1]}, the path needs sm_90"
    if (why := missing_flag(kernels, "FLAG_PREFILL_SM90")) is not None:
        return why
    p = make_problem(1, 128, 256, 8, seed=1)
    try:
        kernels.moe_top2_torch(**p, flags=kernels.FLAG_PREFILL_SM90 | kernels.FLAG_FORCE_PREFILL)
        torch.cuda.synchronize()
    except kernels.KernelError as e:
        # "...: MOE_FLAG_PREFILL_SM90 needs ..." is the library saying the path cannot run here;
        # any other error ("sm90 prefill: CUTLASS refused ...") is the path failing: the section's
        # checks then fail with it, and the failure is diagnosed.
        reason = str(e).partition("): ")[2] or str(e)
        if reason.startswith("MOE_FLAG_PREFILL_SM90"):
            return reason
    return None


def section_sm90(results, kernels, reference) -> str | None:
    """The sm90 path against the reference: T = 1..4096, skewed routing (experts with no tokens),
    odd dims, the auto path with the flag, determinism, refusals. Returns why it was skipped."""

    why = sm90_unavailable(kernels)
    if why is not None:
        print(f"skip sm90 path: {why}", flush=True)
        return why
    flag = kernels.FLAG_PREFILL_SM90 | kernels.FLAG_FORCE_PREFILL
    for wmode in ("fp16", "bf16"):
        for T in TOKENS:
            check(f"sm90 {wmode} T={T}", make_problem(T, **SMALL, wmode=wmode, seed=200 + T), flag, wmode, results,
                  kernels, reference)  # fmt: skip
        for routing in ("skew", "starve"):  # skew: every token to experts 3 and 5, six experts get none
            for T in (1, 65, 1024, 4096):
                p = make_problem(T, **SMALL, wmode=wmode, routing=routing, seed=7)
                check(f"sm90 {routing} {wmode} T={T}", p, flag, wmode, results, kernels, reference)
    for T in (7, 300):  # the flag alone: decode below the threshold, the sm90 GEMMs above
        check(f"sm90 flag, auto path, fp16 T={T}", make_problem(T, **SMALL, seed=210 + T), kernels.FLAG_PREFILL_SM90,
              "fp16", results, kernels, reference)  # fmt: skip
    check("sm90 tiny dims H=128 I=256 T=130", make_problem(130, 128, 256, 8, seed=10), flag, "fp16", results, kernels,
          reference)  # fmt: skip
    check("sm90 E=4 H=256 I=192 T=77", make_problem(77, 256, 192, 4, seed=11), flag, "fp16", results, kernels,
          reference)  # fmt: skip
    check("sm90 fp32 router bf16 T=300", make_problem(300, **SMALL, wmode="bf16", router_fp32=True, seed=9), flag,
          "bf16", results, kernels, reference)  # fmt: skip

    p = make_problem(1024, **SMALL, seed=12)
    deterministic("sm90 deterministic fp16 T=1024", lambda: kernels.moe_top2_torch(**p, flags=flag), results, kernels)

    with_decode = kernels.FLAG_PREFILL_SM90 | kernels.FLAG_FORCE_DECODE
    for name, wmode, flags, expect in (("int8 weights", "int8", flag, "needs fp16/bf16 weights"),
                                       ("with force decode", "fp16", with_decode, "cannot be combined")):  # fmt: skip
        q = make_problem(64, **SMALL, wmode=wmode, seed=13)
        refused(f"sm90 flag refused: {name}", lambda q=q, flags=flags: kernels.moe_top2_torch(**q, flags=flags), expect,
                results, kernels)  # fmt: skip
    return None


def bench_reason(option: str, kernels) -> str | None:
    """Why the mixtral and breakdown sections leave out ``option``'s rows ("sm90", "pdl"; None:
    they benchmark them): its section failed or was skipped, or, run by hand, it cannot run here."""
    verdict = os.environ.get(GATE_ENV[option])
    if verdict is None:  # run as a single section by hand
        unavailable = {"sm90": sm90_unavailable, "pdl": pdl_unavailable, "wide": wide_unavailable,
                       "decode-fused": fused_unavailable}[option]
        return unavailable(kernels)
    return None if verdict == "1" else verdict.removeprefix("0:")


# --- Mixtral dims: correctness and speed --------------------------------------------------------


def bench(fn, warmup: int, reps: int) -> float:
    """Median microseconds of ``fn`` over ``reps`` CUDA-event-timed calls after ``warmup`` calls."""
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for s, e in ev:
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    return 1000 * statistics.median(s.elapsed_time(e) for s, e in ev)


def workspace_for(kernels, p, flags: int = 0):
    """A device workspace for problem ``p`` (uint8, the size the library asks for with ``flags``)."""
    import torch

    T, H = p["hidden"].shape
    E, two_i, _ = p["w13"].shape
    size = kernels.workspace_size(T, H, two_i // 2, E, 2, kernels.torch_dtype_code(p["hidden"].dtype), flags=flags)
    return torch.empty(size, dtype=torch.uint8, device="cuda")


def enqueuer(kernels, p, ws, out, flags: int = 0):
    """One enqueue of problem ``p`` into workspace ``ws`` and ``out`` with ``flags``, as a call
    (what the speed table times, the profile traces and a CUDA graph captures)."""
    return lambda: kernels.moe_top2_torch(**p, out=out, workspace=ws, flags=flags)


def graph_call(kernels, p, ws, out, flags: int = 0):
    """One enqueue captured in a CUDA graph (as TensorRT decode would run it): replay per call."""
    import torch

    enqueue = enqueuer(kernels, p, ws, out, flags)
    try:
        enqueue()  # loads the kernels before capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            enqueue()
    except Exception as e:  # noqa: BLE001
        print(f"  cuda graph capture failed: {type(e).__name__}: {e}", flush=True)
        return None
    return graph.replay


def grouped_mm_moe(hidden, router, w13_t, w2_t, I: int):
    """Sort-by-expert + torch._grouped_mm twice + weighted scatter (bf16)."""
    import torch
    import torch.nn.functional as F
    from mixtral_trt.plugins.reference import route

    T, H = hidden.shape
    top_w, top_e = route(hidden, router)  # [T, 2]
    flat = top_e.flatten()  # [2T]
    order = torch.argsort(flat, stable=True)  # [2T]
    offs = torch.cumsum(torch.bincount(flat, minlength=w13_t.shape[0]), 0).to(torch.int32)  # [E]
    tok = order // 2
    h = torch._grouped_mm(hidden[tok], w13_t, offs=offs)  # [2T, 2I]
    a = F.silu(h[:, :I]) * h[:, I:]  # [2T, I]
    y = torch._grouped_mm(a, w2_t, offs=offs)  # [2T, H]
    out = torch.zeros(T, H, dtype=torch.float32, device=hidden.device)
    out.index_add_(0, tok, y.float() * top_w.flatten()[order, None])
    return out.to(hidden.dtype)


def ceilings() -> tuple[float, float]:
    import torch

    n = 1 << 31
    x = torch.empty(n, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    us = bench(lambda: y.copy_(x), 2, 10)
    bw = 2 * n / (us * 1e-6)
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    us_mm = bench(lambda: a @ b, 3, 10)
    return bw, 2 * 8192**3 / (us_mm * 1e-6)


# The token counts of the speed table, the targets first (one-token decode, 2048-token
# prefill), so that a run cut short by its deadline still has them; the table sorts them.
BENCH_TOKENS = (1, 2048, 64, 4, 512, 4096, 16, 8, 32)


def mixtral_problems(wmodes):
    """One 4096-token problem per weight mode at Mixtral dims (same seed: same hidden and router)."""
    H, I, E = MIXTRAL["H"], MIXTRAL["I"], MIXTRAL["E"]
    return {w: make_problem(4096, H, I, E, wmode=w, seed=21) for w in wmodes}


def first_tokens(p, T: int):
    return dict(p, hidden=p["hidden"][:T].contiguous())


def token_counts(tokens, cut):
    """``tokens`` in order, leaving out (and adding to ``cut``) those that would start with under
    STEP_S seconds left before main stops the section."""
    for T in tokens:
        if seconds_left() < STEP_S:
            print(f"  T={T}: not timed, {max(seconds_left(), 0):.0f} s left", flush=True)
            if cut is not None:
                cut.append(f"T={T}")
            continue
        yield T


def time_impls(impls, p, wmode: str, reps: int, reference, rows_out, base_us=None) -> None:
    """Times each (impl, fn) of ``impls`` on problem ``p`` and adds its table row: the selected
    experts' weight bytes per second, the MoE's TFLOP/s, and its time over the plain enqueue's
    ("ours", timed first in this process, or ``base_us``)."""
    import torch

    T, H = p["hidden"].shape
    E, two_i, _ = p["w13"].shape
    I = two_i // 2
    _, top_e = reference.route(p["hidden"], p["router"])
    experts = int(torch.unique(top_e).numel())
    wbytes = experts * 3 * H * I * p["w13"].element_size()
    if p["w13_scale"] is not None:
        wbytes += experts * (2 * I + H) * p["w13_scale"].element_size()
    flop = 2 * T * 2 * 3 * H * I
    for impl, fn in impls:
        try:
            us = bench(fn, 3, reps if impl.startswith("ours") else max(5, reps // 5))
        except Exception as e:  # noqa: BLE001
            print(f"  {impl} {wmode} T={T}: {type(e).__name__}: {str(e).splitlines()[0][:160]}", flush=True)
            continue
        if impl == "ours":
            base_us = us
        row = dict(kind="bench", wmode=wmode, T=T, impl=impl, us=us, experts=experts,
                   gbs=wbytes / (us * 1e-6) / 1e9, tflops=flop / (us * 1e-6) / 1e12,
                   vs_ours=(us / base_us) if base_us else None)  # fmt: skip
        rows_out.append(row)
        print(f"  {wmode:9s} T={T:5d} {impl:27s} {us:10.1f} us  {row['gbs']:7.0f} GB/s  "
              f"{row['tflops']:6.1f} TFLOP/s", flush=True)  # fmt: skip


def section_mixtral(results, kernels, reference, rows_out, cut=None):
    """Mixtral dims: a few checks against the reference, the copy and matmul ceilings, then the
    speed table: every token count of BENCH_TOKENS x weight mode against the PyTorch loop and
    torch._grouped_mm; "ours" is flags 0, "ours[auto]" MOE_FLAG_AUTO (what the plugins enqueue;
    where it takes the sm_90a prefill, only once that path's section passed); the pdl, wide and
    decode-fused rows only after their sections passed (the sm90 path's forced rows come from their
    own section, next). Token counts that would start with under
    STEP_S seconds left go to ``cut``."""
    import torch

    name = torch.cuda.get_device_name()
    bw, mm = ceilings()
    print(f"device {name} (torch {torch.__version__}, CUDA {torch.version.cuda}): measured copy {bw / 1e12:.2f} TB/s "
          f"(read+write), bf16 8192^3 matmul {mm / 1e12:.0f} TFLOP/s", flush=True)  # fmt: skip
    rows_out.append(dict(kind="ceiling", device=name, copy_tbs=bw / 1e12, matmul_tflops=mm / 1e12))
    problems = mixtral_problems(("fp16", "bf16", "int8-bf16"))
    for wmode, T in (("fp16", 1), ("fp16", 64), ("fp16", 512), ("int8-bf16", 1), ("int8-bf16", 512), ("bf16", 2048)):
        check(f"Mixtral dims {wmode} T={T}", first_tokens(problems[wmode], T), 0, wmode, results, kernels, reference)
    reasons = {o: bench_reason(o, kernels) for o in ("pdl", "wide", "decode-fused")}
    for option, why in reasons.items():
        if why is not None:
            print(f"  {option} rows left out: {why}", flush=True)
    no_pdl, no_wide, no_fused = reasons.values()
    # the plugins' flags; at the sm_90a prefill's sizes only once that path passed its section
    auto = getattr(kernels, "FLAG_AUTO", None)
    no_sm90 = bench_reason("sm90", kernels) if auto and on_sm90() else None
    if no_sm90 is not None:
        print(f"  ours[auto] rows left out where it takes the sm90 path: {no_sm90}", flush=True)
    I = MIXTRAL["I"]
    w13_t = problems["bf16"]["w13"].transpose(1, 2)
    w2_t = problems["bf16"]["w2"].transpose(1, 2)
    for T in token_counts(BENCH_TOKENS, cut):
        small = T <= 64
        for wmode in ("fp16", "bf16", "int8-bf16"):
            p = first_tokens(problems[wmode], T)
            ws = workspace_for(kernels, p, auto or 0)  # MOE_FLAG_AUTO's workspace serves every other call too
            out = torch.empty_like(p["hidden"])
            eager = functools.partial(enqueuer, kernels, p, ws, out)  # eager(flags): one enqueue as a call
            impls = [("ours", eager())]
            replay = graph_call(kernels, p, ws, out) if small and wmode != "bf16" else None
            if replay is not None:
                impls.append(("ours[cuda graph]", replay))
            if auto and (no_sm90 is None or not auto_takes_sm90(kernels, T, wmode)):
                impls.append(("ours[auto]", eager(auto)))
                replay = graph_call(kernels, p, ws, out, auto) if small and wmode != "bf16" else None
                if replay is not None:
                    impls.append(("ours[auto, cuda graph]", replay))
            if no_wide is None and not small:
                impls.append(("ours[wide]", eager(kernels.FLAG_PREFILL_WIDE)))
            if no_pdl is None and wmode != "bf16" and (small or T == 2048):
                impls.append(("ours[pdl]", eager(kernels.FLAG_PDL)))
                replay = graph_call(kernels, p, ws, out, flags=kernels.FLAG_PDL) if small else None
                if replay is not None:
                    impls.append(("ours[pdl, cuda graph]", replay))
            if no_fused is None and wmode != "bf16" and kernels.decode_path(T, "int8" in wmode):  # decode only
                fused = kernels.FLAG_DECODE_FUSED
                impls.append(("ours[fused]", eager(fused)))
                if no_pdl is None:
                    fused |= kernels.FLAG_PDL
                replay = graph_call(kernels, p, ws, out, flags=fused)
                if replay is not None:
                    impls.append(("ours[pdl+fused, cuda graph]" if no_pdl is None else "ours[fused, cuda graph]",
                                  replay))  # fmt: skip
            if T in (16, 32, 64):
                for path, flag in (("decode", kernels.FLAG_FORCE_DECODE), ("prefill", kernels.FLAG_FORCE_PREFILL)):
                    if kernels.decode_path(T, "int8" in wmode) != (path == "decode"):
                        impls.append((f"ours[{path} path]", eager(flag)))
            # int8: the loop dequantises each selected expert's weights, then multiplies in bf16
            impls.append(("torch loop", lambda p=p: reference.moe_top2_loop(**p)))
            if wmode == "bf16" and hasattr(torch, "_grouped_mm"):
                impls.append(("torch._grouped_mm", lambda p=p: grouped_mm_moe(p["hidden"], p["router"], w13_t, w2_t, I)))
            time_impls(impls, p, wmode, 50 if small else 10, reference, rows_out)
            del ws, out


def section_mixtral_sm90(results, kernels, reference, rows_out, cut=None) -> str | None:
    """The sm90 path at Mixtral dims, after the speed table (so a hang here costs none of it) and
    only once its own section passed: two checks against the reference, then its rows at
    SM90_BENCH_TOKENS, each beside the plain enqueue timed again in this process. Returns why
    skipped."""
    import torch

    why = bench_reason("sm90", kernels)
    if why is not None:
        print(f"  sm90 rows left out: {why}", flush=True)
        return why
    problems = mixtral_problems(("fp16", "bf16"))
    sm90 = kernels.FLAG_PREFILL_SM90
    for wmode, T in (("fp16", 512), ("bf16", 2048)):
        check(f"Mixtral dims {wmode} T={T} sm90", first_tokens(problems[wmode], T), sm90, wmode, results, kernels,
              reference)  # fmt: skip
    for T in token_counts(SM90_BENCH_TOKENS, cut):
        for wmode in ("fp16", "bf16"):
            p = first_tokens(problems[wmode], T)
            ws = workspace_for(kernels, p, sm90)  # the sm90 path's workspace covers the plain enqueue's too
            out = torch.empty_like(p["hidden"])
            base = []
            time_impls([("ours", enqueuer(kernels, p, ws, out))], p, wmode, 10, reference, base)
            time_impls([("ours[sm90]", enqueuer(kernels, p, ws, out, sm90))], p, wmode, 10, reference, rows_out,
                       base_us=base[0]["us"] if base else None)  # fmt: skip
            del ws, out
    return None


# --- where the time goes: each launch of one enqueue, from the CUDA profiler ---------------------


def short_kernel_name(name: str) -> str:
    """'void moe::decode_gemm<__half, false, true, 1>(moe::GemmArgs)' -> 'decode_gemm<__half, false, true, 1>'."""
    if "cutlass" in name and "GemmUniversal" in name:
        return "cutlass grouped GEMM (sm90)"
    name = name.removeprefix("void ")
    for prefix in ("moe::(anonymous namespace)::", "moe::"):
        name = name.replace(prefix, "")
    depth, cut = 0, len(name)
    for i, ch in enumerate(name):  # drop the parameter list: the first '(' outside template brackets
        depth += (ch == "<") - (ch == ">")
        if ch == "(" and depth == 0:
            cut = i
            break
    return name[:cut][:70]


def breakdown_from_trace(events, calls: int):
    """Kernel events of ``calls`` identical enqueues (dicts with name, ts, dur in µs, any order) ->
    (rows, busy, span): per launch position the kernel's name and median µs; the median per call
    of the summed kernel time (busy) and of first start to last end (span; span - busy = the gaps
    between dependent launches). None when the events do not split into equal calls."""
    kernels = sorted(events, key=lambda e: e["ts"])
    if calls <= 0 or not kernels or len(kernels) % calls:
        return None
    n = len(kernels) // calls
    per_call = [kernels[i * n:(i + 1) * n] for i in range(calls)]
    names = [short_kernel_name(e["name"]) for e in per_call[0]]
    if any([short_kernel_name(e["name"]) for e in c] != names for c in per_call[1:]):
        return None
    rows = [(names[k], statistics.median(c[k]["dur"] for c in per_call)) for k in range(n)]
    busy = statistics.median(sum(e["dur"] for e in c) for c in per_call)
    span = statistics.median(max(e["ts"] + e["dur"] for e in c) - c[0]["ts"] for c in per_call)
    return rows, busy, span


def profile_calls(fn, calls: int = 5):
    """Kernel events of ``calls`` calls of ``fn`` (after warm-up), from torch.profiler's CUDA trace."""
    import tempfile

    import torch
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "trace.json"
        prof.export_chrome_trace(str(path))
        trace = json.loads(path.read_text())
    return [e for e in trace.get("traceEvents", []) if e.get("cat") == "kernel"]


def section_breakdown(kernels, rows_out):
    """One-token decode (eager and as a CUDA graph) and 2048-token prefill at Mixtral dims, fp16:
    each launch's median time, the kernels' sum and the span of one enqueue."""
    import torch

    H, I, E = MIXTRAL["H"], MIXTRAL["I"], MIXTRAL["E"]
    cases = [("decode T=1", 1, 0, False), ("decode T=1 (cuda graph)", 1, 0, True), ("prefill T=2048", 2048, 0, False)]
    if bench_reason("wide", kernels) is None:
        cases.append(("prefill T=2048 wide", 2048, kernels.FLAG_PREFILL_WIDE, False))
    if bench_reason("pdl", kernels) is None:
        pdl = kernels.FLAG_PDL
        cases += [("decode T=1 pdl", 1, pdl, False), ("decode T=1 pdl (cuda graph)", 1, pdl, True)]
        if bench_reason("decode-fused", kernels) is None:
            both = kernels.FLAG_PDL | kernels.FLAG_DECODE_FUSED
            cases.append(("decode T=1 pdl+fused (cuda graph)", 1, both, True))
    if bench_reason("sm90", kernels) is None:
        cases.append(("prefill T=2048 sm90", 2048, kernels.FLAG_PREFILL_SM90, False))
    base = make_problem(2048, H, I, E, wmode="fp16", seed=21)
    for title, T, flags, graphed in cases:
        p = dict(base, hidden=base["hidden"][:T].contiguous())
        ws = workspace_for(kernels, p, flags)
        out = torch.empty_like(p["hidden"])
        fn = graph_call(kernels, p, ws, out, flags) if graphed else enqueuer(kernels, p, ws, out, flags)
        if fn is None:
            continue
        try:
            found = breakdown_from_trace(profile_calls(fn), 5)
        except Exception as e:  # noqa: BLE001 - the profiler is optional: say why and go on
            print(f"  {title}: no profile ({type(e).__name__}: {str(e).splitlines()[0][:160]})", flush=True)
            continue
        if found is None:
            print(f"  {title}: the profile did not split into 5 equal calls", flush=True)
            continue
        launches, busy, span = found
        gaps = f"gaps {span - busy:.1f} us" if span >= busy else f"overlap {busy - span:.1f} us"
        print(f"\n{title} (fp16, Mixtral dims): kernels {busy:.1f} us, first start to last end {span:.1f} us, {gaps}",
              flush=True)  # fmt: skip
        for name, us in launches:
            print(f"  {us:9.1f} us  {us / busy * 100:5.1f}%  {name}", flush=True)
        rows_out.append(dict(kind="breakdown", case=title, busy_us=busy, span_us=span, launches=launches))
        del ws, out


# --- driver -----------------------------------------------------------------------------------


class Streamed(list):
    """A section's results or rows: each append is printed at once as one "@@<TAG> <json>" line,
    so what a section measured reaches main even when the section hangs or crashes later."""

    def __init__(self, tag: str):
        super().__init__()
        self.tag = tag

    def append(self, item) -> None:
        super().append(item)
        print(f"@@{self.tag} " + json.dumps(item), flush=True)


def seconds_left() -> float:
    """Seconds before main stops this section (its --timeout, or what --deadline leaves); run by
    hand with --section, no limit."""
    until = os.environ.get(UNTIL_ENV)
    return float(until) - time.time() if until else math.inf


def parse_section_output(text: str):
    """A section's output -> (its other lines, its streamed results, its streamed rows, its summary
    or None when it never got to print one: it hung or crashed)."""
    lines, results, rows, summary = [], [], [], None
    for line in text.splitlines():
        tag, _, body = line.partition(" ")
        try:  # a line another process wrote into (compute-sanitizer shares the pipe) stays text
            item = json.loads(body) if tag in ("@@RESULT", "@@ROW", "@@SUMMARY") else None
        except ValueError:
            tag, item = "", None
        if tag == "@@RESULT":
            results.append(item)
        elif tag == "@@ROW":
            rows.append(item)
        elif tag == "@@SUMMARY":
            summary = item
        else:
            lines.append(line)
    return lines, results, rows, summary


def run_section(name: str) -> int:
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    _, kernels, reference = import_plugins()
    kernels.load_library()
    results, rows, skipped, cut = Streamed("RESULT"), Streamed("ROW"), None, []
    start = time.monotonic()
    try:
        if name in ("decode", "prefill"):
            section_paths(name, ("fp16", "bf16"), results, kernels, reference)
        elif name in ("int8-decode", "int8-prefill"):
            section_paths(name.split("-")[1], ("int8", "int8-bf16"), results, kernels, reference)
        elif name == "special":
            section_special(results, kernels, reference)
        elif name == "pdl":
            skipped = section_pdl(results, kernels, reference)
        elif name == "wide":
            skipped = section_wide(results, kernels, reference)
        elif name == "decode-fused":
            skipped = section_fused(results, kernels, reference)
        elif name == "sm90":
            skipped = section_sm90(results, kernels, reference)
        elif name == "mixtral":
            section_mixtral(results, kernels, reference, rows, cut)
        elif name == "mixtral-sm90":
            skipped = section_mixtral_sm90(results, kernels, reference, rows, cut)
        elif name == "breakdown":
            section_breakdown(kernels, rows)
        elif name == "sm90-sanitize":  # empty experts (group 0 included), one partial tile, odd dims
            flag = kernels.FLAG_PREFILL_SM90 | kernels.FLAG_FORCE_PREFILL
            for T, routing, dims in ((1, "random", (128, 256, 8)), (130, "skew", (128, 256, 8)),
                                     (77, "starve", (256, 192, 4)), (300, "random", (512, 1024, 8))):  # fmt: skip
                check(f"sm90 tiny {routing} T={T} H,I,E={dims}", make_problem(T, *dims, routing=routing, seed=T), flag,
                      "fp16", results, kernels, reference)  # fmt: skip
        elif name == "sanitize":
            for wmode in ("fp16", "int8-bf16"):
                for T, flags in ((3, kernels.FLAG_FORCE_DECODE), (65, kernels.FLAG_FORCE_PREFILL), (65, 0)):
                    check(f"tiny {wmode} T={T} flags={flags}", make_problem(T, 128, 256, 8, wmode=wmode, seed=T), flags,
                          wmode, results, kernels, reference)  # fmt: skip
    except Exception:  # noqa: BLE001
        traceback.print_exc()
        results.append(dict(name=f"{name}: uncaught error", ok=False, err=None, note=traceback.format_exc(limit=2)))
    summary = dict(section=name, seconds=round(time.monotonic() - start, 1), skipped=skipped, cut=cut)
    print("@@SUMMARY " + json.dumps(summary), flush=True)
    return 0


def print_table(rows) -> None:
    ceil = [r for r in rows if r["kind"] == "ceiling"]
    if ceil:
        c = ceil[0]
        print(f"\nSpeed at Mixtral dims (H=4096, I=14336, E=8, top-2) on {c['device']}; measured copy "
              f"{c['copy_tbs']:.2f} TB/s, bf16 matmul {c['matmul_tflops']:.0f} TFLOP/s")  # fmt: skip
    print("GB/s = bytes of the selected experts' weights / time; %BW vs 3.35 TB/s (H100 SXM) and 4.8 TB/s (H200);"
          f" %MMA vs {PEAK_TFLOPS} TFLOP/s")  # fmt: skip
    hdr = (f"{'weights':9s} {'T':>5s} {'impl':27s} {'experts':>7s} {'us':>10s} {'GB/s':>7s} {'%H100':>6s} "
           f"{'%H200':>6s} {'TFLOP/s':>8s} {'%MMA':>5s} {'t/ours':>7s}")
    print(hdr)
    print("-" * len(hdr))
    order = list(WMODES)
    for r in sorted((r for r in rows if r["kind"] == "bench"), key=lambda r: (r["T"], order.index(r["wmode"]))):
        bw100, bw200 = (r["gbs"] * 1e9 / HBM[k] * 100 for k in ("H100 SXM", "H200"))
        mma = r["tflops"] / PEAK_TFLOPS * 100
        vs = f"{r['vs_ours']:.2f}" if r["vs_ours"] else "-"
        print(f"{r['wmode']:9s} {r['T']:5d} {r['impl']:27s} {r['experts']:7d} {r['us']:10.1f} {r['gbs']:7.0f} "
              f"{bw100:5.0f}% {bw200:5.0f}% {r['tflops']:8.1f} {mma:4.0f}% {vs:>7s}")  # fmt: skip
    print_auto_summary(rows)
    print_sm90_summary(rows)
    print_option_summary(rows, "programmatic dependent launch (> 1x: faster with MOE_FLAG_PDL)",
                         {"ours[pdl]": "ours", "ours[pdl, cuda graph]": "ours[cuda graph]"})
    print_option_summary(rows, "wide prefill tiles (> 1x: faster with MOE_FLAG_PREFILL_WIDE)", {"ours[wide]": "ours"})
    print_option_summary(rows, "fused decode (> 1x: faster with MOE_FLAG_DECODE_FUSED)",
                         {"ours[fused]": "ours", "ours[fused, cuda graph]": "ours[cuda graph]",
                          "ours[pdl+fused, cuda graph]": "ours[pdl, cuda graph]"})


def of_peak(row) -> str:
    """A table row's TFLOP/s and its share of the tensor-core peak, as the summaries quote them."""
    return f"{row['tflops']:.0f} TFLOP/s = {row['tflops'] / PEAK_TFLOPS * 100:.0f}% of {PEAK_TFLOPS}"


def bench_rows(rows) -> dict:
    """The speed table's rows by (weight mode, tokens, impl)."""
    return {(r["wmode"], r["T"], r["impl"]): r for r in rows if r["kind"] == "bench"}


def print_auto_summary(rows) -> None:
    """The targets, read off what the plugins run (MOE_FLAG_AUTO; the faster of eager and CUDA
    graph where both were timed): decode at >= 75% of HBM bandwidth for the selected experts'
    bytes, 2048-token prefill at >= 50% of 989 TFLOP/s, faster than the PyTorch loop everywhere."""
    bench = bench_rows(rows)
    lines = []
    for (wmode, T, impl), r in sorted(bench.items()):
        if impl != "ours[auto]":
            continue
        graph = bench.get((wmode, T, "ours[auto, cuda graph]"))
        best = graph if graph is not None and graph["us"] < r["us"] else r
        if T <= 64:
            share = "/".join(f"{best['gbs'] * 1e9 / HBM[k] * 100:.0f}" for k in HBM) + "% of H100 SXM/H200 bandwidth"
        else:
            share = of_peak(best)
        names = {"ours": "flags 0", "torch loop": "the PyTorch loop", "torch._grouped_mm": "_grouped_mm"}
        others = [f"{bench[(wmode, T, o)]['us'] / best['us']:.2f}x {name}"
                  for o, name in names.items() if (wmode, T, o) in bench]  # fmt: skip
        how = " (cuda graph)" if best is graph else ""
        lines.append(f"  {wmode:9s} T={T:5d} {best['us']:8.1f} us{how}; {share}; speed-up vs {', '.join(others)}")
    if lines:
        print("\nwhat the plugins run (MOE_FLAG_AUTO; speed-up > 1: it is faster):")
        print("\n".join(lines))


def print_sm90_summary(rows) -> None:
    """The issue's targets for the sm90 path: >= 50% of 989 TFLOP/s at T=2048, faster than PyTorch."""
    bench = bench_rows(rows)
    lines = []
    for (wmode, T, impl), r in sorted(bench.items()):
        if impl != "ours[sm90]":
            continue
        others = [f"{1 / r['vs_ours']:.2f}x the mma.sync path"] if r["vs_ours"] else []
        names = {"torch loop": "the PyTorch loop", "torch._grouped_mm": "_grouped_mm"}
        others += [f"{bench[(wmode, T, o)]['us'] / r['us']:.2f}x {name}"
                   for o, name in names.items() if (wmode, T, o) in bench]  # fmt: skip
        lines.append(f"  {wmode} T={T}: {of_peak(r)}; speed-up vs {', '.join(others)}")
    if lines:
        print("\nsm90 path (speed-up > 1: the sm90 path is faster):")
        print("\n".join(lines))


def print_option_summary(rows, title: str, bases: dict[str, str]) -> None:
    """What an option buys: each of its rows (``bases``: option impl -> the impl it is compared to)
    against the same call without it; for decode sizes the share of H100 SXM's 3.35 TB/s that the
    selected experts' weights reach (the one-token target is 75%), for prefill the share of 989
    TFLOP/s (the 2048-token target is 50%)."""
    bench = bench_rows(rows)
    lines = []
    for (wmode, T, impl), r in sorted(bench.items()):
        base = bases.get(impl)
        if base is None or (wmode, T, base) not in bench:
            continue
        b = bench[(wmode, T, base)]
        share = f"{r['gbs'] * 1e9 / HBM['H100 SXM'] * 100:.0f}% of H100 SXM bandwidth" if T <= 64 else of_peak(r)
        lines.append(f"  {wmode:9s} T={T:5d} {base:16s} {b['us']:8.1f} us -> {r['us']:8.1f} us "
                     f"({b['us'] / r['us']:.3f}x); {share}")  # fmt: skip
    if lines:
        print(f"\n{title}:")
        print("\n".join(lines))


def run_captured(cmd, timeout: float, env) -> tuple[str, int | str]:
    """What ``cmd`` printed (stdout and stderr, interleaved as written) and its exit code; on a
    timeout, what it printed so far and "timeout". It runs in a process group of its own, stopped
    whole at the timeout (compute-sanitizer's target with it) or when this script is interrupted."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
                            env=env, start_new_session=True)  # fmt: skip
    try:
        text, _ = proc.communicate(timeout=timeout)
        return text, proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        text, _ = proc.communicate()  # what it wrote before it was stopped
        return text, "timeout"
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        raise


def diagnose_sm90(env, seconds_left: float) -> None:
    """After the sm90 section failed: its tiny cases again, with every launch synchronous (so the
    enqueue's message names the step that faulted: gather, setup, GEMM1, silu, GEMM2), then under
    compute-sanitizer's memcheck where the toolkit has it. Output only; the verdict stands."""
    import shutil

    me = [sys.executable, str(Path(__file__).resolve()), "--section", "sm90-sanitize"]
    sanitizer = shutil.which("compute-sanitizer") or next(
        (str(c) for c in (Path("/usr/local/cuda/bin/compute-sanitizer"),
                          Path("/usr/local/cuda/compute-sanitizer/compute-sanitizer")) if c.is_file()), None)  # fmt: skip
    # Short limits: a wrong TMA descriptor hangs a GEMM (its barrier waits for bytes that never
    # come), and the whole script must fit one device call.
    runs = [("blocking launches", me, dict(env, CUDA_LAUNCH_BLOCKING="1"), 60)]
    if sanitizer:
        runs.append(("compute-sanitizer memcheck", [sanitizer, "--tool", "memcheck", "--print-limit", "20", *me], env,
                     120))  # fmt: skip
    end = time.monotonic() + seconds_left
    for title, cmd, run_env, timeout in runs:
        timeout = min(timeout, end - time.monotonic())
        if timeout < MIN_SECTION_S:
            print(f"\n=== sm90 diagnosis: {title}: skipped, out of time (--deadline) ===", flush=True)
            continue
        print(f"\n=== sm90 diagnosis: {title} ===", flush=True)
        text, code = run_captured(cmd, timeout, run_env)
        if code == "timeout":  # what it printed before it hung says which case hung
            text += f"\n(timed out after {timeout:.0f} s: a hang, not a slow run)"
        lines = parse_section_output(text)[0]
        print("\n".join(lines[:80] + (["..."] if len(lines) > 80 else [])), flush=True)
    if not sanitizer:
        print("(compute-sanitizer not found: memcheck skipped)", flush=True)


def save_json(results, rows, out_of_time) -> None:
    """$OUT/gpu_check.json (on the device machine, what comes back), when $OUT is set."""
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "gpu_check.json").write_text(
            json.dumps(dict(results=results, rows=rows, out_of_time=out_of_time), indent=1))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--build-only", action="store_true", help="build for this GPU's arch and print the path")
    ap.add_argument("--section", choices=SECTIONS + EXTRA_SECTIONS, help="run one section in this process")
    ap.add_argument("--extended", action="store_true",
                    help="also check the opt-in options (pdl, decode-fused, wide), time them in the speed table "
                         f"and profile each launch (breakdown); --deadline then defaults to {DEADLINE[True]}")
    ap.add_argument("--skip", action="append", default=[], choices=SECTIONS, help="sections to leave out")
    ap.add_argument("--timeout", type=float, default=240, help="seconds per section [240]")
    ap.add_argument("--deadline", type=float, default=None,
                    help="seconds for the whole run, the build by gpu_check.sh included: each section's limit is "
                         f"cut to what is left, a section that would start with under {MIN_SECTION_S} s left is "
                         f"skipped and named in the verdict [{DEADLINE[False]}, so the run ends within 5 minutes; "
                         f"{DEADLINE[True]} with --extended, within one 10-minute device call]")  # fmt: skip
    args = ap.parse_args()
    if args.section:
        return run_section(args.section)
    why = unready()
    if why is not None:
        print(f"gpu_check: {why}", file=sys.stderr)
        return 2
    if args.build_only:
        build, _, _ = import_plugins()
        print(build.build_library(archs=(gpu_arch(),)))
        return 0

    deadline = DEADLINE[args.extended] if args.deadline is None else args.deadline
    started = os.environ.get("MIXTRAL_GPU_CHECK_STARTED")  # gpu_check.sh: time.time() before its build
    spent = max(0.0, time.time() - float(started)) if started else 0.0
    results, rows, out_of_time, diagnose = [], [], [], False
    start = time.monotonic() - spent
    env = dict(os.environ)
    if not env.get("MIXTRAL_TRT_KERNELS_LIB"):  # build once, for this GPU only, before the clock of any section
        build, _, _ = import_plugins()
        env["MIXTRAL_TRT_KERNELS_LIB"] = str(build.build_library(archs=(gpu_arch(),)))
    chosen = SECTIONS if args.extended else CORE_SECTIONS
    for option, var in GATE_ENV.items():  # "1" once the option's section passes
        why = "--skip" if option in args.skip else "it runs with --extended" if option not in chosen else "not yet"
        env[var] = f"0:the {option} section was not run ({why})"
    for name in (s for s in chosen if s not in args.skip):
        left = deadline - (time.monotonic() - start)
        if left < MIN_SECTION_S:
            print(f"\n=== section {name}: skipped, {max(left, 0):.0f} s of the {deadline:.0f} s deadline left ===",
                  flush=True)  # fmt: skip
            out_of_time.append(name)
            if name in GATE_ENV:
                env[GATE_ENV[name]] = f"0:the {name} section was not run (out of time)"
            continue
        print(f"\n=== section {name} ===", flush=True)
        cmd = [sys.executable, str(Path(__file__).resolve()), "--section", name]
        timeout = min(args.timeout, SECTION_TIMEOUT.get(name, args.timeout), left)
        env[UNTIL_ENV] = str(time.time() + timeout - 5)  # the section winds down before it is stopped
        text, code = run_captured(cmd, timeout, env)
        lines, got, got_rows, summary = parse_section_output(text)
        print("\n".join(lines), flush=True)
        results += got  # what it measured, even if it then hung or crashed
        rows += got_rows
        skipped = summary["skipped"] if summary else None
        failed = summary is None or not all(r["ok"] for r in got)
        if name in GATE_ENV:  # bench an option's rows only after it passed its checks
            passed = not (failed or skipped)
            env[GATE_ENV[name]] = "1" if passed else f"0:{skipped or f'the {name} section crashed or failed'}"
            diagnose = diagnose or (name == "sm90" and failed)
        if name == "mixtral-sm90" and failed:  # no sm90 profile after the path failed at Mixtral dims
            env[GATE_ENV["sm90"]] = "0:the mixtral-sm90 section crashed or failed"
        if summary is None:
            why = f"stopped after {timeout:.0f} s" if code == "timeout" else f"exit {code}"
            results.append(dict(name=f"section {name} crashed or hung ({why})", ok=False, err=None, note=""))
        else:
            out_of_time += [f"{name} {c}" for c in summary.get("cut", [])]
            print(f"--- {name}: {summary['seconds']} s", flush=True)
        save_json(results, rows, out_of_time)  # after every section: a run cut short keeps what it measured
    save_json(results, rows, out_of_time)
    if diagnose:  # after the benchmark, so that a hang being diagnosed costs no measurements
        diagnose_sm90(env, deadline - (time.monotonic() - start))
    print_table(rows)
    failed = [r for r in results if not r["ok"]]
    errs = [r["err"] for r in results if r.get("err") is not None]
    print(f"\nCorrectness: {len(results) - len(failed)}/{len(results)} checks passed; worst relative error "
          f"{max(errs) if errs else float('nan'):.2e}")  # fmt: skip
    for r in failed:
        print(f"  FAILED {r['name']}: err={r.get('err')} {r.get('note', '')}")
    verdict = "FAIL" if failed else "INCOMPLETE" if out_of_time else "PASS"
    late = f"; not run, out of time: {', '.join(out_of_time)}" if out_of_time else ""
    print(f"{verdict}: {len(results) - len(failed)} passed, {len(failed)} failed{late} "
          f"({time.monotonic() - start:.0f} s)")  # fmt: skip
    return 0 if verdict == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())
