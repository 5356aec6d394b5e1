"""The main job's OUT and the Triton repository as other tools and a newcomer meet them.

Every ``.onnx`` the main job and ``triton`` write opens in onnx's own checker and in Polygraphy
(fresh processes, so nothing of ours is registered), every ONNX data file has one link (onnx
refuses several), ``generate`` / ``inspect`` / ``triton`` accept OUT itself and point at the
right directory when given the wrong one, and an interrupted repository change leaves a
consistent or refused pair and no staging behind.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from mixtral_trt.cli import main
from mixtral_trt.manifest import sha256_file
from tests.conftest import load_module

HAVE_RTX = __import__("importlib.util").util.find_spec("tensorrt_rtx_bindings") is not None
PRECISIONS = ("fp16", "int8")
# The .onnx files each main job writes (no lowered copy: ONNX Runtime lowers OUT/<precision> when loading).
ONNX_FILES = {p: ("export/model.onnx", f"{p}/model.onnx") for p in PRECISIONS}
POLYGRAPHY = "import sys; from polygraphy.tools import main; sys.exit(main())"


def _cli(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result


@pytest.fixture(scope="module")
def jobs(tmp_path_factory):
    """OUT of the main job per precision (TensorRT-RTX engine where installed) and its Triton repository."""
    root = tmp_path_factory.mktemp("layout")
    made = {}
    for precision in PRECISIONS:
        out = root / f"out-{precision}"
        built = _cli("--precision", precision, "--max-seq-len", 64, "--max-batch", 2, "--quiet", "--out", out)
        assert built.exit_code == 0, built.output
        repo = root / f"repo-{precision}"
        served = _cli("triton", out, "--out", repo)  # checked by the tests below, each on its own
        made[precision] = {"out": out, "repo": repo, "output": built.output, "triton": served}
    return made


def _run(*args, **kwargs):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, check=False, timeout=120, **kwargs)


# ---------------------------------------------------------------------------------------------
# Artifacts every ONNX tool opens


def test_every_onnx_file_is_accounted_for(jobs):
    for precision, job in jobs.items():
        found = sorted(str(p.relative_to(job["out"])) for p in job["out"].rglob("*.onnx"))
        assert found == sorted(ONNX_FILES[precision]), found
        assert job["triton"].exit_code == 0, job["triton"].output
        assert not [p for p in job["repo"].rglob("*") if ".onnx" in p.name]  # the repository references the build


def test_every_onnx_data_file_has_one_link(jobs):
    import onnx

    for job in jobs.values():
        for model in job["out"].rglob("*.onnx"):
            graph = onnx.load(str(model), load_external_data=False).graph
            locations = {kv.value for t in graph.initializer for kv in t.external_data if kv.key == "location"}
            assert locations, model
            for name in locations:
                assert (model.parent / name).stat().st_nlink == 1, f"{model.parent / name} is hard-linked"


@pytest.mark.parametrize("precision, relative", [(p, f) for p in PRECISIONS for f in ONNX_FILES[p]])
def test_onnx_checker_and_polygraphy_inspect_open_it(jobs, precision, relative):
    path = jobs[precision]["out"] / relative
    checked = _run("-c", "import sys, onnx; onnx.checker.check_model(sys.argv[1])", path)
    assert checked.returncode == 0, checked.stderr[-2000:]
    inspected = _run("-c", POLYGRAPHY, "inspect", "model", path)
    assert inspected.returncode == 0, inspected.stderr[-2000:]


@pytest.mark.parametrize("precision, relative", [(p, f) for p in PRECISIONS for f in ONNX_FILES[p]])
def test_polygraphy_runs_it_on_onnxruntime(jobs, precision, relative):
    """Canonical graphs run as they are: MoETop2 is a model-local function ONNX Runtime inlines."""
    path = jobs[precision]["out"] / relative
    inputs = load_module(Path(__file__).parents[2] / "scripts" / "polygraphy_inputs.py", "polygraphy_inputs")
    ran = _run("-c", POLYGRAPHY, "run", "--onnxrt", path, *inputs.polygraphy_args(path.parent))
    assert ran.returncode == 0, ran.stderr[-2000:]


# ---------------------------------------------------------------------------------------------
# A newcomer's path: OUT itself works, wrong directories point at the right one


def test_generate_runs_out_itself_and_says_which_directory(jobs):
    out = jobs["fp16"]["out"]
    result = CliRunner().invoke(main, ["generate", str(out), "--prompt-ids", "1,415,2936",
                                                       "--max-new-tokens", "4", "--json"])  # fmt: skip
    assert result.exit_code == 0, result.output + result.stderr
    assert f"using {out / 'fp16'} (ONNX Runtime)" in result.stderr
    assert len(json.loads(result.stdout.splitlines()[-1])["output_ids"]) == 4


@pytest.mark.skipif(not HAVE_RTX, reason="needs TensorRT-RTX for OUT/engine")
def test_backend_errors_point_at_the_directory_that_works(jobs):
    out = jobs["fp16"]["out"]
    wrong = _cli("generate", out / "engine", "--backend", "onnxruntime", "--prompt-ids", "1,2")
    assert wrong.exit_code == 1 and "Traceback" not in wrong.output
    assert f"holds a TensorRT engine; for ONNX Runtime use {out / 'fp16'}" in wrong.output
    wrong = _cli("generate", out / "fp16", "--backend", "tensorrt", "--prompt-ids", "1,2")
    assert wrong.exit_code == 1 and f"for TensorRT use {out / 'engine'}" in wrong.output
    from mixtral_trt.pipeline import resolve_build

    assert resolve_build(out, "tensorrt") == (out / "engine", f"using {out / 'engine'} (TensorRT)")


def test_inspect_describes_each_stage_of_out(jobs):
    out = jobs["int8"]["out"]
    listed = _cli("inspect", out)
    assert listed.exit_code == 0, listed.output
    assert f"== export: {out / 'export'}" in listed.output
    assert f"== precision int8: {out / 'int8'} (runs on ONNX Runtime)" in listed.output
    assert "precision int8, target canonical" in listed.output
    as_json = CliRunner().invoke(main, ["inspect", str(out), "--json"])
    stages = json.loads(as_json.stdout)
    assert stages["precision int8"]["manifest"]["optimize"]["precision"] == "int8"


def test_triton_on_out_serves_its_build_in_process(jobs, tmp_path):
    """The one-model layout serves OUT/engine (through the runtime's TensorRT backend) where the main job
    built one, else the ONNX Runtime directory; layout bls passes the RTX engine over with the reason."""
    job = jobs["fp16"]
    assert job["triton"].exit_code == 0, job["triton"].output
    served, backend = ("engine", "tensorrt") if HAVE_RTX else ("fp16", "onnxruntime")
    config = (job["repo"] / "mixtral" / "config.pbtxt").read_text()
    assert f'"build_dir" value: {{ string_value: "{(job["out"] / served).resolve()}" }}' in config
    assert f'"backend" value: {{ string_value: "{backend}" }}' in config
    assert sha256_file(job["out"] / served / "manifest.json") in config
    assert f"using {job['out'] / served} ({'TensorRT' if HAVE_RTX else 'ONNX Runtime'})" in job["triton"].output
    if HAVE_RTX:
        bls = _cli("triton", job["out"], "--out", tmp_path / "repo", "--layout", "bls")
        assert bls.exit_code == 1 and "TensorRT-RTX engine" in bls.output and "Traceback" not in bls.output


def test_try_it_line_runs_as_printed(jobs):
    job = jobs["fp16"]
    [line] = [ln for ln in job["output"].splitlines() if ln.startswith("try it:")]
    assert line == f'try it:  mixtral-build generate {job["out"]} --prompt "The capital of France is"'
    ran = _cli(*shlex.split(line.removeprefix("try it:"))[1:], "--max-new-tokens", "2")
    assert ran.exit_code == 0, ran.output


def test_try_it_line_without_a_tokenizer_uses_prompt_ids(tmp_path):
    ckpt = tmp_path / "ckpt"
    assert _cli("tiny", ckpt, "--layers", 1, "--hidden", 64, "--intermediate", 64).exit_code == 0
    (ckpt / "tokenizer.model").unlink()
    out = tmp_path / "out"
    built = _cli("--model", ckpt, "--target", "onnxruntime", "--precision", "fp32", "--max-seq-len", 32,
                 "--max-batch", 1, "--quiet", "--out", out)  # fmt: skip
    assert built.exit_code == 0, built.output
    [line] = [ln for ln in built.output.splitlines() if ln.startswith("try it:")]
    assert line == f"try it:  mixtral-build generate {out} --prompt-ids 1,415,2936"
    ran = _cli(*shlex.split(line.removeprefix("try it:"))[1:], "--max-new-tokens", "2")
    assert ran.exit_code == 0, ran.output


def test_rerun_retires_the_earlier_linked_onnxruntime_dir(jobs, tmp_path):
    """An OUT from before: OUT/onnxruntime hard-linking OUT/fp16's data. A rerun removes it."""
    from mixtral_trt.optimize.lowering import lower_dir

    out = tmp_path / "out"
    shutil.copytree(jobs["fp16"]["out"], out)
    lower_dir(out / "fp16", out / "onnxruntime", data="copy")
    (out / "onnxruntime" / "model.onnx.data").unlink()
    os.link(out / "fp16" / "model.onnx.data", out / "onnxruntime" / "model.onnx.data")  # as it was written
    record = json.loads((out / "build.json").read_text())
    record["onnxruntime model"] = {"inputs": {}, "path": str(out / "onnxruntime"),
                                   "manifest_sha256": sha256_file(out / "onnxruntime" / "manifest.json")}
    (out / "build.json").write_text(json.dumps(record))
    rerun = _cli("--precision", "fp16", "--max-seq-len", 64, "--max-batch", 2, "--quiet", "--out", out)
    assert rerun.exit_code == 0, rerun.output
    assert not (out / "onnxruntime").exists() and "onnxruntime model" not in json.loads((out / "build.json").read_text())
    assert (out / "fp16" / "model.onnx.data").stat().st_nlink == 1


# ---------------------------------------------------------------------------------------------
# Triton: the repository changes as a whole


def _engine_build(root: Path, source: Path) -> Path:
    from tests.runtime.test_triton import engine_dir

    return engine_dir(root, source)


def _ids(repo: Path) -> tuple[str, str]:
    return tuple(json.loads((repo / m / "1" / "mixtral_build.json").read_text())["build_id"]
                 for m in ("mixtral_engine", "mixtral"))  # fmt: skip


def _leftovers(repo: Path) -> list[Path]:
    return [p for p in repo.rglob(".*") if p.name.startswith((".partial-", ".old-"))]


def _snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else None for p in sorted(root.rglob("*"))}


