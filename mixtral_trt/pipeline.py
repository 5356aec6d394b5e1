"""The main job: checkpoint → export → precision (+ TensorRT engine).

Each stage writes its own directory under OUT with a manifest; ``OUT/build.json`` records
what each finished stage was made from (a fingerprint of its inputs and options) and the
sha256 of the manifest it produced, so a rerun skips stages whose inputs are unchanged and
an interrupted run resumes at the stage that did not finish. It also says which stage each
runtime uses (``serves``): ONNX Runtime runs the canonical ``OUT/<precision>`` directory
(``OUT/fp32`` for bf16 builds), lowering MoETop2 in memory when it loads it, so the weights are
on disk once per precision and no data file is linked into a second directory. A TensorRT
engine is ``OUT/engine``. :func:`resolve_build` turns OUT (or a stage directory) into the
directory a runtime or ``triton`` should read.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib.util
import json
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

from .fsutil import atomic_write_text, output_lock, output_path_problem, overlap_problem
from .inspect import human_size
from .manifest import MANIFEST, ManifestError, read_manifest

PRECISIONS = ("fp32", "fp16", "bf16", "int8")
TARGETS = ("tensorrt", "tensorrt-rtx", "onnxruntime")
RECORD = "build.json"
RUNTIMES = {"onnxruntime": "ONNX Runtime", "tensorrt": "TensorRT"}
TRY_PROMPT_IDS = "1,415,2936"  # "<s> The quick" in Mixtral's tokenizer; needs no tokenizer


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
    serves: str | None = None  # the runtime that runs this stage's directory ("onnxruntime", "tensorrt")


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
    # OUT only gains named stage directories, so a checkpoint inside it is safe; writing into the
    # checkpoint is not (OUT/build.json would change the checkpoint's fingerprint on every run).
    problem = overlap_problem(plan.model, plan.out, replaced=False) or output_path_problem(plan.out)
    if problem:
        raise PipelineError(problem)
    say(f"target: {target} ({why}); precision: {plan.precision}; output: {plan.out}")
    with output_lock(plan.out):  # a second build into the same OUT is refused, not interleaved
        record = _Record(plan.out)
        record.retire(_RETIRED, plan.out / "onnxruntime", say)
        results: list[StageResult] = []
        fresh: set[Path] = set()  # directories this run wrote (and hashed while writing)
        stages = _stages(plan, target, ort_precision, fresh)
        for n, (name, make, inputs, serves) in enumerate(stages, 1):
            say(f"[{n}/{len(stages)}] {name}")
            results.append(record.stage(name, make, inputs(), progress, serves))
            if not results[-1].reused:
                fresh.add(results[-1].path.resolve())
            say(f"      {'reused' if results[-1].reused else 'done'}: {results[-1].path} ({results[-1].seconds:.1f} s)")
    return results


def _stages(plan: Plan, target: str, ort_precision: str, fresh: set[Path]):
    out = plan.out
    export_dir, precise_dir = out / "export", out / plan.precision

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

    def engine_stage(progress):
        from mixtral_trt.optimize.engine import build

        return build(precise_dir, out / "engine", target=target, sms=list(plan.sms) or None,
                     max_batch=plan.max_batch, max_seq_len=plan.max_seq_len, progress=progress,
                     verify=verify(precise_dir))  # fmt: skip

    options = {"precision": plan.precision, "int8_lm_head": plan.int8_lm_head, "int8_router": plan.int8_router,
               "int8_attention": plan.int8_attention}  # fmt: skip
    # (name, make, inputs, serves): ONNX Runtime runs the canonical precision directory itself.
    same = ort_precision == plan.precision
    stages = [("export", export_stage, lambda: {"checkpoint": _checkpoint_fingerprint(plan.model),
                                                 "max_batch": plan.max_batch, "max_seq_len": plan.max_seq_len}, None)]
    stages.append((f"precision {plan.precision}", precision_stage(precise_dir, plan.precision),
                   lambda: {"source": _manifest_sha(export_dir), **options}, "onnxruntime" if same else None))  # fmt: skip
    if not same:
        stages.append((f"precision {ort_precision} (for ONNX Runtime)", precision_stage(out / ort_precision, ort_precision),
                       lambda: {"source": _manifest_sha(export_dir), **options, "precision": ort_precision},
                       "onnxruntime"))  # fmt: skip
    if target != "onnxruntime":
        stages.append((f"{target} engine", engine_stage, lambda: {
            "source": _manifest_sha(precise_dir), "target": target, "sms": sorted(plan.sms),
            "max_batch": plan.max_batch, "max_seq_len": plan.max_seq_len}, "tensorrt"))  # fmt: skip
    return stages


# Earlier builds wrote OUT/onnxruntime, a lowered graph hard-linking OUT/<precision>'s data file.
_RETIRED = "onnxruntime model"


class _Record:
    """OUT/build.json: for each finished stage, the fingerprint of its inputs and its manifest's sha256."""

    def __init__(self, out: Path) -> None:
        self.out, self.path = out, out / RECORD
        try:
            self.data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            self.data = {}

    def stage(self, name: str, make, inputs: dict, progress: bool, serves: str | None = None) -> StageResult:
        start = time.perf_counter()
        entry = self.data.get(name)
        if entry and entry.get("inputs") == inputs:
            path = self.out / Path(entry["path"]).name  # OUT may have moved, or the build ran elsewhere
            if _manifest_sha(path) == entry.get("manifest_sha256"):
                if entry.get("serves") != serves:  # a record from before `serves` existed
                    self._save(name, {**entry, "serves": serves})
                return StageResult(name, path, time.perf_counter() - start, True, serves)
        path = Path(make(progress))
        self._save(name, {"inputs": inputs, "path": str(path), "manifest_sha256": _manifest_sha(path), "serves": serves})
        return StageResult(name, path, time.perf_counter() - start, False, serves)

    def retire(self, name: str, directory: Path, say: Callable[[str], None]) -> None:
        """Remove a stage this version no longer makes, with its directory if it is still as built."""
        entry = self.data.get(name)
        if entry is None:
            return
        if _manifest_sha(directory) == entry.get("manifest_sha256"):
            shutil.rmtree(directory)
            say(f"removed {directory} (earlier layout; ONNX Runtime now runs the precision directory)")
        self._save(name, None)

    def _save(self, name: str, entry: dict | None) -> None:
        if entry is None:
            self.data.pop(name, None)
        else:
            self.data[name] = entry
        self.out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path, json.dumps(self.data, indent=2) + "\n")


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
    lines, width = [], max((len(r.name) for r in results), default=0)
    for r in results:
        size = sum(p.stat().st_size for p in r.path.iterdir() if p.is_file()) if r.path.is_dir() else 0
        try:
            stage = read_manifest(r.path, verify=False)
            what = _describe(stage)
        except ManifestError:
            what = ""
        state = "reused" if r.reused else f"{r.seconds:.1f} s"
        lines.append(f"{r.name:<{width}} {human_size(size):>9}  {state:>8}  {r.path}  {what}")
    return lines


