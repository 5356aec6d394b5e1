"""The ``MixtralMoETop2`` TensorRT plugin (version 1, namespace ``mixtral``), in Python.

It implements ``mixtral.MoETop2`` (see :mod:`mixtral_trt.export.moe_op`) inside a TensorRT
network: the ONNX parser meets a ``trt.plugins.MixtralMoETop2`` node (written by
:func:`mixtral_trt.optimize.trt_lowering.lower_for_tensorrt`), finds our creator in the plugin
registry by (name, version, namespace) and hands it the node's attributes as plugin fields.

Dimension legend: T = tokens, H = hidden, E = experts, I = expert FFN size, k = top_k.

| position | tensor | dtype | shape |
|---|---|---|---|
| input 0 | hidden | fp32 / fp16 / bf16 (= A) | [T, H] |
| input 1 | router | A or fp32 | [E, H] |
| input 2 | w13 | A, or int8 when quantization='int8' | [E, 2I, H] |
| input 3 | w2 | A, or int8 when quantization='int8' | [E, H, I] |
| input 4 | w13_scale (int8 only) | fp32 / fp16 | [E, 2I] |
| input 5 | w2_scale (int8 only) | fp32 / fp16 | [E, H] |
| output 0 | output | A | [T, H] |

| field | PluginField type | values |
|---|---|---|
| num_experts | INT32 | E > 0, must equal w13's first dim |
| top_k | INT32 | 2 |
| activation | CHAR | 'swiglu' |
| quantization | CHAR | 'none' or 'int8' |

The serialized form is exactly these four fields (``get_fields_to_serialize`` → creator
``create_plugin``); a change to it needs a new plugin version, in the C++ plugin too.

Everything TensorRT-free (field parsing and validation, shape checks, the workspace formula,
supported dtypes) is a plain function here, testable without TensorRT. The TensorRT classes
are made per nvinfer module (datacenter ``tensorrt`` or ``tensorrt_rtx_bindings``) by
:func:`plugin_classes`; :func:`register` registers the creator once per process and module.
``enqueue`` calls the CUDA kernels' C ABI through :mod:`mixtral_trt.plugins.kernels`; until
that library is built it raises :class:`KernelLibraryMissing` (it never fakes a result).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from collections.abc import Mapping, Sequence

import numpy as np

PLUGIN_NAME = "MixtralMoETop2"
PLUGIN_VERSION = "1"
PLUGIN_NAMESPACE = "mixtral"
ACTIVATIONS = ("swiglu",)
QUANTIZATIONS = ("none", "int8")
FIELD_TYPES = {"num_experts": "INT32", "top_k": "INT32", "activation": "CHAR", "quantization": "CHAR"}
INPUT_NAMES = ("hidden", "router", "w13", "w2", "w13_scale", "w2_scale")
ACTIVATION_DTYPES = ("float32", "float16", "bfloat16")
ACTIVATION_SIZES = {"float32": 4, "float16": 2, "bfloat16": 2}
KERNEL_DTYPES = {"float32": 0, "float16": 1, "int8": 2, "bfloat16": 7}  # moe_top2.h MOE_DTYPE_* = TensorRT DataType
SCALE_DTYPES = ("float32", "float16")
WORKSPACE_ALIGN = 256  # bytes; every workspace region starts on this boundary
SM90_ARG_BYTES_PER_GROUP = 64  # the sm_90a path's per-group GEMM arguments (prefill_sm90.h)
SM90_GEMM_WORKSPACE = 4 * 128 * 256  # its CUTLASS workspace: TMA descriptors for up to 256 SMs (prefill_sm90.h)
PREFILL_TILE_ROWS = 128  # rows per prefill GEMM tile of the kernels (moe_top2.h: MT = ceil(A / 128) + E)
_DTYPE_NAMES = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "INT8": "int8", "INT32": "int32",
                "INT64": "int64", "BOOL": "bool", "UINT8": "uint8"}  # fmt: skip


class PluginFieldError(ValueError):
    """A MixtralMoETop2 field is missing, of the wrong type, or has a value the plugin refuses."""


class PluginShapeError(ValueError):
    """The plugin's input shapes do not fit each other or its fields."""


