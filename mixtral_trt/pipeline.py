"""The main job: checkpoint → export → precision → ONNX Runtime model (+ TensorRT engine).

Each stage writes its own directory under OUT with a manifest; ``OUT/build.json`` records
what each finished stage was made from (a fingerprint of its inputs and options) and the
sha256 of the manifest it produced, so a rerun skips stages whose inputs are unchanged and
an interrupted run resumes at the stage that did not finish.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

from .fsutil import atomic_write_text, output_lock, output_path_problem
from .inspect import human_size
from .manifest import MANIFEST, ManifestError, read_manifest

PRECISIONS = ("fp32", "fp16", "bf16", "int8")
TARGETS = ("tensorrt", "tensorrt-rtx", "onnxruntime")
RECORD = "build.json"


class PipelineError(ValueError):
    """The requested build cannot be made here (missing package, unsupported option)."""


@dataclasses.dataclass(frozen=True)
class Plan:
    model: Path
    out: Path
    precision: str = "fp16"
    target: str | None = None  # None: choose what is installed
    max_batch: int = 8
    max_seq_len: int | None = None
    sms: tuple[str, ...] = ()
    int8_lm_head: bool = False
    int8_router: bool = False
    int8_attention: bool = True


@dataclasses.dataclass
class StageResult:
    name: str
    path: Path
    seconds: float
    reused: bool


def choose_target(requested: str | None) -> tuple[str, str]:
    """The target to build and a sentence saying why."""
    have_trt = importlib.util.find_spec("tensorrt") is not None
    have_rtx = importlib.util.find_spec("tensorrt_rtx_bindings") is not None
    if requested == "tensorrt" and not have_trt:
        raise PipelineError(
            "--target tensorrt needs datacenter TensorRT (>= 10), which is not installed: "
            "pip install tensorrt-cu13 (on a machine with an NVIDIA GPU), or use --target tensorrt-rtx / onnxruntime"
        )
    if requested == "tensorrt-rtx" and not have_rtx:
        raise PipelineError(
            "--target tensorrt-rtx needs TensorRT-RTX: pip install tensorrt-rtx-cu13-libs tensorrt-rtx-cu13-bindings"
        )
    if requested:
        return requested, f"--target {requested}"
    if have_trt:
        return "tensorrt", "TensorRT is installed"
    if have_rtx:
        return "tensorrt-rtx", "TensorRT is not installed; TensorRT-RTX is (ahead-of-time build)"
    return "onnxruntime", "neither TensorRT nor TensorRT-RTX is installed"


def run(plan: Plan, say: Callable[[str], None] | None = None, progress: bool = True) -> list[StageResult]:
    """Run every stage of ``plan`` (reusing finished ones) and return what each produced."""
    say = say or (lambda msg: print(msg, file=sys.stderr))
    if plan.precision not in PRECISIONS:
        raise PipelineError(f"--precision {plan.precision!r} is not one of {PRECISIONS}")
    int8_only = [flag for flag, on in (("--int8-lm-head", plan.int8_lm_head), ("--int8-router", plan.int8_router),
                                       ("--fp16-attention", not plan.int8_attention)) if on]  # fmt: skip
    if int8_only and plan.precision != "int8":
        raise PipelineError(f"{', '.join(int8_only)} apply to --precision int8 only, not {plan.precision}; "
                            "drop them or add --precision int8")  # fmt: skip
    target, why = choose_target(plan.target)
    if plan.sms and target != "tensorrt-rtx":
        raise PipelineError(f"--sm applies to TensorRT-RTX ahead-of-time builds; the target is {target}")
    if plan.sms:  # refuse an SM the installed TensorRT-RTX cannot target before any stage runs
        from mixtral_trt.optimize import engine, trt_compat

        engine.check_target_sms(trt_compat.load(target), plan.sms)
    # ONNX Runtime on CPU has no bf16 MatMul: the ONNX Runtime model of a bf16 build is fp32.
    ort_precision = "fp32" if plan.precision == "bf16" else plan.precision
    if Path(plan.out).exists() and not Path(plan.out).is_dir():
        raise PipelineError(f"--out {plan.out} exists and is a file; choose a directory path")
    problem = output_path_problem(plan.out)
    if problem:
        raise PipelineError(problem)
    say(f"target: {target} ({why}); precision: {plan.precision}; output: {plan.out}")
    with output_lock(plan.out):  # a second build into the same OUT is refused, not interleaved
        record = _Record(plan.out)
        results: list[StageResult] = []
        fresh: set[Path] = set()  # directories this run wrote (and hashed while writing)
        stages = _stages(plan, target, ort_precision, fresh)
        for n, (name, make, inputs) in enumerate(stages, 1):
            say(f"[{n}/{len(stages)}] {name}")
            results.append(record.stage(name, make, inputs(), progress))
            if not results[-1].reused:
                fresh.add(results[-1].path.resolve())
            say(f"      {'reused' if results[-1].reused else 'done'}: {results[-1].path} ({results[-1].seconds:.1f} s)")
    return results


def _stages(plan: Plan, target: str, ort_precision: str, fresh: set[Path]):
    out = plan.out
    export_dir, precise_dir = out / "export", out / plan.precision
    ort_dir = out / "onnxruntime"

    def verify(source: Path) -> bool:
        # A source this run just wrote was hashed while it was written; re-hashing it would be a
        # second pass over every weight (93 GB for Mixtral-8x7B). A reused one is verified.
        return source.resolve() not in fresh

    def export_stage(progress):
        from mixtral_trt.export.onnx_export import export

        return export(plan.model, export_dir, max_batch=plan.max_batch, max_seq_len=plan.max_seq_len, progress=progress)

    def precision_stage(dst, precision):
        def make(progress):
            from mixtral_trt.optimize.precision import convert

            return convert(export_dir, dst, precision, int8_lm_head=plan.int8_lm_head, int8_router=plan.int8_router,
                           int8_attention=plan.int8_attention, progress=progress,
                           verify=verify(export_dir))  # fmt: skip

        return make

    def ort_stage(progress):
        from mixtral_trt.optimize.lowering import lower_dir

        return lower_dir(out / ort_precision, ort_dir, target="onnxruntime", verify=verify(out / ort_precision))

    def engine_stage(progress):
        from mixtral_trt.optimize.engine import build

        return build(precise_dir, out / "engine", target=target, sms=list(plan.sms) or None,
                     max_batch=plan.max_batch, max_seq_len=plan.max_seq_len, progress=progress,
                     verify=verify(precise_dir))  # fmt: skip

    options = {"precision": plan.precision, "int8_lm_head": plan.int8_lm_head, "int8_router": plan.int8_router,
               "int8_attention": plan.int8_attention}  # fmt: skip
    stages = [("export", export_stage, lambda: {"checkpoint": _checkpoint_fingerprint(plan.model),
                                                 "max_batch": plan.max_batch, "max_seq_len": plan.max_seq_len})]
    stages.append((f"precision {plan.precision}", precision_stage(precise_dir, plan.precision),
                   lambda: {"source": _manifest_sha(export_dir), **options}))  # fmt: skip
    if ort_precision != plan.precision:
        stages.append((f"precision {ort_precision} (for ONNX Runtime)", precision_stage(out / ort_precision, ort_precision),
                       lambda: {"source": _manifest_sha(export_dir), **options, "precision": ort_precision}))
    stages.append(("onnxruntime model", ort_stage, lambda: {"source": _manifest_sha(out / ort_precision)}))
    if target != "onnxruntime":
        stages.append((f"{target} engine", engine_stage, lambda: {
            "source": _manifest_sha(precise_dir), "target": target, "sms": sorted(plan.sms),
            "max_batch": plan.max_batch, "max_seq_len": plan.max_seq_len}))  # fmt: skip
    return stages


class _Record:
    """OUT/build.json: for each finished stage, the fingerprint of its inputs and its manifest's sha256."""

    def __init__(self, out: Path) -> None:
        self.out, self.path = out, out / RECORD
        try:
            self.data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            self.data = {}

    def stage(self, name: str, make, inputs: dict, progress: bool) -> StageResult:
        start = time.perf_counter()
        entry = self.data.get(name)
        if entry and entry.get("inputs") == inputs:
            path = Path(entry["path"])
            if _manifest_sha(path) == entry.get("manifest_sha256"):
                return StageResult(name, path, time.perf_counter() - start, True)
        path = Path(make(progress))
        self.data[name] = {"inputs": inputs, "path": str(path), "manifest_sha256": _manifest_sha(path)}
        self.out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path, json.dumps(self.data, indent=2) + "\n")
        return StageResult(name, path, time.perf_counter() - start, False)