def _describe(manifest: dict) -> str:
    if manifest["stage"] == "engine":
        return f"(plan: {manifest['engine'].get('plan_file', 'model.plan')})"
    if manifest["stage"] == "optimize":
        o = manifest["optimize"]
        return f"({o.get('target')} {o.get('precision')})"
    return "(canonical ONNX)"


def try_it(out: Path, results: list[StageResult]) -> list[str]:
    """The summary's closing lines: which directory each runtime runs, and a command that works on OUT."""
    runs = [f"{RUNTIMES[r.serves]} {r.path}" + (" (MoETop2 lowered when loaded)" if r.serves == "onnxruntime" else "")
            for r in results if r.serves]  # fmt: skip
    ort = next((r.path for r in results if r.serves == "onnxruntime"), None)
    tokenizer = ort is not None and any((ort / n).is_file() for n in ("tokenizer.model", "tokenizer.json"))
    prompt = '--prompt "The capital of France is"' if tokenizer else f"--prompt-ids {TRY_PROMPT_IDS}"
    return [f"runs on: {', '.join(runs)}", f"try it:  mixtral-build generate {out} {prompt}"]


# ---------------------------------------------------------------------------------------------
# From OUT (or a stage directory) to the directory a runtime reads


def main_job_stages(out: str | Path) -> dict[str, dict]:
    """``OUT/build.json``'s stages that are still on disk: name -> {"path", "serves"} (paths under OUT)."""
    out = Path(out)
    try:
        record = json.loads((out / RECORD).read_text())
    except (OSError, ValueError) as exc:
        raise PipelineError(f"{out / RECORD} cannot be read ({exc}); rerun the main job with --out {out}") from None
    stages = {}
    for name, entry in record.items() if isinstance(record, dict) else ():
        if not isinstance(entry, dict) or not entry.get("path"):
            continue
        path = out / Path(entry["path"]).name  # stages are OUT's children, wherever the build ran from
        if (path / MANIFEST).is_file():
            stages[name] = {"path": path, "serves": entry.get("serves", _serves(path))}
    if not stages:  # an interrupted first run, or a build.json that is not ours: nothing to read
        raise PipelineError(
            f"{out / RECORD} lists no finished stage still in {out}; rerun the main job with --out {out}"
        )
    return stages


