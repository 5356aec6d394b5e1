"""One small export with Mixtral's tokenizer, made once per test process and shared read-only by
the generation fault tests (exporting traces the decoder, seconds; every test here reuses it)."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import make_checkpoint

MAX_BATCH, MAX_SEQ, VOCAB = 2, 24, 32000
# One layer is enough for request validation; vocab_size stays Mixtral's so text prompts tokenize.
SHAPE = dict(num_hidden_layers=1, hidden_size=64, intermediate_size=64, num_local_experts=4, num_attention_heads=2,
             num_key_value_heads=1, vocab_size=VOCAB)  # fmt: skip

_made: dict[str, Path] = {}


def shared_export(tmp_path_factory) -> Path:
    """Read-only: copy it before changing anything."""
    if "export" not in _made:
        from mixtral_trt.export.onnx_export import export

        root = tmp_path_factory.mktemp("faults-generate")
        ckpt = make_checkpoint(root / "ckpt", seed=3, **SHAPE)
        _made["export"] = export(ckpt, root / "export", max_batch=MAX_BATCH, max_seq_len=MAX_SEQ, progress=False)
    return _made["export"]
