"""The MoETop2 CUDA kernels: build (all four architectures), C ABI through ctypes, references.

CPU (CI): nvcc builds ``libmixtral_moe_top2.so`` for sm_80, sm_89, sm_90a and sm_120, with the
CUTLASS grouped GEMMs of prefill_sm90.cu for sm_90a (about 1.5 minutes on two cores); the library
loads without a GPU (cudart is static), its workspace size is a pure function of the shapes
matching an independent formula, and it refuses bad arguments with a message before touching CUDA.
The PyTorch reference is checked against the exported op's eager kernel, and the int8 quantiser on
its own. The built library's SASS shows the GEMMs on tensor cores (wgmma + TMA in the sm_90a CUTLASS
GEMMs, mma.sync elsewhere), and CUTLASS's own host functions size the sm_90a path's workspace within
what the library reserves. ``slow``: prefill_sm90.cu compiles for every architecture of the build. ``gpu``: the
kernels against the reference (scripts/gpu_check.py does the full sweep and the timings).
"""

from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mixtral_trt.plugins import build, kernels, reference

EXPECTED_ARCHS = {"sm_80", "sm_89", "sm_90a", "sm_120"}


@pytest.fixture(scope="module")
def library() -> Path:
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc not found: the kernels cannot be compiled here")
    return build.build_library()  # all four architectures, cached under $MIXTRAL_TRT_CACHE


@pytest.fixture(scope="module")
def lib(library):
    return kernels.load_library(library)


# --- build --------------------------------------------------------------------------------------


def fatbin_archs(so: Path) -> set[str]:
    """SM targets of the cubins in an ELF's fatbins, read without cuobjdump.

    Fatbin: magic 0xBA55ED50, u16 version, u16 header size, u64 payload size; then entries of
    u16 kind (2 = cubin), u16, u32 header size, u64 size, u32, u32, u16, u16, u32 arch, ...,
    u64 flags (bit 0x100000 marks an arch-specific 'a' target, as cuobjdump lists sm_90a).
    """
    data = so.read_bytes()
    archs, at = set(), data.find(struct.pack("<I", 0xBA55ED50))
    while at != -1:
        version, header, size = struct.unpack_from("<HHQ", data, at + 4)
        if version == 1 and header == 16:
            p, end = at + header, at + header + size
            while p < end:
                kind, _, ehead, esize = struct.unpack_from("<HHIQ", data, p)
                arch, flags = struct.unpack_from("<I", data, p + 28)[0], struct.unpack_from("<Q", data, p + 40)[0]
                if kind == 2:
                    archs.add(f"sm_{arch}" + ("a" if flags & 0x100000 else ""))
                p += ehead + esize
        at = data.find(struct.pack("<I", 0xBA55ED50), at + 4)
    return archs


def cuda_tool(name: str) -> str | None:
    """A CUDA binary tool: on PATH, else from its pip wheel (nvidia-cuda-cuobjdump/-nvdisasm, in the
    test extra), which installs it under site-packages/nvidia/cu13/bin."""
    found = shutil.which(name)
    if found:
        return found
    import importlib.util

    spec = importlib.util.find_spec("nvidia")
    for root in (spec.submodule_search_locations or []) if spec else []:
        for candidate in sorted(Path(root).glob(f"cu*/bin/{name}")):
            if os.access(candidate, os.X_OK):
                return str(candidate)
    return None


def cuobjdump_archs(so: Path) -> set[str] | None:
    tool = cuda_tool("cuobjdump")
    if tool is None:
        return None
    out = subprocess.run([tool, "--list-elf", str(so)], capture_output=True, text=True, check=True).stdout
    return {part for line in out.splitlines() for part in line.replace(".", " ").split() if part.startswith("sm_")}


def test_library_builds_for_all_four_architectures(library):
    assert library.is_file() and library.name == "libmixtral_moe_top2.so"
    assert fatbin_archs(library) == EXPECTED_ARCHS
    listed = cuobjdump_archs(library)
    if listed is not None:
        assert listed == EXPECTED_ARCHS


def test_library_needs_no_cuda_runtime_library(library):
    ldd = shutil.which("ldd")
    if ldd is None:
        pytest.skip("ldd not found")
    deps = subprocess.run([ldd, str(library)], capture_output=True, text=True, check=False).stdout
    assert "libcudart" not in deps and "libnvinfer" not in deps, deps


def test_build_is_cached_by_source_hash(library, tmp_path):
    assert build.build_library() == library  # a cache hit: same key, no compile
    key = build.build_key(build.DEFAULT_ARCHS, build.nvcc_version("nvcc"))
    assert library.parent.name == key
    assert build.build_key(("90a",), build.nvcc_version("nvcc")) != key
    assert not list(library.parent.parent.glob(".*partial*"))  # no half-written builds left behind


