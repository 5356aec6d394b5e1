"""Lowering passes: replace ``mixtral.MoETop2`` with what a target runtime executes.

``onnxruntime`` (CPU or CUDA) gets ``com.microsoft.MoE`` (fp32, SwiGLU with interleaved
gate/up rows) or, with ``moe="decomposed"``, a dense decomposition into standard opset-24
ops that any ONNX runtime runs (the portable reference; it computes every expert).
Weights are not rewritten: layout changes are graph ops on initializers, which runtimes
fold once at load time, so the lowered model shares the export's data file.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import onnx
from onnx import TensorProto, helper

from mixtral_trt.export import moe_op
from mixtral_trt.fsutil import atomic_dir
from mixtral_trt.manifest import check_output_dir, read_manifest, write_manifest

MOE_LOWERINGS = ("contrib", "decomposed")


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


def _router_logits(b: _Nodes, hidden: str, router: str) -> str:
    return b.one("MatMul", [hidden, b.one("Transpose", [router], perm=[1, 0])])  # [T, E]


def lower_moe_contrib(node: onnx.NodeProto) -> list[onnx.NodeProto]:
    """MoETop2 → com.microsoft.MoE: interleave w1/w3 rows, plain SwiGLU (alpha 1, beta 0, no clamp)."""
    hidden, router, w13, w2 = node.input[:4]
    a = _attrs(node)
    b = _Nodes(node.name or node.output[0])
    logits = _router_logits(b, hidden, router)
    w1, w3 = b.add("Split", [w13], n_out=2, axis=1, num_outputs=2)  # [E, I, H] each
    axis = b.ints([2])
    paired = b.one("Concat", [b.one("Unsqueeze", [w1, axis]), b.one("Unsqueeze", [w3, axis])], axis=2)  # [E, I, 2, H]
    fc1 = b.one("Reshape", [paired, b.one("Shape", [w13])])  # [E, 2I, H]: w1 row, w3 row, ...
    b.nodes.append(
        helper.make_node(
            "MoE",
            [hidden, logits, fc1, "", w2],
            [node.output[0]],
            name=b.prefix + "/MoE",
            domain="com.microsoft",
            k=int(a.get("top_k", 2)),
            activation_type="swiglu",
            swiglu_fusion=1,
            normalize_routing_weights=1,
            activation_alpha=1.0,
            activation_beta=0.0,
            use_sparse_mixer=0,
        )
    )
    return b.nodes


def lower_moe_decomposed(node: onnx.NodeProto) -> list[onnx.NodeProto]:
    """MoETop2 → standard ops, dense over experts (T = tokens, E = experts, I = FFN size)."""
    hidden, router, w13, w2 = node.input[:4]
    k = int(_attrs(node).get("top_k", 2))
    b = _Nodes(node.name or node.output[0])
    probs = b.one("Softmax", [_router_logits(b, hidden, router)], axis=-1)  # [T, E]
    top_w, top_e = b.add("TopK", [probs, b.ints([k])], n_out=2, axis=-1)  # [T, A] each
    top_w = b.one("Div", [top_w, b.one("ReduceSum", [top_w, b.ints([-1])], keepdims=1)])  # renormalised
    dense = b.one("ScatterElements", [b.one("Mul", [probs, b.one("Constant", [], value_float=0.0)]), top_e, top_w],
                  axis=1)  # [T, E], zero for unchosen experts  # fmt: skip
    h13 = b.one("MatMul", [hidden, b.one("Transpose", [w13], perm=[0, 2, 1])])  # [E, T, 2I]
    gate, up = b.add("Split", [h13], n_out=2, axis=-1, num_outputs=2)  # [E, T, I] each
    act = b.one("Mul", [b.one("Mul", [gate, b.one("Sigmoid", [gate])]), up])  # silu(gate) * up
    y = b.one("MatMul", [act, b.one("Transpose", [w2], perm=[0, 2, 1])])  # [E, T, H]
    weight = b.one("Unsqueeze", [b.one("Transpose", [dense], perm=[1, 0]), b.ints([-1])])  # [E, T, 1]
    b.nodes.append(
        helper.make_node("ReduceSum", [b.one("Mul", [y, weight]), b.ints([0])], [node.output[0]], keepdims=0,
                         name=b.prefix + "/ReduceSum")  # fmt: skip
    )
    return b.nodes


def lower_for_onnxruntime(model: onnx.ModelProto, moe: str = "contrib") -> onnx.ModelProto:
    """Return a copy of ``model`` with every MoETop2 replaced; other nodes untouched."""
    if moe not in MOE_LOWERINGS:
        raise ValueError(f"moe lowering {moe!r} is not one of {MOE_LOWERINGS}")
    rewrite = lower_moe_contrib if moe == "contrib" else lower_moe_decomposed
    out = onnx.ModelProto()
    out.CopyFrom(model)
    nodes = []
    for node in out.graph.node:
        if node.domain == moe_op.MOE_DOMAIN and node.op_type == moe_op.MOE_OP:
            if _attrs(node).get("quantization", "none") != "none":
                raise ValueError(f"{node.name}: quantized MoETop2 has no ONNX Runtime lowering here")
            nodes.extend(rewrite(node))
        else:
            nodes.append(node)
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    del out.opset_import[:]
    out.opset_import.extend([helper.make_opsetid("", moe_op.OPSET)])
    if moe == "contrib":
        out.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return out


def lower_export_dir(export_dir: str | Path, out_dir: str | Path, moe: str = "contrib") -> Path:
    """Write an ONNX Runtime model for an export directory; the data file is hard-linked, not copied."""
    export_dir, out_dir = Path(export_dir), Path(out_dir)
    manifest = read_manifest(export_dir, "export", verify=False)
    check_output_dir(out_dir, "optimize")
    info = manifest["export"]
    model = onnx.load(str(export_dir / info["model_file"]), load_external_data=False)
    lowered = lower_for_onnxruntime(model, moe)
    with atomic_dir(out_dir) as tmp:
        (tmp / info["model_file"]).write_bytes(lowered.SerializeToString())
        for path in export_dir.iterdir():
            if path.is_file() and path.name not in (info["model_file"], "manifest.json"):
                _link_or_copy(path, tmp / path.name)
        body = {k: v for k, v in manifest.items() if k not in ("format", "format_version", "stage", "files", "tools")}
        body["optimize"] = {"target": "onnxruntime", "precision": "fp32", "moe": moe,
                            "source": str(export_dir.resolve())}  # fmt: skip
        hashes = {name: e["sha256"] for name, e in manifest["files"].items() if name != info["model_file"]}
        write_manifest(tmp, "optimize", body, hashes)
    return out_dir


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)
