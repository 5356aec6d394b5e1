"""Backends run one forward step of the exported graph over a static KV cache they own.

A backend exposes ``max_batch``, ``max_seq_len``, ``vocab_size`` and
``step(input_ids, position_ids, write_indices) -> logits`` ([B, S] int64 each but
write_indices [B]; logits [B, S, V] float32 numpy). The cache lives in the backend, bound
as both the graph's ``past_key_values.*`` inputs and ``present.*`` outputs, so a step
updates it where it lies. ``step_rows(r0, input_ids, position_ids, write_indices)`` runs the
same step over the cache rows ``r0 .. r0+B-1`` only (bound at base + r0 * row_bytes, shape
[B, K, L, D]); the executor needs it to give each request its own row, and serves a backend
without it (the Triton BLS backend) with one row.
"""

BACKENDS = ("onnxruntime", "tensorrt")
