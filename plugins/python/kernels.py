"""ctypes binding of the MoETop2 kernels' C ABI (``plugins/moe_top2/moe_top2.h``).

Three layers: :func:`load_library` (find or build ``libmixtral_moe_top2.so``),
:func:`workspace_size` and :func:`moe_top2_enqueue` (raw pointers and a stream handle, as the
TensorRT plugin's enqueue has them), and :func:`moe_top2_torch` (PyTorch tensors on the current
stream). Data-type codes are TensorRT's ``nvinfer1::DataType`` values. torch is imported only by
the torch helpers.

Dimension legend: T tokens, H hidden, I expert FFN size, E experts.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

ABI_VERSION = 1  # MIXTRAL_MOE_TOP2_VERSION this binding speaks

DTYPE_FP32 = 0
DTYPE_FP16 = 1
DTYPE_INT8 = 2
DTYPE_BF16 = 7
DTYPE_NAMES = {DTYPE_FP32: "fp32", DTYPE_FP16: "fp16", DTYPE_INT8: "int8", DTYPE_BF16: "bf16"}

FLAG_FORCE_DECODE = 1
FLAG_FORCE_PREFILL = 2
FLAG_PREFILL_SM90 = 4  # prefill GEMMs on CUTLASS/wgmma (sm_90 + a 90a build, fp16/bf16 weights; refused elsewhere)
FLAG_PDL = 8  # programmatic dependent launch on sm_90+ (bit-identical; opt-in: at most 4% faster, measured)
FLAG_PREFILL_WIDE = 16  # mma.sync prefill with 128x256 tiles (bit-identical; opt-in: 0.86-1.14x, measured)
FLAG_DECODE_FUSED = 32  # decode in 3-4 launches: router+permute, GEMM2+combine (bit-identical)
FLAG_AUTO = 64  # the measured-fastest choices, what the TensorRT plugins pass (moe_top2.h: MOE_FLAG_AUTO)
DECODE_MAX_TOKENS = 32  # auto path: memory-bound decode up to here (fp16/bf16 weights), tensor cores above
DECODE_MAX_TOKENS_INT8 = 64  # the same for int8 weights
SM90_MIN_TOKENS = 512  # FLAG_AUTO: the sm_90a prefill from here (fp16/bf16 weights on an sm_90 device)


def decode_path(tokens: int, int8: bool) -> bool:
    """Whether enqueue picks the decode path by itself (moe_top2.h: MOE_DECODE_MAX_TOKENS*)."""
    return tokens <= (DECODE_MAX_TOKENS_INT8 if int8 else DECODE_MAX_TOKENS)


class KernelError(RuntimeError):
    """The kernels refused their arguments or a CUDA call failed; ``status`` is the cudaError_t code."""

    def __init__(self, message: str, status: int = 0):
        super().__init__(message)
        self.status = status


class MoeTop2Params(ctypes.Structure):
    _fields_ = [
        ("tokens", ctypes.c_int),
        ("hidden_size", ctypes.c_int),
        ("inter_size", ctypes.c_int),
        ("num_experts", ctypes.c_int),
        ("top_k", ctypes.c_int),
        ("act_dtype", ctypes.c_int),
        ("router_dtype", ctypes.c_int),
        ("weight_dtype", ctypes.c_int),
        ("scale_dtype", ctypes.c_int),
        ("flags", ctypes.c_int),
        ("hidden", ctypes.c_void_p),
        ("router", ctypes.c_void_p),
        ("w13", ctypes.c_void_p),
        ("w2", ctypes.c_void_p),
        ("w13_scale", ctypes.c_void_p),
        ("w2_scale", ctypes.c_void_p),
        ("out", ctypes.c_void_p),
    ]


_LIBS: dict[str, ctypes.CDLL] = {}
_DEFAULT: ctypes.CDLL | None = None


def load_library(path=None) -> ctypes.CDLL:
    """Load the kernels: ``path``, else ``$MIXTRAL_TRT_KERNELS_LIB``, else :func:`build.build_library`.

    Loading needs no GPU (cudart is linked statically); launching does.
    """
    global _DEFAULT
    if path is None and _DEFAULT is not None:
        return _DEFAULT
    chosen = path or os.environ.get("MIXTRAL_TRT_KERNELS_LIB")
    if not chosen:
        from .build import build_library

        chosen = build_library()
    key = str(Path(chosen).resolve())
    if key not in _LIBS:
        if not Path(key).is_file():
            raise KernelError(f"MoETop2 kernel library {chosen} does not exist; unset MIXTRAL_TRT_KERNELS_LIB to build it")
        lib = ctypes.CDLL(key)
        _declare(lib)
        version = lib.mixtral_moe_top2_version()
        if version != ABI_VERSION:
            raise KernelError(f"{key} speaks kernel ABI version {version}, this binding speaks {ABI_VERSION}; rebuild it")
        _LIBS[key] = lib
    if path is None:
        _DEFAULT = _LIBS[key]
    return _LIBS[key]


def _declare(lib: ctypes.CDLL) -> None:
    c_int = ctypes.c_int
    lib.mixtral_moe_top2_workspace_size.argtypes = [c_int] * 6
    lib.mixtral_moe_top2_workspace_size.restype = ctypes.c_size_t
    lib.mixtral_moe_top2_workspace_size_flags.argtypes = [c_int] * 7
    lib.mixtral_moe_top2_workspace_size_flags.restype = ctypes.c_size_t
    lib.mixtral_moe_top2_enqueue.argtypes = [ctypes.POINTER(MoeTop2Params), ctypes.c_void_p, ctypes.c_void_p]
    lib.mixtral_moe_top2_enqueue.restype = c_int
    lib.mixtral_moe_top2_last_error.argtypes = []
    lib.mixtral_moe_top2_last_error.restype = ctypes.c_char_p
    lib.mixtral_moe_top2_version.argtypes = []
    lib.mixtral_moe_top2_version.restype = c_int


def _last_error(lib) -> str:
    return (lib.mixtral_moe_top2_last_error() or b"").decode(errors="replace")


def workspace_size(tokens: int, hidden: int, inter: int, experts: int, top_k: int = 2,
                   act_dtype: int = DTYPE_FP16, lib=None, flags: int = 0) -> int:  # fmt: skip
    """Bytes of device workspace for one enqueue with ``flags`` (a pure function of the shapes and
    the flags; only FLAG_PREFILL_SM90 and FLAG_AUTO change it)."""
    lib = lib or load_library()
    n = lib.mixtral_moe_top2_workspace_size_flags(tokens, hidden, inter, experts, top_k, act_dtype, flags)
    if n == 0:
        raise KernelError(f"MoETop2 workspace_size: {_last_error(lib)}", 1)
    return int(n)


def moe_top2_enqueue(hidden, router, w13, w2, w13_scale, w2_scale, out, workspace,
                     tokens, hidden_size, inter_size, num_experts, top_k, act_dtype, weight_dtype, scale_dtype, stream,
                     *, router_dtype=None, flags=0, lib=None) -> None:  # fmt: skip
    """Enqueue the op on ``stream`` (a cudaStream_t as an int; 0 = legacy default stream).

    The first eight arguments are device pointers as integers (``w13_scale``/``w2_scale`` None or
    0 unless the weights are int8); keyword names are those of ``MoeTop2Params``.
    ``router_dtype`` defaults to ``act_dtype``; ``scale_dtype`` matters for int8 weights only.
    Raises :class:`KernelError` with the kernels' reason on a non-zero status.
    """
    lib = lib or load_library()
    p = MoeTop2Params(
        tokens, hidden_size, inter_size, num_experts, top_k, act_dtype,
        act_dtype if router_dtype is None else router_dtype, weight_dtype, scale_dtype, flags,
        hidden or None, router or None, w13 or None, w2 or None, w13_scale or None, w2_scale or None, out or None,
    )  # fmt: skip
    status = lib.mixtral_moe_top2_enqueue(ctypes.byref(p), workspace or None, stream or None)
    if status != 0:
        raise KernelError(f"MoETop2 enqueue failed (status {status}): {_last_error(lib)}", status)


# --- torch helpers ----------------------------------------------------------------------------


def torch_dtype_code(dtype) -> int:
    import torch

    codes = {torch.float32: DTYPE_FP32, torch.float16: DTYPE_FP16, torch.bfloat16: DTYPE_BF16, torch.int8: DTYPE_INT8}
    if dtype not in codes:
        raise KernelError(f"dtype {dtype} has no kernel code; expected one of {list(codes)}")
    return codes[dtype]


def moe_top2_torch(hidden, router, w13, w2, w13_scale=None, w2_scale=None, *, flags: int = 0, out=None,
                   workspace=None, lib=None):  # fmt: skip
    """Run the kernels on PyTorch CUDA tensors on the current stream; returns ``out`` [T, H].

    hidden [T, H] fp16/bf16; router [E, H] (hidden's dtype or fp32); w13 [E, 2I, H] and w2 [E, H, I]
    in hidden's dtype, or int8 with per-output-channel scales w13_scale [E, 2I], w2_scale [E, H]
    (fp16 or fp32). ``out`` and ``workspace`` (uint8, at least :func:`workspace_size` bytes) may be
    passed in to avoid allocations (CUDA graphs).
    """
    import torch

    T, H = _shape(hidden, "hidden", 2)
    E, two_i, H1 = _shape(w13, "w13", 3)
    I = two_i // 2
    _expect(router, "router", (E, H))
    _expect(w2, "w2", (E, H, I))
    if H1 != H or two_i % 2:
        raise KernelError(f"w13 has shape {tuple(w13.shape)}; expected [E, 2*I, H] with H={H}")
    int8 = w13.dtype == torch.int8
    if w2.dtype != w13.dtype:
        raise KernelError(f"w13 is {w13.dtype} but w2 is {w2.dtype}; both must have one dtype")
    if int8:
        if w13_scale is None or w2_scale is None:
            raise KernelError("int8 weights need w13_scale [E, 2I] and w2_scale [E, H]")
        _expect(w13_scale, "w13_scale", (E, two_i))
        _expect(w2_scale, "w2_scale", (E, H))
        if w13_scale.dtype != w2_scale.dtype:
            raise KernelError(f"w13_scale is {w13_scale.dtype} but w2_scale is {w2_scale.dtype}; use one dtype")
    tensors = [hidden, router, w13, w2] + ([w13_scale, w2_scale] if int8 else [])
    for t in tensors:
        if not t.is_cuda or t.device != hidden.device:
            raise KernelError(f"all tensors must be on {hidden.device}; got one on {t.device}")
    act = torch_dtype_code(hidden.dtype)
    if out is None:
        out = torch.empty_like(hidden)
    _expect(out, "out", (T, H))
    need = workspace_size(T, H, I, E, 2, act, lib=lib, flags=flags)
    if workspace is None:
        workspace = torch.empty(need, dtype=torch.uint8, device=hidden.device)
    elif workspace.numel() * workspace.element_size() < need:
        raise KernelError(f"workspace holds {workspace.numel() * workspace.element_size()} bytes; {need} needed")
    with torch.cuda.device(hidden.device):
        moe_top2_enqueue(
            hidden.data_ptr(), router.data_ptr(), w13.data_ptr(), w2.data_ptr(),
            w13_scale.data_ptr() if int8 else None, w2_scale.data_ptr() if int8 else None,
            out.data_ptr(), workspace.data_ptr(), T, H, I, E, 2, act,
            torch_dtype_code(w13.dtype), torch_dtype_code(w13_scale.dtype) if int8 else DTYPE_FP32,
            torch.cuda.current_stream(hidden.device).cuda_stream,
            router_dtype=torch_dtype_code(router.dtype), flags=flags, lib=lib,
        )  # fmt: skip
    return out


def _shape(t, name: str, ndim: int) -> tuple:
    if t.dim() != ndim or not t.is_contiguous():
        raise KernelError(f"{name} must be a contiguous {ndim}-D tensor; got shape {tuple(t.shape)}")
    return tuple(t.shape)


def _expect(t, name: str, shape: tuple) -> None:
    if tuple(t.shape) != tuple(shape) or not t.is_contiguous():
        raise KernelError(f"{name} has shape {tuple(t.shape)} (contiguous={t.is_contiguous()}); expected {shape}")