def _manifest_sha(directory: Path) -> str | None:
    try:
        return hashlib.sha256((Path(directory) / MANIFEST).read_bytes()).hexdigest()
    except OSError:
        return None


def _checkpoint_fingerprint(model: Path) -> dict:
    """Names, sizes and modification times of the checkpoint's files (hashing 93 GB per run is too slow)."""
    model = Path(model)
    if not model.is_dir():
        return {"path": str(model)}
    files = sorted(p for p in model.iterdir() if p.is_file())
    return {"path": str(model.resolve()), "files": [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]}


def summary(results: list[StageResult]) -> list[str]:
    """Lines describing each artifact: path, size on disk, time."""
    lines = []
    for r in results:
        size = sum(p.stat().st_size for p in r.path.iterdir() if p.is_file()) if r.path.is_dir() else 0
        try:
            stage = read_manifest(r.path, verify=False)
            what = _describe(stage)
        except ManifestError:
            what = ""
        state = "reused" if r.reused else f"{r.seconds:.1f} s"
        lines.append(f"{r.name:<40} {human_size(size):>9}  {state:>8}  {r.path}  {what}")
    return lines


def _describe(manifest: dict) -> str:
    if manifest["stage"] == "engine":
        return f"(plan: {manifest['engine'].get('plan_file', 'model.plan')})"
    if manifest["stage"] == "optimize":
        o = manifest["optimize"]
        return f"({o.get('target')} {o.get('precision')})"
    return "(canonical ONNX)"
