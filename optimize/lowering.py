"""Lowering passes: replace ``mixtral.MoETop2`` with what a target runtime executes.

``onnxruntime`` (CPU or CUDA) gets ``com.microsoft.MoE`` (SwiGLU with interleaved gate/up
rows; fp32 or fp16 — ONNX Runtime 1.32 has both CPU kernels), ``com.microsoft.QMoE`` for int8
experts, or, with ``moe="decomposed"``, a dense decomposition into standard opset-24 ops that
any ONNX runtime runs (the portable reference; it computes every expert). The router logits
are computed in fp32 whatever the activation dtype, as MoETop2 defines them.
Weights are not rewritten: layout changes are graph ops on initializers, which runtimes
fold once at load time. The lowered model still needs a data file of its own beside it: ONNX
resolves external data inside the model's directory only, and onnx >= 1.22 refuses a data file
with several hard links. So :func:`lower_dir` moves the data out of a source that is about to be
deleted (``data="move"``, what ``optimize --target onnxruntime`` does with its staging directory),
copies it only when asked (``data="copy"``), and otherwise refuses: ONNX Runtime lowers a
canonical directory in memory when it loads it, with no second copy of the weights on disk.
The canonical graph's ``mixtral.MoETop2`` model-local function goes with the nodes it defined.
Given ``max_seq_len``, the KV cache length becomes that fixed size (the runtimes always bind the
whole cache), so tools that read the graph see the only cache shape it runs with.
"""

from __future__ import annotations

import copy
import os
import shutil
from pathlib import Path

import onnx
from onnx import TensorProto, helper

from mixtral_trt.export import moe_schema as moe_op
from mixtral_trt.fsutil import atomic_dir
from mixtral_trt.manifest import MANIFEST, ManifestError, check_output_dir, read_manifest, sha256_file, write_manifest
from mixtral_trt.onnx_files import check_external_data

from .trt_lowering import CACHE_DIM, CACHE_PREFIXES, pin_cache_dims

MOE_LOWERINGS = ("contrib", "decomposed")
MOE_ACTIVATIONS = ("swiglu",)
MOE_QUANTIZATIONS = ("none", "int8")


class LoweringError(ValueError):
    """The graph cannot be lowered for ONNX Runtime (a MoETop2 node whose attributes or inputs disagree)."""


class _Nodes:
    """Collects new nodes and constants for one rewrite, with unique names under ``prefix``."""

    def __init__(self, prefix: str) -> None:
        self.prefix, self.nodes, self.count = prefix, [], 0

    def add(self, op: str, inputs: list[str], domain: str = "", n_out: int = 1, **attrs) -> list[str]:
        self.count += 1
        outs = [f"{self.prefix}/{op.lower()}{self.count}_{k}" for k in range(n_out)]
        self.nodes.append(helper.make_node(op, inputs, outs, name=f"{self.prefix}/{op}{self.count}", domain=domain, **attrs))
        return outs

    def one(self, op: str, inputs: list[str], domain: str = "", **attrs) -> str:
        return self.add(op, inputs, domain, **attrs)[0]

    def ints(self, values: list[int]) -> str:
        tensor = helper.make_tensor(f"{self.prefix}/c{self.count + 1}", TensorProto.INT64, [len(values)], values)
        return self.one("Constant", [], value=tensor)


def _attrs(node: onnx.NodeProto) -> dict:
    values = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    return {k: v.decode() if isinstance(v, bytes) else v for k, v in values.items()}


def _type(types: dict[str, int] | None, name: str) -> int:
    return (types or {}).get(name, TensorProto.FLOAT)


def _router_logits(b: _Nodes, hidden: str, router: str, dtype: int = TensorProto.FLOAT) -> str:
    """hidden [T, H] @ router^T → fp32 logits [T, E], whatever the activation dtype."""
    if dtype != TensorProto.FLOAT:
        hidden, router = (b.one("Cast", [x], to=TensorProto.FLOAT) for x in (hidden, router))
    return b.one("MatMul", [hidden, b.one("Transpose", [router], perm=[1, 0])])  # [T, E]


