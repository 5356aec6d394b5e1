"""Runtime: generation over exported or built artifacts.

    from mixtral_trt import runtime
    model = runtime.load("out/tiny")                      # ONNX Runtime on CPU by default
    [result] = model.generate(["The capital of France is"], max_new_tokens=16, greedy=True)
    print(result.text, result.finish_reason)

    with model.executor:                                  # in-flight batching on a background thread
        handle = model.executor.submit("Once upon a time", max_new_tokens=16, seed=1)
        for delta in handle:
            print(delta.text, end="")
        print(handle.result().ttft_ms)

Nothing heavy is imported until :func:`load` is called.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from .executor import Executor, QueueFullError
from .generator import GenerationError, Result
from .requests import Delta, Handle
from .sampling import SamplingParams

__all__ = ["Delta", "Executor", "GenerationError", "Handle", "Model", "QueueFullError", "Result", "SamplingParams",
           "load"]


class Model:
    """A loaded build: ``generate`` for text or ids, ``logits`` for raw scores, ``executor`` for
    requests that come and go (``generate`` is a batch submitted to it and waited for)."""

    def __init__(self, backend, tokenizer, manifest: dict, **executor_options) -> None:
        from .generator import Generator

        self.backend, self.tokenizer, self.manifest = backend, tokenizer, manifest
        eos_id = manifest["config"].get("eos_token_id")
        self.generator = Generator(backend, tokenizer, eos_id=eos_id, **executor_options)
        self.executor = self.generator.executor

    def generate(self, prompts, on_token=None, **sampling) -> list[Result]:
        """Generate for a batch of prompts (strings or token-id lists). ``sampling``: fields of
        :class:`SamplingParams` (max_new_tokens, greedy, temperature, top_k, top_p,
        repetition_penalty, seed, stop). ``on_token(row, token_id, text_delta)`` streams."""
        known = [f.name for f in dataclasses.fields(SamplingParams)]
        unknown = sorted(set(sampling) - set(known))
        if unknown:
            raise GenerationError(f"unknown sampling option {unknown[0]!r}; the options are {', '.join(known)}")
        if on_token is not None and not callable(on_token):
            raise GenerationError(f"on_token={type(on_token).__name__} must be a function (row, token_id, text_delta)")
        try:
            params = SamplingParams(**sampling)
        except ValueError as exc:
            raise GenerationError(str(exc)) from None
        return self.generator.generate(prompts, params, on_token)

    def logits(self, input_ids) -> list:
        """Prefill logits [len, V] (float32 numpy) for each id list, from an empty cache."""
        import numpy as np

        ids = self.generator.encode(input_ids)
        longest = max(map(len, ids))
        if longest > self.backend.max_seq_len:
            raise GenerationError(f"input of {longest} tokens exceeds the build's max_seq_len={self.backend.max_seq_len}")
        padded = np.zeros((len(ids), longest), np.int64)
        for b, row in enumerate(ids):
            padded[b, : len(row)] = row
        with self.executor.exclusive() as backend:
            out = backend.step(padded, np.tile(np.arange(longest), (len(ids), 1)), np.zeros(len(ids), np.int64))
        return [out[b, : len(row)].copy() for b, row in enumerate(ids)]


def load(build_dir: str | Path, backend: str = "onnxruntime", verify: bool = True, executor: dict | None = None,
         **backend_options) -> Model:
    """Open a build directory (an export, an ONNX Runtime optimize output, or an engine build).

    ``verify`` re-hashes every file against the manifest before anything is loaded. ``executor``:
    options of :class:`Executor` (max_queue, prefill_chunk, max_gap).
    """
    from mixtral_trt.manifest import read_manifest

    from .tokenizer import Tokenizer, TokenizerError

    build_dir = Path(build_dir)
    manifest = read_manifest(build_dir, ("export", "optimize", "engine"), verify=verify)
    if not verify:
        _check_sizes(build_dir, manifest)
    if backend == "onnxruntime":
        from .backends.onnxruntime import OnnxRuntimeBackend

        if manifest["stage"] == "engine":
            raise GenerationError(f"{build_dir} holds a TensorRT engine; use backend='tensorrt'")
        impl = OnnxRuntimeBackend(build_dir, manifest, **backend_options)
    elif backend == "tensorrt":
        from .backends.tensorrt import TensorRTBackend

        impl = TensorRTBackend(build_dir, manifest, **backend_options)
    else:
        raise GenerationError(f"unknown backend {backend!r}; choose 'onnxruntime' or 'tensorrt'")
    try:
        tokenizer = Tokenizer(build_dir, manifest["config"].get("bos_token_id"), manifest["config"].get("eos_token_id"))
    except TokenizerError:
        tokenizer = None
    return Model(impl, tokenizer, manifest, **(executor or {}))


def _check_sizes(build_dir: Path, manifest: dict) -> None:
    """Without hashing, still refuse a file that is missing or of another length than recorded (a
    truncated copy or download), before a backend reads it and fails somewhere inside."""
    for name, entry in manifest.get("files", {}).items():
        path = build_dir / name
        try:
            size = path.stat().st_size
        except OSError:
            raise GenerationError(f"{path} is missing; re-run the stage that wrote {build_dir}") from None
        expected = entry.get("bytes") if isinstance(entry, dict) else None
        if isinstance(expected, int) and size != expected:
            raise GenerationError(
                f"{path} is {size} bytes but its manifest records {expected}: the file is damaged or "
                f"incomplete; re-run the stage that wrote {build_dir} (without --no-verify / verify=False every "
                "file's sha256 is checked)"
            )
