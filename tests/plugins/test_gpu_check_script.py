"""scripts/gpu_check.py on the CPU: the parts that need no GPU, so that a device run is not lost to a
bug in the script (its problems' routing, the failure diagnosis, the command line)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from mixtral_trt.plugins import kernels, reference

from tests.conftest import load_module

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    return load_module(SCRIPT, "gpu_check")


@pytest.mark.parametrize("E", [4, 8])
def test_routings_do_what_their_names_say(gpu_check, E):
    skew = gpu_check.make_problem(50, 64, 96, E, routing="skew", seed=1, device="cpu")
    _, top_e = reference.route(skew["hidden"], skew["router"], 2)
    first, second = (3, 5) if E == 8 else (2, 3)  # every token to the same two: the rest (expert 0 too) empty
    assert (top_e[:, 0] == first).all() and (top_e[:, 1] == second).all()
    starve = gpu_check.make_problem(300, 64, 96, E, routing="starve", seed=2, device="cpu")
    _, top_e = reference.route(starve["hidden"], starve["router"], 2)
    assert set(top_e.flatten().tolist()) == set(range(E - 1))  # the last expert alone gets nothing


def test_problem_dtypes_and_int8_scales(gpu_check):
    p = gpu_check.make_problem(5, 64, 96, 4, wmode="int8-bf16", device="cpu")
    assert p["hidden"].dtype == torch.bfloat16 and p["w13"].dtype == torch.int8 and p["w2"].dtype == torch.int8
    assert p["w13_scale"].shape == (4, 192) and p["w2_scale"].shape == (4, 64) and p["w13_scale"].dtype == torch.float16
    p = gpu_check.make_problem(5, 64, 96, 4, router_fp32=True, device="cpu")
    assert p["router"].dtype == torch.float32 and p["w13"].dtype == torch.float16


def test_diagnosis_locates_the_wrong_rows(gpu_check):
    p = gpu_check.make_problem(40, 64, 96, 4, routing="starve", seed=3, device="cpu")
    ref = reference.moe_top2_reference(**p)
    _, top_e = reference.route(p["hidden"], p["router"], 2)
    out = ref.clone()
    out[5] = float("nan")  # never written
    out[7] = 0  # left zero
    text = gpu_check.diagnose(out, ref, p, reference)
    assert text.startswith("1/40 rows non-finite; 1 rows all zero")
    expert_of_5 = int(top_e[5, 0])
    assert f"e{expert_of_5}:{int((top_e[:, 0] == expert_of_5).sum())}t/inf" in text
    clean = gpu_check.diagnose(ref.clone(), ref, p, reference)
    assert "0/40 rows non-finite; 0 rows all zero" in clean and "inf" not in clean
    assert "finite rows by column block of 8: " + " ".join(["0.0e+00"] * 8) in clean


def test_command_line_help_needs_no_gpu():
    done = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    for option in ("--build-only", "--section", "--skip", "--timeout", "--extended", "--deadline"):
        assert option in done.stdout
    for section in ("sm90-sanitize", "breakdown", "pdl", "wide", "decode-fused"):
        assert section in done.stdout


def test_kernel_names_are_shortened(gpu_check):
    short = gpu_check.short_kernel_name
    assert short("void moe::decode_gemm<__half, false, true, 1>(moe::GemmArgs)") == "decode_gemm<__half, false, true, 1>"
    assert short("void moe::(anonymous namespace)::silu_mul_kernel<__half>(__half*, __half const*, unsigned long)") == (
        "silu_mul_kernel<__half>")
    assert short("void cutlass::device_kernel<cutlass::gemm::kernel::GemmUniversal<cutlass::gemm::GroupProblemShape<"
                 "cute::tuple<int, int, int> >, (long)> >(T1::Params)") == "cutlass grouped GEMM (sm90)"


def test_breakdown_splits_the_trace_into_calls(gpu_check):
    names = ["void moe::router_kernel<__half, __half>(x)", "void moe::permute_kernel(x)",
             "void moe::decode_gemm<__half, false, true, 1>(g)", "void moe::combine_kernel<__half, false>(y)"]
    events, t = [], 0.0
    for call in range(3):
        for k, name in enumerate(names):
            dur = 10.0 * (k + 1) + call  # call 1 is the median
            events.append(dict(cat="kernel", name=name, ts=t, dur=dur))
            t += dur + 2.0  # 2 us between dependent launches
        t += 50.0  # host time between calls: not part of a call's span
    rows, busy, span = gpu_check.breakdown_from_trace(list(reversed(events)), 3)
    assert [r[0] for r in rows] == ["router_kernel<__half, __half>", "permute_kernel",
                                    "decode_gemm<__half, false, true, 1>", "combine_kernel<__half, false>"]
    assert [r[1] for r in rows] == [11.0, 21.0, 31.0, 41.0]
    assert busy == 104.0 and span == 104.0 + 3 * 2.0
    assert gpu_check.breakdown_from_trace(events[:-1], 3) is None  # a launch missing: no split
    shuffled = events[:4] + events[5:6] + events[4:5] + events[6:]  # call 2 launches in another order
    shuffled[4], shuffled[5] = dict(shuffled[4], ts=shuffled[5]["ts"]), dict(shuffled[5], ts=shuffled[4]["ts"])
    assert gpu_check.breakdown_from_trace(shuffled, 3) is None


def test_options_are_benchmarked_only_after_their_section_passed(gpu_check, monkeypatch):
    for option, var in gpu_check.GATE_ENV.items():
        monkeypatch.setenv(var, "1")
        assert gpu_check.bench_reason(option, kernels=None) is None
        monkeypatch.setenv(var, f"0:the {option} section crashed or failed")
        assert gpu_check.bench_reason(option, kernels=None) == f"the {option} section crashed or failed"


def test_option_summary_compares_like_with_like(gpu_check, capsys):
    def row(T, impl, us):
        gbs = 704e6 / (us * 1e-6) / 1e9
        return dict(kind="bench", wmode="fp16", T=T, impl=impl, us=us, experts=2, gbs=gbs, tflops=4946.0 / us,
                    vs_ours=None)  # fmt: skip

    rows = [row(1, "ours", 216.0), row(1, "ours[pdl]", 200.0), row(1, "ours[cuda graph]", 210.0),
            row(1, "ours[pdl, cuda graph]", 196.0), row(2048, "ours", 9.0), row(2048, "ours[pdl]", 8.9),
            row(4, "ours[pdl]", 300.0), row(2048, "ours[wide]", 10.0)]  # no plain row at T=4: nothing to compare
    gpu_check.print_option_summary(rows, "pdl", {"ours[pdl]": "ours", "ours[pdl, cuda graph]": "ours[cuda graph]"})
    lines = [ln for ln in capsys.readouterr().out.splitlines() if "->" in ln]
    assert len(lines) == 3  # the wide row is not a pdl row
    eager, graph, prefill = (next(ln for ln in lines if key in ln) for key in (" ours  ", "graph", "T= 2048"))
    assert "216.0 us ->    200.0 us (1.080x); 105% of H100 SXM bandwidth" in eager  # 704 MB in 200 us
    assert "210.0 us ->    196.0 us (1.071x)" in graph
    assert "(1.011x); 556 TFLOP/s = 56% of 989" in prefill and "bandwidth" not in prefill


def _section_output(name: str, ok: bool = True, rows=(), summary: bool = True, cut=()) -> str:
    """What a section prints: a log line, its result and rows as it gets them, then its summary."""
    lines = [f"log of {name}", "@@RESULT " + json.dumps(dict(name=name, ok=ok, err=None, note=""))]
    lines += ["@@ROW " + json.dumps(r) for r in rows]
    if summary:
        lines.append("@@SUMMARY " + json.dumps(dict(section=name, seconds=1.0, skipped=None, cut=list(cut))))
    return "\n".join(lines)


def _main(gpu_check, monkeypatch, argv, fake_run, clock=None, env=None):
    """main() with a GPU assumed, a prebuilt library, sections run by ``fake_run``, the clock at
    ``clock[0]`` if given, and only the environment variables of ``env`` set among its own."""
    monkeypatch.setattr(gpu_check, "run_captured", fake_run)
    monkeypatch.delenv("MIXTRAL_GPU_CHECK_STARTED", raising=False)
    monkeypatch.setenv("MIXTRAL_TRT_KERNELS_LIB", "prebuilt.so")  # main builds only without one
    monkeypatch.setattr(gpu_check, "unready", lambda: None)
    for var in gpu_check.GATE_ENV.values():
        monkeypatch.delenv(var, raising=False)
    for var, value in (env or {}).items():
        monkeypatch.setenv(var, value)
    if clock is not None:
        monkeypatch.setattr(gpu_check.time, "monotonic", lambda: clock[0])
        monkeypatch.setattr(gpu_check.time, "time", lambda: clock[0])
    monkeypatch.setattr(sys, "argv", ["gpu_check.py", *argv])
    return gpu_check.main()


@pytest.mark.parametrize("extended", [False, True])
def test_the_deadline_cuts_sections_and_says_so(gpu_check, monkeypatch, tmp_path, capsys, extended):
    """One device call has a fixed limit: sections share --deadline, each is cut to what is left,
    the ones that no longer fit are named, and the JSON in $OUT is rewritten after every section."""
    clock = [1000.0]
    limits, untils = {}, {}

    def fake_run(cmd, timeout, env):
        name = cmd[cmd.index("--section") + 1]
        limits[name], untils[name] = timeout, float(env[gpu_check.UNTIL_ENV]) - clock[0]
        clock[0] += 100.0  # every section takes 100 s
        return _section_output(name), 0

    monkeypatch.setenv("OUT", str(tmp_path))
    argv = ["--deadline", "330", "--skip", "sm90"] + ["--extended"] * extended
    assert _main(gpu_check, monkeypatch, argv, fake_run, clock) == 1
    out = capsys.readouterr().out
    chosen = [s for s in (gpu_check.SECTIONS if extended else gpu_check.CORE_SECTIONS) if s != "sm90"]
    ran = chosen[:4]  # 0, 100, 200, 300 s: the 4th starts with 30 s left
    assert list(limits) == ran
    assert limits[ran[0]] == 240 and limits[ran[3]] == 30  # --timeout, then what the deadline leaves
    assert untils[ran[0]] == 235 and untils[ran[3]] == 25  # the section winds down 5 s before it is stopped
    late = chosen[4:]
    assert f"INCOMPLETE: 4 passed, 0 failed; not run, out of time: {', '.join(late)}" in out
    assert "log of decode" in out and "@@" not in out
    saved = json.loads((tmp_path / "gpu_check.json").read_text())
    assert [r["name"] for r in saved["results"]] == ran and saved["out_of_time"] == late


def test_the_plain_run_keeps_to_five_minutes_and_counts_the_build(gpu_check, monkeypatch, capsys):
    """The issue's check ends within 5 minutes: the plain run's deadline is 285 s from the start of
    gpu_check.sh (its build included); the options wait for --extended, and their rows say why."""
    clock = [1000.0]
    limits, gates = {}, {}

    def fake_run(cmd, timeout, env):
        name = cmd[cmd.index("--section") + 1]
        limits[name] = timeout
        gates[name] = {o: env[v] for o, v in gpu_check.GATE_ENV.items()}
        clock[0] += 10.0
        return _section_output(name), 0

    started = {"MIXTRAL_GPU_CHECK_STARTED": str(clock[0] - 230)}  # the build took 230 s
    assert _main(gpu_check, monkeypatch, [], fake_run, clock, env=started) == 1  # 55 s left: the last ones do not fit
    assert list(limits) == ["decode", "prefill", "int8-decode", "int8-prefill"] and limits["decode"] == 55
    assert gates["decode"]["pdl"] == "0:the pdl section was not run (it runs with --extended)"
    assert gates["decode"]["sm90"] == "0:the sm90 section was not run (not yet)"
    out = capsys.readouterr().out
    assert "INCOMPLETE: 4 passed, 0 failed; not run, out of time: special, sm90, mixtral, mixtral-sm90 (" in out


def test_a_section_that_hangs_keeps_what_it_measured(gpu_check, monkeypatch, tmp_path, capsys):
    """A section stopped at its limit (or crashed) never prints its summary: its results and rows
    printed so far are kept, it counts as failed, an option it checks is not timed, and the speed
    rows of a benchmark cut short reach the table and the JSON."""
    row = dict(kind="bench", wmode="fp16", T=1, impl="ours", us=216.0, experts=2, gbs=3259.0, tflops=0.1, vs_ours=1.0)
    gates = {}

    def fake_run(cmd, timeout, env):
        name = cmd[cmd.index("--section") + 1]
        gates[name] = env[gpu_check.GATE_ENV["pdl"]]
        if name == "pdl":  # hangs after its first result
            return _section_output(name, summary=False), "timeout"
        if name == "mixtral":  # crashes after its first row
            return _section_output(name, rows=[row], summary=False), -11
        return _section_output(name), 0

    monkeypatch.setenv("OUT", str(tmp_path))
    assert _main(gpu_check, monkeypatch, ["--extended"], fake_run) == 1
    out = capsys.readouterr().out
    assert "FAILED section pdl crashed or hung (stopped after" in out
    assert "FAILED section mixtral crashed or hung (exit -11)" in out
    assert gates["mixtral"] == "0:the pdl section crashed or failed"
    table = out[out.index("GB/s = bytes"):]
    assert "  216.0" in table
    saved = json.loads((tmp_path / "gpu_check.json").read_text())
    assert saved["rows"] == [row] and {"pdl", "mixtral"} <= {r["name"] for r in saved["results"]}


def test_a_section_streams_its_results_and_rows(gpu_check, capsys):
    results, rows = gpu_check.Streamed("RESULT"), gpu_check.Streamed("ROW")
    results.append(dict(name="a", ok=True, err=float("nan"), note=""))
    rows.append(dict(kind="breakdown", case="decode T=1", busy_us=1.0, span_us=2.0, launches=[["router", 1.0]]))
    print("@@SUMMARY " + json.dumps(dict(section="x", seconds=1.0, skipped=None, cut=["T=4096"])))
    lines, got, got_rows, summary = gpu_check.parse_section_output("plain line\n" + capsys.readouterr().out)
    assert lines == ["plain line"] and got[0]["name"] == "a" and math.isnan(got[0]["err"])
    assert got_rows == list(rows) and summary["cut"] == ["T=4096"]
    assert gpu_check.parse_section_output("@@RESULT " + json.dumps(dict(name="b", ok=False)))[3] is None


class _StandInKernels:
    """kernels.py's surface that the pdl section uses, computing with the PyTorch reference on the
    CPU: flags change nothing, so a correct section passes, and a corrupted output must fail it."""

    FLAG_FORCE_DECODE, FLAG_FORCE_PREFILL, FLAG_PREFILL_SM90, FLAG_PDL, FLAG_PREFILL_WIDE, FLAG_DECODE_FUSED = (
        1, 2, 4, 8, 16, 32)
    FLAG_AUTO, SM90_MIN_TOKENS = 64, 512
    KernelError = RuntimeError
    decode_path = staticmethod(kernels.decode_path)

    def __init__(self, corrupt_flag: int = 0, corrupt_tokens=(16, 300)):
        self.corrupt_flag, self.corrupt_tokens, self.calls = corrupt_flag, corrupt_tokens, []

    def moe_top2_torch(self, hidden, router, w13, w2, w13_scale=None, w2_scale=None, *, flags=0, out=None,
                       workspace=None):
        self.calls.append((hidden.shape[0], flags))
        y = reference.moe_top2_reference(hidden, router, w13, w2, w13_scale, w2_scale)
        if self.corrupt_flag and flags & self.corrupt_flag and hidden.shape[0] in self.corrupt_tokens:
            y = y.clone()
            y[-1, 0] += 1.0  # one element of one token: a bit-for-bit check sees it
        if out is None:
            return y
        out.copy_(y)
        return out


@pytest.mark.parametrize("section,corrupt", [("pdl", 0), ("pdl", 8), ("wide", 0), ("wide", 16), ("fused", 0),
                                             ("fused", 32)])
def test_option_sections_run_end_to_end_on_a_stand_in(gpu_check, monkeypatch, section, corrupt):
    """The pdl and wide sections' own logic (every comparison; for pdl the back-to-back run and the
    graph replays) on the CPU against a stand-in library, so that a device run is not lost to a bug
    in the script; a stand-in whose output with the option differs for 16 or 300 tokens fails them."""
    _small_on_the_cpu(gpu_check, monkeypatch)
    monkeypatch.setattr(gpu_check, "pdl_unavailable", lambda kernels: None)
    stand_in, results = _StandInKernels(corrupt), []
    option = {"pdl": 8, "wide": 16, "fused": 32}[section]
    assert getattr(gpu_check, f"section_{section}")(results, stand_in, reference) is None
    failed = [r["name"] for r in results if not r["ok"]]
    if corrupt:
        assert failed and all("T=16" in name or "T=300" in name for name in failed)
    else:
        assert not failed and len(results) >= 50
    assert any(flags & option for _, flags in stand_in.calls) and any(not flags & option for _, flags in stand_in.calls)


@pytest.mark.parametrize("corrupt", [0, 64])
def test_auto_checks_run_end_to_end_on_a_stand_in(gpu_check, monkeypatch, corrupt):
    """The checks of MOE_FLAG_AUTO (part of the special section) on the CPU against a stand-in: a
    correct library passes them all, one whose MOE_FLAG_AUTO output is off for 9 tokens fails
    exactly those, against the reference and bit for bit against flags 0."""
    _small_on_the_cpu(gpu_check, monkeypatch)
    stand_in, results = _StandInKernels(corrupt, corrupt_tokens=(9,)), []
    gpu_check.auto_checks(results, stand_in, reference)
    failed = [r["name"] for r in results if not r["ok"]]
    if corrupt:
        assert failed and all("T=9" in name for name in failed) and any("== flags 0" in name for name in failed)
    else:
        assert not failed and len(results) >= 40
    assert {T for T, flags in stand_in.calls if flags & 64} >= {1, 8, 9, 511, 512, 1024}


def test_a_failed_sm90_section_is_diagnosed_after_the_benchmark(gpu_check, monkeypatch, capsys):
    order = []

    def fake_run(cmd, timeout, env):
        name = cmd[cmd.index("--section") + 1]
        order.append(name)
        ok = name != "sm90"
        if name == "mixtral":  # the sm90 rows are left out: its section failed
            assert env[gpu_check.GATE_ENV["sm90"]] == "0:the sm90 section crashed or failed"
        return _section_output(name, ok), 0

    monkeypatch.setattr(gpu_check, "diagnose_sm90", lambda env, seconds_left: order.append("diagnosis"))
    monkeypatch.delenv("OUT", raising=False)
    assert _main(gpu_check, monkeypatch, ["--extended"], fake_run) == 1
    assert order == [*gpu_check.SECTIONS, "diagnosis"]
    assert f"FAIL: {len(gpu_check.SECTIONS) - 1} passed, 1 failed" in capsys.readouterr().out


def _small_on_the_cpu(gpu_check, monkeypatch):
    """The correctness sections' GPU calls replaced so they run here: tiny dims, CPU tensors, no
    workspace, graphs replayed as plain calls, nothing to synchronise."""
    monkeypatch.setattr(gpu_check, "SMALL", dict(H=64, I=128, E=8))
    make = gpu_check.make_problem
    monkeypatch.setattr(gpu_check, "make_problem", lambda *a, **k: make(*a, **dict(k, device="cpu")))
    monkeypatch.setattr(gpu_check, "workspace_for", lambda kernels, p, flags=0: None)
    monkeypatch.setattr(gpu_check, "graph_call", lambda kernels, p, ws, out, flags=0: (
        lambda: kernels.moe_top2_torch(**p, out=out, workspace=ws, flags=flags)))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)


def _on_the_cpu(gpu_check, monkeypatch):
    """The benchmark sections too: Mixtral's dims shrunk, a fixed ceiling, one call per timing
    (100 us), a named stand-in device."""
    _small_on_the_cpu(gpu_check, monkeypatch)
    monkeypatch.setattr(gpu_check, "MIXTRAL", dict(H=64, I=128, E=8))
    monkeypatch.setattr(gpu_check, "ceilings", lambda: (4.28e12, 700e12))
    monkeypatch.setattr(gpu_check, "bench", lambda fn, warmup, reps: (fn(), 100.0)[1])
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda: "stand-in GPU")
    for var in gpu_check.GATE_ENV.values():  # every option's section passed
        monkeypatch.setenv(var, "1")


def test_mixtral_section_times_every_option_on_a_stand_in(gpu_check, monkeypatch, capsys):
    """The benchmark section end to end on the CPU (the script's most valuable minutes on a
    device): its checks pass on a correct library, every option's rows are there, and the table
    and the summaries print."""
    _on_the_cpu(gpu_check, monkeypatch)
    results, rows = [], []
    gpu_check.section_mixtral(results, _StandInKernels(), reference, rows)
    assert results and all(r["ok"] for r in results)
    impls = {(r["impl"], r["T"]) for r in rows if r["kind"] == "bench"}
    for impl, T in [("ours", 1), ("ours[cuda graph]", 1), ("ours[pdl]", 1), ("ours[pdl, cuda graph]", 64),
                    ("ours[pdl]", 2048), ("ours[wide]", 2048), ("torch loop", 4096),
                    ("ours[prefill path]", 16), ("ours[decode path]", 64), ("ours[fused]", 1),
                    ("ours[pdl+fused, cuda graph]", 64), ("ours[auto]", 1), ("ours[auto, cuda graph]", 1),
                    ("ours[auto]", 2048), ("ours[auto]", 4096)]:  # fmt: skip
        assert (impl, T) in impls, (impl, T)
    assert ("ours[wide]", 64) not in impls and not any(impl == "ours[sm90]" for impl, _ in impls)
    stand_in, sm90_rows = _StandInKernels(), []
    assert gpu_check.section_mixtral_sm90(results, stand_in, reference, sm90_rows) is None
    assert {(r["impl"], r["T"], r["wmode"]) for r in sm90_rows} == {
        ("ours[sm90]", T, w) for T in (512, 2048, 4096) for w in ("fp16", "bf16")}
    assert [T for T, flags in stand_in.calls if flags][2] == 2048  # after the two checks: the target first
    assert all(r["vs_ours"] == 1.0 for r in sm90_rows)  # each beside the plain enqueue of its own process
    rows += sm90_rows
    gpu_check.print_table(rows)
    out = capsys.readouterr().out
    assert "stand-in GPU" in out and "sm90 path (speed-up > 1" in out
    assert "programmatic dependent launch" in out and "wide prefill tiles" in out and "fused decode" in out
    assert "what the plugins run (MOE_FLAG_AUTO" in out and "speed-up vs 1.00x flags 0, 1.00x the PyTorch loop" in out


def test_breakdown_section_prints_gaps_and_overlaps_on_a_stand_in(gpu_check, monkeypatch, capsys):
    _on_the_cpu(gpu_check, monkeypatch)

    def fake_profile(fn, calls=5):
        fn()
        events = []
        for c in range(calls):  # two launches per call; the second starts before the first ends
            events += [dict(name="void moe::router_kernel<__half, __half>(x)", ts=100.0 * c, dur=10.0),
                       dict(name="void moe::combine_kernel<__half, false>(y)", ts=100.0 * c + 8.0, dur=4.0)]
        return events

    monkeypatch.setattr(gpu_check, "profile_calls", fake_profile)
    rows = []
    gpu_check.section_breakdown(_StandInKernels(), rows)
    out = capsys.readouterr().out
    cases = [r["case"] for r in rows]
    assert {"decode T=1", "decode T=1 pdl (cuda graph)", "decode T=1 pdl+fused (cuda graph)", "prefill T=2048 wide",
            "prefill T=2048 sm90"} <= set(cases)
    assert "kernels 14.0 us, first start to last end 12.0 us, overlap 2.0 us" in out


def test_the_stand_in_speaks_the_bindings_flags():
    for flag in ("FLAG_FORCE_DECODE", "FLAG_FORCE_PREFILL", "FLAG_PREFILL_SM90", "FLAG_PDL", "FLAG_PREFILL_WIDE",
                 "FLAG_DECODE_FUSED", "FLAG_AUTO", "SM90_MIN_TOKENS"):
        assert getattr(_StandInKernels, flag) == getattr(kernels, flag), flag


@pytest.mark.parametrize("failed", ["sm90", "decode-fused"])
def test_each_option_is_left_out_of_the_table_on_its_own_verdict(gpu_check, monkeypatch, failed):
    """One option's failed section leaves out that option's checks and rows, and only those: the
    sm90 path is never launched at Mixtral dims when its section failed, whatever the others did."""
    _on_the_cpu(gpu_check, monkeypatch)
    monkeypatch.setenv(gpu_check.GATE_ENV[failed], f"0:the {failed} section crashed or failed")
    stand_in, results, rows = _StandInKernels(), [], []
    gpu_check.section_mixtral(results, stand_in, reference, rows)
    skipped = gpu_check.section_mixtral_sm90(results, stand_in, reference, rows)
    option = {"sm90": stand_in.FLAG_PREFILL_SM90, "decode-fused": stand_in.FLAG_DECODE_FUSED}[failed]
    assert not any(flags & option for _, flags in stand_in.calls)
    impls = {r["impl"] for r in rows if r["kind"] == "bench"}
    sm90_checks = [r["name"] for r in results if r["name"].endswith(" sm90")]
    if failed == "sm90":
        assert skipped == "the sm90 section crashed or failed"
        assert "ours[sm90]" not in impls and not sm90_checks and "ours[fused]" in impls
    else:
        assert skipped is None and "ours[fused]" not in impls and "ours[sm90]" in impls
        assert sm90_checks == ["Mixtral dims fp16 T=512 sm90", "Mixtral dims bf16 T=2048 sm90"]


def test_the_benchmark_times_the_targets_first_and_names_what_it_had_no_time_for(gpu_check, monkeypatch, capsys):
    """Near its limit the table starts no new token count: one-token decode and 2048-token prefill
    (the targets) come first, the counts left out are named, and the table still sorts by tokens."""
    _on_the_cpu(gpu_check, monkeypatch)
    left = iter([100.0, 100.0, 100.0, 5.0])  # time for three token counts
    monkeypatch.setattr(gpu_check, "seconds_left", lambda: next(left, 0.0))
    results, rows, cut = [], [], []
    gpu_check.section_mixtral(results, _StandInKernels(), reference, rows, cut)
    assert {r["T"] for r in rows if r["kind"] == "bench"} == {1, 2048, 64}
    assert cut == [f"T={T}" for T in gpu_check.BENCH_TOKENS[3:]]
    gpu_check.print_table(rows)
    table = capsys.readouterr().out.split("GB/s = bytes")[1].split("\n\n")[0].splitlines()[3:]  # past the header
    firsts = [int(ln.split()[1]) for ln in table]
    assert firsts == sorted(firsts) and firsts[0] == 1 and firsts[-1] == 2048


def test_a_stopped_section_still_hands_over_what_it_printed(gpu_check):
    """The real subprocess path: a section that hangs after printing one result is stopped at its
    limit, and that result reaches main."""
    hang = "import json, time; print('@@RESULT ' + json.dumps({'name': 'x', 'ok': True}), flush=True); time.sleep(60)"
    start = time.monotonic()
    text, code = gpu_check.run_captured([sys.executable, "-c", hang], 3, None)
    assert code == "timeout" and time.monotonic() - start < 30
    assert gpu_check.parse_section_output(text)[1] == [{"name": "x", "ok": True}]


class _BrokenSm90(_StandInKernels):
    """A library whose sm90 path is there but fails when it runs (or, with ``missing``, is not there)."""

    def __init__(self, missing: bool = False):
        super().__init__()
        self.missing = missing

    def moe_top2_torch(self, hidden, router, w13, w2, w13_scale=None, w2_scale=None, *, flags=0, out=None,
                       workspace=None):
        if flags & self.FLAG_PREFILL_SM90:
            why = ("MOE_FLAG_PREFILL_SM90: this library was built without CUTLASS" if self.missing
                   else "sm90 prefill: CUTLASS refused GEMM1 (up) (8 groups)")  # fmt: skip
            raise self.KernelError(f"MoETop2 enqueue failed (status 1): {why}")
        return super().moe_top2_torch(hidden, router, w13, w2, w13_scale, w2_scale, flags=flags, out=out,
                                      workspace=workspace)  # fmt: skip


@pytest.mark.parametrize("missing", [False, True])
def test_an_sm90_path_that_fails_is_a_failure_not_a_skip(gpu_check, monkeypatch, missing):
    """Only the library's own "cannot run here" (a MOE_FLAG_PREFILL_SM90 message) skips the sm90
    section; the path failing when it runs fails the section, so the verdict is FAIL and the
    failure is diagnosed."""
    _small_on_the_cpu(gpu_check, monkeypatch)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda: (9, 0))
    results = []
    skipped = gpu_check.section_sm90(results, _BrokenSm90(missing), reference)
    if missing:
        assert skipped == "MOE_FLAG_PREFILL_SM90: this library was built without CUTLASS" and not results
    else:
        assert skipped is None and len(results) > 40
        failed = [r for r in results if not r["ok"]]
        assert failed and all("CUTLASS refused" in r["note"] for r in failed if r["name"].startswith("sm90 fp16"))


def test_a_gate_left_in_the_environment_does_not_bench_an_unchecked_option(gpu_check, monkeypatch):
    gates = {}

    def fake_run(cmd, timeout, env):
        name = cmd[cmd.index("--section") + 1]
        gates[name] = env[gpu_check.GATE_ENV["pdl"]]
        return _section_output(name), 0

    leftover = {gpu_check.GATE_ENV["pdl"]: "1"}  # from an earlier run in the same shell
    assert _main(gpu_check, monkeypatch, ["--extended", "--skip", "pdl"], fake_run, env=leftover) == 0
    assert gates["mixtral"] == "0:the pdl section was not run (--skip)"


def test_a_stopped_section_takes_its_children_along_and_keeps_its_stderr(gpu_check, tmp_path):
    """compute-sanitizer runs the section as its child: at the timeout both go, and what either
    wrote to stderr (CUTLASS's and CUDA's messages) comes back with stdout, in order."""
    pid_file = tmp_path / "grandchild.pid"
    child = ("import subprocess, sys, time; "
             f"g = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
             f"open({str(pid_file)!r}, 'w').write(str(g.pid)); "
             "print('out 1', flush=True); print('err 2', file=sys.stderr, flush=True); time.sleep(60)")  # fmt: skip
    text, code = gpu_check.run_captured([sys.executable, "-c", child], 3, None)
    assert code == "timeout" and text.splitlines() == ["out 1", "err 2"]
    grandchild = int(pid_file.read_text())
    for _ in range(50):  # SIGKILL is delivered at once; give the kernel a moment to reap
        try:
            os.kill(grandchild, 0)
        except ProcessLookupError:
            break
        status = Path(f"/proc/{grandchild}/stat")
        if status.exists() and status.read_text().split()[2] == "Z":  # killed, waiting for its reaper
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"the section's child {grandchild} outlived it")
    assert gpu_check.run_captured([sys.executable, "-c", "import sys; sys.exit(3)"], 10, None) == ("", 3)


def test_a_line_written_into_a_result_line_stays_text(gpu_check):
    text = '@@RESULT {"name": "a", "ok": true}\n@@RESULT {"name": "b", "ok"========= Invalid __global__ read\nplain'
    lines, results, _, summary = gpu_check.parse_section_output(text)
    assert results == [{"name": "a", "ok": True}] and summary is None
    assert lines == ['@@RESULT {"name": "b", "ok"========= Invalid __global__ read', "plain"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU: the check would run")
def test_without_a_gpu_or_a_library_it_says_why_and_stops(gpu_check, monkeypatch, tmp_path):
    done = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, check=False,
                          env=dict(os.environ, MIXTRAL_TRT_KERNELS_LIB=""))  # fmt: skip
    assert done.returncode == 2 and "=== section" not in done.stdout
    assert done.stderr.startswith("gpu_check: no CUDA GPU here (torch ") and "CUDA build of PyTorch" in done.stderr
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("MIXTRAL_TRT_KERNELS_LIB", str(tmp_path / "missing.so"))
    assert gpu_check.unready() == (f"the kernel library does not load: MoETop2 kernel library {tmp_path}/missing.so "
                                   "does not exist; unset MIXTRAL_TRT_KERNELS_LIB to build it")  # fmt: skip


class _RefusingTopK3(_StandInKernels):
    """The stand-in plus the raw enqueue, which refuses top_k=3 as the library does."""

    DTYPE_FP16, DTYPE_FP32 = kernels.DTYPE_FP16, kernels.DTYPE_FP32

    def __init__(self, refuse: bool = True):
        super().__init__()
        self.refuse = refuse

    def moe_top2_enqueue(self, *args):
        if self.refuse and args[12] == 3:
            raise self.KernelError("MoETop2 enqueue failed (status 1): top_k=3; only top-2 routing is implemented")


@pytest.mark.parametrize("refuse", [True, False])
def test_special_section_runs_end_to_end_on_a_stand_in(gpu_check, monkeypatch, refuse):
    """Skewed and starved routing, determinism, graph replays and the top_k=3 refusal, on the CPU:
    all pass on a correct library; a library that accepts top_k=3 fails that check alone."""
    _small_on_the_cpu(gpu_check, monkeypatch)
    results = []
    gpu_check.section_special(results, _RefusingTopK3(refuse), reference)
    names = [r["name"] for r in results]
    assert "deterministic int8 T=1024" in names and "plain cuda graph T=64 replay 2 == eager without" in names
    failed = [r for r in results if not r["ok"]]
    assert failed == ([] if refuse else [dict(name="top_k=3 refused", ok=False, err=None, note="accepted")])


PATHS_BENCH = SCRIPT.with_name("paths_bench.py")


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the script would run its sweeps")
def test_paths_bench_needs_a_gpu_and_says_so():
    done = subprocess.run([sys.executable, str(PATHS_BENCH)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "paths_bench: no CUDA GPU here" in done.stderr


def test_paths_bench_sweeps_every_variant_on_a_stand_in(monkeypatch, capsys):
    """scripts/paths_bench.py (the numbers behind MOE_FLAG_AUTO's choices) on the CPU: every path at
    every prefill size, every option pair eagerly and from a graph at every decode size, then the
    summary of the fastest per size."""
    bench = load_module(PATHS_BENCH, "paths_bench")
    _on_the_cpu(bench.gc, monkeypatch)
    problems = bench.gc.mixtral_problems(("fp16", "bf16", "int8-bf16"))
    stand_in, rows = _StandInKernels(), []
    bench.prefill_sweep(stand_in, problems, True, rows)
    bench.decode_sweep(stand_in, problems, rows)
    assert len(rows) == 2 * len(bench.PREFILL_TOKENS) * 3 + sum(map(len, bench.DECODE_TOKENS.values())) * 8
    assert {r["variant"] for r in rows if r["sweep"] == "prefill"} == {"decode", "mma.sync", "sm90"}
    assert {flags for _, flags in stand_in.calls} == {1, 2, 6, 0, 8, 32, 40}
    bench.summary(rows)
    out = capsys.readouterr().out
    assert "prefill fp16      T= 512: decode" in out and "decode  int8-bf16 T=  64: plain, eager" in out