def _interleave(b: _Nodes, x: str) -> str:
    """[E, 2I, ...] with w1 rows then w3 rows → w1 row, w3 row, ... (the layout swiglu_fusion=1 reads)."""
    w1, w3 = b.add("Split", [x], n_out=2, axis=1, num_outputs=2)  # [E, I, ...] each
    axis = b.ints([2])
    paired = b.one("Concat", [b.one("Unsqueeze", [w1, axis]), b.one("Unsqueeze", [w3, axis])], axis=2)  # [E, I, 2, ...]
    return b.one("Reshape", [paired, b.one("Shape", [x])])  # [E, 2I, ...]


def _cast_to(b: _Nodes, x: str, types: dict[str, int] | None, dtype: int) -> str:
    return x if _type(types, x) == dtype else b.one("Cast", [x], to=dtype)


def _as_uint8(b: _Nodes, q: str) -> str:
    """int8 q → uint8 q + 128. Cast int8→uint8 keeps the bits (ONNX Cast: out-of-range integers wrap in
    two's complement), and flipping the top bit adds 128 modulo 256; one byte per weight throughout."""
    top = helper.make_tensor(f"{b.prefix}/c{b.count + 1}", TensorProto.UINT8, [], [128])
    return b.one("BitwiseXor", [b.one("Cast", [q], to=TensorProto.UINT8), b.one("Constant", [], value=top)])


def _dequantize(b: _Nodes, q: str, scale: str, types: dict[str, int] | None, dtype: int) -> str:
    """Per-output-channel int8 [E, R, C] with scales [E, R] → dtype [E, R, C]: DequantizeLinear(axis 0)
    takes one 1-D scale per axis, so rows are flattened to [E·R, C] around it."""
    rows = b.one("Concat", [b.ints([-1]), b.one("Shape", [q], start=2)], axis=0)  # [E·R, C]
    flat = b.one("Reshape", [q, rows])
    values = b.one("DequantizeLinear", [flat, b.one("Reshape", [_cast_to(b, scale, types, dtype), b.ints([-1])])],
                   axis=0)  # fmt: skip
    return b.one("Reshape", [values, b.one("Shape", [q])])


def lower_moe_contrib(node: onnx.NodeProto, types: dict[str, int] | None = None) -> list[onnx.NodeProto]:
    """MoETop2 → com.microsoft.MoE, or QMoE for int8: interleaved w1/w3 rows, plain SwiGLU (alpha 1, beta 0,
    no clamp). ``types`` gives the element type of the node's inputs (default float32)."""
    hidden, router, w13, w2 = node.input[:4]
    a = _attrs(node)
    dtype = _type(types, hidden)
    b = _Nodes(node.name or node.output[0])
    logits = _router_logits(b, hidden, router, dtype)
    if dtype != TensorProto.FLOAT:  # the kernels take router_probs in the activation dtype
        logits = b.one("Cast", [logits], to=dtype)
    common = dict(k=int(a.get("top_k", 2)), activation_type="swiglu", swiglu_fusion=1, normalize_routing_weights=1,
                  activation_alpha=1.0, activation_beta=0.0, use_sparse_mixer=0)  # fmt: skip
    if a.get("quantization", "none") == "int8":
        # QMoE runs our weights exactly: with expert_weight_bits=8, no block_size (one scale per output
        # row), raw [E, N, K] layout (weights_prepacked=0) and no zero points, its CPU kernel computes
        # (u - 128) · scale from uint8 u; u = q + 128 makes that q · scale (checked against MoE on
        # dequantized weights: equal to 6e-7 in fp32). So no dequantized copy of the experts is made.
        s13, s2 = (_cast_to(b, s, types, dtype) for s in node.input[4:6])
        inputs = [hidden, logits, _as_uint8(b, _interleave(b, w13)), _interleave(b, s13), "",
                  _as_uint8(b, w2), s2]  # fmt: skip
        op, extra = "QMoE", dict(expert_weight_bits=8, quant_type="int", weights_prepacked=0)
    else:
        inputs, op, extra = [hidden, logits, _interleave(b, w13), "", w2], "MoE", {}
    b.nodes.append(helper.make_node(op, inputs, [node.output[0]], name=f"{b.prefix}/{op}", domain="com.microsoft",
                                    **common, **extra))  # fmt: skip
    return b.nodes


