"""ONNX Runtime backend: IOBinding with the KV cache bound in place (input and output share memory).

The cache is one numpy array per layer and kind, [max_batch, K, max_seq_len, D], allocated
once. A batch of ``b`` rows binds the leading ``b`` rows (a contiguous view) as both
``past_key_values.{i}.*`` and ``present.{i}.*``; ONNX Runtime's TensorScatter then writes
the new keys/values into that memory instead of copying the cache each step.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mixtral_trt.export import moe_op  # noqa: F401  (registers the MoETop2 schema for onnx)


class OnnxRuntimeBackend:
    name = "onnxruntime"

    def __init__(
        self, build_dir: Path, manifest: dict, providers: list[str] | None = None, threads: int = 0, log_severity: int = 3
    ) -> None:
        import onnxruntime as ort

        cfg = manifest["config"]
        self.build_dir = Path(build_dir)
        self.max_batch = int(manifest["export"]["max_batch"])
        self.max_seq_len = int(manifest["export"]["max_seq_len"])
        self.vocab_size = int(cfg["vocab_size"])
        self.layers = int(cfg["num_hidden_layers"])
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        options.log_severity_level = log_severity  # 3: keep ORT's per-run notes off the user's terminal
        model = _model_bytes(build_dir, manifest, options)
        self.providers = providers or _default_providers(ort)
        self.session = ort.InferenceSession(model, options, providers=self.providers)
        shape = (self.max_batch, cfg["num_key_value_heads"], self.max_seq_len, cfg["head_dim"])
        # One buffer per (layer, kind); bound as input and output, never reallocated.
        self.cache = {
            (i, kind): np.zeros(shape, np.float32) for i in range(self.layers) for kind in ("key", "value")
        }

    def cache_address(self, layer: int, kind: str) -> int:
        return self.cache[(layer, kind)].ctypes.data

    def step(self, input_ids: np.ndarray, position_ids: np.ndarray, write_indices: np.ndarray) -> np.ndarray:
        B = input_ids.shape[0]
        binding = self.session.io_binding()
        for name, value in (("input_ids", input_ids), ("position_ids", position_ids), ("write_indices", write_indices)):
            binding.bind_cpu_input(name, np.ascontiguousarray(value, dtype=np.int64))
        binding.bind_output("logits", "cpu")  # first, so it is get_outputs()[0]
        for (i, kind), buf in self.cache.items():
            view = buf[:B]  # leading rows of a C-contiguous array: contiguous, same memory
            ptr, shape = view.ctypes.data, view.shape
            binding.bind_input(f"past_key_values.{i}.{kind}", "cpu", 0, np.float32, shape, ptr)
            binding.bind_output(f"present.{i}.{kind}", "cpu", 0, np.float32, shape, ptr)
        self.session.run_with_iobinding(binding)
        return binding.get_outputs()[0].numpy()


def _default_providers(ort) -> list[str]:
    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


def _model_bytes(build_dir: Path, manifest: dict, options) -> bytes | str:
    """The ONNX Runtime model: an optimize-stage model as is, an export lowered in memory."""
    if manifest["stage"] == "optimize":
        return str(build_dir / manifest["export"]["model_file"])
    import onnx

    from mixtral_trt.optimize.lowering import lower_for_onnxruntime

    model = onnx.load(str(build_dir / manifest["export"]["model_file"]), load_external_data=False)
    # The lowered graph references the export's data file; tell ORT where it lies.
    options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(build_dir))
    return lower_for_onnxruntime(model).SerializeToString()