def test_library_holds_the_cutlass_grouped_gemms_for_sm90a(library):
    """prefill_sm90.cu was compiled (for sm_90a only) and linked in: its kernel launch stubs are there,
    and its GEMMs rewrite their TMA descriptors on the device (CUTLASS's fallback, a printf of this
    message in place of the rewrite, is not in the library)."""
    import json

    record = json.loads((library.parent / "build.json").read_text())
    assert record["sm90_archs"] == ["90a"] and record["cutlass"].startswith("4.")
    assert "-gencode=arch=compute_90a,code=sm_90a" in record["commands"][1]
    assert b"Using TMA Descriptor modification without" not in library.read_bytes()
    nm = shutil.which("nm")
    if nm is None:
        pytest.skip("nm not found")
    symbols = subprocess.run([nm, "-C", "--defined-only", str(library)], capture_output=True, text=True, check=True)
    # the launch stubs of cutlass::device_kernel<GemmUniversal<GroupProblemShape<...>, ...>> (mangled by nvcc)
    stub = "__device_stub__ZN7cutlass13device_kernelINS_4gemm6kernel13GemmUniversalINS1_17GroupProblemShape"
    assert stub in symbols.stdout
    assert "moe::sm90_prefill_enqueue(" in symbols.stdout and "moe::sm90_prefill_check(" in symbols.stdout


def sass_functions(so: Path, workdir: Path) -> dict[str, dict[str, str]]:
    """{image: {mangled kernel name: its SASS}} for every cubin in the library, through cuobjdump
    (extracts the cubins) and nvdisasm (disassembles each); skips when either tool is missing."""
    cuobjdump, nvdisasm = cuda_tool("cuobjdump"), cuda_tool("nvdisasm")
    if cuobjdump is None or nvdisasm is None:
        pytest.skip("cuobjdump/nvdisasm not found: pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm")
    subprocess.run([cuobjdump, "-xelf", "all", str(so)], cwd=workdir, capture_output=True, check=True, timeout=120)
    images: dict[str, dict[str, str]] = {}
    for cubin in sorted(workdir.glob("*.cubin")):  # libmixtral_moe_top2.<n>.sm_<arch>.cubin
        sass = subprocess.run([nvdisasm, str(cubin)], capture_output=True, text=True, check=True, timeout=300).stdout
        functions: dict[str, list[str]] = {}
        name = None
        for line in sass.splitlines():
            if line.startswith(".text.") and line.endswith(":"):
                name = line[len(".text."):-1]
                functions[name] = []
            elif name is not None:
                functions[name].append(line)
        images[cubin.name.split(".", 1)[1].removesuffix(".cubin")] = {f: "\n".join(b) for f, b in functions.items()}
    return images


def test_sass_runs_the_gemms_on_tensor_cores(library, tmp_path):
    """What the GPU executes, read from the built library: the sm_90a image's CUTLASS GEMMs are
    wgmma (HGMMA) fed and drained by TMA (UTMALDG/UTMASTG); every image's own GEMMs are mma.sync
    (HMMA, ldmatrix for prefill); no prefill GEMM spills registers to local memory."""
    images = sass_functions(library, tmp_path)
    assert {name.split(".")[1] for name in images} == EXPECTED_ARCHS  # "<n>.sm_90a" -> sm_90a
    cutlass = {f: body for img, fns in images.items() for f, body in fns.items() if "cutlass13device_kernel" in f}
    assert len(cutlass) == 2, sorted(cutlass)  # one GemmUniversal per activation dtype (fp16, bf16)
    for name, body in cutlass.items():
        for instruction in ("HGMMA.64x256x16.F32", "UTMALDG", "UTMASTG"):
            assert instruction in body, f"{instruction} missing from {name[:120]}"
        assert "HMMA" not in body and "LDL" not in body and "STL" not in body, name[:120]
    for image, functions in images.items():
        if not any("prefill_gemm" in f for f in functions):
            continue  # the sm90 translation unit's image: checked above
        ours = {f: body for f, body in functions.items() if "prefill_gemm" in f or "decode_gemm" in f}
        assert any("prefill_gemm" in f for f in ours) and any("decode_gemm" in f for f in ours), image
        for name, body in ours.items():
            assert "HMMA.16816.F32" in body, f"{image}: no mma.sync in {name}"
            if "prefill_gemm" in name:
                assert "LDSM" in body and "LDL" not in body and "STL" not in body, f"{image}: {name}"


def opcodes(sass: str) -> list[str]:
    """The opcodes (with modifiers, predicates dropped) of one function's SASS, in order."""
    ops = []
    for line in sass.splitlines():
        words = line.split("*/", 1)[1].split() if "*/" in line else []
        words = words[1:] if words and words[0].startswith("@") else words
        if words:
            ops.append(words[0])
    return ops


