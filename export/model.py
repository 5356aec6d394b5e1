"""Mixtral's decoder written for tracing: pure functions of (activations, weights).

The exporter traces three pieces once each, with every weight a graph input, and
stitches them into one graph (see :mod:`mixtral_trt.export.onnx_export`):

    prologue:  input_ids, write_indices, cache  -> hidden, mask
    layer:     hidden, mask, positions, caches, weights -> hidden, present key, present value
    epilogue:  hidden, norm, lm_head            -> logits

Dimension legend: B = batch, S = new tokens, L = cache capacity (slots), H = hidden,
N = query heads, K = KV heads, D = head dim, V = vocab, E = experts, I = expert FFN size.
The KV cache is static: token s of row b lives in slot write_indices[b] + s (= its position).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mixtral_trt.config import MixtralConfig

from . import moe_op

# Per-layer weights, in the order the layer graph takes them. Values: checkpoint-style names
# relative to ``model.layers.{i}.``; w13/w2 are the stacked expert tensors the exporter builds.
LAYER_WEIGHTS = (
    "input_layernorm.weight",
    "self_attn.q_proj.weight",
    "self_attn.k_proj.weight",
    "self_attn.v_proj.weight",
    "self_attn.o_proj.weight",
    "post_attention_layernorm.weight",
    "block_sparse_moe.gate.weight",
    "block_sparse_moe.experts.w13",
    "block_sparse_moe.experts.w2",
)


def layer_weight_shapes(cfg: MixtralConfig) -> dict[str, tuple[int, ...]]:
    """Shape of each entry of :data:`LAYER_WEIGHTS`."""
    H, I, E, D = cfg.hidden_size, cfg.intermediate_size, cfg.num_local_experts, cfg.head_dim
    N, K = cfg.num_attention_heads, cfg.num_key_value_heads
    return {
        "input_layernorm.weight": (H,),
        "self_attn.q_proj.weight": (N * D, H),
        "self_attn.k_proj.weight": (K * D, H),
        "self_attn.v_proj.weight": (K * D, H),
        "self_attn.o_proj.weight": (H, N * D),
        "post_attention_layernorm.weight": (H,),
        "block_sparse_moe.gate.weight": (E, H),
        "block_sparse_moe.experts.w13": (E, 2 * I, H),
        "block_sparse_moe.experts.w2": (E, H, I),
    }


def rope_caches(cfg: MixtralConfig, positions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [P, D/2] in fp32, computed exactly as Hugging Face computes them."""
    D = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, D, 2, dtype=torch.int64).float() / D))  # [D/2]
    freqs = torch.arange(positions, dtype=torch.int64).float()[:, None] * inv_freq[None, :]  # [P, D/2]
    return freqs.cos(), freqs.sin()


def prologue(input_ids, write_indices, past_key, embed_tokens):
    """Embed tokens and build the attention mask: key slot j is visible to query s iff j <= its slot."""
    S, L = input_ids.shape[1], past_key.shape[2]
    hidden = F.embedding(input_ids, embed_tokens)  # [B, S, H]
    query_slot = write_indices[:, None] + torch.arange(S, device=input_ids.device)  # [B, S]
    key_slot = torch.arange(L, device=input_ids.device)  # [L]
    mask = key_slot[None, None, :] <= query_slot[:, :, None]  # [B, S, L]
    return hidden, mask.unsqueeze(1)  # [B, S, H], [B, 1, S, L]


def decoder_layer(cfg: MixtralConfig, hidden, mask, position_ids, write_indices, cos, sin, past_k, past_v, *w):
    """One Mixtral block: RMSNorm → GQA attention over the static cache → RMSNorm → MoE."""
    ln1, wq, wk, wv, wo, ln2, router, w13, w2 = w
    B, S, H = hidden.shape
    N, K, D, eps = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.rms_norm_eps

    x = F.rms_norm(hidden, (H,), ln1, eps)  # [B, S, H]
    q = F.linear(x, wq).view(B, S, N, D).transpose(1, 2)  # [B, N, S, D]
    k = F.linear(x, wk).view(B, S, K, D).transpose(1, 2)  # [B, K, S, D]
    v = F.linear(x, wv).view(B, S, K, D).transpose(1, 2)  # [B, K, S, D]
    q = moe_op.rotary_embedding(q, cos, sin, position_ids)  # [B, N, S, D]
    k = moe_op.rotary_embedding(k, cos, sin, position_ids)  # [B, K, S, D]
    present_k = moe_op.tensor_scatter(past_k, k, write_indices)  # [B, K, L, D]
    present_v = moe_op.tensor_scatter(past_v, v, write_indices)  # [B, K, L, D]
    attn = F.scaled_dot_product_attention(
        q, present_k, present_v, attn_mask=mask, scale=D**-0.5, enable_gqa=N != K
    )  # [B, N, S, D]; GQA stays implicit in the 4-D shapes
    hidden = hidden + F.linear(attn.transpose(1, 2).reshape(B, S, N * D), wo)  # [B, S, H]

    x = F.rms_norm(hidden, (H,), ln2, eps).reshape(B * S, H)  # [T, H]
    moe = moe_op.moe_top2(x, router, w13, w2, cfg.num_local_experts, cfg.num_experts_per_tok)  # [T, H]
    return hidden + moe.view(B, S, H), present_k, present_v


def epilogue(cfg: MixtralConfig, hidden, norm, lm_head):
    """Final RMSNorm and the LM head; logits in fp32."""
    x = F.rms_norm(hidden, (hidden.shape[-1],), norm, cfg.rms_norm_eps)  # [B, S, H]
    return F.linear(x, lm_head).float()  # [B, S, V]


class Piece(torch.nn.Module):
    """Wrap one of the functions above as a module whose forward takes every tensor."""

    def __init__(self, fn, *static) -> None:
        super().__init__()
        self.fn, self.static = fn, static

    def forward(self, *tensors):
        return self.fn(*self.static, *tensors)


def forward(cfg: MixtralConfig, weights, input_ids, position_ids, write_indices, past):
    """Eager reference of the whole decoder over a weight dict (checkpoint names + stacked experts).

    ``past`` is a list of (key, value) caches [B, K, L, D]; returns logits and the new caches.
    """
    hidden, mask = prologue(input_ids, write_indices, past[0][0], weights["model.embed_tokens.weight"])
    cos, sin = rope_caches(cfg, past[0][0].shape[2])
    present = []
    for i, (pk, pv) in enumerate(past):
        w = [weights[f"model.layers.{i}.{name}"] for name in LAYER_WEIGHTS]
        hidden, k, v = decoder_layer(cfg, hidden, mask, position_ids, write_indices, cos, sin, pk, pv, *w)
        present.append((k, v))
    head = weights.get("lm_head.weight", weights["model.embed_tokens.weight"])
    return epilogue(cfg, hidden, weights["model.norm.weight"], head), present
