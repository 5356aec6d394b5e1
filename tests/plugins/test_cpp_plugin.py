"""The C++ MixtralMoETop2 plugin (plugins/moe_top2/plugin.{h,cpp}, serialize.h).

- Always (CPU, CI): the field parser / blob decoder / I/O checks of serialize.h, compiled alone
  with g++ under AddressSanitizer + UBSan and fuzzed (tests/fuzz_deserialize.cpp); skipped with
  a reason where g++ or its sanitizer runtimes are missing.
- With TensorRT headers (``MIXTRAL_TRT_TENSORRT_INCLUDE`` = the directory holding
  NvInferRuntime.h; CI has none, so these skip there): plugin.cpp must compile against them;
  ``slow``: the CMake build of libmixtral_trt_plugins.so (needs nvcc) and the interface smoke
  test that dlopens it like TensorRT does (tests/plugin_smoke.cpp, CPU part).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PLUGIN_DIR = ROOT / "plugins" / "moe_top2"
TRT_INCLUDE_ENV = "MIXTRAL_TRT_TENSORRT_INCLUDE"
PASS_LINE = re.compile(r"^fuzz_deserialize: PASS \(\d+ iterations, \d+ inputs refused, \d+ accepted", re.MULTILINE)


def _run(cmd: list[str], timeout: float = 600, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout, **kwargs)


def _gxx_with_sanitizers(tmp_path: Path) -> str:
    gxx = shutil.which("g++")
    if gxx is None:
        pytest.skip("g++ not found: the ASan fuzz test of plugins/moe_top2/serialize.h needs it")
    probe = tmp_path / "probe.cpp"
    probe.write_text("int main() { return 0; }\n")
    done = _run([gxx, "-fsanitize=address,undefined", str(probe), "-o", str(tmp_path / "probe")])
    if done.returncode != 0:
        pytest.skip(f"g++ cannot link -fsanitize=address,undefined (libasan/libubsan missing): {done.stderr[-300:]}")
    return gxx


def test_fuzz_deserialize_under_asan(tmp_path):
    gxx = _gxx_with_sanitizers(tmp_path)
    exe = tmp_path / "fuzz_deserialize"
    # Only serialize.h is on the include path: the seam must not need TensorRT or CUDA.
    build = _run([gxx, "-std=c++17", "-g", "-O1", "-Wall", "-Wextra", "-Werror", "-fsanitize=address,undefined",
                  "-fno-sanitize-recover=all", "-fno-omit-frame-pointer", f"-I{PLUGIN_DIR}",
                  str(PLUGIN_DIR / "tests" / "fuzz_deserialize.cpp"), "-o", str(exe)])  # fmt: skip
    assert build.returncode == 0, build.stderr[-4000:]
    env = dict(os.environ, ASAN_OPTIONS="detect_leaks=1:abort_on_error=0", UBSAN_OPTIONS="print_stacktrace=1")
    done = _run([str(exe), "20000", "0x5eed"], env=env, timeout=300)
    assert done.returncode == 0, f"stdout:\n{done.stdout[-2000:]}\nstderr:\n{done.stderr[-6000:]}"
    assert PASS_LINE.search(done.stdout), done.stdout
    assert "ERROR: AddressSanitizer" not in done.stderr and "runtime error" not in done.stderr, done.stderr[-4000:]


def _tensorrt_include() -> Path:
    value = os.environ.get(TRT_INCLUDE_ENV)
    if not value:
        pytest.skip(f"{TRT_INCLUDE_ENV} is not set (no TensorRT headers here; CI has none)")
    include = Path(value)
    if not (include / "NvInferRuntime.h").is_file():
        pytest.fail(f"{TRT_INCLUDE_ENV}={value} has no NvInferRuntime.h")
    return include


def _cuda_include() -> Path:
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(nvcc).resolve().parents[1]))
    for base in filter(None, candidates):
        if (Path(base) / "include" / "cuda_runtime_api.h").is_file():
            return Path(base) / "include"
    pytest.skip("cuda_runtime_api.h not found (TensorRT's headers include it); set CUDA_HOME")


def tensorrt_version(include: Path) -> str:
    text = (include / "NvInferVersion.h").read_text()
    parts = []
    for name in ("MAJOR", "MINOR", "PATCH", "BUILD"):
        m = re.search(rf"#define\s+(?:NV_TENSORRT|TRT)_{name}(?:_ENTERPRISE)?\s+(\d+)", text)
        parts.append(m.group(1) if m else "?")
    return ".".join(parts)


def test_plugin_compiles_against_tensorrt_headers():
    include = _tensorrt_include()
    cuda = _cuda_include()
    gxx = shutil.which("g++")
    if gxx is None:
        pytest.skip("g++ not found")
    done = _run([gxx, "-std=c++17", "-fsyntax-only", "-Wall", "-Wextra", "-Werror", f"-isystem{include}",
                 f"-isystem{cuda}", f"-I{PLUGIN_DIR}", str(PLUGIN_DIR / "plugin.cpp")])  # fmt: skip
    assert done.returncode == 0, f"TensorRT {tensorrt_version(include)} headers at {include}:\n{done.stderr[-6000:]}"


@pytest.mark.slow
def test_plugin_library_builds_and_loads(tmp_path):
    include = _tensorrt_include()
    cuda = _cuda_include()
    for tool in ("cmake", "nvcc", "g++"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not found: building libmixtral_trt_plugins.so needs cmake, nvcc and g++")
    build = tmp_path / "build"
    configure = _run(["cmake", "-S", str(PLUGIN_DIR), "-B", str(build), f"-DTensorRT_INCLUDE_DIR={include}",
                      "-DCMAKE_CUDA_ARCHITECTURES=90a"])  # fmt: skip
    assert configure.returncode == 0, configure.stdout[-2000:] + configure.stderr[-4000:]
    made = _run(["cmake", "--build", str(build), "--target", "mixtral_trt_plugins", "mixtral_trt_plugins_selfreg",
                 "-j2"], timeout=1200)  # fmt: skip
    assert made.returncode == 0, made.stdout[-4000:] + made.stderr[-4000:]
    library = build / "libmixtral_trt_plugins.so"
    selfreg = build / "libmixtral_trt_plugins_selfreg.so"
    for lib in (library, selfreg):
        exported = sorted(
            line.split()[-1] for line in _run(["nm", "-D", "--defined-only", str(lib)]).stdout.splitlines()
        )
        assert exported == ["getCreators", "setLoggerFinder"], exported
        # No TensorRT library symbol is needed: the plugin only implements TensorRT's interfaces.
        undefined = _run(["nm", "-D", "--undefined-only", "-C", str(lib)]).stdout
        assert "nvinfer1::" not in undefined and "getPluginRegistry" not in undefined, undefined

    smoke = tmp_path / "plugin_smoke"
    compiled = _run(["g++", "-std=c++17", f"-isystem{include}", f"-isystem{cuda}",
                     str(PLUGIN_DIR / "tests" / "plugin_smoke.cpp"), f"-L{cuda.parent / 'lib64'}", "-lcudart", "-ldl",
                     "-o", str(smoke)])  # fmt: skip
    assert compiled.returncode == 0, compiled.stderr[-4000:]
    env = dict(os.environ, LD_LIBRARY_PATH=f"{cuda.parent / 'lib64'}:{os.environ.get('LD_LIBRARY_PATH', '')}")
    done = _run([str(smoke), str(library)], env=env, timeout=120)
    assert done.returncode == 0 and "plugin_smoke: PASS" in done.stdout, done.stdout + done.stderr[-4000:]

    # The self-registering variant, with a stand-in libnvinfer.so.<major> and without any.
    major = tensorrt_version(include).split(".")[0]
    fake = tmp_path / f"libnvinfer.so.{major}"
    compiled = _run(["g++", "-std=c++17", "-shared", "-fPIC", f"-isystem{include}", f"-isystem{cuda}",
                     str(PLUGIN_DIR / "tests" / "fake_nvinfer.cpp"), f"-Wl,-soname,{fake.name}", "-o", str(fake)])  # fmt: skip
    assert compiled.returncode == 0, compiled.stderr[-4000:]
    for extra, note in (([str(fake)], "with libnvinfer"), ([], "without libnvinfer")):
        done = _run([str(smoke), str(selfreg), "selfreg", *extra], env=env, timeout=120)
        assert done.returncode == 0 and f"PASS (self-registration {note})" in done.stdout, done.stdout + done.stderr
    # The loadLibrary variant must not register itself when dlopen'ed.
    done = _run([str(smoke), str(library), "selfreg", str(fake)], env=env, timeout=120)
    assert done.returncode == 1 and "registrations: 0" in done.stderr, done.stdout + done.stderr
