"""ONNX Runtime logits and KV cache of the exported graph against transformers' MixtralForCausalLM."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.conftest import make_checkpoint

transformers = pytest.importorskip("transformers")
ort = pytest.importorskip("onnxruntime")

SHAPES = {
    "default": dict(),
    "gqa4-e4": dict(num_hidden_layers=3, hidden_size=64, intermediate_size=96, num_local_experts=4,
                    num_attention_heads=8, num_key_value_heads=2, vocab_size=1000),
    "mha-e6": dict(num_hidden_layers=1, hidden_size=96, intermediate_size=160, num_local_experts=6,
                   num_attention_heads=4, num_key_value_heads=4, vocab_size=700),
    "mqa-e2-tied": dict(num_hidden_layers=2, hidden_size=80, intermediate_size=48, num_local_experts=2,
                        num_attention_heads=5, num_key_value_heads=1, vocab_size=500, tie_word_embeddings=True),
}  # fmt: skip
MAX_SEQ = 32
PROMPT_LENS = (5, 2, 9)
DECODE_STEPS = 3
ATOL = 1e-4


@pytest.fixture(scope="module", params=sorted(SHAPES))
def built(request, tmp_path_factory):
    from mixtral_trt.export.onnx_export import export
    from mixtral_trt.optimize.lowering import lower_export_dir

    root = tmp_path_factory.mktemp(request.param)
    ckpt = make_checkpoint(root / "ckpt", seed=len(request.param), **SHAPES[request.param])
    export(ckpt, root / "export", max_batch=4, max_seq_len=MAX_SEQ, progress=False)
    lowered = lower_export_dir(root / "export", root / "ort", data="copy")
    hf = transformers.MixtralForCausalLM.from_pretrained(ckpt, dtype=torch.float32, attn_implementation="eager")
    # The lowered graph (com.microsoft.MoE), and the canonical one through its MoETop2 function.
    graphs = {"contrib": lowered / "model.onnx", "function": root / "export" / "model.onnx"}
    return hf.eval(), {k: ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]) for k, p in graphs.items()}


def _run(session, cfg, ids, positions, write, caches):
    feeds = {"input_ids": ids, "position_ids": positions, "write_indices": write}
    for i, (k, v) in enumerate(caches):
        feeds[f"past_key_values.{i}.key"], feeds[f"past_key_values.{i}.value"] = k, v
    out = session.run(None, feeds)
    names = [o.name for o in session.get_outputs()]
    got = dict(zip(names, out))
    new = [(got[f"present.{i}.key"], got[f"present.{i}.value"]) for i in range(cfg.num_hidden_layers)]
    return got["logits"], new


@pytest.mark.parametrize("moe", ["contrib", "function"])
def test_prefill_and_decode_match_transformers(built, moe):
    hf, sessions = built
    session = sessions[moe]
    cfg = hf.config
    K, D = cfg.num_key_value_heads, cfg.head_dim
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, cfg.vocab_size, n) for n in PROMPT_LENS]
    B, S = len(prompts), max(PROMPT_LENS)

    ids = np.zeros((B, S), np.int64)  # right padding; padded slots are overwritten by decode
    for b, p in enumerate(prompts):
        ids[b, : len(p)] = p
    caches = [(np.zeros((B, K, MAX_SEQ, D), np.float32),) * 2 for _ in range(cfg.num_hidden_layers)]
    logits, caches = _run(session, cfg, ids, np.tile(np.arange(S), (B, 1)), np.zeros(B, np.int64), caches)

    hf_caches, next_tokens = [], []
    with torch.no_grad():
        for b, p in enumerate(prompts):
            out = hf(torch.tensor(p)[None], use_cache=True)
            np.testing.assert_allclose(logits[b, : len(p)], out.logits[0].numpy(), atol=ATOL, rtol=0)
            for i, layer in enumerate(out.past_key_values.layers):
                np.testing.assert_allclose(caches[i][0][b, :, : len(p)], layer.keys[0].numpy(), atol=ATOL, rtol=0)
                np.testing.assert_allclose(caches[i][1][b, :, : len(p)], layer.values[0].numpy(), atol=ATOL, rtol=0)
            hf_caches.append(out.past_key_values)
            next_tokens.append(int(out.logits[0, -1].argmax()))

    lengths = np.array(PROMPT_LENS, np.int64)
    for step in range(DECODE_STEPS):
        tokens = np.array(next_tokens, np.int64)[:, None]
        logits, caches = _run(session, cfg, tokens, lengths[:, None] + step, lengths + step, caches)
        with torch.no_grad():
            for b in range(B):
                out = hf(torch.tensor([[next_tokens[b]]]), cache=hf_caches[b], use_cache=True)
                np.testing.assert_allclose(logits[b, 0], out.logits[0, -1].numpy(), atol=ATOL, rtol=0)
                slot = PROMPT_LENS[b] + step
                for i, layer in enumerate(out.past_key_values.layers):
                    np.testing.assert_allclose(caches[i][0][b, :, slot], layer.keys[0, :, -1].numpy(), atol=ATOL, rtol=0)
                next_tokens[b] = int(out.logits[0, -1].argmax())