def test_sass_waits_for_the_previous_kernel_before_reading_its_output(library, tmp_path):
    """MOE_FLAG_PDL as compiled: in the sm_90a and sm_120 images every kernel of the default paths
    waits for its predecessor (griddepcontrol.wait: ACQBULK) before it touches global memory, and
    all but the last (combine, or the decode GEMM2 that applies it) let their dependents launch
    (launch_dependents: PREEXIT) only after that wait.
    The one exception is the decode GEMM2: before its wait it loads the routing (complete two
    launches back) and prefetches its first weights into L2 (CCTL), and it stores nothing. The
    sm_80 and sm_89 images have neither instruction (no programmatic launch before sm_90)."""
    images = sass_functions(library, tmp_path)
    names = ("router_kernel", "permute_kernel", "decode_gemm", "prefill_gemm", "combine_kernel")
    global_memory = {"LDG", "STG", "LD", "ST", "ATOM", "ATOMG", "RED", "REDG", "LDGSTS", "CCTL"}
    checked = 0
    for image, functions in images.items():
        for name, body in functions.items():
            if not any(n in name for n in names):
                continue  # the sm90 translation unit's kernels: never launched with the attribute
            ops = opcodes(body)
            wait = ops.index("ACQBULK") if "ACQBULK" in ops else None
            trigger = ops.index("PREEXIT") if "PREEXIT" in ops else None
            checked += 1
            if image.split(".")[1] in ("sm_80", "sm_89"):  # "<n>.sm_80"
                assert wait is None and trigger is None, f"{image}: {name}"
                continue
            assert wait is not None, f"{image}: no griddepcontrol.wait in {name}"
            last = "combine_kernel" in name or re.search(r"decode_gemmI\w+?ELi\d+ELb1EE", name) is not None
            assert (trigger is None) == last, f"{image}: {name}"
            assert trigger is None or trigger > wait, f"{image}: {name} lets dependents launch before its wait"
            early = {op.split(".")[0] for op in ops[:wait]} & global_memory
            gated = re.search(r"decode_gemmI\w+?Lb[01]ELb([01])ELi", name)
            allowed = {"LDG", "CCTL"} if gated and gated.group(1) == "0" else set()
            assert early <= allowed, f"{image}: {name} reaches global memory before its wait: {sorted(early)}"
            if allowed:
                assert early == allowed, f"{image}: {name}: the routing read and the L2 prefetch moved ({early})"
    assert checked == 4 * 73, checked  # 73 kernels in each of the four images


def nvcc_sm90(archs, *args: str) -> list[str]:
    """nvcc with the flags the library build gives prefill_sm90.cu (CUTLASS's include, its defines)."""
    return ["nvcc", *build.sm90_compile_flags(build.cutlass_include()), *build.gencode_flags(archs), *args]


def test_sm90_workspace_region_holds_what_cutlass_asks_for(tmp_path):
    """CUTLASS's own host functions, compiled from prefill_sm90.cu with the library's flags and run
    on the CPU: for every SM count the path accepts (1..kSm90MaxSms) the grouped GEMMs' workspace
    fits kSm90GemmWorkspaceBytes, and CUTLASS accepts device-only problem shapes (about a minute).
    With no driver, CUTLASS cannot build the TMA descriptors: the path refuses to launch, naming them."""
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc not found")
    probe = tmp_path / "sm90_host_probe"
    cmd = nvcc_sm90((build.SM90_ARCH,), "-o", str(probe), str(build.SOURCE_DIR / "tests" / "sm90_host_probe.cu"))
    made = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=1200)
    assert made.returncode == 0, made.stderr[-4000:]
    done = subprocess.run([str(probe)], capture_output=True, text=True, check=False, timeout=120)
    assert done.returncode == 0 and "sm90_host_probe: PASS" in done.stdout, done.stdout + done.stderr
    for dtype in ("fp16", "bf16"):
        facts = dict(kv.split("=") for kv in next(
            line for line in done.stdout.splitlines() if line.startswith(dtype + " ")).split()[1:])  # fmt: skip
        assert 0 < int(facts["workspace_max"]) <= int(facts["reserved"])
        assert int(facts["smem"]) <= 227 * 1024 and int(facts["threads"]) == 384  # 3 warpgroups: cooperative
    if not torch.cuda.is_available():
        assert "could not build the TMA descriptors of GEMM1" in done.stdout


def test_build_compiles_prefill_sm90_with_cutlass(tmp_path):
    include = build.cutlass_include()
    assert (include / "cute" / "tensor.hpp").is_file()
    assert {"prefill_sm90.cu", "prefill_sm90.h"} <= set(build.SOURCE_NAMES)
    kernels_cc, sm90_cc, link = build.nvcc_commands("nvcc", ("80", "90a"), tmp_path, tmp_path / "lib.so", include)
    assert kernels_cc[-1].endswith("kernels.cu") and sm90_cc[-1].endswith("prefill_sm90.cu")
    assert f"-I{include}" in sm90_cc and "--expt-relaxed-constexpr" in sm90_cc and "-DNDEBUG" in sm90_cc
    assert [f for f in sm90_cc if f.startswith("-gencode")] == ["-gencode=arch=compute_90a,code=sm_90a"]
    assert [f for f in kernels_cc if f.startswith("-gencode")] == build.gencode_flags(("80", "90a"))
    assert link[-2:] == [str(tmp_path / "kernels.o"), str(tmp_path / "prefill_sm90.o")] and "--shared" in link
    # Without sm_90a the file still compiles (its GEMMs as stubs), for the archs asked for.
    _, sm90_cc, _ = build.nvcc_commands("nvcc", ("80", "89"), tmp_path, tmp_path / "lib.so", include)
    assert [f for f in sm90_cc if f.startswith("-gencode")] == build.gencode_flags(("80", "89"))