class KernelLibraryMissing(RuntimeError):
    """enqueue was called but the CUDA kernel library (mixtral_trt.plugins.kernels) is not built."""


# ---------------------------------------------------------------------------------------------
# Fields


@dataclasses.dataclass(frozen=True)
class MoEFields:
    """The plugin's fields, validated on construction."""

    num_experts: int
    top_k: int = 2
    activation: str = "swiglu"
    quantization: str = "none"

    def __post_init__(self) -> None:
        if isinstance(self.num_experts, bool) or not isinstance(self.num_experts, int) or self.num_experts <= 0:
            raise PluginFieldError(f"{PLUGIN_NAME}: num_experts={self.num_experts!r}; expected an integer > 0")
        if self.top_k != 2:
            raise PluginFieldError(
                f"{PLUGIN_NAME}: top_k={self.top_k!r}; this plugin (version {PLUGIN_VERSION}) implements top-2 "
                "routing only (Mixtral)"
            )
        if self.top_k > self.num_experts:
            raise PluginFieldError(f"{PLUGIN_NAME}: top_k={self.top_k} exceeds num_experts={self.num_experts}")
        if self.activation not in ACTIVATIONS:
            raise PluginFieldError(
                f"{PLUGIN_NAME}: activation={self.activation!r}; expected one of {list(ACTIVATIONS)}"
            )
        if self.quantization not in QUANTIZATIONS:
            raise PluginFieldError(
                f"{PLUGIN_NAME}: quantization={self.quantization!r}; expected one of {list(QUANTIZATIONS)}"
            )

    @property
    def num_inputs(self) -> int:
        """4, or 6 with the two per-channel scale inputs of int8 weights."""
        return 6 if self.quantization == "int8" else 4


def parse_fields(raw: Mapping[str, object]) -> MoEFields:
    """Fields from ``{name: value}``; a value may be an int, a str, bytes (CHAR, NUL-terminated
    as the ONNX parser passes strings) or a numpy array (as TensorRT hands PluginField data).
    Unknown names are refused; missing ones take their defaults (num_experts has none)."""
    unknown = sorted(set(raw) - set(FIELD_TYPES))
    if unknown:
        raise PluginFieldError(f"{PLUGIN_NAME}: unknown field(s) {unknown}; fields are {list(FIELD_TYPES)}")
    if "num_experts" not in raw:
        raise PluginFieldError(f"{PLUGIN_NAME}: field num_experts is missing (the ONNX node needs that attribute)")
    values = {name: (_int_field(name, v) if FIELD_TYPES[name] == "INT32" else _str_field(name, v))
              for name, v in raw.items()}  # fmt: skip
    return MoEFields(**values)


def _int_field(name: str, value: object) -> int:
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return int(value)
    array = np.asarray(value)
    if array.dtype.kind not in "iu" or array.size != 1:
        raise PluginFieldError(f"{PLUGIN_NAME}: field {name} must be one INT32, got {array.dtype} x {array.size}")
    return int(array.reshape(-1)[0])


def _str_field(name: str, value: object) -> str:
    if isinstance(value, str):
        return value
    data = value if isinstance(value, bytes) else np.asarray(value).tobytes()
    try:
        return data.split(b"\0", 1)[0].decode("ascii")
    except UnicodeDecodeError:
        raise PluginFieldError(f"{PLUGIN_NAME}: field {name} is not an ASCII string: {data!r}") from None


def encode_fields(fields: MoEFields) -> list[tuple[str, np.ndarray, str]]:
    """(name, data, PluginFieldType member name) per field, as serialized into an engine.
    Strings are NUL-terminated CHAR arrays, as the ONNX parser passes them."""
    out = []
    for name, kind in FIELD_TYPES.items():
        value = getattr(fields, name)
        if kind == "INT32":
            data = np.array([value], dtype=np.int32)
        else:
            data = np.frombuffer(value.encode("ascii") + b"\0", dtype=np.int8).copy()
        out.append((name, data, kind))
    return out


# ---------------------------------------------------------------------------------------------
# Shapes, dtypes, workspace


@dataclasses.dataclass(frozen=True)
class MoEDims:
    tokens: int  # -1 when dynamic
    hidden: int
    inter: int
    experts: int


