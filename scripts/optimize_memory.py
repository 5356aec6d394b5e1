#!/usr/bin/env python
"""Measure the optimize and engine stages on one real-size Mixtral-8x7B layer.

Generates a random bf16 checkpoint with Mixtral-8x7B's real dimensions (hidden 4096, FFN 14336,
8 experts, 32/8 heads, vocab 32000) but a single decoder layer (~3.4 GB with embedding and LM
head), exports it (max_batch 1, max_seq_len 512), then runs each step in a fresh child process
and reports its output size, wall time and peak RSS (for the builds also the peak of anonymous
memory, sampled: the part the kernel cannot reclaim):

    convert fp16, convert int8 (weight-only), TensorRT-RTX ahead-of-time build (SM89, batch 1,
    seq 512) of the fp16 graph and of the int8 graph.

    python scripts/optimize_memory.py [--workdir DIR] [--keep] [--skip-engine]

The checkpoint generator, checkpoint layout, child protocol and peak-RSS measurement (the child's
own ``VmHWM``) are :mod:`scripts/export_memory.py`'s, imported, not copied. A build that fails
(TensorRT or plugin error, crash) is reported in its table row and the run goes on. A step whose
RSS passes :data:`RSS_LIMIT_GB` is killed (this is itself a finding: the step does not fit a
24 GB machine) and reported as such.
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

_EM_PATH = Path(__file__).resolve().with_name("export_memory.py")
_spec = importlib.util.spec_from_file_location("export_memory", _EM_PATH)
EM = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(EM)

GB = EM.GB
LAYERS = 1
MAX_BATCH = 1
MAX_SEQ_LEN = 512
SMS = ["89"]
RSS_LIMIT_GB = 20.0  # a child above this is killed before the 24 GB machine's OOM killer steps in
POLL_S = 0.2
DISK_MARGIN = 1.15


# ---- children: each runs in a fresh interpreter and reports its own peak RSS ----------------


def child_export(result_file: str, model_dir: str, out_dir: str) -> None:
    from mixtral_trt.export.onnx_export import export

    start = time.perf_counter()
    export(model_dir, out_dir, max_batch=MAX_BATCH, max_seq_len=MAX_SEQ_LEN, progress=True)
    EM._report(result_file, wall_s=time.perf_counter() - start)


def child_convert(result_file: str, src_dir: str, out_dir: str, precision: str) -> None:
    from mixtral_trt.optimize.precision import convert

    start = time.perf_counter()
    convert(src_dir, out_dir, precision, progress=True)
    EM._report(result_file, wall_s=time.perf_counter() - start)


class _AnonPeak:
    """Largest RssAnon of this process, sampled every 20 ms by a thread. VmHWM also counts
    file-backed pages (the parser maps the weights' data file), which the kernel can reclaim;
    anonymous memory is what a build cannot give back."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _proc_status(os.getpid(), "RssAnon") or 0)
            self._stop.wait(0.02)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def child_build(result_file: str, src_dir: str, out_dir: str) -> None:
    """An RTX build; a failure is reported (exact message) rather than raised, with the peak so far."""
    from mixtral_trt.optimize.engine import build

    anon = _AnonPeak()
    start = time.perf_counter()
    try:
        build(src_dir, out_dir, target="tensorrt-rtx", sms=SMS, max_batch=MAX_BATCH, max_seq_len=MAX_SEQ_LEN,
              progress=True)  # fmt: skip
    except Exception as exc:  # noqa: BLE001  (the row shows whatever went wrong)
        EM._report(result_file, wall_s=time.perf_counter() - start, error=f"{type(exc).__name__}: {exc}",
                   peak_anon=anon.stop())  # fmt: skip
        return
    EM._report(result_file, wall_s=time.perf_counter() - start, peak_anon=anon.stop())


# ---- parent --------------------------------------------------------------------------------


def _proc_status(pid: int, key: str) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


def run_step(function: str, *args: str | Path) -> dict:
    """Run ``function(result_file, *args)`` of this file in a fresh interpreter (export_memory's
    protocol). Never raises for a failed child: returns ``{"error": ...}`` with what is known.

    The child's stderr is passed through and its tail kept for the error message; its RSS is
    polled and the child killed above RSS_LIMIT_GB.
    """
    with tempfile.TemporaryDirectory() as tmp:
        result_file = Path(tmp) / "result.json"
        cmd = [sys.executable, "-c", EM.CHILD, __file__, function, str(result_file), *map(str, args)]
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, errors="replace")
        tail: collections.deque[str] = collections.deque(maxlen=40)

        def pump() -> None:
            for line in proc.stderr:
                sys.stderr.write(line)
                tail.append(line.rstrip("\n"))

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        killed_at = None
        while proc.poll() is None:
            rss = _proc_status(proc.pid, "VmRSS")
            if rss is not None and rss > RSS_LIMIT_GB * GB:
                killed_at = _proc_status(proc.pid, "VmHWM") or rss
                proc.kill()
                break
            time.sleep(POLL_S)
        proc.wait()
        reader.join(timeout=10)
        wall = time.perf_counter() - start
        if killed_at is not None:
            return {"wall_s": wall, "peak_rss": killed_at,
                    "error": f"killed: RSS passed {RSS_LIMIT_GB:.0f} GB (VmHWM {killed_at / GB:.2f} GB)"}  # fmt: skip
        if result_file.is_file():
            return json.loads(result_file.read_text())
        last = [line for line in tail if line.strip()][-12:]
        return {"wall_s": wall, "peak_rss": None,
                "error": f"child exited with status {proc.returncode}:\n" + "\n".join(last)}  # fmt: skip