def test_failure_between_the_two_swaps_leaves_the_previous_repository(jobs, tmp_path, monkeypatch):
    from mixtral_trt import triton

    a = _engine_build(tmp_path / "a", jobs["fp16"]["out"] / "fp16")
    b = _engine_build(tmp_path / "b", jobs["int8"]["out"] / "int8")
    repo = triton.write_repository(a, tmp_path / "repo", layout="bls")
    before = _snapshot(repo)
    real, calls = triton._swap_in, []

    def interrupted(*args, **kwargs):
        calls.append(args)
        if len(calls) == 2:  # the engine model is swapped; the text model is next
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(triton, "_swap_in", interrupted)
    with pytest.raises(KeyboardInterrupt):
        triton.write_repository(b, repo, layout="bls")
    assert _snapshot(repo) == before and _leftovers(repo) == []
    from mixtral_trt.runtime.backends.triton_bls import check_pair

    assert check_pair(repo / "mixtral" / "1", repo / "mixtral_engine" / "1")["build_id"] == sha256_file(
        a / "manifest.json")


KILLED = """
import os, signal, sys
from mixtral_trt import triton
real, calls = triton._swap_in, []
def killed(*args, **kwargs):
    calls.append(args)
    if len(calls) == 2:
        os.kill(os.getpid(), signal.SIGKILL)  # no handler, no cleanup: as a power cut
    return real(*args, **kwargs)
triton._swap_in = killed
triton.write_repository(sys.argv[1], sys.argv[2], verify=False, layout="bls")
"""


