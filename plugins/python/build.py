"""Build the MoETop2 kernels (``plugins/moe_top2``) into ``libmixtral_moe_top2.so`` with nvcc.

The library is cached under ``$MIXTRAL_TRT_CACHE/plugins/<key>/`` (else
``$XDG_CACHE_HOME/mixtral-trt/plugins`` or ``~/.cache/mixtral-trt/plugins``), where ``<key>`` is the
sha256 of the sources, the architectures, the flags, nvcc's and CUTLASS's versions: a changed
source or toolchain builds anew, anything else reuses the cached file. The directory appears whole
or not at all. cudart is linked statically, so loading the library needs no CUDA runtime installed
(only a driver, at the first launch).

Two translation units, compiled concurrently: ``kernels.cu`` for every architecture, and
``prefill_sm90.cu`` (CUTLASS grouped GEMMs, headers from the ``nvidia-cutlass`` package or
``$MIXTRAL_TRT_CUTLASS_INCLUDE``) for sm_90a only when 90a is among them, since its GEMMs exist only
there and CUTLASS costs a minute of compilation per architecture; for the others the file still
compiles (to stubs). Without CUTLASS headers the library is built without that opt-in path
(``MOE_FLAG_PREFILL_SM90`` is then refused with the fix); every default path is there either way.

    python -m mixtral_trt.plugins.build [--arch 90a ...] [--out-dir DIR] [--nvcc PATH] [--quiet]
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NoReturn

LIBRARY_NAME = "libmixtral_moe_top2.so"
DEFAULT_ARCHS = ("80", "89", "90a", "120")
SOURCE_DIR = Path(__file__).resolve().parent.parent / "moe_top2"
MAIN_SOURCE = "kernels.cu"
SM90_SOURCE = "prefill_sm90.cu"
SOURCE_NAMES = ("kernels.cu", "common.cuh", "decode.cuh", "prefill.cuh", "moe_top2.h", "prefill_sm90.cu",
                "prefill_sm90.h")  # the two translation units and what they include  # fmt: skip
FLAGS = ("-O3", "-std=c++17", "-Xcompiler", "-fPIC")
# CUTLASS calls constexpr host functions from device code; NDEBUG drops its device-side asserts.
SM90_FLAGS = ("--expt-relaxed-constexpr", "-DNDEBUG")
LINK_FLAGS = ("--shared", "-cudart", "static", "--no-device-link")  # no rdc: a device link would add an sm_75 stub
SM90_ARCH = "90a"
CUTLASS_PIP = "pip install nvidia-cutlass==4.2.0.0"
NO_SM90_DEFINE = "-DMIXTRAL_MOE_NO_SM90_PATH"  # kernels.cu then defines the path's entry points as refusals


class BuildError(RuntimeError):
    """nvcc is missing or failed; the message says what to do."""


def cache_root() -> Path:
    if os.environ.get("MIXTRAL_TRT_CACHE"):
        return Path(os.environ["MIXTRAL_TRT_CACHE"]) / "plugins"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "mixtral-trt" / "plugins"


def sources() -> list[Path]:
    """The files the library is built from (the plugin's C++ files beside them are not)."""
    missing = [n for n in SOURCE_NAMES if not (SOURCE_DIR / n).is_file()]
    if missing:
        raise BuildError(f"kernel sources {missing} not found in {SOURCE_DIR}; build from a source checkout of mixtral-trt")
    return [SOURCE_DIR / n for n in SOURCE_NAMES]


def normalize_arch(arch: str) -> str:
    """'sm_90a', '90a', 'compute_90a' -> '90a'; refuses anything that is not digits plus an optional suffix."""
    a = str(arch).strip().lower().removeprefix("sm_").removeprefix("compute_")
    digits = a.rstrip("af")
    if not digits.isdigit() or int(digits) < 80 or len(a) - len(digits) > 1:
        raise BuildError(f"architecture {arch!r}; expected an SM version of 80 or newer such as '80', '90a' or '120'")
    return a


def cutlass_include() -> Path:
    """CUTLASS's include directory (``cute/``, ``cutlass/``): ``$MIXTRAL_TRT_CUTLASS_INCLUDE``, else the
    installed ``nvidia-cutlass`` package's, found without importing its Python module (which pulls
    in scipy and cuda-python). Raises BuildError naming the fix when there is none."""
    override = os.environ.get("MIXTRAL_TRT_CUTLASS_INCLUDE")
    if override:
        include = Path(override)
        if not (include / "cutlass" / "cutlass.h").is_file():
            raise BuildError(f"MIXTRAL_TRT_CUTLASS_INCLUDE={override} has no cutlass/cutlass.h; point it at a CUTLASS "
                             f"include directory, or unset it and {CUTLASS_PIP}")  # fmt: skip
        return include
    spec = importlib.util.find_spec("cutlass_library")
    if spec is None or not spec.submodule_search_locations:
        raise BuildError(f"CUTLASS headers not found (no cutlass_library package); the sm_90a prefill path compiles "
                         f"against them: {CUTLASS_PIP}")  # fmt: skip
    include = Path(next(iter(spec.submodule_search_locations))) / "source" / "include"
    if not (include / "cutlass" / "cutlass.h").is_file():
        raise BuildError(f"{include} has no cutlass/cutlass.h (a damaged nvidia-cutlass install?); {CUTLASS_PIP}")
    return include


def find_cutlass() -> Path | None:
    """cutlass_include(), or None when no CUTLASS is installed at all (the library is then built
    without the sm_90a path). A set but wrong $MIXTRAL_TRT_CUTLASS_INCLUDE still raises."""
    try:
        return cutlass_include()
    except BuildError:
        if os.environ.get("MIXTRAL_TRT_CUTLASS_INCLUDE"):
            raise
        return None


def cutlass_version(include: Path | None) -> str | None:
    if include is None:
        return None
    text = (include / "cutlass" / "version.h").read_text()
    parts = [re.search(rf"#define CUTLASS_{name}\s+(\d+)", text) for name in ("MAJOR", "MINOR", "PATCH")]
    return ".".join(m.group(1) if m else "?" for m in parts)


def gencode_flags(archs) -> list[str]:
    return [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]


def nvcc_version(nvcc: str) -> str:
    path = shutil.which(nvcc)
    if path is None:
        raise BuildError(
            f"nvcc not found ({nvcc!r}); install the CUDA toolkit (12.8 or newer), give nvcc's path (--nvcc PATH), "
            "or point MIXTRAL_TRT_KERNELS_LIB at a prebuilt libmixtral_moe_top2.so"
        )
    out = subprocess.run([path, "--version"], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise BuildError(f"{path} --version failed: {out.stderr.strip() or out.stdout.strip()}")
    return out.stdout.strip().splitlines()[-1]


def build_key(archs, nvcc_ver: str) -> str:
    h = hashlib.sha256()
    for p in sources():
        h.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    flags = {"flags": FLAGS, "sm90": SM90_FLAGS, "link": LINK_FLAGS}
    h.update(json.dumps({"archs": list(archs), **flags, "nvcc": nvcc_ver,
                         "cutlass": cutlass_version(find_cutlass())}).encode())  # fmt: skip
    return h.hexdigest()[:24]


def sm90_archs(archs) -> tuple:
    """Architectures prefill_sm90.cu is compiled for: only sm_90a holds its GEMMs."""
    return (SM90_ARCH,) if SM90_ARCH in archs else tuple(archs)


def sm90_compile_flags(cutlass: Path) -> list[str]:
    """nvcc flags for prefill_sm90.cu (and sources that include it), before the -gencode flags."""
    return [*FLAGS, *SM90_FLAGS, f"-I{cutlass}"]


def nvcc_commands(nvcc: str, archs, objects: Path, output: Path, cutlass: Path | None = None) -> list[list[str]]:
    """Compile kernels.cu and prefill_sm90.cu to objects in ``objects`` (run concurrently), then link.

    ``cutlass``: CUTLASS's include directory; None builds kernels.cu alone, without the sm_90a path.
    """

    def compile_(flags, archs_, source: str) -> tuple[list[str], str]:  # (command, object file)
        obj = str(objects / (Path(source).stem + ".o"))
        threads = max(1, min(len(archs_), os.cpu_count() or 1))
        cmd = [nvcc, *flags, *gencode_flags(archs_), f"--threads={threads}", "-c", "-o", obj, str(SOURCE_DIR / source)]
        return cmd, obj

    if cutlass is None:
        kernels_cc, kernels_o = compile_([*FLAGS, NO_SM90_DEFINE], archs, MAIN_SOURCE)
        return [kernels_cc, [nvcc, *LINK_FLAGS, "-o", str(output), kernels_o]]
    kernels_cc, kernels_o = compile_(FLAGS, archs, MAIN_SOURCE)
    sm90_cc, sm90_o = compile_(sm90_compile_flags(cutlass), sm90_archs(archs), SM90_SOURCE)
    return [kernels_cc, sm90_cc, [nvcc, *LINK_FLAGS, "-o", str(output), kernels_o, sm90_o]]


def _target(cmd: list[str]) -> str:
    """What one nvcc command makes, for progress lines: 'kernels.cu for sm_80, sm_90a' or the library."""
    archs = [a.split("code=")[-1] for a in cmd if a.startswith("-gencode=")]
    if "-c" in cmd:
        return f"{Path(cmd[-1]).name} for {', '.join(archs)}"
    return f"link {Path(cmd[cmd.index('-o') + 1]).name}"


def _run_nvcc(commands: list[list[str]], say=None) -> None:
    """The compiles side by side (two cores halve the wall time), then the link; the first failure raises.
    ``say`` (a print-like callable, or None) hears each command's target as it starts and its time as it ends:
    the compiles take minutes with no output of their own."""
    say = say or (lambda message: None)
    *compiles, link = commands
    with tempfile.TemporaryFile("w+") as log0, tempfile.TemporaryFile("w+") as log1:
        logs, procs = [log0, log1][: len(compiles)], []
        try:
            start = time.monotonic()
            for cmd, log in zip(compiles, logs):
                say(f"  nvcc: {_target(cmd)} ...")
                procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True))
            codes = _wait_all(procs, [_target(c) for c in compiles], start, say)
        finally:  # interrupted: stop the other compile too
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
        for cmd, log, code in zip(compiles, logs, codes):
            if code != 0:
                log.seek(0)
                _failed(cmd, code, log.read())
    say(f"  nvcc: {_target(link)} ...")
    start = time.monotonic()
    run = subprocess.run(link, capture_output=True, text=True, check=False)
    if run.returncode != 0:
        _failed(link, run.returncode, run.stderr + run.stdout)
    say(f"  nvcc: {_target(link)} done in {time.monotonic() - start:.1f} s")