def test_build_names_the_package_when_cutlass_is_missing(monkeypatch, tmp_path):
    monkeypatch.delenv("MIXTRAL_TRT_CUTLASS_INCLUDE", raising=False)
    monkeypatch.setattr(build.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(build.BuildError, match=r"pip install nvidia-cutlass==4\.2"):
        build.cutlass_include()
    assert build.find_cutlass() is None  # the library is then built without the sm_90a path
    compile_, link = build.nvcc_commands("nvcc", ("80", "90a"), tmp_path, tmp_path / "lib.so", None)
    assert compile_[-1].endswith("kernels.cu") and build.NO_SM90_DEFINE in compile_
    assert link[-1] == str(tmp_path / "kernels.o")
    # A wrong override is an error, not a silent build without the path.
    monkeypatch.setenv("MIXTRAL_TRT_CUTLASS_INCLUDE", str(tmp_path))
    with pytest.raises(build.BuildError, match="MIXTRAL_TRT_CUTLASS_INCLUDE=.* has no cutlass/cutlass.h"):
        build.find_cutlass()


def test_cutlass_include_override(monkeypatch):
    include = build.cutlass_include()
    monkeypatch.setenv("MIXTRAL_TRT_CUTLASS_INCLUDE", str(include))
    monkeypatch.setattr(build.importlib.util, "find_spec", lambda name: None)
    assert build.cutlass_include() == include


def test_library_without_cutlass_refuses_the_sm90_flag_with_the_fix(monkeypatch, tmp_path):
    """No CUTLASS installed: the library still builds, every default path is in it, and only the
    opt-in flag is refused, naming the package (built for sm_80 alone to keep this short)."""
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc not found: the kernels cannot be compiled here")
    monkeypatch.delenv("MIXTRAL_TRT_CUTLASS_INCLUDE", raising=False)
    monkeypatch.setattr(build.importlib.util, "find_spec", lambda name: None)
    library = build.build_library(tmp_path / "lib", archs=("80",), verbose=False)
    record = __import__("json").loads((library.parent / "build.json").read_text())
    assert record["cutlass"] is None and len(record["commands"]) == 2
    lib = kernels.load_library(library)
    assert kernels.workspace_size(7, 64, 64, 4, lib=lib) == workspace_formula(7, 64, 64, 4)
    with pytest.raises(kernels.KernelError, match=r"built without CUTLASS.*pip install nvidia-cutlass") as err:
        _enqueue(lib, flags=kernels.FLAG_PREFILL_SM90 | kernels.FLAG_FORCE_PREFILL)
    assert err.value.status == 1


@pytest.mark.slow
def test_prefill_sm90_compiles_for_every_architecture(tmp_path):
    """The guards hold: the file compiles for sm_80/89/120 (stubs) and sm_90a (the GEMMs), with no
    warning from our code (about 2 minutes of CPU; the default build compiles it for sm_90a only)."""
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc not found")
    cmd = nvcc_sm90(build.DEFAULT_ARCHS, "--threads=2", "-c", "-o", str(tmp_path / "p.o"),
                    str(build.SOURCE_DIR / build.SM90_SOURCE))  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=1200)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "prefill_sm90" not in done.stderr, done.stderr[-4000:]  # warnings in our files