def lower_moe_decomposed(node: onnx.NodeProto, types: dict[str, int] | None = None) -> list[onnx.NodeProto]:
    """MoETop2 → standard ops, dense over experts (T = tokens, E = experts, I = FFN size).

    Routing and the weighted sum of expert outputs run in fp32 (as the eager op); the experts'
    matmuls in the activation dtype; int8 experts are dequantized first."""
    hidden, router, w13, w2 = node.input[:4]
    a = _attrs(node)
    k, dtype = int(a.get("top_k", 2)), _type(types, hidden)
    b = _Nodes(node.name or node.output[0])
    if a.get("quantization", "none") == "int8":
        w13, w2 = (_dequantize(b, w, s, types, dtype) for w, s in zip((w13, w2), node.input[4:6], strict=True))
    probs = b.one("Softmax", [_router_logits(b, hidden, router, dtype)], axis=-1)  # [T, E]
    top_w, top_e = b.add("TopK", [probs, b.ints([k])], n_out=2, axis=-1)  # [T, A] each
    top_w = b.one("Div", [top_w, b.one("ReduceSum", [top_w, b.ints([-1])], keepdims=1)])  # renormalised
    dense = b.one("ScatterElements", [b.one("Mul", [probs, b.one("Constant", [], value_float=0.0)]), top_e, top_w],
                  axis=1)  # [T, E], zero for unchosen experts  # fmt: skip
    h13 = b.one("MatMul", [hidden, b.one("Transpose", [w13], perm=[0, 2, 1])])  # [E, T, 2I]
    gate, up = b.add("Split", [h13], n_out=2, axis=-1, num_outputs=2)  # [E, T, I] each
    act = b.one("Mul", [b.one("Mul", [gate, b.one("Sigmoid", [gate])]), up])  # silu(gate) * up
    y = b.one("MatMul", [act, b.one("Transpose", [w2], perm=[0, 2, 1])])  # [E, T, H]
    if dtype != TensorProto.FLOAT:
        y = b.one("Cast", [y], to=TensorProto.FLOAT)
    weight = b.one("Unsqueeze", [b.one("Transpose", [dense], perm=[1, 0]), b.ints([-1])])  # [E, T, 1]
    total = [node.output[0]] if dtype == TensorProto.FLOAT else [f"{b.prefix}/sum_fp32"]
    b.nodes.append(helper.make_node("ReduceSum", [b.one("Mul", [y, weight]), b.ints([0])], total, keepdims=0,
                                    name=b.prefix + "/ReduceSum"))  # fmt: skip
    if dtype != TensorProto.FLOAT:
        b.nodes.append(helper.make_node("Cast", total, [node.output[0]], to=dtype, name=b.prefix + "/CastOut"))
    return b.nodes


