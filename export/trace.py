"""Trace the decoder's three pieces to ONNX once each, on meta tensors (no weight memory).

Every weight is a graph input of its piece; :mod:`mixtral_trt.export.stitch` later binds those
inputs to initializers and repeats the layer graph once per decoder layer.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import logging
import warnings

import onnx
import torch

from mixtral_trt.config import MixtralConfig

from . import model as M
from . import moe_op

# Example sizes for tracing: distinct primes so no dynamic dim is mistaken for a model dim.
_B, _S, _L, _P = 3, 7, 29, 31


@dataclasses.dataclass(frozen=True)
class Pieces:
    prologue: onnx.ModelProto  # (input_ids, write_indices, past_key, embed) -> (hidden, mask)
    layer: onnx.ModelProto  # (hidden, mask, position_ids, write_indices, cos, sin, past_k, past_v, *w) -> 3
    epilogue: onnx.ModelProto  # (hidden, norm, lm_head) -> logits


@functools.lru_cache(maxsize=4)
def trace_pieces(cfg: MixtralConfig) -> Pieces:
    """Export prologue, one layer and epilogue with dynamic batch, sequence and cache length."""
    batch, seq, cache = torch.export.Dim("batch"), torch.export.Dim("seq"), torch.export.Dim("cache")
    positions = torch.export.Dim("positions")
    H, K, D, V = cfg.hidden_size, cfg.num_key_value_heads, cfg.head_dim, cfg.vocab_size

    def t(*shape, dtype=torch.float32):
        return torch.empty(shape, dtype=dtype, device="meta")

    ids = t(_B, _S, dtype=torch.int64)
    write = t(_B, dtype=torch.int64)
    past = t(_B, K, _L, D)
    prologue = _export(
        M.Piece(M.prologue),
        (ids, write, past, t(V, H)),
        ({0: batch, 1: seq}, {0: batch}, {0: batch, 2: cache}, None),
    )
    weights = [t(*s) for s in M.layer_weight_shapes(cfg).values()]
    layer_args = (
        t(_B, _S, H), t(_B, 1, _S, _L, dtype=torch.bool), t(_B, _S, dtype=torch.int64), write,
        t(_P, D // 2), t(_P, D // 2), past, t(_B, K, _L, D), *weights,
    )  # fmt: skip
    layer_dims = (
        {0: batch, 1: seq}, {0: batch, 2: seq, 3: cache}, {0: batch, 1: seq}, {0: batch},
        {0: positions}, {0: positions}, {0: batch, 2: cache}, {0: batch, 2: cache}, *[None] * len(weights),
    )  # fmt: skip
    layer = _export(M.Piece(M.decoder_layer, cfg), layer_args, layer_dims)
    epilogue = _export(M.Piece(M.epilogue, cfg), (t(_B, _S, H), t(H), t(V, H)), ({0: batch, 1: seq}, None, None))
    return Pieces(prologue, layer, epilogue)


def _export(module: torch.nn.Module, args: tuple, dims: tuple) -> onnx.ModelProto:
    # The exporter is chatty (warnings about dim renames, progress lines); keep our output clean.
    quiet = io.StringIO()
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with warnings.catch_warnings(), contextlib.redirect_stdout(quiet):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module,
            args,
            dynamic_shapes=(dims,),
            opset_version=moe_op.OPSET,
            dynamo=True,
            optimize=False,
            verify=False,
            custom_translation_table=moe_op.custom_translation_table(),
        )
    return program.model_proto