def test_killed_run_leaves_a_refused_pair_and_the_next_run_cleans_up(jobs, tmp_path):
    from mixtral_trt import triton
    from mixtral_trt.runtime.backends.triton_bls import TritonModelMismatch, check_pair

    a = _engine_build(tmp_path / "a", jobs["fp16"]["out"] / "fp16")
    b = _engine_build(tmp_path / "b", jobs["int8"]["out"] / "int8")
    repo = triton.write_repository(a, tmp_path / "repo", layout="bls")
    killed = _run("-c", KILLED, b, repo, cwd=Path(__file__).parents[2])
    assert killed.returncode == -9, killed.stderr
    id_a, id_b = sha256_file(a / "manifest.json"), sha256_file(b / "manifest.json")
    assert _ids(repo) == (id_b, id_a)  # the engine of one build beside the text model of another
    with pytest.raises(TritonModelMismatch) as refused:
        check_pair(repo / "mixtral" / "1", repo / "mixtral_engine" / "1")
    assert id_a[:16] in str(refused.value) and id_b[:16] in str(refused.value)
    assert _leftovers(repo)  # the dead run's staging
    triton.write_repository(b, repo, layout="bls")
    assert _ids(repo) == (id_b, id_b) and _leftovers(repo) == []
    check_pair(repo / "mixtral" / "1", repo / "mixtral_engine" / "1")


def test_switching_to_an_onnxruntime_build_retires_our_engine_model(jobs, tmp_path):
    from mixtral_trt import triton

    ort = jobs["fp16"]["out"] / "fp16"
    repo = triton.write_repository(_engine_build(tmp_path / "a", ort), tmp_path / "repo", layout="bls")
    assert (repo / "mixtral_engine" / "1" / "model.plan").is_file()
    triton.write_repository(_engine_build(tmp_path / "b", ort), repo)  # the default layout: one model
    assert sorted(p.name for p in repo.iterdir()) == ["mixtral"] and _leftovers(repo) == []
    assert "mixtral_engine" not in (repo / "mixtral" / "config.pbtxt").read_text()
    triton.write_repository(_engine_build(tmp_path / "c", ort), repo, layout="bls")
    triton.write_repository(ort, repo)
    assert sorted(p.name for p in repo.iterdir()) == ["mixtral"] and _leftovers(repo) == []