def check_shapes(fields: MoEFields, shapes: Sequence[Sequence[int]]) -> MoEDims:
    """Validate the inputs' shapes (-1 = not known yet) against each other and the fields."""
    if len(shapes) != fields.num_inputs:
        extra = " (quantization='int8' needs w13_scale and w2_scale)" if fields.quantization == "int8" else ""
        raise PluginShapeError(
            f"{PLUGIN_NAME}: {len(shapes)} inputs; expected {fields.num_inputs} "
            f"({', '.join(INPUT_NAMES[: fields.num_inputs])}){extra}"
        )
    shapes = [tuple(int(d) for d in s) for s in shapes]
    ranks = (2, 2, 3, 3, 2, 2)
    for name, shape, rank in zip(INPUT_NAMES, shapes, ranks):
        if len(shape) != rank:
            raise PluginShapeError(f"{PLUGIN_NAME}: {name} has shape {list(shape)}; expected rank {rank}")
    T, H = shapes[0]
    E, I2, H13 = shapes[2]
    I = I2 // 2 if I2 >= 0 else -1  # noqa: E741 (the paper's name)
    expected = {
        "router": (E, H),
        "w13": (fields.num_experts, 2 * I if I >= 0 else -1, H),
        "w2": (E, H, I),
        "w13_scale": (E, 2 * I if I >= 0 else -1),
        "w2_scale": (E, H),
    }
    if I2 >= 0 and I2 % 2:
        raise PluginShapeError(f"{PLUGIN_NAME}: w13 has {I2} rows per expert; expected 2*I (w1 rows, then w3 rows)")
    for name, shape in zip(INPUT_NAMES[1:], shapes[1:]):
        want = expected[name]
        if any(w >= 0 and s >= 0 and w != s for w, s in zip(want, shape)):
            legend = {"router": "[E, H]", "w13": "[E, 2I, H]", "w2": "[E, H, I]", "w13_scale": "[E, 2I]",
                      "w2_scale": "[E, H]"}[name]  # fmt: skip
            raise PluginShapeError(
                f"{PLUGIN_NAME}: {name} has shape {list(shape)}; expected {legend} = "
                f"{[w if w >= 0 else '?' for w in want]} from hidden {list(shapes[0])}, w13 {list(shapes[2])} and "
                f"num_experts={fields.num_experts}"
            )
    if H13 >= 0 and H >= 0 and H13 != H:
        raise PluginShapeError(f"{PLUGIN_NAME}: w13 has shape {list(shapes[2])}; its last dim must be H={H}")
    return MoEDims(T, H, I, E)


def supports_dtypes(fields: MoEFields, pos: int, dtypes: Sequence[str], num_inputs: int) -> bool:
    """May tensor ``pos`` (inputs, then the output) have dtype ``dtypes[pos]``, given the earlier ones?"""
    act = dtypes[0]
    if pos == 0:
        return act in ACTIVATION_DTYPES
    dtype = dtypes[pos]
    if pos == num_inputs:  # the output
        return dtype == act
    if pos == 1:
        return dtype in (act, "float32")
    if pos in (2, 3):
        return dtype == ("int8" if fields.quantization == "int8" else act)
    if pos in (4, 5):
        return fields.quantization == "int8" and dtype in SCALE_DTYPES
    return False