def _value_info(model: onnx.ModelProto) -> tuple[dict[str, int], dict[str, list]]:
    """Element type and dims (int, or None where symbolic) of every value: initializers, graph
    inputs, the rest by onnx shape inference."""
    g = onnx.shape_inference.infer_shapes(model).graph
    values = (*g.value_info, *g.input, *g.output)
    types = {v.name: v.type.tensor_type.elem_type for v in values}
    types.update({i.name: i.data_type for i in g.initializer})
    shapes = {v.name: [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
              for v in values if v.type.tensor_type.HasField("shape")}  # fmt: skip
    shapes.update({i.name: list(i.dims) for i in g.initializer})
    return {name: t for name, t in types.items() if t}, shapes


def check_moe_node(node: onnx.NodeProto, shapes: dict[str, list]) -> None:
    """Refuse a MoETop2 node ONNX Runtime would run differently from its definition: the same
    rules as the TensorRT plugin's fields (activation, quantization and its scale inputs,
    top_k <= num_experts) and num_experts equal to the router's rows and the experts' leading dim."""
    where, a = node.name or node.output[0], _attrs(node)
    E, k = a.get("num_experts"), a.get("top_k", 2)
    if not isinstance(E, int) or E <= 0:
        raise LoweringError(f"{where}: MoETop2 num_experts={E!r}; expected an integer > 0 (the experts' count)")
    if not isinstance(k, int) or not 1 <= k <= E:
        raise LoweringError(f"{where}: MoETop2 top_k={k!r}; expected an integer 1..num_experts={E}")
    if a.get("activation", "swiglu") not in MOE_ACTIVATIONS:
        raise LoweringError(f"{where}: MoETop2 activation={a['activation']!r}; only {list(MOE_ACTIVATIONS)} is "
                            "defined (silu(w1 x) * w3 x)")  # fmt: skip
    quantization = a.get("quantization", "none")
    if quantization not in MOE_QUANTIZATIONS:
        raise LoweringError(f"{where}: MoETop2 quantization={quantization!r} has no ONNX Runtime lowering; "
                            f"expected one of {list(MOE_QUANTIZATIONS)}")  # fmt: skip
    inputs = list(node.input)
    while inputs and not inputs[-1]:
        inputs.pop()
    need = 6 if quantization == "int8" else 4
    if len(inputs) != need or not all(inputs):
        names = "hidden, router, w13, w2" + (", w13_scale, w2_scale" if need == 6 else "")
        raise LoweringError(f"{where}: MoETop2 with quantization={quantization!r} takes {need} inputs ({names}); "
                            f"the node has {inputs}")  # fmt: skip
    for name, what in zip(inputs[1:], ("router rows", "w13 experts", "w2 experts", "w13_scale experts",
                                       "w2_scale experts")):  # fmt: skip
        lead = (shapes.get(name) or [None])[0]
        if lead is not None and lead != E:
            raise LoweringError(f"{where}: MoETop2 num_experts={E} but input {name!r} has {lead} {what} "
                                f"(shape {shapes[name]}); the attribute and the weights must agree")  # fmt: skip


def lower_for_onnxruntime(
    model: onnx.ModelProto, moe: str = "contrib", max_seq_len: int | None = None
) -> onnx.ModelProto:
    """Return a copy of ``model`` with every MoETop2 replaced, other nodes untouched, and the cache
    length fixed to ``max_seq_len`` if given."""
    if moe not in MOE_LOWERINGS:
        raise LoweringError(f"moe lowering {moe!r} is not one of {MOE_LOWERINGS}")
    rewrite = lower_moe_contrib if moe == "contrib" else lower_moe_decomposed
    out = onnx.ModelProto()
    out.CopyFrom(model)
    info = None
    nodes = []
    for node in out.graph.node:
        if node.domain == moe_op.MOE_DOMAIN and node.op_type == moe_op.MOE_OP:
            info = _value_info(model) if info is None else info
            check_moe_node(node, info[1])
            nodes.extend(rewrite(node, info[0]))
        else:
            nodes.append(node)
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    moe_op.set_function(out, None)  # no MoETop2 node is left to call it
    if max_seq_len is not None:
        for values in (out.graph.input, out.graph.output, out.graph.value_info):
            pin_cache_dims(values, max_seq_len)
    del out.opset_import[:]
    out.opset_import.extend([helper.make_opsetid("", moe_op.OPSET)])
    if moe == "contrib":
        out.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return out


DATA_MODES = ("move", "copy")


def lower_dir(src_dir: str | Path, out_dir: str | Path, target: str = "onnxruntime", moe: str = "contrib",
              data: str | None = None, verify: bool = True) -> Path:  # fmt: skip
    """Write an ONNX Runtime model for an export or a canonical precision output ('optimize' stage,
    target 'canonical').

    ``data``: how the weights reach ``out_dir`` — "move" renames the source's data file into it
    (the source is a staging directory about to be deleted), "copy" copies it; None refuses,
    naming both ways and the in-memory lowering that needs neither. ``verify`` re-hashes the
    source's files first: their hashes are carried into the new manifest, which must not vouch
    for altered files."""
    if target != "onnxruntime":
        raise LoweringError(f"target {target!r}: lower_dir lowers for 'onnxruntime' only")
    src_dir, out_dir = Path(src_dir), Path(out_dir)
    manifest = read_manifest(src_dir, ("export", "optimize"), verify=verify)
    previous = manifest.get("optimize", {})
    if manifest["stage"] == "optimize" and previous.get("target") != "canonical":
        raise ManifestError(
            f"{src_dir} is already lowered for {previous.get('target')!r}; lower an export or a precision "
            "output (optimize target 'canonical') instead"
        )
    info = manifest["export"]
    if data not in DATA_MODES:
        size = (src_dir / info["data_file"]).stat().st_size if (src_dir / info["data_file"]).is_file() else 0
        raise LoweringError(
            f"lower_dir({src_dir}, {out_dir}, data={data!r}): the lowered model needs its own {info['data_file']} "
            f"({size / 2**20:.1f} MiB; ONNX refuses hard-linked data files). Pass data='copy' to copy it, "
            f"data='move' if {src_dir} is about to be deleted, or skip lowering: ONNX Runtime lowers {src_dir} "
            "in memory when it loads it (runtime.load, mixtral-build generate)"
        )
    check_output_dir(out_dir, "optimize", source=src_dir)
    model = onnx.load(str(src_dir / info["model_file"]), load_external_data=False)
    check_external_data(src_dir / info["model_file"], model)
    lowered = lower_for_onnxruntime(model, moe, int(info["max_seq_len"]))
    with atomic_dir(out_dir) as tmp:
        (tmp / info["model_file"]).write_bytes(lowered.SerializeToString())
        for path in src_dir.iterdir():
            if path.is_file() and path.name not in (info["model_file"], MANIFEST):
                if path.name == info["data_file"] and data == "move":
                    os.replace(path, tmp / path.name)  # one inode, one link: written once, never shared
                else:
                    shutil.copyfile(path, tmp / path.name)  # small files, or the data when asked to copy
        body = {k: v for k, v in manifest.items() if k not in ("format", "format_version", "stage", "files", "tools")}
        body["io"] = pinned_io(manifest["io"], int(info["max_seq_len"]))
        body["optimize"] = {
            **{k: v for k, v in previous.items() if k not in ("target", "source")},  # precision, int8 options
            "target": "onnxruntime",
            "precision": previous.get("precision", info["precision"]),
            "moe": moe,
            "source": {"dir": str(src_dir.resolve()), "manifest_sha256": sha256_file(src_dir / MANIFEST)},
        }
        hashes = {name: e["sha256"] for name, e in manifest["files"].items() if name != info["model_file"]}
        write_manifest(tmp, "optimize", body, hashes)
    return out_dir


def pinned_io(io: dict, max_seq_len: int) -> dict:
    """The I/O table with the caches' ``max_cache_len`` dim as ``max_seq_len``, as in the lowered graph."""
    out = copy.deepcopy(io)
    for entry in out["inputs"] + out["outputs"]:
        if entry["name"].startswith(CACHE_PREFIXES):
            entry["shape"] = [max_seq_len if d == CACHE_DIM else d for d in entry["shape"]]
    return out


def lower_export_dir(export_dir: str | Path, out_dir: str | Path, moe: str = "contrib", data: str | None = None) -> Path:
    """``lower_dir(export_dir, out_dir, "onnxruntime", moe, data)``, under its earlier name."""
    return lower_dir(export_dir, out_dir, "onnxruntime", moe, data)