def checkpoint_bytes() -> int:
    from mixtral_trt.export.checkpoint import expected_tensors

    return sum(EM._numel(s) for s in expected_tensors(EM.config(LAYERS)).values()) * EM.BYTES_PER_WEIGHT


def check_disk(workdir: Path, keep: bool, skip_engine: bool) -> None:
    """Checkpoint B; export and fp16 ~B each; int8 ~0.6 B; a plan about its source's size.

    Without --keep the checkpoint goes after the export and each plan after it is measured.
    """
    b = checkpoint_bytes()
    engines = 0 if skip_engine else (1.6 if keep else 1.0)
    need = int(b * ((1 + 1 + 1 + 0.6 if keep else 1 + 1 + 0.6) + engines) * DISK_MARGIN)
    free = shutil.disk_usage(workdir).free
    if free < need:
        raise SystemExit(
            f"{workdir} has {free / GB:.1f} GB free; this run needs about {need / GB:.1f} GB. "
            "Point --workdir at a larger disk"
        )
    print(f"disk: {free / GB:.1f} GB free in {workdir}, about {need / GB:.1f} GB needed", file=sys.stderr)


def _banner(step: str) -> None:
    print(f"\n=== {step} ===", file=sys.stderr, flush=True)


def measure(workdir: Path, keep: bool, skip_engine: bool) -> list[tuple[str, dict]]:
    workdir.mkdir(parents=True, exist_ok=True)
    check_disk(workdir, keep, skip_engine)
    rows: list[tuple[str, dict]] = []

    _banner("baseline (imports only)")
    rows.append(("baseline: import torch/onnx", EM.run_child("child_baseline")))

    pool = workdir / "shards"
    pool.mkdir(exist_ok=True)
    _banner("generate checkpoint")
    start = time.perf_counter()
    gen = EM.run_child("child_generate", pool, LAYERS)
    ckpt = EM.make_checkpoint(workdir, pool, LAYERS)
    gen.update(wall_s=time.perf_counter() - start, out_bytes=EM.dir_bytes(ckpt, ".safetensors"))
    rows.append(("generate bf16 checkpoint", gen))

    export_dir = workdir / "export"
    _banner("export")
    r = run_step("child_export", ckpt, export_dir)
    rows.append((f"export bf16 (batch {MAX_BATCH}, seq {MAX_SEQ_LEN})", r))
    if "error" in r:
        return rows
    r["out_bytes"] = EM.dir_bytes(export_dir)
    if not keep:  # the checkpoint is no longer needed
        shutil.rmtree(pool, ignore_errors=True)
        shutil.rmtree(ckpt, ignore_errors=True)

    converted = {}
    for precision in ("fp16", "int8"):
        out = workdir / f"optimize-{precision}"
        _banner(f"convert {precision}")
        r = run_step("child_convert", export_dir, out, precision)
        rows.append((f"convert {precision}", r))
        if "error" not in r:
            r["out_bytes"] = EM.dir_bytes(out)
            converted[precision] = out

    if skip_engine:
        return rows
    for precision in ("fp16", "int8"):
        label = f"RTX build {precision} (SM{'/'.join(SMS)})"
        if precision not in converted:
            rows.append((label, {"error": f"skipped: convert {precision} failed"}))
            continue
        out = workdir / f"engine-{precision}"
        _banner(label)
        r = run_step("child_build", converted[precision], out)
        rows.append((label, r))
        if "error" not in r:
            r["out_bytes"] = EM.dir_bytes(out)
            if not keep:  # a plan is as large as its weights
                shutil.rmtree(out, ignore_errors=True)
    return rows


def _gb(value) -> str:
    return "-" if value is None else f"{value / GB:.2f}"


def table(rows: list[tuple[str, dict]]) -> str:
    width = max(len(step) for step, _ in rows)
    lines = [f"{'step':<{width}}  {'output GB':>9}  {'wall s':>7}  {'peak RSS GB':>11}  {'of it anonymous GB':>18}"]
    for step, r in rows:
        wall = "-" if r.get("wall_s") is None else f"{r['wall_s']:.1f}"
        lines.append(f"{step:<{width}}  {_gb(r.get('out_bytes')):>9}  {wall:>7}  {_gb(r.get('peak_rss')):>11}  "
                     f"{_gb(r.get('peak_anon')):>18}")  # fmt: skip
        if "error" in r:
            lines.extend("    ! " + line for line in r["error"].splitlines())
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, help="where to write checkpoint, export, conversions, engines "
                                                     "(default: a temp dir)")  # fmt: skip
    parser.add_argument("--keep", action="store_true", help="keep everything written")
    parser.add_argument("--skip-engine", action="store_true", help="stop after the fp16 and int8 conversions")
    args = parser.parse_args(argv)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="optimize-memory-"))
    rows: list[tuple[str, dict]] = []
    try:
        rows = measure(workdir, args.keep, args.skip_engine)
    except RuntimeError as exc:  # the generator failed; its traceback is already on stderr
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        if not args.keep:
            clean(workdir, created=args.workdir is None)
    print(table(rows))
    if args.keep:
        print(f"kept {workdir}")
    return 1 if any("error" in r for _, r in rows) else 0


def clean(workdir: Path, created: bool) -> None:
    """Remove what we wrote; a user-given --workdir itself stays."""
    if created:
        shutil.rmtree(workdir, ignore_errors=True)
        return
    names = ["shards", f"mixtral-8x7b-{LAYERS}layer", "export", "optimize-fp16", "optimize-int8", "engine-fp16",
             "engine-int8"]  # fmt: skip
    for name in names:
        shutil.rmtree(workdir / name, ignore_errors=True)
    for cache in workdir.glob("timing-*.cache"):
        cache.unlink(missing_ok=True)


if __name__ == "__main__":
    sys.exit(main())
