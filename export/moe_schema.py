"""The ``mixtral.MoETop2`` ONNX contract: domain, version, opset and the registered schema.

Kept free of torch so the optimizer and the runtimes can use it without loading PyTorch.
"""

from __future__ import annotations

import onnx

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


def register_schema() -> None:
    """Make ``mixtral.MoETop2`` known to onnx (checker, shape inference); idempotent."""
    if not onnx.defs.has(MOE_OP, MOE_DOMAIN):
        onnx.defs.register_schema(_moe_schema())


register_schema()