def _align(n: int) -> int:
    return -(-n // WORKSPACE_ALIGN) * WORKSPACE_ALIGN


def workspace_regions(tokens: int, hidden: int, inter: int, experts: int, top_k: int, act_dtype_size: int,
                      sm90: bool = False):  # fmt: skip
    """The workspace layout, in order: (name, bytes) per region; each region starts 256-aligned.

    The layout of the CUDA kernels' C ABI (``plugins/moe_top2/moe_top2.h``,
    ``mixtral_moe_top2_workspace_size_flags``), so the plugin reserves exactly what they use;
    ``sm90`` adds the regions of the sm_90a prefill path, which the plugin reserves for fp16/bf16
    weights on every GPU (it enqueues with MOE_FLAG_AUTO, which takes that path on an sm_90 GPU).
    A = T * k (token, slot) assignments; MT = ceil(A / 128) + E, the most 128-row prefill tiles.

    | region | dtype | shape | use |
    |---|---|---|---|
    | topk_ids | int32 | [A] | expert of assignment a = t * k + slot |
    | topk_weights | fp32 | [A] | its renormalised routing weight |
    | offsets | int32 | [E + 1] | first permuted row of each expert; offsets[E] = A |
    | counters | int32 | [4] | number of row tiles, number of active experts |
    | active | int32 | [E] | the active experts, ascending |
    | permutation | int32 | [A] | assignment held by permuted row r (stable within an expert) |
    | tiles | int32 x 4 | [MT] | prefill row tiles {expert, first row, end row, 0} |
    | intermediate | A dtype | [A, I] | silu(x w1^T) * (x w3^T) of the permuted rows |
    | expert_out | A dtype | [A, H] | expert outputs, combined per token with the routing weights |
    | row_of | int32 | [A] | (sm90) permuted row of each assignment |
    | up | A dtype | [A, I] | (sm90) x w3^T of the permuted rows |
    | sm90_args | bytes | 64 (3E + 4) | (sm90) the grouped GEMMs' shapes, pointers, strides |
    | sm90_gemm | bytes | 131072 | (sm90) CUTLASS's TMA descriptors |
    """
    rows = tokens * top_k
    tiles = -(-rows // PREFILL_TILE_ROWS) + experts
    return [
        ("topk_ids", 4 * rows),
        ("topk_weights", 4 * rows),
        ("offsets", 4 * (experts + 1)),
        ("counters", 4 * 4),
        ("active", 4 * experts),
        ("permutation", 4 * rows),
        ("tiles", 16 * tiles),
        ("intermediate", act_dtype_size * rows * inter),
        ("expert_out", act_dtype_size * rows * hidden),
    ] + ([
        ("row_of", 4 * rows),
        ("up", act_dtype_size * rows * inter),
        ("sm90_args", SM90_ARG_BYTES_PER_GROUP * (3 * experts + 4)),
        ("sm90_gemm", SM90_GEMM_WORKSPACE),
    ] if sm90 else [])  # fmt: skip


def workspace_bytes(tokens: int, hidden: int, inter: int, experts: int, top_k: int, act_dtype_size: int,
                    sm90: bool = False) -> int:  # fmt: skip
    """Scratch bytes one enqueue of ``tokens`` tokens needs: the sum of the 256-aligned regions of
    :func:`workspace_regions` (the CUDA kernels lay the workspace out in that order)."""
    for name, value in (("tokens", tokens), ("hidden", hidden), ("inter", inter), ("experts", experts),
                        ("top_k", top_k), ("act_dtype_size", act_dtype_size)):  # fmt: skip
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise ValueError(f"workspace_bytes: {name}={value!r}; expected a non-negative integer")
    return sum(_align(n) for _, n in workspace_regions(tokens, hidden, inter, experts, top_k, act_dtype_size, sm90))


# ---------------------------------------------------------------------------------------------
# TensorRT classes (one pair per nvinfer module)

_CLASSES: dict[str, tuple[type, type]] = {}
# TensorRT prints a Python exception raised inside a plugin method to stderr and only sees a
# failure code; the builder reads the messages from here to say what went wrong.
ERRORS: collections.deque[str] = collections.deque(maxlen=32)
_REGISTERED: dict[str, object] = {}  # module name -> creator kept alive (the registry holds a raw pointer)


def dtype_name(trt_dtype) -> str:
    return _DTYPE_NAMES.get(trt_dtype.name, trt_dtype.name.lower())


def _dims(dims) -> tuple[int, ...]:
    return tuple(int(dims[i]) for i in range(len(dims)))


def _reported(method):
    """Record an exception of a plugin method in ERRORS before TensorRT swallows it."""

    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        try:
            return method(*args, **kwargs)
        except Exception as exc:
            ERRORS.append(f"{method.__name__}: {exc}")
            raise

    return wrapper


def take_errors() -> list[str]:
    """Plugin errors recorded since the last call (oldest first)."""
    errors = list(ERRORS)
    ERRORS.clear()
    return errors


def plugin_classes(trt) -> tuple[type, type]:
    """(MixtralMoETop2Plugin, MixtralMoETop2Creator) subclassing ``trt``'s IPluginV3 interfaces."""
    if trt.__name__ not in _CLASSES:
        _CLASSES[trt.__name__] = _make_classes(trt)
    return _CLASSES[trt.__name__]


def _make_classes(trt):  # noqa: C901  (one class body per TensorRT interface)
    class MixtralMoETop2Plugin(trt.IPluginV3, trt.IPluginV3OneCore, trt.IPluginV3OneBuild, trt.IPluginV3OneRuntime):
        def __init__(self, fields: MoEFields, phase=None) -> None:
            trt.IPluginV3.__init__(self)
            trt.IPluginV3OneCore.__init__(self)
            trt.IPluginV3OneBuild.__init__(self)
            trt.IPluginV3OneRuntime.__init__(self)
            self.num_outputs = 1
            self.plugin_name = PLUGIN_NAME
            self.plugin_version = PLUGIN_VERSION
            self.plugin_namespace = PLUGIN_NAMESPACE
            self.fields = fields
            self.phase = phase
            self.dims: MoEDims | None = None
            self.dtypes: tuple[str, ...] | None = None
            self.tactic = 0
            self._serialized = None  # keeps the field buffers alive while TensorRT reads them

        # -- core ----------------------------------------------------------------------------
        def get_capability_interface(self, type):  # noqa: A002  (TensorRT's argument name)
            return self

        def clone(self):
            copy = MixtralMoETop2Plugin(self.fields, self.phase)
            copy.dims, copy.dtypes, copy.tactic = self.dims, self.dtypes, self.tactic
            return copy

        # -- build ---------------------------------------------------------------------------
        @_reported
        def get_output_data_types(self, input_types):
            if len(input_types) != self.fields.num_inputs:
                check_shapes(self.fields, [()] * len(input_types))  # raises with the input list
            return [input_types[0]]

        @_reported
        def get_output_shapes(self, inputs, shape_inputs, expr_builder):
            shapes = [tuple(d.get_constant_value() if d.is_constant() else -1 for d in e) for e in inputs]
            check_shapes(self.fields, shapes)
            return [trt.DimsExprs(inputs[0])]  # output [T, H] = hidden's dims

        @_reported
        def supports_format_combination(self, pos, in_out, num_inputs):
            if in_out[pos].desc.format != trt.TensorFormat.LINEAR:
                return False
            dtypes = [dtype_name(d.desc.type) for d in in_out[: pos + 1]]
            return supports_dtypes(self.fields, pos, dtypes, num_inputs)

        @_reported
        def configure_plugin(self, inp, out):
            self.dims = check_shapes(self.fields, [_dims(d.desc.dims) for d in inp])
            self.dtypes = tuple(dtype_name(d.desc.type) for d in inp)

        @_reported
        def get_workspace_size(self, inp, out):
            hidden, w2 = inp[0], inp[3]
            T, H = int(hidden.max[0]), int(hidden.max[1])
            E, _, I = _dims(w2.max)  # noqa: E741
            size = ACTIVATION_SIZES[dtype_name(hidden.desc.type)]
            # int8 weights never take the sm_90a prefill (enqueue_kernels: MOE_FLAG_AUTO)
            return workspace_bytes(T, H, I, E, self.fields.top_k, size, sm90=self.fields.quantization != "int8")

        # -- runtime -------------------------------------------------------------------------
        @_reported
        def on_shape_change(self, inp, out):
            self.dims = check_shapes(self.fields, [_dims(d.dims) for d in inp])
            self.dtypes = tuple(dtype_name(d.type) for d in inp)

        def set_tactic(self, tactic):
            self.tactic = int(tactic)

        def attach_to_context(self, context):
            return self.clone()

        @_reported
        def get_fields_to_serialize(self):
            encoded = encode_fields(self.fields)
            kinds = trt.PluginFieldType
            self._serialized = [trt.PluginField(n, data, getattr(kinds, kind)) for n, data, kind in encoded]
            return trt.PluginFieldCollection(self._serialized)

        @_reported
        def enqueue(self, input_desc, output_desc, inputs, outputs, workspace, stream):
            shapes = [_dims(d.dims) for d in input_desc]
            dtypes = [dtype_name(d.type) for d in input_desc]
            enqueue_kernels(self.fields, shapes, dtypes, inputs, outputs[0], workspace, stream)

    class MixtralMoETop2Creator(trt.IPluginCreatorV3One):
        def __init__(self, version: str = PLUGIN_VERSION) -> None:
            trt.IPluginCreatorV3One.__init__(self)
            self.name = PLUGIN_NAME
            self.plugin_version = version
            self.plugin_namespace = PLUGIN_NAMESPACE
            self.field_names = trt.PluginFieldCollection(
                [trt.PluginField(n, np.array([]), getattr(trt.PluginFieldType, k)) for n, k in FIELD_TYPES.items()]
            )

        @_reported
        def create_plugin(self, name, fc, phase):
            return MixtralMoETop2Plugin(parse_fields({f.name: f.data for f in fc}), phase)

    return MixtralMoETop2Plugin, MixtralMoETop2Creator


def registered(trt) -> list[tuple[str, str, str]]:
    """(name, version, namespace) of every creator in ``trt``'s registry named like ours."""
    return [(c.name, c.plugin_version, c.plugin_namespace) for c in trt.get_plugin_registry().all_creators
            if c.name == PLUGIN_NAME]  # fmt: skip


def register(trt) -> object:
    """Register the creator with ``trt``'s plugin registry under namespace 'mixtral'; once per
    process (a creator removed from the registry is registered again). Returns the creator."""
    ours = (PLUGIN_NAME, PLUGIN_VERSION, PLUGIN_NAMESPACE)
    creator = _REGISTERED.get(trt.__name__)
    if creator is not None and ours in registered(trt):
        return creator
    creator = creator or plugin_classes(trt)[1]()
    if not trt.get_plugin_registry().register_creator(creator, PLUGIN_NAMESPACE):
        raise RuntimeError(
            f"TensorRT refused to register plugin {PLUGIN_NAME} version {PLUGIN_VERSION} namespace "
            f"{PLUGIN_NAMESPACE!r}: another creator with that name, version and namespace is registered"
        )
    _REGISTERED[trt.__name__] = creator
    return creator


def enqueue_kernels(fields: MoEFields, shapes, dtypes, inputs, output, workspace, stream) -> None:
    """Run the MoE through the CUDA kernels' C ABI (``mixtral_moe_top2_enqueue`` of
    ``plugins/moe_top2/moe_top2.h``) via :mod:`mixtral_trt.plugins.kernels`: keyword arguments
    named as the fields of ``MoeTop2Params``, dtypes as the ABI's codes (TensorRT's DataType
    values), device pointers and the stream as integers. Flags: MOE_FLAG_AUTO, the kernels'
    measured-fastest choices for the GPU (fused decode up to 8 tokens, the sm_90a prefill from 512
    tokens on an sm_90 GPU with fp16/bf16 weights), within the workspace get_workspace_size reserves."""
    try:
        from mixtral_trt.plugins import kernels
    except ImportError as exc:
        raise KernelLibraryMissing(
            f"{PLUGIN_NAME}.enqueue: the MoE kernel library is not built (mixtral_trt.plugins.kernels: {exc}); "
            "the plugin builds engines but cannot run them until the CUDA kernels are built"
        ) from exc
    dims = check_shapes(fields, shapes)
    kernels.load_library()
    int8 = fields.quantization == "int8"
    kernels.moe_top2_enqueue(
        tokens=dims.tokens, hidden_size=dims.hidden, inter_size=dims.inter, num_experts=dims.experts,
        top_k=fields.top_k, act_dtype=KERNEL_DTYPES[dtypes[0]], router_dtype=KERNEL_DTYPES[dtypes[1]],
        weight_dtype=KERNEL_DTYPES[dtypes[2]], scale_dtype=KERNEL_DTYPES[dtypes[4]] if int8 else 0, flags=kernels.FLAG_AUTO,
        hidden=inputs[0], router=inputs[1], w13=inputs[2], w2=inputs[3], w13_scale=inputs[4] if int8 else 0,
        w2_scale=inputs[5] if int8 else 0, out=output, workspace=workspace, stream=stream,
    )  # fmt: skip
