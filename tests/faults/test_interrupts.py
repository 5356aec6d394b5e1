"""Ctrl-C and killed runs: the previous output stays, nothing half-written is left behind, and two
writers of one output never interleave.

The TensorRT cases run ``mixtral-build engine`` in a child process driven by a small script that
wraps the process logger: ``slow`` makes each log callback of the build take a few ms (so a
SIGINT sent from here, after the child says it is building, lands mid-build), ``parse`` and
``build`` send SIGINT from inside a logger callback, where a KeyboardInterrupt is swallowed.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from mixtral_trt.cli import main
from mixtral_trt.fsutil import atomic_dir
from mixtral_trt.manifest import read_manifest

from ._helpers import one_layer_export, rtx_or_skip, sha256, siblings

REPO = Path(__file__).resolve().parents[2]

DRIVER = textwrap.dedent(
    """
    import os, signal, sys, time
    from mixtral_trt.optimize import engine, trt_compat

    mode = sys.argv.pop(1)
    Logger = type(trt_compat.load("tensorrt-rtx").logger())
    log, build_plan = Logger.log, engine._build_plan
    phase = ["parse"]

    def slow_or_signal(self, severity, msg):
        if phase[0] == mode:
            phase[0] = "signalled"
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)  # the handler runs here, inside the callback
        elif mode == "slow" and phase[0] == "build":
            time.sleep(0.005)
        return log(self, severity, msg)

    def building(*args):
        if phase[0] == "parse":
            phase[0] = "build"
        print("driver: building", file=sys.stderr, flush=True)
        return build_plan(*args)

    Logger.log, engine._build_plan = slow_or_signal, building
    from mixtral_trt.cli import main
    main()
    """
)


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    rtx_or_skip()
    return one_layer_export(tmp_path_factory)


def _previous_engine(export_dir: Path, out: Path) -> str:
    from mixtral_trt.optimize.engine import build

    build(export_dir, out, target="tensorrt-rtx", sms=["89"], progress=False)
    return sha256(out / "model.plan")


def _run_engine(mode: str, export_dir: Path, out: Path, tmp_path: Path) -> tuple[int, str]:
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    cmd = [sys.executable, str(script), mode, "engine", str(export_dir), "--out", str(out), "--target",
           "tensorrt-rtx", "--sm", "89"]  # fmt: skip
    child = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    said = []
    if mode == "slow":  # wait until it builds, then interrupt it from outside
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and select.select([child.stderr], [], [], 1)[0]:
            said.append(child.stderr.readline())
            if said[-1].startswith("driver: building") or not said[-1]:
                break
        assert said and said[-1].startswith("driver: building"), "".join(said)
        child.send_signal(signal.SIGINT)
    _, err = child.communicate(timeout=120)
    return child.returncode, "".join(said) + err


@pytest.mark.tensorrt
@pytest.mark.parametrize("mode", ["slow", "parse", "build"])
def test_sigint_stops_engine_build_and_keeps_previous(mode, export_dir, tmp_path):
    out = tmp_path / "engine"
    before = _previous_engine(export_dir, out)
    code, err = _run_engine(mode, export_dir, out, tmp_path)
    assert code == 130, f"exit {code}:\n{err}"
    assert "Aborted!" in err and "Traceback" not in err, err
    assert f"wrote {out}" not in err, err  # stopped, not finished and then reported
    read_manifest(out, "engine", verify=True)  # the previous engine, whole
    assert sha256(out / "model.plan") == before
    assert siblings(out) == []


def _kill_inside_atomic_dir(final: Path, between_renames: bool) -> None:
    """A child process that dies by SIGKILL while writing ``final`` (mid-body, or between the
    rename of the previous ``final`` aside and the rename of the new one into place)."""
    code = textwrap.dedent(
        f"""
        import os, signal
        from pathlib import Path
        from mixtral_trt import fsutil

        final = Path({str(final)!r})
        if {between_renames}:
            real = os.replace
            def replace(src, dst):
                real(src, dst)
                os.kill(os.getpid(), signal.SIGKILL)
            fsutil.os.replace = replace
        with fsutil.atomic_dir(final) as tmp:
            (tmp / "data").write_text("new, whole")
            if not {between_renames}:
                os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    child = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert child.returncode == -signal.SIGKILL, child.stderr


def test_killed_writers_partial_is_removed_by_the_next_writer(tmp_path):
    final = tmp_path / "export"
    _kill_inside_atomic_dir(final, between_renames=False)
    assert any(".partial-" in name for name in siblings(final))  # the leftover this is about
    with atomic_dir(final) as tmp:
        (tmp / "data").write_text("second run")
    assert (final / "data").read_text() == "second run"
    assert siblings(final) == []


def test_killed_between_renames_the_previous_output_is_put_back(tmp_path):
    final = tmp_path / "engine"
    final.mkdir()
    (final / "data").write_text("previous")
    _kill_inside_atomic_dir(final, between_renames=True)
    assert not final.exists()  # the window this is about: previous moved aside, new not yet in place
    with pytest.raises(RuntimeError, match="next run fails"):
        with atomic_dir(final):
            raise RuntimeError("next run fails")
    assert (final / "data").read_text() == "previous"
    assert siblings(final) == []


def test_second_writer_of_one_output_is_refused_while_the_first_writes(tmp_path):
    final = tmp_path / "ckpt"
    code = textwrap.dedent(
        f"""
        import sys
        from pathlib import Path
        from mixtral_trt.fsutil import atomic_dir

        with atomic_dir(Path({str(final)!r})) as tmp:
            (tmp / "data").write_text("first writer")
            print("writing", flush=True)
            sys.stdin.readline()
        """
    )
    first = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             text=True)  # fmt: skip
    try:
        assert first.stdout.readline() == "writing\n"
        result = CliRunner().invoke(main, ["tiny", str(final)])
        partials = [name for name in siblings(final) if ".partial-" in name]
    finally:
        first.communicate("done\n", timeout=60)
    assert result.exit_code == 1, result.output
    assert result.output.startswith("Error: ") and result.output.count("\n") == 1, result.output
    assert f"pid {first.pid}" in result.output and str(final) in result.output, result.output
    assert len(partials) == 1  # the live writer's partial was left alone
    assert first.returncode == 0
    assert (final / "data").read_text() == "first writer"
    assert siblings(final) == []
