"""Backends run one forward step of the exported graph over a static KV cache they own.

A backend exposes ``max_batch``, ``max_seq_len``, ``vocab_size`` and
``step(input_ids, position_ids, write_indices) -> logits`` ([B, S] int64 each but
write_indices [B]; logits [B, S, V] float32 numpy). The cache lives in the backend, bound
as both the graph's ``past_key_values.*`` inputs and ``present.*`` outputs, so a step
updates it where it lies.
"""

BACKENDS = ("onnxruntime", "tensorrt")
