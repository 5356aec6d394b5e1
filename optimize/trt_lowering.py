"""TensorRT lowering: the canonical graph as TensorRT's ONNX parser wants it. A pure graph rewrite.

These changes, nothing else (weights stay where they are, external data untouched):

1. Each ``mixtral.MoETop2`` node becomes a plugin node ``trt.plugins.MixtralMoETop2``. TensorRT's
   parser imports a node it has no importer for through its plugin fallback: it looks up the
   creator by (op_type, attribute ``plugin_version`` [default "1"], attribute
   ``plugin_namespace`` [default ""]) and passes every attribute named in the creator's field
   list as a PluginField (INT → INT32, STRING → NUL-terminated CHAR). The node domain is not
   consulted; ``trt.plugins`` keeps the graph valid ONNX. ``plugin_namespace`` is always set,
   so a same-named local function cannot win over the plugin; and the canonical graph's
   ``mixtral.MoETop2`` model-local function is dropped with the last node that called it, so the
   parser never sees (or expands) the dense reference body.
2. The KV cache capacity is pinned: the parser turns ``TensorScatter`` into TensorRT's
   KV-cache-update layer, which refuses a dynamic cache length, so the ``max_cache_len`` dim of
   ``past_key_values.*`` / ``present.*`` becomes ``max_seq_len``.
3. With ``cache_update="copy"`` (for servers that cannot alias an output to an input, such as
   Triton's TensorRT backend) each ``TensorScatter`` becomes standard ops that write a new
   ``present`` tensor: a one-hot [B, L, S] of the written slots, a MatMul placing the new rows,
   and a Where keeping ``past`` elsewhere. It costs O(L) per step; the default ``"inplace"``
   keeps TensorRT's in-place KV-cache-update layer.
4. ``Attention``'s ``softmax_precision`` attribute (set by the fp16/bf16/int8 precision pass) is
   dropped: TensorRT's IAttention has no such setting and its parser refuses the node ("Setting
   softmax precision is not supported in TensorRT Attention"); TensorRT picks the softmax
   accumulation itself (whether it is fp32 in every kernel is to be checked on a GPU).
"""

from __future__ import annotations

import onnx
from onnx import helper

from mixtral_trt.export import moe_schema as moe_op
from mixtral_trt.plugins import moe_plugin as P

PLUGIN_DOMAIN = "trt.plugins"
PLUGIN_DOMAIN_VERSION = 1
CACHE_DIM = "max_cache_len"
CACHE_PREFIXES = ("past_key_values.", "present.")
DROPPED_ATTENTION_ATTRS = ("softmax_precision",)
CACHE_UPDATES = ("inplace", "copy")


class LoweringError(ValueError):
    """The graph cannot be lowered for TensorRT (bad MoETop2 node, cache dims, max_seq_len)."""


def _attrs(node: onnx.NodeProto) -> dict:
    values = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    return {k: v.decode() if isinstance(v, bytes) else v for k, v in values.items()}


def moe_plugin_node(node: onnx.NodeProto) -> onnx.NodeProto:
    """The plugin node replacing one ``mixtral.MoETop2`` node: same inputs and output, fields as attributes."""
    attrs = _attrs(node)
    where = node.name or node.output[0]
    try:
        fields = P.parse_fields({k: attrs[k] for k in P.FIELD_TYPES if k in attrs})
    except P.PluginFieldError as exc:
        raise LoweringError(f"{where}: {exc}") from None
    inputs = list(node.input)
    while inputs and not inputs[-1]:  # optional inputs left out at the end
        inputs.pop()
    if len(inputs) != fields.num_inputs or not all(inputs):
        need = ", ".join(P.INPUT_NAMES[: fields.num_inputs])
        raise LoweringError(
            f"{where}: MoETop2 with quantization={fields.quantization!r} needs inputs ({need}); "
            f"the node has {inputs}"
        )
    return helper.make_node(
        P.PLUGIN_NAME,
        inputs,
        list(node.output),
        name=node.name,
        domain=PLUGIN_DOMAIN,
        num_experts=fields.num_experts,
        top_k=fields.top_k,
        activation=fields.activation,
        quantization=fields.quantization,
        plugin_version=P.PLUGIN_VERSION,
        plugin_namespace=P.PLUGIN_NAMESPACE,
    )


def pin_cache_dims(values, max_seq_len: int) -> int:
    """Replace the ``max_cache_len`` dim (or an existing fixed one) of the cache tensors; count them."""
    pinned = 0
    for vi in values:
        if not vi.name.startswith(CACHE_PREFIXES):
            continue
        dims = vi.type.tensor_type.shape.dim
        if len(dims) != 4:
            raise LoweringError(f"cache tensor {vi.name!r} has rank {len(dims)}; expected [batch, heads, L, head_dim]")
        dim = dims[2]
        if dim.HasField("dim_value") and dim.dim_value != max_seq_len:
            raise LoweringError(f"cache tensor {vi.name!r} has a fixed length {dim.dim_value}, not {max_seq_len}")
        if dim.HasField("dim_param") and dim.dim_param != CACHE_DIM:
            raise LoweringError(f"cache tensor {vi.name!r} has length {dim.dim_param!r}; expected {CACHE_DIM!r}")
        dim.Clear()
        dim.dim_value = max_seq_len
        pinned += 1
    return pinned


