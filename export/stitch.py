"""Assemble the canonical graph from traced pieces: bind weights, repeat the layer, name the I/O.

Plain ONNX protobuf surgery: each piece's graph inputs are mapped to global names (graph
inputs, initializers or the previous piece's outputs) and every internal value gets a
per-piece prefix, so the layer graph can be stamped out once per decoder layer.
"""

from __future__ import annotations

import dataclasses

import onnx
from onnx import TensorProto, helper

from mixtral_trt.config import MixtralConfig

from . import model as M
from . import moe_op, moe_schema

ONNX_DTYPES = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16, "bfloat16": TensorProto.BFLOAT16}


@dataclasses.dataclass(frozen=True)
class Initializer:
    """An initializer whose bytes live in the external data file."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int


def io_table(cfg: MixtralConfig) -> dict[str, list[dict]]:
    """The graph's public inputs and outputs: names, dtypes and (symbolic) dims."""
    K, D = cfg.num_key_value_heads, cfg.head_dim
    cache = ["batch", K, "max_cache_len", D]
    inputs = [
        {"name": "input_ids", "dtype": "int64", "shape": ["batch", "seq"]},
        {"name": "position_ids", "dtype": "int64", "shape": ["batch", "seq"]},
        {"name": "write_indices", "dtype": "int64", "shape": ["batch"]},
    ]
    outputs = [{"name": "logits", "dtype": "float32", "shape": ["batch", "seq", cfg.vocab_size]}]
    for i in range(cfg.num_hidden_layers):
        for kind in ("key", "value"):
            inputs.append({"name": f"past_key_values.{i}.{kind}", "dtype": "float32", "shape": cache})
            outputs.append({"name": f"present.{i}.{kind}", "dtype": "float32", "shape": cache})
    return {"inputs": inputs, "outputs": outputs}


def _value_info(entry: dict) -> onnx.ValueInfoProto:
    dtype = {"int64": TensorProto.INT64, "float32": TensorProto.FLOAT}[entry["dtype"]]
    return helper.make_tensor_value_info(entry["name"], dtype, entry["shape"])


def external_tensor(init: Initializer, location: str) -> onnx.TensorProto:
    t = TensorProto(name=init.name, data_type=ONNX_DTYPES[init.dtype], dims=list(init.shape))
    t.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(init.offset)), ("length", str(init.nbytes))):
        t.external_data.add(key=key, value=value)
    return t


class _Builder:
    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.fp32: dict[str, str] = {}  # initializer name -> name of its fp32 view

    def weight(self, init: Initializer) -> str:
        """The name carrying ``init`` as fp32; a Cast is added for half-precision checkpoints."""
        if init.dtype == "float32":
            return init.name
        if init.name not in self.fp32:
            out = f"{init.name}.float32"
            self.nodes.append(helper.make_node("Cast", [init.name], [out], to=TensorProto.FLOAT, name=f"cast/{init.name}"))
            self.fp32[init.name] = out
        return self.fp32[init.name]

    def stamp(self, piece: onnx.ModelProto, prefix: str, inputs: list[str], outputs: list[str]) -> None:
        """Copy ``piece``'s nodes with graph inputs/outputs renamed and everything else prefixed."""
        g = piece.graph
        if g.initializer:
            raise RuntimeError(f"traced piece {prefix!r} unexpectedly holds initializers")
        rename = {vi.name: new for vi, new in zip(g.input, inputs, strict=True)}
        rename.update({vi.name: new for vi, new in zip(g.output, outputs, strict=True)})

        def name(value: str) -> str:
            return "" if value == "" else rename.get(value, f"{prefix}/{value}")

        for node in g.node:
            copy = onnx.NodeProto()
            copy.CopyFrom(node)
            del copy.metadata_props[:]
            copy.name = f"{prefix}/{node.name or node.op_type}"
            copy.input[:] = [name(v) for v in node.input]
            copy.output[:] = [name(v) for v in node.output]
            self.nodes.append(copy)


def build_graph(
    cfg: MixtralConfig, pieces, inits: dict[str, Initializer], data_file: str, ir_version: int
) -> onnx.ModelProto:
    """The canonical model: prologue, ``num_hidden_layers`` layers, epilogue."""
    b = _Builder()
    L = cfg.num_hidden_layers
    embed = b.weight(inits["model.embed_tokens.weight"])
    b.stamp(pieces.prologue, "prologue", ["input_ids", "write_indices", "past_key_values.0.key", embed],
            ["hidden.embed", "attention_mask"])  # fmt: skip
    cos, sin = b.weight(inits["rope.cos_cache"]), b.weight(inits["rope.sin_cache"])
    hidden = "hidden.embed"
    for i in range(L):
        p = f"model.layers.{i}"
        weights = [b.weight(inits[f"{p}.{n}"]) for n in M.LAYER_WEIGHTS]
        ins = [hidden, "attention_mask", "position_ids", "write_indices", cos, sin,
               f"past_key_values.{i}.key", f"past_key_values.{i}.value", *weights]  # fmt: skip
        hidden = f"{p}.output"
        b.stamp(pieces.layer, p, ins, [hidden, f"present.{i}.key", f"present.{i}.value"])
    head = inits.get("lm_head.weight", inits["model.embed_tokens.weight"])
    b.stamp(pieces.epilogue, "epilogue", [hidden, b.weight(inits["model.norm.weight"]), b.weight(head)], ["logits"])

    table = io_table(cfg)
    graph = helper.make_graph(
        b.nodes,
        "mixtral",
        [_value_info(e) for e in table["inputs"]],
        [_value_info(e) for e in table["outputs"]],
        [external_tensor(init, data_file) for init in inits.values()],
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", moe_op.OPSET), helper.make_opsetid(moe_op.MOE_DOMAIN, moe_op.MOE_VERSION)],
        producer_name="mixtral-trt",
        ir_version=ir_version,
    )
    moe_schema.set_function(model, "none")  # MoETop2 defined in standard ops: any ONNX runtime runs the graph
    return model
