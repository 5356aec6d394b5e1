"""Build the MoETop2 kernels (``plugins/moe_top2``) into ``libmixtral_moe_top2.so`` with nvcc.

The library is cached under ``$MIXTRAL_TRT_CACHE/plugins/<key>/`` (else
``$XDG_CACHE_HOME/mixtral-trt/plugins`` or ``~/.cache/mixtral-trt/plugins``), where ``<key>`` is the
sha256 of the sources, the architectures, the flags and nvcc's version: a changed source or
toolchain builds anew, anything else reuses the cached file. The directory appears whole or not
at all. cudart is linked statically, so loading the library needs no CUDA runtime installed
(only a driver, at the first launch).

    python -m mixtral_trt.plugins.build [--arch 90a ...] [--out-dir DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LIBRARY_NAME = "libmixtral_moe_top2.so"
DEFAULT_ARCHS = ("80", "89", "90a", "120")
SOURCE_DIR = Path(__file__).resolve().parent.parent / "moe_top2"
MAIN_SOURCE = "kernels.cu"
SOURCE_NAMES = ("kernels.cu", "common.cuh", "decode.cuh", "prefill.cuh", "moe_top2.h")  # what kernels.cu includes
FLAGS = ("-O3", "-std=c++17", "-Xcompiler", "-fPIC", "--shared", "-cudart", "static")


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


def gencode_flags(archs) -> list[str]:
    return [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]


def nvcc_version(nvcc: str) -> str:
    path = shutil.which(nvcc)
    if path is None:
        raise BuildError(
            f"nvcc not found ({nvcc!r}); install the CUDA toolkit (12.8 or newer), pass nvcc=<path>, or point "
            "MIXTRAL_TRT_KERNELS_LIB at a prebuilt libmixtral_moe_top2.so"
        )
    out = subprocess.run([path, "--version"], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise BuildError(f"{path} --version failed: {out.stderr.strip() or out.stdout.strip()}")
    return out.stdout.strip().splitlines()[-1]


def build_key(archs, nvcc_ver: str) -> str:
    h = hashlib.sha256()
    for p in sources():
        h.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    h.update(json.dumps({"archs": list(archs), "flags": FLAGS, "nvcc": nvcc_ver}).encode())
    return h.hexdigest()[:24]


def nvcc_command(nvcc: str, archs, output: Path) -> list[str]:
    threads = max(1, min(len(archs), os.cpu_count() or 1))
    return [nvcc, *FLAGS, *gencode_flags(archs), f"--threads={threads}", "-o", str(output), str(SOURCE_DIR / MAIN_SOURCE)]


def build_library(out_dir=None, archs=DEFAULT_ARCHS, nvcc: str = "nvcc", verbose: bool = True) -> Path:
    """Return the path of ``libmixtral_moe_top2.so`` for ``archs``, compiling it if needed.

    ``out_dir`` None: the cache directory keyed by the sources' sha256; else that directory (its
    build.json records the key, and a matching build is reused).
    """
    archs = tuple(dict.fromkeys(normalize_arch(a) for a in archs))
    if not archs:
        raise BuildError("no architecture given; pass e.g. archs=('90a',)")
    ver = nvcc_version(nvcc)
    key = build_key(archs, ver)
    final = Path(out_dir) if out_dir is not None else cache_root() / key
    lib = final / LIBRARY_NAME
    if lib.is_file() and _recorded_key(final) == key:
        return lib

    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=final.parent))
    try:
        cmd = nvcc_command(shutil.which(nvcc), archs, tmp / LIBRARY_NAME)
        if verbose:
            print(f"building {LIBRARY_NAME} for sm_{', sm_'.join(archs)} with {ver} ...", file=sys.stderr, flush=True)
        start = time.monotonic()
        run = subprocess.run(cmd, capture_output=True, text=True, check=False)
        seconds = round(time.monotonic() - start, 1)
        if run.returncode != 0:
            tail = "\n".join((run.stderr + run.stdout).strip().splitlines()[-40:])
            raise BuildError(f"nvcc failed (exit {run.returncode}) building {LIBRARY_NAME}:\n  {' '.join(cmd)}\n{tail}")
        record = {"key": key, "archs": list(archs), "nvcc": ver, "command": cmd, "seconds": seconds,
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


def _recorded_key(directory: Path) -> str | None:
    try:
        return json.loads((directory / "build.json").read_text()).get("key")
    except (OSError, ValueError):
        return None


def _publish(tmp: Path, final: Path) -> None:
    """Swap ``tmp`` into place of ``final`` with renames, so readers see the old or the new build."""
    from mixtral_trt.fsutil import replace_dir

    replace_dir(tmp, final)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mixtral_trt.plugins.build", description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", action="append", help=f"SM architecture (repeatable) [default: {' '.join(DEFAULT_ARCHS)}]")
    ap.add_argument("--out-dir", type=Path, help="build here instead of the cache directory")
    ap.add_argument("--nvcc", default="nvcc", help="nvcc to use [default: nvcc on PATH]")
    args = ap.parse_args(argv)
    try:
        lib = build_library(args.out_dir, tuple(args.arch or DEFAULT_ARCHS), args.nvcc)
    except BuildError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(lib)
    return 0


if __name__ == "__main__":
    sys.exit(main())