def _wait_all(procs: list[subprocess.Popen], targets: list[str], start: float, say) -> list[int]:
    """Exit codes of ``procs``, reporting each one as it finishes (in the order they finish)."""
    codes: list[int | None] = [None] * len(procs)
    while None in codes:
        for i, proc in enumerate(procs):
            if codes[i] is None and proc.poll() is not None:
                codes[i] = proc.returncode
                outcome = "done" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
                say(f"  nvcc: {targets[i]} {outcome} in {time.monotonic() - start:.1f} s")
        if None in codes:
            time.sleep(0.1)
    return codes


def _failed(cmd: list[str], code: int, output: str) -> NoReturn:
    tail = "\n".join(output.strip().splitlines()[-40:])
    raise BuildError(f"nvcc failed (exit {code}) building {LIBRARY_NAME}:\n  {' '.join(cmd)}\n{tail}")


def build_library(out_dir=None, archs=DEFAULT_ARCHS, nvcc: str = "nvcc", verbose: bool = True) -> Path:
    """Return the path of ``libmixtral_moe_top2.so`` for ``archs``, compiling it if needed.

    ``out_dir`` None: the cache directory keyed by the sources' sha256; else that directory (its
    build.json records the key, and a matching build is reused).
    """
    archs = tuple(dict.fromkeys(normalize_arch(a) for a in archs))
    if not archs:
        raise BuildError("no architecture given; pass e.g. archs=('90a',)")
    if out_dir is not None:  # before minutes of compiling, not after
        from mixtral_trt.fsutil import output_path_problem

        problem = output_path_problem(Path(out_dir))
        if Path(out_dir).exists() and not Path(out_dir).is_dir():
            problem = f"output path {out_dir} exists and is a file; choose a directory path"
        if problem:
            raise BuildError(problem)
    ver = nvcc_version(nvcc)
    key = build_key(archs, ver)
    final = Path(out_dir) if out_dir is not None else cache_root() / key
    lib = final / LIBRARY_NAME
    if lib.is_file() and _recorded_key(final) == key:
        return lib

    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=final.parent))
    try:
        if verbose:
            print(f"building {LIBRARY_NAME} for sm_{', sm_'.join(archs)} with {ver} ...", file=sys.stderr, flush=True)
        start = time.monotonic()
        cutlass = find_cutlass()
        if cutlass is None and verbose:
            print(f"no CUTLASS headers: building without the opt-in sm_90a prefill path ({CUTLASS_PIP} adds it)",
                  file=sys.stderr, flush=True)  # fmt: skip
        with tempfile.TemporaryDirectory(prefix="mixtral-trt-objects-") as objects:
            commands = nvcc_commands(shutil.which(nvcc), archs, Path(objects), tmp / LIBRARY_NAME, cutlass)
            _run_nvcc(commands, _progress if verbose else None)
        seconds = round(time.monotonic() - start, 1)
        record = {"key": key, "archs": list(archs), "sm90_archs": list(sm90_archs(archs)), "nvcc": ver,
                  "cutlass": cutlass_version(cutlass), "commands": commands, "seconds": seconds,
                  "sources": [p.name for p in sources()]}  # fmt: skip
        (tmp / "build.json").write_text(json.dumps(record, indent=2) + "\n")
        os.chmod(tmp, 0o755)
        _publish(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if verbose:
        print(f"built {lib} in {seconds} s", file=sys.stderr, flush=True)
    return lib


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _recorded_key(directory: Path) -> str | None:
    try:
        return json.loads((directory / "build.json").read_text()).get("key")
    except (OSError, ValueError):
        return None


def _publish(tmp: Path, final: Path) -> None:
    """Swap ``tmp`` into place of ``final`` with renames, so readers see the old or the new build."""
    from mixtral_trt.fsutil import replace_dir

    replace_dir(tmp, final)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        """A bad flag: usage, then one ``Error:`` line and exit 1, as mixtral-build's own refusals."""
        self.print_usage(sys.stderr)
        self.exit(1, f"Error: {message}\n")


def main(argv=None) -> int:
    ap = _Parser(prog="python -m mixtral_trt.plugins.build", description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", action="append", help=f"SM architecture (repeatable) [default: {' '.join(DEFAULT_ARCHS)}]")
    ap.add_argument("--out-dir", type=Path, help="build here instead of the cache directory")
    ap.add_argument("--nvcc", default="nvcc", help="nvcc to use [default: nvcc on PATH]")
    ap.add_argument("--quiet", action="store_true", help="no progress output (only the library's path)")
    args = ap.parse_args(argv)
    try:
        lib = build_library(args.out_dir, tuple(args.arch or DEFAULT_ARCHS), args.nvcc, verbose=not args.quiet)
    except BuildError as e:
        print(f"Error: {e}", file=sys.stderr)
        return 1
    print(lib)
    return 0


if __name__ == "__main__":
    sys.exit(main())