def _serves(directory: Path) -> str | None:
    """The runtime of a stage directory recorded before build.json said it: engines and lowered graphs."""
    try:
        manifest = read_manifest(directory, verify=False)
    except ManifestError:
        return None
    if manifest["stage"] == "engine":
        return "tensorrt"
    return "onnxruntime" if manifest.get("optimize", {}).get("target") == "onnxruntime" else None


def resolve_build(path: str | Path, want: str = "any",
                  accept: Callable[[Path], str | None] | None = None) -> tuple[Path, str | None]:  # fmt: skip
    """The directory to read for ``want`` ("onnxruntime", "tensorrt" or "any": an engine first) and a
    line saying which (None when ``path`` is that directory itself).

    ``path`` is an artifact directory (has a manifest) or the main job's OUT (has build.json).
    ``accept(dir)`` may return a reason to pass over a candidate (e.g. an engine Triton cannot
    serve). A directory of the wrong kind is refused with the one that would work.
    """
    path = Path(path)
    if (path / MANIFEST).is_file():
        kind = _kind(path)
        if want == "any" or kind in (None, want):
            return path, None  # an unreadable manifest: the caller's own read says what is wrong
        raise PipelineError(_wrong_kind(path, kind, want))
    if not (path / RECORD).is_file():
        return path, None  # neither: the caller's read_manifest names the missing manifest.json
    stages = main_job_stages(path)
    skipped = []
    for role in ("tensorrt", "onnxruntime") if want == "any" else (want,):
        for stage in (s for s in stages.values() if s["serves"] == role):
            reason = accept(stage["path"]) if accept else None
            if reason:
                skipped.append(f"not {stage['path']}: {reason}")
                continue
            return stage["path"], "; ".join([f"using {stage['path']} ({RUNTIMES[role]})", *skipped])
    have = ", ".join(f"{s['path']} ({RUNTIMES.get(s['serves'], 'canonical ONNX')})" for s in stages.values())
    wanted = "servable build" if want == "any" else f"build for {RUNTIMES[want]}"
    raise PipelineError("; ".join([f"{path} (a main-job build directory) has no {wanted}", *skipped,
                                   f"it holds: {have}. Rerun the main job with --out {path}"
                                   + (" and a --target that builds an engine" if want == "tensorrt" else "")]))


def _kind(directory: Path) -> str | None:
    try:
        stage = read_manifest(directory, verify=False)["stage"]
    except ManifestError:
        return None
    return "tensorrt" if stage == "engine" else "onnxruntime"


def _wrong_kind(path: Path, kind: str, want: str) -> str:
    what = "a TensorRT engine" if kind == "tensorrt" else "ONNX, not a TensorRT engine"
    other = None
    if (path.parent / RECORD).is_file():
        with contextlib.suppress(PipelineError):
            other = resolve_build(path.parent, want)[0]
    if other is not None:
        return f"{path} holds {what}; for {RUNTIMES[want]} use {other}"
    if want == "onnxruntime":
        return f"{path} holds {what}; use --backend tensorrt, or give an export or optimize directory"
    return (f"{path} holds {what}; build one with `mixtral-build engine {path} --out DIR`, "
            "or use --backend onnxruntime")  # fmt: skip
