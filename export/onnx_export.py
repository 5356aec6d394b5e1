"""Export stage: Hugging Face Mixtral checkpoint → canonical ONNX + manifest.

Memory stays bounded by construction: the graph is traced once on meta tensors, and tensor
bytes are copied from the safetensors shards into ``model.onnx.data`` in fixed-size chunks
(never a whole tensor, let alone a layer, in memory), hashed on the way.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import shutil
import sys
import threading
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from mixtral_trt.config import MixtralConfig
from mixtral_trt.fsutil import atomic_dir
from mixtral_trt.manifest import MAX_DIM, check_output_dir, write_manifest

from . import model as M
from . import moe_op
from .checkpoint import Checkpoint, CheckpointError, TensorRef, check_tokenizer, open_checkpoint
from .stitch import Initializer, build_graph, io_table

MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
ALIGN = 4096  # page-aligned tensors let runtimes mmap the data file
CHUNK = 8 << 20
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json", "config.json")  # fmt: skip
DEFAULT_MAX_BATCH = 8
DEFAULT_MAX_SEQ_LEN = 4096


class ExportError(ValueError):
    """The export request cannot be carried out (bad output path or limits)."""


class DataWriter:
    """Appends tensors to the external data file, page-aligned, hashing as it goes."""

    def __init__(self, path: Path) -> None:
        self.file = open(path, "wb")
        self.offset = 0
        self.sha = hashlib.sha256()
        self._buf = bytearray(CHUNK)

    def _write(self, data) -> None:
        self.file.write(data)
        self.sha.update(data)
        self.offset += len(data)

    def _align(self) -> None:
        pad = -self.offset % ALIGN
        if pad:
            self._write(b"\0" * pad)

    def copy(self, name: str, refs: list[TensorRef], shape: tuple[int, ...]) -> Initializer:
        """One initializer made of the concatenated bytes of ``refs`` (same dtype)."""
        dtypes = {r.dtype for r in refs}
        if len(dtypes) != 1:
            raise CheckpointError(f"{name} stacks tensors of different dtypes {sorted(dtypes)}: {[r.name for r in refs]}")
        self._align()
        start = self.offset
        view = memoryview(self._buf)
        for ref in refs:
            with open(ref.path, "rb") as src:
                src.seek(ref.offset)
                left = ref.nbytes
                while left:
                    n = src.readinto(view[: min(CHUNK, left)])
                    if not n:
                        raise CheckpointError(f"{ref.path} ended early while reading {ref.name!r} (truncated file?)")
                    self._write(view[:n])
                    left -= n
        return Initializer(name, refs[0].dtype, shape, start, self.offset - start)

    def array(self, name: str, value: np.ndarray) -> Initializer:
        return self.stream(name, "float32", tuple(value.shape), [np.asarray(value, dtype=np.float32)])

    def stream(self, name: str, dtype: str, shape: tuple[int, ...], chunks: Iterable[np.ndarray]) -> Initializer:
        """One initializer of numpy ``dtype`` written from row-major ``chunks``, none held after it is written."""
        self._align()
        start, count = self.offset, 0
        for chunk in chunks:
            if chunk.dtype.name != dtype:
                raise TypeError(f"{name}: chunk of dtype {chunk.dtype.name}, expected {dtype}")
            # A byte view, not a copy (also for ml_dtypes' bfloat16, which has no buffer format).
            self._write(np.ascontiguousarray(chunk).reshape(-1).view(np.uint8))
            count += chunk.size
        if count != math.prod(shape):
            raise RuntimeError(f"{name}: wrote {count} elements for shape {list(shape)}, expected {math.prod(shape)}")
        return Initializer(name, dtype, tuple(shape), start, self.offset - start)

    def close(self) -> str:
        self.file.close()
        return self.sha.hexdigest()


def export(
    model_dir: str | Path,
    out_dir: str | Path,
    max_batch: int = DEFAULT_MAX_BATCH,
    max_seq_len: int | None = None,
    progress: bool = True,
) -> Path:
    """Write ``out_dir/{model.onnx, model.onnx.data, manifest.json, tokenizer files}``.

    ``out_dir`` appears whole or not at all; a previous export there is replaced, anything
    else there is refused.
    """
    ckpt = open_checkpoint(model_dir)
    cfg = ckpt.config
    max_seq_len = _check_limits(cfg, max_batch, max_seq_len)
    out_dir = Path(out_dir)
    check_output_dir(out_dir, "export", ExportError, source=ckpt.directory)
    tokenizer = check_tokenizer(ckpt)
    if tokenizer is None:  # a warning, not progress: shown even when progress is off
        print(f"warning: no tokenizer in {ckpt.directory}: the build will take token ids only (--prompt-ids); "
              "copy tokenizer.model there to generate from text", file=sys.stderr)  # fmt: skip

    from .trace import trace_pieces

    with _timed(progress, f"tracing the decoder (one trace for all {cfg.num_hidden_layers} layers, takes ~15 s)"):
        pieces = trace_pieces(cfg)
    with atomic_dir(out_dir) as tmp:
        writer = DataWriter(tmp / DATA_FILE)
        try:
            inits = _write_weights(ckpt, writer, max_seq_len, progress)
        finally:
            data_sha = writer.close()
        graph = build_graph(cfg, pieces, inits, DATA_FILE, pieces.layer.ir_version)
        (tmp / MODEL_FILE).write_bytes(graph.SerializeToString())
        _check_graph(tmp / MODEL_FILE)
        for name in TOKENIZER_FILES:
            if (ckpt.directory / name).is_file():
                shutil.copyfile(ckpt.directory / name, tmp / name)
        body = _manifest_body(ckpt, max_batch, max_seq_len, inits)
        body["export"]["tokenizer"] = tokenizer  # the file name, or None: token ids only
        write_manifest(tmp, "export", body, {DATA_FILE: data_sha})
    _say(progress, f"wrote {out_dir}")
    return out_dir


def _write_weights(ckpt: Checkpoint, w: DataWriter, max_seq_len: int, progress: bool) -> dict[str, Initializer]:
    cfg = ckpt.config
    inits: dict[str, Initializer] = {}

    def put(init: Initializer) -> None:
        inits[init.name] = init

    put(w.copy("model.embed_tokens.weight", [ckpt["model.embed_tokens.weight"]], (cfg.vocab_size, cfg.hidden_size)))
    cos, sin = M.rope_caches(cfg, max_seq_len)
    put(w.array("rope.cos_cache", cos.numpy()))
    put(w.array("rope.sin_cache", sin.numpy()))
    shapes = M.layer_weight_shapes(cfg)
    for i in _progress(range(cfg.num_hidden_layers), progress, "writing layers"):
        p = f"model.layers.{i}"
        for name in M.LAYER_WEIGHTS:
            put(w.copy(f"{p}.{name}", _sources(ckpt, p, name), shapes[name]))
    put(w.copy("model.norm.weight", [ckpt["model.norm.weight"]], (cfg.hidden_size,)))
    if not cfg.tie_word_embeddings:
        put(w.copy("lm_head.weight", [ckpt["lm_head.weight"]], (cfg.vocab_size, cfg.hidden_size)))
    return inits


def _sources(ckpt: Checkpoint, prefix: str, name: str) -> list[TensorRef]:
    """Checkpoint tensors making up one layer weight; experts are stacked e-major (w1 then w3)."""
    E = ckpt.config.num_local_experts
    experts = f"{prefix}.block_sparse_moe.experts"
    if name == "block_sparse_moe.experts.w13":
        return [ckpt[f"{experts}.{e}.{w}.weight"] for e in range(E) for w in ("w1", "w3")]
    if name == "block_sparse_moe.experts.w2":
        return [ckpt[f"{experts}.{e}.w2.weight"] for e in range(E)]
    return [ckpt[f"{prefix}.{name}"]]


def _check_limits(cfg: MixtralConfig, max_batch: int, max_seq_len: int | None) -> int:
    if max_seq_len is None:
        max_seq_len = min(DEFAULT_MAX_SEQ_LEN, cfg.max_position_embeddings)
    if max_batch < 1:
        raise ExportError(f"--max-batch={max_batch} must be >= 1")
    if not 2 <= max_seq_len <= cfg.max_position_embeddings:
        raise ExportError(
            f"--max-seq-len={max_seq_len} must be between 2 and the model's "
            f"max_position_embeddings={cfg.max_position_embeddings}"
        )
    if max_batch * max_seq_len > MAX_DIM:  # what an engine could be built for (one 32-bit token dimension)
        raise ExportError(
            f"--max-batch={max_batch} x --max-seq-len={max_seq_len} = {max_batch * max_seq_len} tokens; TensorRT's "
            f"dimensions are 32-bit: at most {MAX_DIM}. Give a smaller --max-batch or --max-seq-len"
        )
    return max_seq_len


def _check_graph(path: Path) -> None:
    import onnx

    moe_op.register_schema()
    onnx.checker.check_model(str(path))


def _manifest_body(ckpt: Checkpoint, max_batch: int, max_seq_len: int, inits: dict[str, Initializer]) -> dict:
    cfg = ckpt.config
    dtypes = sorted({i.dtype for i in inits.values()})
    return {
        "config": cfg.to_dict(),
        "source": {"checkpoint": str(ckpt.directory.resolve()), "files": [p.name for p in ckpt.files]},
        "export": {
            "opset": moe_op.OPSET,
            "custom_ops": [{"domain": moe_op.MOE_DOMAIN, "op_type": moe_op.MOE_OP, "version": moe_op.MOE_VERSION}],
            "precision": "fp32",
            "weight_dtypes": dtypes,
            "max_batch": max_batch,
            "max_seq_len": max_seq_len,
            "kv_cache": "static: slot = position, right padding, write_indices[b] + seq <= max_cache_len",
            "model_file": MODEL_FILE,
            "data_file": DATA_FILE,
        },
        "io": io_table(cfg),
    }


def _progress(it, enabled: bool, desc: str):
    if not enabled:
        return it
    from tqdm import tqdm

    return tqdm(it, desc=desc, unit="layer", file=sys.stderr)


@contextlib.contextmanager
def _timed(enabled: bool, message: str, tick: float = 1.0):
    """A start line, then (on a terminal) the seconds ticking on it, then the time taken: a silent
    wait of seconds otherwise looks like a hang."""
    if not enabled:
        yield
        return
    start, done = time.monotonic(), threading.Event()
    live = sys.stderr.isatty()

    def ticker() -> None:
        while not done.wait(tick):
            print(f"\r{message} ... {time.monotonic() - start:.0f} s", end="", file=sys.stderr, flush=True)

    print(f"{message} ...", end="" if live else "\n", file=sys.stderr, flush=True)
    thread = threading.Thread(target=ticker, daemon=True) if live else None
    if thread:
        thread.start()
    finished = False
    try:
        yield
        finished = True
    finally:
        done.set()
        if thread:
            thread.join()
        if live and not finished:
            print(file=sys.stderr)  # end the ticking line; the error follows on a line of its own
    end = f"\r{message} ... done in" if live else "  done in"
    print(f"{end} {time.monotonic() - start:.1f} s", file=sys.stderr, flush=True)


def _say(enabled: bool, message: str) -> None:
    if enabled:
        print(message, file=sys.stderr)