def scatter_copy_nodes(node: onnx.NodeProto) -> list[onnx.NodeProto]:
    """``TensorScatter(past [B,K,L,D], update [B,K,S,D], write_indices [B])`` (axis 2, linear) as
    standard ops producing a new tensor: present = Where(slot written, onehot^T @ update, past)."""
    past, update, write = node.input[:3]
    p = f"{node.name or node.output[0]}/copy"
    out: list[onnx.NodeProto] = []

    def add(op: str, inputs: list[str], **attrs) -> str:
        name = f"{p}/{op}{len(out)}"
        out.append(helper.make_node(op, inputs, [name], name=name, **attrs))
        return name

    def ints(*values: int) -> str:
        return add("Constant", [], value=helper.make_tensor(f"{p}/c{len(out)}", onnx.TensorProto.INT64,
                                                            [len(values)], list(values)))  # fmt: skip

    zero, one = add("Constant", [], value_int=0), add("Constant", [], value_int=1)
    seq = add("Squeeze", [add("Slice", [add("Shape", [update]), ints(2), ints(3)]), ints(0)])  # S
    cap = add("Squeeze", [add("Slice", [add("Shape", [past]), ints(2), ints(3)]), ints(0)])  # L
    slots = add("Add", [add("Unsqueeze", [write, ints(1)]), add("Range", [zero, seq, one])])  # [B, S]
    onehot = add("Equal", [add("Unsqueeze", [slots, ints(2)]), add("Range", [zero, cap, one])])  # [B, S, L]
    weights = add("CastLike", [onehot, update])  # [B, S, L] in the cache dtype
    placer = add("Unsqueeze", [add("Transpose", [weights], perm=[0, 2, 1]), ints(1)])  # [B, 1, L, S]
    placed = add("MatMul", [placer, update])  # [B, K, L, D]: the new rows, zeros elsewhere
    written = add("Unsqueeze", [add("ReduceMax", [add("Cast", [onehot], to=onnx.TensorProto.INT32), ints(1)],
                                    keepdims=0), ints(1, 3)])  # [B, 1, L, 1]  # fmt: skip
    out.append(helper.make_node("Where", [add("Cast", [written], to=onnx.TensorProto.BOOL), placed, past],
                                [node.output[0]], name=f"{p}/Where"))  # fmt: skip
    return out


def lower_for_tensorrt(model: onnx.ModelProto, max_seq_len: int, cache_update: str = "inplace") -> onnx.ModelProto:
    """A copy of ``model`` with each MoETop2 as a MixtralMoETop2 plugin node and the cache length fixed."""
    if isinstance(max_seq_len, bool) or not isinstance(max_seq_len, int) or max_seq_len < 1:
        raise LoweringError(f"max_seq_len={max_seq_len!r}; expected a positive integer")
    if cache_update not in CACHE_UPDATES:
        raise LoweringError(f"cache_update={cache_update!r}; expected one of {CACHE_UPDATES}")
    out = onnx.ModelProto()
    out.CopyFrom(model)
    nodes, moe = [], 0
    for node in out.graph.node:
        if node.domain == moe_op.MOE_DOMAIN and node.op_type == moe_op.MOE_OP:
            nodes.append(moe_plugin_node(node))
            moe += 1
        elif node.domain == moe_op.MOE_DOMAIN:
            raise LoweringError(f"{node.name}: {node.domain}.{node.op_type} has no TensorRT lowering")
        elif cache_update == "copy" and node.domain in ("", "ai.onnx") and node.op_type == "TensorScatter":
            nodes.extend(scatter_copy_nodes(node))
        else:
            if node.domain in ("", "ai.onnx") and node.op_type == "Attention":
                kept = [a for a in node.attribute if a.name not in DROPPED_ATTENTION_ATTRS]
                del node.attribute[:]
                node.attribute.extend(kept)
            nodes.append(node)
    if not moe:
        raise LoweringError(
            "the graph has no mixtral.MoETop2 node: is it a canonical export (not an ONNX Runtime lowering)?"
        )
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    g = out.graph
    pinned_in = pin_cache_dims(g.input, max_seq_len)
    pinned_out = pin_cache_dims(g.output, max_seq_len)
    pin_cache_dims(g.value_info, max_seq_len)
    if not pinned_in or pinned_in != pinned_out:
        raise LoweringError(
            f"expected past_key_values.* inputs matching present.* outputs; found {pinned_in} and {pinned_out}"
        )
    moe_op.set_function(out, None)  # every MoETop2 is a plugin node now
    imports = [o for o in out.opset_import if o.domain not in (moe_op.MOE_DOMAIN, PLUGIN_DOMAIN)]
    del out.opset_import[:]
    out.opset_import.extend(imports + [helper.make_opsetid(PLUGIN_DOMAIN, PLUGIN_DOMAIN_VERSION)])
    return out


def count_plugin_nodes(model: onnx.ModelProto) -> int:
    return sum(1 for n in model.graph.node if n.domain == PLUGIN_DOMAIN and n.op_type == P.PLUGIN_NAME)
