"""PyTorch references of ``mixtral.MoETop2`` for checking the kernels, and the int8 quantiser.

Semantics are those of :func:`mixtral_trt.export.moe_op.moe_top2`: fp32 router logits
(hidden @ router^T), softmax, top-2, renormalise, out = sum_k w_k * w2[e] @ (silu(w1[e] x) * (w3[e] x))
with w13[e] = [w1[e]; w3[e]]. int8 weights are symmetric per output channel: w = q * scale[row].

Dimension legend: T tokens, H hidden, I expert FFN size, E experts, A = top_k.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def quantize_int8(w: torch.Tensor, scale_dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8 over the last dim: scale = max|row| / 127 (1 for zero rows).

    w [..., rows, K] -> (q int8 [..., rows, K], scale [..., rows] in ``scale_dtype``); q = round(w / scale).
    """
    wf = w.float()
    amax = wf.abs().amax(dim=-1)  # [..., rows]
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax)).to(scale_dtype)
    q = torch.round(wf / scale.float().unsqueeze(-1)).clamp_(-127, 127).to(torch.int8)
    return q, scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """q [..., rows, K] int8, scale [..., rows] -> fp32 weights."""
    return q.float() * scale.float().unsqueeze(-1)


def route(hidden: torch.Tensor, router: torch.Tensor, top_k: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 softmax routing: (weights [T, A] renormalised, experts [T, A])."""
    logits = F.linear(hidden.float(), router.float())  # [T, E]
    probs = torch.softmax(logits, dim=-1)  # [T, E]
    top_w, top_e = torch.topk(probs, top_k, dim=-1)  # [T, A]
    return top_w / top_w.sum(dim=-1, keepdim=True), top_e


def routing_margin(hidden: torch.Tensor, router: torch.Tensor, top_k: int = 2) -> torch.Tensor:
    """Per token, logit of the k-th choice minus the (k+1)-th's [T]: near 0, rounding may pick either."""
    logits = F.linear(hidden.float(), router.float())  # [T, E]
    top = torch.topk(logits, top_k + 1, dim=-1).values  # [T, A+1]
    return top[:, top_k - 1] - top[:, top_k]


def _expert_weights(w13, w2, w13_scale, w2_scale, e: int, dtype: torch.dtype):
    if w13.dtype == torch.int8:
        return dequantize_int8(w13[e], w13_scale[e]).to(dtype), dequantize_int8(w2[e], w2_scale[e]).to(dtype)
    return w13[e].to(dtype), w2[e].to(dtype)


def moe_top2_reference(hidden, router, w13, w2, w13_scale=None, w2_scale=None, top_k: int = 2,
                       compute_dtype: torch.dtype = torch.float32) -> torch.Tensor:  # fmt: skip
    """The op computed expert by expert in ``compute_dtype`` (fp32: the accuracy oracle; the
    activations' dtype: the eager PyTorch loop, as export/moe_op.py runs it). Returns hidden's dtype."""
    T, H = hidden.shape
    I = w13.shape[1] // 2
    top_w, top_e = route(hidden, router, top_k)  # [T, A] each
    x_all = hidden.to(compute_dtype)  # [T, H]
    out = torch.zeros((T, H), dtype=torch.float32, device=hidden.device)
    for e in torch.unique(top_e).tolist():
        tok, slot = torch.where(top_e == e)  # tokens routed to e, and which of their A slots
        w13_e, w2_e = _expert_weights(w13, w2, w13_scale, w2_scale, e, compute_dtype)  # [2I, H], [H, I]
        gate, up = F.linear(x_all[tok], w13_e).split(I, dim=-1)  # [t, I] each
        y = F.linear(F.silu(gate) * up, w2_e)  # [t, H]
        out.index_add_(0, tok, y.float() * top_w[tok, slot, None])
    return out.to(hidden.dtype)


def moe_top2_loop(hidden, router, w13, w2, w13_scale=None, w2_scale=None, top_k: int = 2) -> torch.Tensor:
    """The eager PyTorch baseline: the reference loop in the activations' dtype."""
    return moe_top2_reference(hidden, router, w13, w2, w13_scale, w2_scale, top_k, compute_dtype=hidden.dtype)


def relative_error(out: torch.Tensor, ref: torch.Tensor, rows: torch.Tensor | None = None) -> float:
    """max |out - ref| / max |ref| over ``rows`` (a boolean mask of tokens; all if None); inf on NaN."""
    o, r = out.float(), ref.float()
    if rows is not None:
        o, r = o[rows], r[rows]
    if o.numel() == 0:
        return 0.0
    if not torch.isfinite(o).all():
        return float("inf")
    return float((o - r).abs().max() / r.abs().max().clamp_min(1e-30))
