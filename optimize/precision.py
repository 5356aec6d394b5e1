"""Precision pass: canonical ONNX (fp32 compute) → the same graph in fp32, fp16, bf16 or int8 weight-only.

TensorRT 11 builds strongly typed networks only, so precision is a property of the graph:

- ``fp32``: every float initializer fp32; the export's per-initializer ``Cast`` nodes are gone.
- ``fp16`` / ``bf16``: weights and activations in that dtype, KV cache inputs/outputs too; the
  logits get a final ``Cast`` to float32. Accumulations that need fp32 stay fp32 by attribute:
  ``RMSNormalization(stash_type=1)``, ``Attention(softmax_precision=FLOAT)``; MoETop2 routes in
  fp32 by its own definition.
- ``int8``: weight-only, activations fp16. Each linear weight ``W`` [out, in] becomes ``W.int8``
  (int8) and ``W.scale`` [out] (fp16) → ``DequantizeLinear(axis=0)`` named ``W`` (fp16), which
  feeds the export's ``Transpose → MatMul`` unchanged. Symmetric per output channel (TensorRT's
  int8 is symmetric and per-channel only on constant weights). Experts go to MoETop2 as int8 with
  ``w13_scale`` [E, 2I] / ``w2_scale`` [E, H] and ``quantization='int8'``. Embedding, norms and rope
  tables are fp16; the router and LM head stay fp16 unless ``int8_router`` / ``int8_lm_head``;
  ``int8_attention=False`` keeps the attention projections fp16 too (experts-only int8: about
  3% of Mixtral's weight bytes stay fp16, for accuracy; see the README's accuracy section).

Every output carries the ``mixtral.MoETop2`` model-local function matching its experts (the
dequantising body for int8), so the canonical graph of any precision runs in plain ONNX runtimes.

Weights stream: one initializer at a time, in row chunks of at most :data:`CHUNK_BYTES` (fp32
working size; rows are output channels, leading dims flattened), each output tensor written once.
The export's data file is read front to back and hashed on the way, so it is checked against
its manifest without a second pass. Legend: R = rows (output channels), C = columns (inputs).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import math
import os
import re
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from mixtral_trt.export import moe_schema as moe_op
from mixtral_trt.export.onnx_export import DataWriter
from mixtral_trt.export.stitch import Initializer
from mixtral_trt.fsutil import atomic_dir
from mixtral_trt.onnx_files import check_external_data
from mixtral_trt.manifest import (
    MANIFEST,
    ManifestError,
    check_output_dir,
    read_manifest,
    sha256_file,
    verify_files,
    write_manifest,
)

PRECISIONS = ("fp32", "fp16", "bf16", "int8")
ACTIVATION = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "int8": "float16"}
SCALE_DTYPE = "float16"
CHUNK_BYTES = 64 << 20  # fp32 working size of one row chunk

ONNX_TYPE = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16, "bfloat16": TensorProto.BFLOAT16,
             "int8": TensorProto.INT8}  # fmt: skip
NUMPY = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16, "int8": np.int8}
FLOAT_NAMES = {v: k for k, v in ONNX_TYPE.items() if k != "int8"}

_ATTENTION_LINEAR = re.compile(r"model\.layers\.\d+\.self_attn\.[qkvo]_proj\.weight")
_ROUTER = re.compile(r"model\.layers\.\d+\.block_sparse_moe\.gate\.weight")
_EXPERTS = re.compile(r"model\.layers\.\d+\.block_sparse_moe\.experts\.w(13|2)")
_LAYER = re.compile(r"model\.layers\.(\d+)\.")
EMBED, LM_HEAD = "model.embed_tokens.weight", "lm_head.weight"


class PrecisionError(ValueError):
    """The precision request cannot be carried out (bad option, unreadable or unrepresentable weights)."""


@dataclasses.dataclass(frozen=True)
class _Job:
    """One source initializer and what becomes of it: ``name`` in ``dtype``, or ``name.int8`` + ``name.scale``."""

    src: TensorProto  # external-data initializer of the export
    name: str  # the source's name, or LM_HEAD for a tied head quantized apart from the embedding
    quantize: bool
    dtype: str  # output dtype when not quantized

    @property
    def offset(self) -> int:
        return int(_external(self.src)["offset"])


def convert(
    src_dir: str | Path,
    out_dir: str | Path,
    precision: str,
    *,
    int8_lm_head: bool = False,
    int8_router: bool = False,
    int8_attention: bool = True,
    progress: bool = True,
    verify: bool = True,
) -> Path:
    """Write ``out_dir`` (model.onnx, a new model.onnx.data, tokenizer files, manifest.json) from an export.

    ``out_dir`` appears whole or not at all; a previous optimize output there is replaced,
    anything else is refused. ``verify``: check every source file against the export's manifest
    (the data file is hashed while it is read, at no extra cost); ``False`` skips only that.
    """
    if precision not in PRECISIONS:
        raise PrecisionError(f"precision {precision!r} is not one of {PRECISIONS}")
    if (int8_lm_head or int8_router or not int8_attention) and precision != "int8":
        raise PrecisionError(f"int8_lm_head/int8_router/int8_attention apply to precision 'int8' only, not {precision!r}")
    src_dir, out_dir = Path(src_dir), Path(out_dir)
    manifest = read_manifest(src_dir, "export", verify=False)  # the data file is verified while it is read
    info = manifest["export"]
    for key in ("model_file", "data_file"):
        if info.get(key) not in manifest.get("files", {}):
            raise ManifestError(f"{src_dir / MANIFEST} lists no {key} ({info.get(key)!r}): not a complete export; "
                                "re-run the export")  # fmt: skip
    if out_dir.exists() and out_dir.resolve() == src_dir.resolve():
        raise PrecisionError(f"output directory {out_dir} is the export directory itself; choose another path")
    check_output_dir(out_dir, "optimize", source=src_dir)
    small = {n: e for n, e in manifest["files"].items() if n != info["data_file"]}
    if verify:  # the data file is checked as it is read (one pass over the weights)
        verify_files(src_dir, {"files": small})
    model = onnx.load(str(src_dir / info["model_file"]), load_external_data=False)
    check_external_data(src_dir / info["model_file"], model)  # also refuses a data file that is a link
    _check_one_data_file(model.graph, info["data_file"], src_dir)
    jobs = _plan(model.graph, precision, int8_lm_head, int8_router, int8_attention)
    act = ACTIVATION[precision]

    with atomic_dir(out_dir) as tmp:
        writer = DataWriter(tmp / info["data_file"])
        try:
            with _Source(src_dir / info["data_file"]) as source:
                written = _write_tensors(jobs, source, writer, progress, precision)
                if source.finish() != manifest["files"][info["data_file"]]["sha256"] and verify:
                    raise ManifestError(
                        f"{src_dir / info['data_file']}: sha256 differs from {src_dir / MANIFEST} (file modified or "
                        "corrupt); re-run the export"
                    )
        finally:
            data_sha = writer.close()
        io = io_table(manifest["io"], act)
        graph = rewrite_graph(model, jobs, written, act, info["data_file"], io)
        (tmp / info["model_file"]).write_bytes(graph.SerializeToString())
        check_graph(tmp / info["model_file"])
        for name in small:
            if name != info["model_file"]:
                _link_or_copy(src_dir / name, tmp / name)
        optimize = {"precision": precision, "target": "canonical"}
        if precision == "int8":
            optimize["int8"] = {"lm_head": int8_lm_head, "router": int8_router, "attention": int8_attention}
        optimize["source"] = {"dir": str(src_dir.resolve()), "manifest_sha256": sha256_file(src_dir / MANIFEST)}
        body = {"config": manifest["config"], "export": manifest["export"], "io": io, "optimize": optimize}
        hashes = {n: e["sha256"] for n, e in small.items() if n != info["model_file"]}
        write_manifest(tmp, "optimize", body, {**hashes, info["data_file"]: data_sha})
    return out_dir


def _check_one_data_file(graph: onnx.GraphProto, data_file: str, src_dir: Path) -> None:
    """The weights are streamed from the manifest's data file, so the graph must locate them all there."""
    elsewhere = sorted({_external(i).get("location", "") for i in graph.initializer
                        if i.data_location == TensorProto.EXTERNAL} - {data_file})  # fmt: skip
    if elsewhere:
        raise PrecisionError(f"{src_dir / MANIFEST} names the data file {data_file!r}, but the graph also locates "
                             f"initializers in {elsewhere}; re-run the export")  # fmt: skip


