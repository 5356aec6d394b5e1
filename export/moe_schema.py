"""The ``mixtral.MoETop2`` ONNX contract: domain, version, opset, the registered schema and the
model-local function that defines the op in standard opset-24 ops.

The schema lets onnx's checker and shape inference know the node in our own processes. The
function travels inside every canonical model, so any ONNX tool or runtime (ONNX Runtime inlines
model-local functions) runs the graph without our schema or a custom-op library. It is the
portable reference, dense over experts; the lowerings replace every MoETop2 node with a fast
kernel and drop the function. Kept free of torch so the optimizer and the runtimes can use it
without loading PyTorch.
"""

from __future__ import annotations

import onnx
from onnx import TensorProto, helper

MOE_DOMAIN = "mixtral"
MOE_OP = "MoETop2"
MOE_VERSION = 1
OPSET = 24


def _moe_schema() -> onnx.defs.OpSchema:
    formal = onnx.defs.OpSchema.FormalParameter
    attr = onnx.defs.OpSchema.Attribute
    kind = onnx.defs.OpSchema.AttrType
    return onnx.defs.OpSchema(
        MOE_OP,
        MOE_DOMAIN,
        MOE_VERSION,
        doc=(
            "Mixtral top-k sparse mixture of experts. router logits = hidden @ router^T in fp32; "
            "softmax; top_k experts; their weights renormalised to sum 1; output = sum over the "
            "chosen experts of weight * w2[e] @ (silu(w1[e] @ x) * (w3[e] @ x)), where w13[e] holds "
            "w1[e] (rows 0..I-1) then w3[e] (rows I..2I-1). int8 weights carry per-output-channel "
            "scales (w13_scale [E, 2I], w2_scale [E, H]) and quantization='int8'."
        ),
        inputs=[
            formal("hidden", "T", "hidden states [tokens, H]"),
            formal("router", "T", "router (gate) weight [E, H]"),
            formal("w13", "W", "expert gate and up weights [E, 2*I, H] (w1 rows, then w3 rows)"),
            formal("w2", "W", "expert down weights [E, H, I]"),
            formal("w13_scale", "S", "per-output-channel scales of w13 [E, 2*I] (int8 only)",
                   param_option=onnx.defs.OpSchema.FormalParameterOption.Optional),
            formal("w2_scale", "S", "per-output-channel scales of w2 [E, H] (int8 only)",
                   param_option=onnx.defs.OpSchema.FormalParameterOption.Optional),
        ],  # fmt: skip
        outputs=[formal("output", "T", "mixture output [tokens, H]")],
        type_constraints=[
            ("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], "activations"),
            ("W", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)", "tensor(int8)"], "expert weights"),
            ("S", ["tensor(float)", "tensor(float16)"], "int8 scales"),
        ],
        attributes=[
            attr("num_experts", kind.INT, "number of experts E"),
            attr("top_k", onnx.helper.make_attribute("top_k", 2), "experts per token"),
            attr("activation", onnx.helper.make_attribute("activation", "swiglu"), "expert activation"),
            attr("quantization", onnx.helper.make_attribute("quantization", "none"), "'none' or 'int8'"),
        ],
    )


# --- the model-local function -----------------------------------------------------------------

QUANTIZATIONS = ("none", "int8")
_FUNCTION_ATTRS = {"top_k": 2, "activation": "swiglu", "quantization": "none"}  # defaults, as the schema's


class _Body:
    """Nodes of the function body, each output named after its op and position."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []

    def add(self, op: str, inputs: list[str], n_out: int = 1, out: str | None = None, **attrs) -> list[str]:
        outs = [out] if out else [f"{op.lower()}{len(self.nodes)}_{k}" for k in range(n_out)]
        self.nodes.append(helper.make_node(op, inputs, outs, **attrs))
        return outs

    def one(self, op: str, inputs: list[str], **attrs) -> str:
        return self.add(op, inputs, **attrs)[0]

    def ints(self, *values: int) -> str:
        return self.one("Constant", [], value_ints=list(values))

    def referenced(self, attr: str, ref: str, kind: int) -> str:
        """A Constant whose ``attr`` is the calling node's attribute ``ref``."""
        out = self.one("Constant", [])
        self.nodes[-1].attribute.append(onnx.AttributeProto(name=attr, ref_attr_name=ref, type=kind))
        return out

    def dequantize(self, q: str, scale: str, like: str) -> str:
        """int8 q [E, R, C] with per-row scales [E, R] → q · scale [E, R, C] in ``like``'s dtype.
        DequantizeLinear(axis 0) takes one 1-D scale per axis, so the rows are flattened around it."""
        rows = self.one("Concat", [self.ints(-1), self.one("Shape", [q], start=2)], axis=0)  # [E·R, C]
        flat_scale = self.one("Reshape", [self.one("CastLike", [scale, like]), self.ints(-1)])  # [E·R]
        values = self.one("DequantizeLinear", [self.one("Reshape", [q, rows]), flat_scale], axis=0)
        return self.one("Reshape", [values, self.one("Shape", [q])])


def moe_function(quantization: str = "none") -> onnx.FunctionProto:
    """``mixtral.MoETop2`` in standard opset-24 ops, for weights stored as ``quantization``.

    Legend: T = tokens, H = hidden, E = experts, I = expert FFN size, A = top_k. Routing and the
    weighted sum run in fp32 (as Mixtral and the eager op); the experts' matmuls in the activation
    dtype (``hidden``'s); the output is cast back to it. Every expert is computed and weighted by
    its (mostly zero) renormalised routing weight: exact, not fast.
    """
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"MoETop2 quantization {quantization!r} has no function body; expected one of {QUANTIZATIONS}")
    inputs = ["hidden", "router", "w13", "w2"] + (["w13_scale", "w2_scale"] if quantization == "int8" else [])
    b = _Body()
    w13, w2 = "w13", "w2"
    if quantization == "int8":
        w13, w2 = b.dequantize("w13", "w13_scale", "hidden"), b.dequantize("w2", "w2_scale", "hidden")
    x32 = b.one("Cast", ["hidden"], to=TensorProto.FLOAT)  # [T, H]
    r32 = b.one("Cast", ["router"], to=TensorProto.FLOAT)  # [E, H]
    probs = b.one("Softmax", [b.one("MatMul", [x32, b.one("Transpose", [r32], perm=[1, 0])])], axis=-1)  # [T, E]
    k = b.one("Reshape", [b.referenced("value_int", "top_k", onnx.AttributeProto.INT), b.ints(1)])  # [1]
    top_w, top_e = b.add("TopK", [probs, k], n_out=2, axis=-1)  # [T, A] each
    top_w = b.one("Div", [top_w, b.one("ReduceSum", [top_w, b.ints(-1)], keepdims=1)])  # renormalised, [T, A]
    zeros = b.one("ConstantOfShape", [b.one("Shape", [probs])])  # fp32 [T, E]
    dense = b.one("ScatterElements", [zeros, top_e, top_w], axis=1)  # [T, E], 0 for experts not chosen
    h13 = b.one("MatMul", ["hidden", b.one("Transpose", [w13], perm=[0, 2, 1])])  # [E, T, 2I]
    gate, up = b.add("Split", [h13], n_out=2, axis=-1, num_outputs=2)  # [E, T, I] each
    act = b.one("Mul", [b.one("Mul", [gate, b.one("Sigmoid", [gate])]), up])  # silu(gate) · up
    y = b.one("MatMul", [act, b.one("Transpose", [w2], perm=[0, 2, 1])])  # [E, T, H]
    y = b.one("Cast", [y], to=TensorProto.FLOAT)
    weight = b.one("Unsqueeze", [b.one("Transpose", [dense], perm=[1, 0]), b.ints(-1)])  # [E, T, 1]
    total = b.one("ReduceSum", [b.one("Mul", [y, weight]), b.ints(0)], keepdims=0)  # fp32 [T, H]
    b.add("CastLike", [total, "hidden"], out="output")
    return helper.make_function(
        MOE_DOMAIN, MOE_OP, inputs, ["output"], b.nodes, [helper.make_opsetid("", OPSET)],
        attributes=["num_experts"],
        attribute_protos=[helper.make_attribute(k, v) for k, v in _FUNCTION_ATTRS.items()],
        doc_string=f"Mixtral top-k MoE, weights quantization={quantization!r}; dense reference over experts.",
    )  # fmt: skip


def set_function(model: onnx.ModelProto, quantization: str | None) -> None:
    """Give ``model`` exactly the MoETop2 function for ``quantization`` (None: none at all, for
    graphs whose MoETop2 nodes are all lowered), replacing any it carried."""
    kept = [f for f in model.functions if (f.domain, f.name) != (MOE_DOMAIN, MOE_OP)]
    del model.functions[:]
    model.functions.extend(kept + ([moe_function(quantization)] if quantization is not None else []))


def register_schema() -> None:
    """Make ``mixtral.MoETop2`` known to onnx (checker, shape inference); idempotent."""
    if not onnx.defs.has(MOE_OP, MOE_DOMAIN):
        onnx.defs.register_schema(_moe_schema())


register_schema()
