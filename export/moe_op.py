"""The custom operators the exporter emits, each defined three times over one contract.

1. A ``torch.library.custom_op`` with an eager reference and a fake (meta) kernel, so the
   decoder in :mod:`mixtral_trt.export.model` runs eagerly and traces on meta tensors.
2. An ONNX schema (``mixtral.MoETop2``, version 1) registered with ``onnx.defs`` so the
   checker and shape inference know the node.
3. A translation used by ``torch.onnx.export(custom_translation_table=...)`` that turns
   each custom op into one ONNX node: ``MoETop2``, ``RotaryEmbedding`` (opset 23+) or
   ``TensorScatter`` (opset 24).

Dimension legend: T = tokens, H = hidden, E = experts, I = expert FFN size,
B = batch, N = heads, S = new tokens, L = cache capacity, D = head dim, P = positions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .moe_schema import MOE_DOMAIN, MOE_OP, MOE_VERSION, OPSET, register_schema  # noqa: F401  (re-exported for callers of moe_op)

# --- 1. torch custom ops -------------------------------------------------------------------


@torch.library.custom_op("mixtral::moe_top2", mutates_args=())
def moe_top2(
    hidden: torch.Tensor, router: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, num_experts: int, top_k: int
) -> torch.Tensor:
    """Mixtral's sparse MoE: fp32 router softmax, top-k, renormalise, weighted SwiGLU experts."""
    T, H = hidden.shape
    E, two_i, _ = w13.shape
    logits = F.linear(hidden.float(), router.float())  # [T, E], fp32 as Mixtral routes
    probs = torch.softmax(logits, dim=-1)  # [T, E]
    top_w, top_e = torch.topk(probs, top_k, dim=-1)  # [T, A]
    top_w = top_w / top_w.sum(dim=-1, keepdim=True)  # [T, A]
    out = torch.zeros((T, H), dtype=torch.float32, device=hidden.device)
    for e in torch.unique(top_e).tolist():
        tok, slot = torch.where(top_e == e)  # tokens routed to e, and which of their A slots
        x = hidden[tok]  # [t, H]
        gate, up = F.linear(x, w13[e]).split(two_i // 2, dim=-1)  # [t, I] each
        y = F.linear(F.silu(gate) * up, w2[e])  # [t, H]
        out.index_add_(0, tok, y.float() * top_w[tok, slot, None])
    return out.to(hidden.dtype)


@moe_top2.register_fake
def _(hidden, router, w13, w2, num_experts, top_k):
    return torch.empty_like(hidden)


@torch.library.custom_op("mixtral::rotary_embedding", mutates_args=())
def rotary_embedding(
    x: torch.Tensor, cos_cache: torch.Tensor, sin_cache: torch.Tensor, position_ids: torch.Tensor
) -> torch.Tensor:
    """Non-interleaved RoPE (rotate halves), as Mixtral: x [B, N, S, D], caches [P, D/2]."""
    cos = cos_cache[position_ids].unsqueeze(1)  # [B, 1, S, D/2]
    sin = sin_cache[position_ids].unsqueeze(1)  # [B, 1, S, D/2]
    x1, x2 = x.chunk(2, dim=-1)  # [B, N, S, D/2] each
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)  # [B, N, S, D]


@rotary_embedding.register_fake
def _(x, cos_cache, sin_cache, position_ids):
    return torch.empty_like(x)


@torch.library.custom_op("mixtral::tensor_scatter", mutates_args=())
def tensor_scatter(past: torch.Tensor, update: torch.Tensor, write_indices: torch.Tensor) -> torch.Tensor:
    """Write update [B, N, S, D] into a copy of past [B, N, L, D] at slots write_indices[b] + s."""
    B, N, S, D = update.shape
    slots = write_indices[:, None] + torch.arange(S, device=update.device)  # [B, S]
    index = slots[:, None, :, None].expand(B, N, S, D)  # [B, N, S, D]
    return past.clone().scatter_(2, index, update)


@tensor_scatter.register_fake
def _(past, update, write_indices):
    return torch.empty_like(past)


# --- 3. ONNX translations for torch.onnx.export ---------------------------------------------


def custom_translation_table() -> dict:
    """Map our torch ops to onnxscript functions emitting one ONNX node each."""
    from onnxscript import values

    std = values.Opset("", OPSET)
    moe = values.Opset(MOE_DOMAIN, MOE_VERSION)

    def moe_top2_onnx(hidden, router, w13, w2, num_experts: int, top_k: int):
        return moe.MoETop2(
            hidden, router, w13, w2, num_experts=num_experts, top_k=top_k, activation="swiglu", quantization="none"
        )

    def rotary_onnx(x, cos_cache, sin_cache, position_ids):
        return std.RotaryEmbedding(x, cos_cache, sin_cache, position_ids, interleaved=0)

    def tensor_scatter_onnx(past, update, write_indices):
        return std.TensorScatter(past, update, write_indices, axis=2, mode="linear")

    return {
        torch.ops.mixtral.moe_top2.default: moe_top2_onnx,
        torch.ops.mixtral.rotary_embedding.default: rotary_onnx,
        torch.ops.mixtral.tensor_scatter.default: tensor_scatter_onnx,
    }
