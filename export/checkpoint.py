"""Lazy reading of a Hugging Face Mixtral checkpoint: config plus safetensors shards.

Nothing here loads a tensor: we parse each shard's header, validate every tensor's name,
dtype and shape against the config at once (one error listing all problems), and hand out
``TensorRef`` byte ranges that the exporter copies in bounded chunks.
"""

from __future__ import annotations

import dataclasses
import json
import struct
from pathlib import Path

from mixtral_trt.config import ConfigError, MixtralConfig, load_config

SAFETENSORS_DTYPES = {"F32": ("float32", 4), "F16": ("float16", 2), "BF16": ("bfloat16", 2)}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
MAX_HEADER_BYTES = 100 * 1024 * 1024


class CheckpointError(ValueError):
    """The checkpoint's files are missing, truncated, or do not match its config."""


@dataclasses.dataclass(frozen=True)
class TensorRef:
    """Where one tensor's raw little-endian bytes live."""

    name: str
    path: Path
    offset: int  # absolute byte offset in ``path``
    nbytes: int
    dtype: str  # "float32" | "float16" | "bfloat16"
    shape: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    directory: Path
    config: MixtralConfig
    tensors: dict[str, TensorRef]
    files: tuple[Path, ...]

    def __getitem__(self, name: str) -> TensorRef:
        return self.tensors[name]


def expected_tensors(cfg: MixtralConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor name a Mixtral checkpoint with this config holds, with its shape."""
    H, I, V, D = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.head_dim
    N, K = cfg.num_attention_heads, cfg.num_key_value_heads
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (V, H), "model.norm.weight": (H,)}
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = (V, H)
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        out[p + "input_layernorm.weight"] = (H,)
        out[p + "post_attention_layernorm.weight"] = (H,)
        out[p + "self_attn.q_proj.weight"] = (N * D, H)
        out[p + "self_attn.k_proj.weight"] = (K * D, H)
        out[p + "self_attn.v_proj.weight"] = (K * D, H)
        out[p + "self_attn.o_proj.weight"] = (H, N * D)
        out[p + "block_sparse_moe.gate.weight"] = (cfg.num_local_experts, H)
        for e in range(cfg.num_local_experts):
            q = f"{p}block_sparse_moe.experts.{e}."
            out[q + "w1.weight"] = (I, H)
            out[q + "w3.weight"] = (I, H)
            out[q + "w2.weight"] = (H, I)
    return out


def open_checkpoint(model_dir: str | Path) -> Checkpoint:
    """Validate ``model_dir`` (config + safetensors) and index its tensors without reading them."""
    directory = Path(model_dir)
    if not directory.is_dir():
        what = "is a file, not a directory" if directory.exists() else "does not exist"
        raise CheckpointError(
            f"checkpoint directory {directory} {what}; give the directory holding config.json and the "
            "*.safetensors files, or 'tiny' for the built-in tiny model"
        )
    cfg = load_config(directory)
    files = _shard_files(directory)
    tensors: dict[str, TensorRef] = {}
    for path in files:
        for ref in read_header(path):
            if ref.name in tensors:
                raise CheckpointError(f"tensor {ref.name!r} appears in both {tensors[ref.name].path} and {path}")
            tensors[ref.name] = ref
    _check_against_config(cfg, tensors, directory)
    return Checkpoint(directory=directory, config=cfg, tensors=tensors, files=tuple(files))


def _shard_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            names = sorted({str(n) for n in weight_map.values()})
        except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
            raise CheckpointError(f"{index} is not a valid safetensors index (needs 'weight_map'): {exc!r}") from None
        outside = [n for n in names if Path(n).name != n]
        if outside:
            raise CheckpointError(f"{index} names shard files outside the checkpoint directory: {outside}")
        missing = [n for n in names if not (directory / n).is_file()]
        if missing:
            raise CheckpointError(f"{index} names shard files that do not exist: {missing}")
        return [directory / n for n in names]
    single = directory / "model.safetensors"
    if single.is_file():
        return [single]
    shards = sorted(directory.glob("*.safetensors"))
    if shards:
        return shards
    pickles = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise CheckpointError(
            f"{directory} holds only pickle checkpoints {pickles}; pickles can run arbitrary code and are "
            "never loaded. Convert them to safetensors first (e.g. with transformers: "
            "model.save_pretrained(dir, safe_serialization=True))"
        )
    raise CheckpointError(f"{directory} has no *.safetensors files (expected model.safetensors or shards + index)")


def read_header(path: Path) -> list[TensorRef]:
    """Parse a safetensors header and check that every tensor's bytes lie inside the file."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path} is truncated: {size} bytes, too short for a safetensors header")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER_BYTES or 8 + n > size:
            raise CheckpointError(f"{path} is truncated or not safetensors: header claims {n} bytes, file has {size}")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{path} has a corrupt safetensors header: {exc}") from None
        except RecursionError:  # arrays nested deeper than Python's parser recurses: never a real header
            raise CheckpointError(f"{path} has a corrupt safetensors header: JSON nested too deeply; "
                                  "a safetensors header is one flat object of tensor entries") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} has a corrupt safetensors header: a JSON {type(header).__name__}, not an object")
    base = 8 + n
    refs = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = info["dtype"]
            shape = tuple(int(d) for d in info["shape"])
            start, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(
                f"{path} has a corrupt safetensors header: tensor {name!r} entry {info!r} ({exc!r}); "
                "expected dtype, shape and data_offsets [start, end]"
            ) from None
        if dtype not in SAFETENSORS_DTYPES:
            raise CheckpointError(
                f"{path}: tensor {name!r} has dtype {dtype}; supported: {sorted(SAFETENSORS_DTYPES)}"
            )
        np_dtype, itemsize = SAFETENSORS_DTYPES[dtype]
        count = 1
        for d in shape:
            count *= d
        if start < 0 or any(d < 0 for d in shape):
            raise CheckpointError(f"{path}: tensor {name!r} has a negative offset or dimension")
        if end - start != count * itemsize:
            raise CheckpointError(f"{path}: tensor {name!r} byte range {end - start} does not fit shape {shape}")
        if base + end > size:
            raise CheckpointError(
                f"{path} is truncated: tensor {name!r} ends at byte {base + end} but the file has {size} bytes"
            )
        refs.append(TensorRef(name, path, base + start, end - start, np_dtype, shape))
    _check_disjoint(path, refs)
    return refs