def test_build_entry_point_prints_the_cached_library(library):
    done = subprocess.run([sys.executable, "-m", "mixtral_trt.plugins.build"], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert Path(done.stdout.strip()) == library


@pytest.mark.parametrize("arch,expected", [("sm_90a", "90a"), ("80", "80"), ("compute_120", "120"), ("SM_89", "89")])
def test_normalize_arch(arch, expected):
    assert build.normalize_arch(arch) == expected


@pytest.mark.parametrize("arch", ["75", "sm_x", "90ab", ""])
def test_normalize_arch_refuses(arch):
    with pytest.raises(build.BuildError, match="architecture"):
        build.normalize_arch(arch)


def test_gencode_has_one_flag_per_arch():
    assert build.gencode_flags(("80", "90a")) == [
        "-gencode=arch=compute_80,code=sm_80",
        "-gencode=arch=compute_90a,code=sm_90a",
    ]


# --- C ABI through ctypes ---------------------------------------------------------------------


def workspace_formula(T: int, H: int, I: int, E: int, sm90: bool = False) -> int:
    """moe_top2.h's layout, written out again: nine regions every path uses, then (with sm90) four
    of the sm_90a prefill path (row_of, up, sm90_args, sm90_gemm), each rounded up to 256 bytes."""

    def up(n):
        return (n + 255) // 256 * 256

    A = 2 * T
    tiles = (A + 127) // 128 + E
    shared = (4 * A, 4 * A, 4 * (E + 1), 16, 4 * E, 4 * A, 16 * tiles, 2 * A * I, 2 * A * H)
    sm90_only = (4 * A, 2 * A * I, 64 * (3 * E + 4), 131072) if sm90 else ()
    return sum(up(n) for n in shared + sm90_only)


def test_version(lib):
    assert lib.mixtral_moe_top2_version() == kernels.ABI_VERSION


@pytest.mark.parametrize("T", [0, 1, 2, 7, 64, 65, 300, 4096])
@pytest.mark.parametrize("H,I,E", [(4096, 14336, 8), (128, 256, 8), (64, 64, 2), (256, 192, 256)])
def test_workspace_size_is_the_layout_formula(lib, T, H, I, E):
    for act in (kernels.DTYPE_FP16, kernels.DTYPE_BF16):
        first = kernels.workspace_size(T, H, I, E, 2, act, lib=lib)
        assert first == kernels.workspace_size(T, H, I, E, 2, act, lib=lib) == workspace_formula(T, H, I, E)
        assert lib.mixtral_moe_top2_workspace_size(T, H, I, E, 2, act) == first  # the flag-free entry point
        options = (kernels.FLAG_PDL, kernels.FLAG_PREFILL_WIDE, kernels.FLAG_DECODE_FUSED)
        for flags in (kernels.FLAG_FORCE_DECODE, kernels.FLAG_FORCE_PREFILL, *options):
            assert kernels.workspace_size(T, H, I, E, 2, act, lib=lib, flags=flags) == first
        for flags in (kernels.FLAG_PREFILL_SM90, kernels.FLAG_AUTO, kernels.FLAG_AUTO | kernels.FLAG_PDL):
            sm90 = kernels.workspace_size(T, H, I, E, 2, act, lib=lib, flags=flags)
            assert sm90 == workspace_formula(T, H, I, E, sm90=True)


def test_only_the_sm90_and_auto_flags_grow_the_workspace(lib):
    """The sm_90a path's regions come after every path's, so the others' offsets are unchanged,
    and only a caller passing MOE_FLAG_PREFILL_SM90 or MOE_FLAG_AUTO (which may take that path)
    reserves them: at Mixtral dims and T=4096 they add ``up`` (235 MB) to the 302 MB every path needs."""
    T, H, I, E = 4096, 4096, 14336, 8
    plain = kernels.workspace_size(T, H, I, E, 2, kernels.DTYPE_BF16, lib=lib)
    for flags in (kernels.FLAG_PREFILL_SM90, kernels.FLAG_AUTO):
        grown = kernels.workspace_size(T, H, I, E, 2, kernels.DTYPE_BF16, lib=lib, flags=flags) - plain
        assert grown == 4 * 2 * T + 2 * 2 * T * I + 64 * (3 * E + 4) + 131072
        assert round(plain / 1e6) == 302 and round(grown / 1e6) == 235


def test_sm90_workspace_constants_are_documented():
    """prefill_sm90.h's reservations are the numbers moe_top2.h documents (and the formula above uses)."""
    import re

    code = (build.SOURCE_DIR / "prefill_sm90.h").read_text()
    per_group = int(re.search(r"kSm90ArgBytesPerGroup = (\d+);", code).group(1))
    max_sms = int(re.search(r"kSm90MaxSms = (\d+);", code).group(1))
    assert re.search(r"4 \* 128 \* static_cast<size_t>\(kSm90MaxSms\)", code)
    assert "kSm90ArgBytesPerGroup * (3 * experts + 4)" in code
    assert f"sm90_args    {per_group} * (3E + 4) bytes" in _header()
    assert f"sm90_gemm    {4 * 128 * max_sms} bytes" in _header()


@pytest.mark.parametrize(
    "args,message",
    [
        ((4, 4096, 14336, 8, 3, kernels.DTYPE_FP16), "top_k=3"),
        ((4, 100, 14336, 8, 2, kernels.DTYPE_FP16), "hidden=100"),
        ((4, 4096, 100, 8, 2, kernels.DTYPE_FP16), "inter=100"),
        ((4, 4096, 14336, 1, 2, kernels.DTYPE_FP16), "experts=1"),
        ((4, 4096, 14336, 257, 2, kernels.DTYPE_FP16), "experts=257"),
        ((4, 4096, 14336, 8, 2, kernels.DTYPE_FP32), "act_dtype=0"),
        ((-1, 4096, 14336, 8, 2, kernels.DTYPE_FP16), "tokens=-1"),
    ],
)
def test_workspace_size_refuses_bad_shapes(lib, args, message):
    with pytest.raises(kernels.KernelError, match=message):
        kernels.workspace_size(*args, lib=lib)


def _enqueue(lib, **overrides):
    ptr = 1 << 20  # 256-aligned fake device pointers: validation must refuse before any access
    args = dict(hidden=ptr, router=ptr, w13=ptr, w2=ptr, w13_scale=None, w2_scale=None, out=ptr, workspace=ptr,
                tokens=4, hidden_size=128, inter_size=256, num_experts=8, top_k=2, act_dtype=kernels.DTYPE_FP16,
                weight_dtype=kernels.DTYPE_FP16, scale_dtype=kernels.DTYPE_FP32, stream=0)  # fmt: skip
    args.update(overrides)
    kernels.moe_top2_enqueue(**args, lib=lib)


@pytest.mark.parametrize(
    "overrides,message",
    [
        (dict(top_k=1), "top_k=1"),
        (dict(hidden=None), "hidden is null"),
        (dict(w2=(1 << 20) + 8), "w2=.* is not 16-byte aligned"),
        (dict(workspace=None), "workspace is null"),
        (dict(weight_dtype=kernels.DTYPE_BF16), r"weight_dtype=7 \(bf16\); expected the activations' fp16 or int8"),
        (dict(router_dtype=kernels.DTYPE_BF16), "router_dtype=7"),
        (dict(weight_dtype=kernels.DTYPE_INT8, scale_dtype=kernels.DTYPE_INT8), "scale_dtype=2"),
        (dict(weight_dtype=kernels.DTYPE_INT8, scale_dtype=kernels.DTYPE_FP16), "w13_scale is null"),
        (dict(flags=3), "flags=3"),
        (dict(flags=128), "flags=128"),
        (dict(flags=kernels.FLAG_PDL | 3), "flags=11"),
        (dict(flags=kernels.FLAG_PREFILL_SM90 | kernels.FLAG_FORCE_DECODE), "cannot be combined with MOE_FLAG_FORCE"),
        (dict(flags=kernels.FLAG_PREFILL_SM90, weight_dtype=kernels.DTYPE_INT8, w13_scale=1 << 20, w2_scale=1 << 20),
         "MOE_FLAG_PREFILL_SM90 needs fp16/bf16 weights"),
        (dict(act_dtype=kernels.DTYPE_INT8), "act_dtype=2"),
    ],
)
def test_enqueue_refuses_bad_arguments_before_touching_cuda(lib, overrides, message):
    with pytest.raises(kernels.KernelError, match=message) as err:
        _enqueue(lib, **overrides)
    assert err.value.status == 1  # cudaErrorInvalidValue


def test_enqueue_of_nothing_is_a_no_op(lib):
    _enqueue(lib, tokens=0, hidden=None, workspace=None)
    _enqueue(lib, tokens=0, hidden=None, workspace=None, flags=kernels.FLAG_PREFILL_SM90)  # no device needed


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU answers the device query")
def test_sm90_flag_without_a_gpu_is_refused(lib):
    with pytest.raises(kernels.KernelError, match=r"MOE_FLAG_PREFILL_SM90 needs an sm_90 \(Hopper\) GPU") as err:
        _enqueue(lib, flags=kernels.FLAG_PREFILL_SM90 | kernels.FLAG_FORCE_PREFILL)
    assert err.value.status == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the fake pointers would be dereferenced")
@pytest.mark.parametrize("flags", [0, kernels.FLAG_PDL, kernels.FLAG_PDL | kernels.FLAG_FORCE_PREFILL,
                                   kernels.FLAG_PREFILL_WIDE | kernels.FLAG_FORCE_PREFILL,
                                   kernels.FLAG_DECODE_FUSED | kernels.FLAG_PDL, kernels.FLAG_AUTO])
def test_enqueue_without_a_gpu_reports_the_cuda_error(lib, flags):
    with pytest.raises(kernels.KernelError, match="kernel launch failed: cuda"):  # past validation
        _enqueue(lib, flags=flags)


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the fake pointers would be dereferenced")
@pytest.mark.parametrize("tokens", [kernels.SM90_MIN_TOKENS, 4096])
def test_auto_without_an_sm90_gpu_takes_the_other_prefill(lib, tokens):
    """Where MOE_FLAG_PREFILL_SM90 alone is refused (no sm_90 GPU), MOE_FLAG_AUTO at prefill sizes
    falls back to the mma.sync prefill: the enqueue gets past validation and the path choice to the
    launches, which fail here for want of a GPU; int8 weights never ask for the sm_90a path."""
    for weights in ({}, dict(weight_dtype=kernels.DTYPE_INT8, w13_scale=1 << 20, w2_scale=1 << 20)):
        with pytest.raises(kernels.KernelError, match="kernel launch failed: cuda"):
            _enqueue(lib, tokens=tokens, flags=kernels.FLAG_AUTO, **weights)


# --- references ---------------------------------------------------------------------------------


def _problem(T=11, H=32, I=48, E=4, seed=0, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    t = {
        "hidden": torch.randn(T, H, generator=g),
        "router": torch.randn(E, H, generator=g),
        "w13": torch.randn(E, 2 * I, H, generator=g) / H**0.5,
        "w2": torch.randn(E, H, I, generator=g) / I**0.5,
    }
    return {k: v.to(device=device, dtype=dtype) for k, v in t.items()}


@pytest.mark.parametrize("T,E", [(1, 2), (11, 4), (40, 8)])
def test_reference_matches_the_exported_op(T, E):
    from mixtral_trt.export import moe_op

    p = _problem(T=T, E=E, seed=T)
    want = moe_op.moe_top2(p["hidden"], p["router"], p["w13"], p["w2"], E, 2)
    got = reference.moe_top2_reference(**p)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(reference.moe_top2_loop(**p), want, rtol=1e-5, atol=1e-6)


def test_reference_against_a_dense_numpy_oracle():
    import numpy as np

    p = _problem(T=9, E=4, seed=3)
    x, r = p["hidden"].double().numpy(), p["router"].double().numpy()
    w13, w2 = p["w13"].double().numpy(), p["w2"].double().numpy()
    logits = x @ r.T
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    out = np.zeros_like(x)
    I = w13.shape[1] // 2
    for t in range(x.shape[0]):
        top = np.argsort(-probs[t])[:2]
        w = probs[t, top] / probs[t, top].sum()
        for e, we in zip(top, w):
            h = w13[e] @ x[t]
            out[t] += we * (w2[e] @ (h[:I] / (1 + np.exp(-h[:I])) * h[I:]))
    np.testing.assert_allclose(reference.moe_top2_reference(**p).numpy(), out, rtol=1e-4, atol=1e-5)


def test_quantizer_per_output_channel_with_zero_rows():
    w = torch.randn(3, 5, 16)
    w[1, 2] = 0.0  # a zero row: scale 1, all-zero codes
    q, s = reference.quantize_int8(w)
    assert q.dtype == torch.int8 and q.shape == w.shape and s.shape == (3, 5) and s.dtype == torch.float32
    assert s[1, 2] == 1.0 and not q[1, 2].any()
    torch.testing.assert_close(s, torch.where(w.abs().amax(-1) > 0, w.abs().amax(-1) / 127, torch.ones(3, 5)))
    assert int(q.abs().amax(-1).min()) == 127 or bool((w.abs().amax(-1) == 0).any())
    assert q.abs().max() <= 127  # symmetric: -128 never used
    deq = reference.dequantize_int8(q, s)
    assert ((deq - w).abs() <= s.unsqueeze(-1) / 2 + 1e-6).all()
    _, s16 = reference.quantize_int8(w, torch.float16)
    assert s16.dtype == torch.float16 and s16[1, 2] == 1.0


def test_int8_reference_is_close_to_the_float_op():
    p = _problem(T=16, H=64, I=64, seed=5)
    q13, s13 = reference.quantize_int8(p["w13"])
    q2, s2 = reference.quantize_int8(p["w2"])
    want = reference.moe_top2_reference(**p)
    got = reference.moe_top2_reference(p["hidden"], p["router"], q13, q2, s13, s2)
    assert reference.relative_error(got, want) < 3e-2


def test_relative_error_is_inf_on_nan():
    a = torch.ones(2, 3)
    assert reference.relative_error(a, a) == 0.0
    assert reference.relative_error(torch.full_like(a, float("nan")), a) == float("inf")


# --- on a GPU -----------------------------------------------------------------------------------

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _gpu_problem(T: int, mode: str):
    """A small problem on the GPU: fp16 or bf16 activations and weights, or ("int8") fp16
    activations with int8 weights and fp32 per-channel scales."""
    dtype = torch.bfloat16 if mode == "bf16" else torch.float16
    p = _problem(T=T, H=256, I=512, E=8, seed=T, device="cuda")
    p = {k: v.to(dtype) if k != "router" else v for k, v in p.items()}
    if mode == "int8":
        p["w13"], p["w13_scale"] = reference.quantize_int8(p["w13"])
        p["w2"], p["w2_scale"] = reference.quantize_int8(p["w2"])
    return p


def _assert_near_reference(out, p, mode: str) -> None:
    ref = reference.moe_top2_reference(**p)
    rows = reference.routing_margin(p["hidden"], p["router"]) > 1e-4
    assert reference.relative_error(out, ref, rows) <= (2e-2 if mode == "int8" else 1e-2)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("T", [1, 7, 65, 300])
@pytest.mark.parametrize("mode", ["fp16", "bf16", "int8"])
@pytest.mark.parametrize("flags", [0, kernels.FLAG_FORCE_DECODE, kernels.FLAG_FORCE_PREFILL])
def test_kernels_match_the_reference_on_gpu(lib, T, mode, flags):
    p = _gpu_problem(T, mode)
    out = torch.full_like(p["hidden"], float("nan"))
    kernels.moe_top2_torch(**p, flags=flags, out=out, lib=lib)
    _assert_near_reference(out, p, mode)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("T", [1, 7, 65, 300])
@pytest.mark.parametrize("mode", ["fp16", "int8"])
@pytest.mark.parametrize("flags", [0, kernels.FLAG_FORCE_DECODE, kernels.FLAG_FORCE_PREFILL])
@pytest.mark.parametrize("option", [kernels.FLAG_PDL, kernels.FLAG_PREFILL_WIDE, kernels.FLAG_DECODE_FUSED,
                                    kernels.FLAG_DECODE_FUSED | kernels.FLAG_PDL])
def test_options_give_the_same_bits_on_gpu(lib, T, mode, flags, option):
    """MOE_FLAG_PDL changes when kernels start (a no-op before sm_90), MOE_FLAG_PREFILL_WIDE the
    prefill tile's width, MOE_FLAG_DECODE_FUSED which CTA computes what: none changes what any
    output element sums, nor in which order. H and I are multiples of 64 but not of 128 or 256, so
    wide tiles overhang both GEMMs' last columns."""
    p = _problem(T=T, H=320, I=576, E=8, seed=T, device="cuda")
    p = {k: v.half() if k != "router" else v for k, v in p.items()}
    if mode == "int8":
        p["w13"], p["w13_scale"] = reference.quantize_int8(p["w13"])
        p["w2"], p["w2_scale"] = reference.quantize_int8(p["w2"])
    plain = kernels.moe_top2_torch(**p, flags=flags, lib=lib)
    assert torch.equal(kernels.moe_top2_torch(**p, flags=flags | option, lib=lib), plain)


def _on_sm90() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)


@pytest.mark.gpu
@pytest.mark.skipif(not _on_sm90(), reason="the sm_90a prefill path needs an sm_90 GPU")
@pytest.mark.parametrize("T", [1, 7, 65, 300])
@pytest.mark.parametrize("mode", ["fp16", "bf16"])
def test_sm90_prefill_matches_the_reference_on_gpu(lib, T, mode):
    p = _gpu_problem(T, mode)
    out = torch.full_like(p["hidden"], float("nan"))
    kernels.moe_top2_torch(**p, flags=kernels.FLAG_PREFILL_SM90 | kernels.FLAG_FORCE_PREFILL, out=out, lib=lib)
    _assert_near_reference(out, p, mode)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("T", [1, 8, 9, 65, kernels.SM90_MIN_TOKENS - 1, kernels.SM90_MIN_TOKENS])
@pytest.mark.parametrize("mode", ["fp16", "bf16", "int8"])
def test_auto_matches_the_reference_on_gpu(lib, T, mode):
    """MOE_FLAG_AUTO (what the plugins pass): against the reference, and bit for bit against flags 0
    wherever it does not take the sm_90a prefill (fused decode sums in the same order)."""
    p = _gpu_problem(T, mode)
    out = kernels.moe_top2_torch(**p, flags=kernels.FLAG_AUTO, lib=lib)
    _assert_near_reference(out, p, mode)
    if not (_on_sm90() and mode != "int8" and T >= kernels.SM90_MIN_TOKENS):
        assert torch.equal(out, kernels.moe_top2_torch(**p, lib=lib))


# --- the binding speaks the header's ABI ------------------------------------------------------


def _header() -> str:
    return (build.SOURCE_DIR / "moe_top2.h").read_text()


def test_params_struct_matches_the_header():
    import re

    body = re.search(r"typedef struct MoeTop2Params \{(.*?)\} MoeTop2Params;", _header(), re.S).group(1)
    fields = re.findall(r"^\s*(?:const\s+)?(int|void\*)\s+(\w+);", body, re.M)
    assert [name for _, name in fields] == [name for name, _ in kernels.MoeTop2Params._fields_]


def test_constants_match_the_header():
    import re

    defines = dict(re.findall(r"#define (\w+) (\d+)", _header()))
    assert int(defines["MIXTRAL_MOE_TOP2_VERSION"]) == kernels.ABI_VERSION
    assert int(defines["MOE_DECODE_MAX_TOKENS"]) == kernels.DECODE_MAX_TOKENS
    assert int(defines["MOE_DECODE_MAX_TOKENS_INT8"]) == kernels.DECODE_MAX_TOKENS_INT8
    for name in ("FP32", "FP16", "INT8", "BF16"):
        assert int(defines[f"MOE_DTYPE_{name}"]) == getattr(kernels, f"DTYPE_{name}")
    assert int(defines["MOE_FLAG_FORCE_DECODE"]) == kernels.FLAG_FORCE_DECODE
    assert int(defines["MOE_FLAG_FORCE_PREFILL"]) == kernels.FLAG_FORCE_PREFILL
    assert int(defines["MOE_FLAG_PREFILL_SM90"]) == kernels.FLAG_PREFILL_SM90 == 4
    assert int(defines["MOE_FLAG_AUTO"]) == kernels.FLAG_AUTO == 64
    assert int(defines["MOE_SM90_MIN_TOKENS"]) == kernels.SM90_MIN_TOKENS