# --- weights -------------------------------------------------------------------------------------


def quantize_rows(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per row: w [R, C] (any float dtype) → q int8 [R, C], scale fp16 [R], w ≈ q · scale.

    scale = max|row| / 127, rounded *up* to fp16 so |w / scale| ≤ 127 and every element is within
    scale/2 of its dequantized value. A row of zeros (or one whose scale underflows fp16) gets
    scale 1 and q = 0: no division by zero.
    """
    x = w.astype(np.float32)  # [R, C], our own copy, divided in place below
    ideal = np.abs(x).max(axis=1) / np.float32(127)  # [R]
    scale = ideal.astype(np.float16)
    low = scale.astype(np.float32) < ideal
    scale[low] = np.nextafter(scale[low], np.float16(np.inf))
    if not np.isfinite(scale).all():
        raise OverflowError("non-finite weights, or magnitudes beyond 127 × float16's maximum")
    scale[scale == 0] = 1
    x /= scale.astype(np.float32)[:, None]
    np.rint(x, out=x)
    np.clip(x, -127, 127, out=x)
    return x.astype(np.int8), scale


def _plan(graph: onnx.GraphProto, precision: str, int8_lm_head: bool, int8_router: bool,
          int8_attention: bool) -> list[_Job]:  # fmt: skip
    """What becomes of each initializer, in data-file order (so the source is read front to back)."""
    weight = "float16" if precision == "int8" else ACTIVATION[precision]
    jobs = []
    for init in graph.initializer:
        if init.data_location != TensorProto.EXTERNAL or init.data_type not in FLOAT_NAMES:
            raise PrecisionError(
                f"initializer {init.name!r} is not an external float tensor (data_type {init.data_type}); "
                "this is not a canonical export"
            )
        quantize = precision == "int8" and (
            bool(_EXPERTS.fullmatch(init.name))
            or (int8_attention and bool(_ATTENTION_LINEAR.fullmatch(init.name)))
            or (int8_router and bool(_ROUTER.fullmatch(init.name)))
            or (int8_lm_head and init.name == LM_HEAD)
        )
        jobs.append(_Job(init, init.name, quantize, "int8" if quantize else weight))
    names = {i.name for i in graph.initializer}
    if precision == "int8" and int8_lm_head and LM_HEAD not in names:
        # Tied embeddings: the head reads the embedding table; quantize a copy for it, keep the table fp16.
        embed = next(i for i in graph.initializer if i.name == EMBED)
        jobs.append(_Job(embed, LM_HEAD, True, "int8"))
    return sorted(jobs, key=lambda j: j.offset)


class _Source:
    """The export's data file, read in increasing offset order and hashed on the way (padding included)."""

    def __init__(self, path: Path) -> None:
        self.path, self.file, self.pos, self.sha = path, open(path, "rb"), 0, hashlib.sha256()

    def __enter__(self) -> _Source:
        return self

    def __exit__(self, *exc) -> None:
        self.file.close()

    def read(self, offset: int, n: int) -> bytes:
        if offset < self.pos:  # a second look at bytes already hashed (a tied head re-reads the embedding)
            data = os.pread(self.file.fileno(), n, offset)
        else:
            self._skip(offset - self.pos)
            data = self.file.read(n)
            self.sha.update(data)
            self.pos += len(data)
        if len(data) != n:
            raise PrecisionError(f"{self.path} ended early at byte {offset + len(data)} (truncated file?)")
        return data

    def _skip(self, n: int) -> None:
        while n:
            block = self.file.read(min(n, 1 << 20))
            if not block:
                raise PrecisionError(f"{self.path} ended early at byte {self.pos} (truncated file?)")
            self.sha.update(block)
            self.pos += len(block)
            n -= len(block)

    def finish(self) -> str:
        """Hash the rest of the file; the sha256 of the whole file."""
        while block := self.file.read(1 << 20):
            self.sha.update(block)
        return self.sha.hexdigest()


def _external(t: TensorProto) -> dict[str, str]:
    return {e.key: e.value for e in t.external_data}


def _row_chunks(source: _Source, src: TensorProto) -> Iterator[np.ndarray]:
    """The source tensor as [r, C] chunks of at most CHUNK_BYTES (fp32 working size)."""
    dims = list(src.dims)
    C = dims[-1] if dims else 1
    R = math.prod(dims[:-1])
    dtype = np.dtype(NUMPY[FLOAT_NAMES[src.data_type]])
    ext = _external(src)
    if int(ext.get("length", R * C * dtype.itemsize)) != R * C * dtype.itemsize:
        raise PrecisionError(f"{src.name}: external length {ext['length']} != {dims} × {dtype.itemsize} bytes")
    step = max(1, CHUNK_BYTES // (4 * C))  # read at call time so tests can shrink it
    for r0 in range(0, R, step):
        n = min(step, R - r0)
        data = source.read(int(ext["offset"]) + r0 * C * dtype.itemsize, n * C * dtype.itemsize)
        yield np.frombuffer(data, dtype).reshape(n, C)


def _write_tensors(jobs: list[_Job], source: _Source, writer: DataWriter, progress: bool, precision: str):
    """Stream every job into the new data file; ``{job.name: [Initializer, ...]}`` (two for quantized)."""
    layers = [m.group(1) for j in jobs if (m := _LAYER.match(j.name))]
    left = {n: layers.count(n) for n in layers}  # jobs left per layer, for per-layer progress
    bar = _progress(progress, len(left), f"{precision} weights")
    written: dict[str, list[Initializer]] = {}
    for job in jobs:
        shape = tuple(job.src.dims)
        chunks = _row_chunks(source, job.src)
        try:
            if job.quantize:
                scales: list[np.ndarray] = []

                def quantized(chunks=chunks, scales=scales):
                    for chunk in chunks:
                        q, s = quantize_rows(chunk)
                        scales.append(s)
                        yield q

                q = writer.stream(f"{job.name}.int8", "int8", shape, quantized())
                s = writer.stream(f"{job.name}.scale", SCALE_DTYPE, shape[:-1], [np.concatenate(scales)])
                written[job.name] = [q, s]
            else:
                written[job.name] = [writer.stream(job.name, job.dtype, shape, (_cast(c, job.dtype) for c in chunks))]
        except OverflowError as exc:
            raise PrecisionError(f"{job.src.name}: {exc}; it cannot be stored as {precision}") from None
        if bar is not None and (m := _LAYER.match(job.name)):
            left[m.group(1)] -= 1
            if not left[m.group(1)]:
                bar.update(1)
    if bar is not None:
        bar.close()
    return written


def _cast(chunk: np.ndarray, dtype: str) -> np.ndarray:
    out = chunk.astype(NUMPY[dtype])
    if dtype == "float16" and not np.isfinite(out).all() and np.isfinite(chunk).all():
        big = float(np.abs(chunk.astype(np.float32)).max())
        raise OverflowError(f"magnitudes up to {big:g} exceed float16's maximum 65504 (use bf16)")
    return out


# --- graph ---------------------------------------------------------------------------------------


def rewrite_graph(
    model: onnx.ModelProto, jobs: list[_Job], written: dict, act: str, data_file: str, io: dict
) -> onnx.ModelProto:
    """The export's graph with the new initializers, without upcasts, in activation dtype ``act``."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    inits = {i.name: i for i in g.initializer}
    # The export's Cast(to=FLOAT) after each half-precision initializer: consumers read the initializer.
    alias = {n.output[0]: n.input[0] for n in g.node
             if n.op_type == "Cast" and n.input[0] in inits and _attr(n, "to") == TensorProto.FLOAT}  # fmt: skip
    linear = {j.name for j in jobs if j.quantize and not _EXPERTS.fullmatch(j.name)}
    experts = {j.name for j in jobs if j.quantize and _EXPERTS.fullmatch(j.name)}
    tied_head = LM_HEAD in linear and LM_HEAD not in inits
    uses: dict[str, int] = {}  # reads of each value, other than as CastLike's input 0
    for node in g.node:
        for k, name in enumerate(node.input):
            uses[name] = uses.get(name, 0) + (not (node.op_type == "CastLike" and k == 0))

    nodes: list[onnx.NodeProto] = []
    emitted: set[str] = set()
    for node in g.node:
        if node.output[0] in alias:
            continue
        node.input[:] = [alias.get(x, x) for x in node.input]
        if tied_head and node.op_type != "Gather":
            node.input[:] = [LM_HEAD if x == EMBED else x for x in node.input]
        for name in node.input:
            if name in linear and name not in emitted:  # dequantize just before the first reader
                nodes.append(helper.make_node("DequantizeLinear", [f"{name}.int8", f"{name}.scale"], [name],
                                              name=f"dequantize/{name}", axis=0))  # fmt: skip
                emitted.add(name)
        _retype(node, act, uses, experts)
        nodes.append(node)

    logits = next(n for n in nodes if "logits" in n.output)
    if act != "float32":
        logits.output[:] = [f"logits.{act}" if o == "logits" else o for o in logits.output]
        nodes.append(helper.make_node("Cast", [f"logits.{act}"], ["logits"], name="cast/logits", to=TensorProto.FLOAT))
    del g.node[:]
    g.node.extend(nodes)
    moe_op.set_function(out, "int8" if experts else "none")  # the body matching the experts' storage
    del g.value_info[:]  # stale float32 annotations, if any; shape inference recomputes them
    del g.initializer[:]
    g.initializer.extend(_tensor(i, data_file) for j in jobs for i in written[j.name])
    dtypes = {e["name"]: e["dtype"] for e in io["inputs"] + io["outputs"]}
    for vi in [*g.input, *g.output]:
        if dtypes.get(vi.name) in ONNX_TYPE:
            vi.type.tensor_type.elem_type = ONNX_TYPE[dtypes[vi.name]]
    return out


def _retype(node: onnx.NodeProto, act: str, uses: dict[str, int], experts: set[str]) -> None:
    """Make one node compute in ``act``, keeping the fp32 accumulations that are asked for by attribute."""
    target = ONNX_TYPE[act]
    if node.op_type == "Attention":
        _set_attr(node, "softmax_precision", TensorProto.FLOAT)
    elif node.op_type == "RMSNormalization":
        _set_attr(node, "stash_type", 1)
    elif node.op_type == "Cast" and _attr(node, "to") == TensorProto.FLOAT:
        _set_attr(node, "to", target)
    elif node.op_type == "Constant" and uses.get(node.output[0], 0):
        # A float constant feeding real compute follows the activations. (Those read only as
        # CastLike's input 0, e.g. the exporter's 0.0 / 1.0 cast to int64 for Range, are left alone.)
        _retype_constant(node, act)
    elif node.domain == moe_op.MOE_DOMAIN and node.op_type == moe_op.MOE_OP and node.input[2] in experts:
        w13, w2 = node.input[2], node.input[3]
        node.input[:] = [*node.input[:2], f"{w13}.int8", f"{w2}.int8", f"{w13}.scale", f"{w2}.scale"]
        _set_attr(node, "quantization", "int8")


def _retype_constant(node: onnx.NodeProto, act: str) -> None:
    value = next((a for a in node.attribute if a.name in ("value", "value_float", "value_floats")), None)
    if value is None:
        return
    if value.name == "value":
        if value.t.data_type != TensorProto.FLOAT:
            return
        array = numpy_helper.to_array(value.t)
    else:
        array = np.asarray(helper.get_attribute_value(value), np.float32)
    del node.attribute[:]
    node.attribute.append(helper.make_attribute("value", numpy_helper.from_array(array.astype(NUMPY[act]))))


def _attr(node: onnx.NodeProto, name: str):
    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), None)


def _set_attr(node: onnx.NodeProto, name: str, value) -> None:
    kept = [a for a in node.attribute if a.name != name]
    del node.attribute[:]
    node.attribute.extend([*kept, helper.make_attribute(name, value)])


def _tensor(init: Initializer, data_file: str) -> TensorProto:
    t = TensorProto(name=init.name, data_type=ONNX_TYPE[init.dtype], dims=list(init.shape))
    t.data_location = TensorProto.EXTERNAL
    for key, value in (("location", data_file), ("offset", str(init.offset)), ("length", str(init.nbytes))):
        t.external_data.add(key=key, value=value)
    return t


def io_table(io: dict, act: str) -> dict:
    """The export's I/O table with the KV caches in ``act``; logits stay float32."""
    out = copy.deepcopy(io)
    for entry in out["inputs"] + out["outputs"]:
        if entry["name"].startswith(("past_key_values.", "present.")):
            entry["dtype"] = act
    return out


def graph_io(model: onnx.ModelProto) -> dict[str, list[tuple[str, str]]]:
    """(name, dtype) of the graph's inputs and outputs, dtype named as in the manifest's I/O table."""

    def entries(values):
        return [(v.name, helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name) for v in values]

    return {"inputs": entries(model.graph.input), "outputs": entries(model.graph.output)}


def check_graph(path: Path) -> None:
    """onnx.checker plus strict, type-checking shape inference (catches any dtype mismatch left)."""
    moe_op.register_schema()
    onnx.checker.check_model(str(path))
    model = onnx.load(str(path), load_external_data=False)
    onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True, data_prop=True)


def _link_or_copy(src: Path, dst: Path) -> None:
    """Small side files (tokenizer, config) are copied, not hard-linked: a file with several links is
    what onnx's loader refuses for data, and no tool then needs to tell the two cases apart."""
    shutil.copyfile(src, dst)


def _progress(enabled: bool, total: int, desc: str):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="layer", file=sys.stderr)