def _check_disjoint(path: Path, refs: list[TensorRef]) -> None:
    """Two tensors sharing bytes means a corrupt (or crafted) header."""
    spans = sorted((r.offset, r.offset + r.nbytes, r.name) for r in refs if r.nbytes)
    for (_, end, a), (start, _, b) in zip(spans, spans[1:]):
        if start < end:
            raise CheckpointError(f"{path} has a corrupt safetensors header: tensors {a!r} and {b!r} overlap")


def _check_against_config(cfg: MixtralConfig, tensors: dict[str, TensorRef], directory: Path) -> None:
    expected = expected_tensors(cfg)
    problems = []
    missing = [n for n in expected if n not in tensors]
    extra = sorted(n for n in tensors if n not in expected and not _ignorable(n, cfg))
    if missing:
        problems.append(f"missing tensors ({len(missing)}): {_preview(missing)}")
    if extra:
        problems.append(f"unexpected tensors ({len(extra)}): {_preview(extra)}")
    for name, shape in expected.items():
        if name in tensors and tensors[name].shape != shape:
            problems.append(f"tensor {name!r} has shape {list(tensors[name].shape)}, config implies {list(shape)}")
    if problems:
        raise CheckpointError(f"checkpoint {directory} does not match its config.json:\n  " + "\n  ".join(problems))


def _ignorable(name: str, cfg: MixtralConfig) -> bool:
    # A tied checkpoint may still carry lm_head.weight; rotary inv_freq buffers are recomputed.
    return (cfg.tie_word_embeddings and name == "lm_head.weight") or name.endswith("rotary_emb.inv_freq")


def check_tokenizer(ckpt: Checkpoint) -> str | None:
    """The name of the checkpoint's tokenizer file (None: it has none), refusing one that contradicts
    config.json: more tokens than ``vocab_size`` (ids with no embedding row) or other BOS/EOS ids.
    Fewer tokens than ``vocab_size`` is accepted: checkpoints often pad the embedding."""
    from mixtral_trt.runtime.tokenizer import Tokenizer, tokenizer_file

    path = tokenizer_file(ckpt.directory)
    if path is None:
        return None
    try:
        tok = Tokenizer(ckpt.directory)
    except ImportError:
        raise
    except Exception as exc:  # sentencepiece and tokenizers raise bare RuntimeError/Exception on bad files
        raise CheckpointError(f"{path} cannot be read as a tokenizer ({exc}); use the model's own") from None
    cfg = ckpt.config
    if tok.vocab_size > cfg.vocab_size:
        raise CheckpointError(
            f"{path} has {tok.vocab_size} tokens but config.json has vocab_size={cfg.vocab_size}: token ids "
            f"{cfg.vocab_size}..{tok.vocab_size - 1} have no embedding row. Use the tokenizer the model was "
            "trained with (or remove it and give token ids)"
        )
    for kind, own, configured in (("bos", tok.own_bos_id, cfg.bos_token_id), ("eos", tok.own_eos_id, cfg.eos_token_id)):
        if own is not None and configured is not None and own != configured:
            raise CheckpointError(
                f"{path} has {kind.upper()} id {own} but config.json has {kind}_token_id={configured}; "
                f"set {kind}_token_id to the tokenizer's id or use the tokenizer the model was trained with"
            )
    return path.name


def _preview(names: list[str], limit: int = 12) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", … and {len(names) - limit} more" if len(names) > limit else "")


__all__ = ["Checkpoint", "CheckpointError", "ConfigError", "TensorRef", "check_tokenizer", "expected_tensors",
           "open_checkpoint"]
