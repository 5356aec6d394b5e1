"""ONNX Runtime backend: IOBinding with the KV cache bound in place (input and output share memory).

The cache is one buffer per layer and kind, [max_batch, K, max_seq_len, D], allocated once
(numpy on CPU; an OrtValue on the GPU with the CUDA provider). A step over the ``n`` rows
``r0 .. r0+n-1`` binds that run of the row-major buffer (address base + r0 * row_bytes, shape
[n, K, L, D]) as both ``past_key_values.{i}.*`` and ``present.{i}.*``; ONNX Runtime's
TensorScatter then writes the new keys/values into that memory instead of copying the cache
each step. ``step`` is the run starting at row 0.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from ..generator import GenerationError


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
        # int8 builds: ORT fuses DequantizeLinear → MatMul into MatMulNBits, by default with int8
        # activations (accuracy level 4), a second quantization the graph does not ask for (10× the
        # logit error of the weights' own). Level 1 keeps the activations in floating point.
        options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")
        self.providers = providers or _default_providers(ort)
        self.cache_dtype = _cache_dtype(manifest)  # float16 for fp16 and int8 builds
        _check_bf16(self.build_dir, manifest, self.cache_dtype, self.providers)
        self.session = _session(ort, self.build_dir, manifest, options, self.providers)
        shape = (self.max_batch, cfg["num_key_value_heads"], self.max_seq_len, cfg["head_dim"])
        # One buffer per (layer, kind); bound as input and output, never reallocated. With the
        # CUDA provider the cache lives on the GPU (OrtValues), else in numpy arrays.
        self._cache_shape = shape
        self._bindings: dict[tuple[int, int], object] = {}  # (r0, n) -> IOBinding
        self.device = "cuda" if self.session.get_providers()[0] == "CUDAExecutionProvider" else "cpu"
        keys = [(i, kind) for i in range(self.layers) for kind in ("key", "value")]
        try:
            if self.device == "cuda":
                zeros = np.zeros(shape, self.cache_dtype)
                self.cache = {k: ort.OrtValue.ortvalue_from_numpy(zeros, "cuda", 0) for k in keys}
            else:
                self.cache = {k: np.zeros(shape, self.cache_dtype) for k in keys}
        except (MemoryError, ValueError) as exc:  # ValueError: numpy's "Maximum allowed dimension exceeded"
            raise GenerationError(
                f"cannot allocate the KV cache of {build_dir}: {len(keys)} buffers of {list(shape)} "
                f"{np.dtype(self.cache_dtype).name} ({exc}); the build's max_batch={self.max_batch} and "
                f"max_seq_len={self.max_seq_len} need more memory than there is: rebuild with smaller limits"
            ) from None

    def cache_address(self, layer: int, kind: str) -> int:
        buf = self.cache[(layer, kind)]
        return buf.ctypes.data if self.device == "cpu" else buf.data_ptr()

    def step(self, input_ids: np.ndarray, position_ids: np.ndarray, write_indices: np.ndarray) -> np.ndarray:
        return self.step_rows(0, input_ids, position_ids, write_indices)

    def step_rows(self, r0: int, input_ids: np.ndarray, position_ids: np.ndarray,
                  write_indices: np.ndarray) -> np.ndarray:  # fmt: skip
        """One step over the cache rows r0 .. r0+B-1 (B = len(input_ids)); other rows are not touched."""
        B, S = input_ids.shape
        if not (0 <= r0 and 1 <= B and r0 + B <= self.max_batch):
            raise GenerationError(f"rows {r0}..{r0 + B - 1} are outside the cache's rows 0..{self.max_batch - 1}")
        binding = self._binding(r0, B)
        for name, value in (("input_ids", input_ids), ("position_ids", position_ids), ("write_indices", write_indices)):
            binding.bind_cpu_input(name, np.ascontiguousarray(value, dtype=np.int64))
        logits = np.empty((B, S, self.vocab_size), np.float32)
        binding.bind_output("logits", "cpu", 0, np.float32, logits.shape, logits.ctypes.data)
        self.session.run_with_iobinding(binding)
        return logits

    @property
    def row_bytes(self) -> int:
        """Bytes of one cache row [K, L, D]: rows r0.. of a row-major [max_batch, K, L, D] buffer start r0 rows in."""
        return int(np.prod(self._cache_shape[1:])) * np.dtype(self.cache_dtype).itemsize

    def _binding(self, r0: int, B: int):
        """One IOBinding per row run (r0, B), its cache bindings made once (their addresses never change)."""
        if (r0, B) not in self._bindings:
            binding = self.session.io_binding()
            for i, kind in self.cache:
                ptr, shape = self.cache_address(i, kind) + r0 * self.row_bytes, (B, *self._cache_shape[1:])
                binding.bind_input(f"past_key_values.{i}.{kind}", self.device, 0, self.cache_dtype, shape, ptr)
                binding.bind_output(f"present.{i}.{kind}", self.device, 0, self.cache_dtype, shape, ptr)
            self._bindings[(r0, B)] = binding
        return self._bindings[(r0, B)]


def _default_providers(ort) -> list[str]:
    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


def _cache_dtype(manifest: dict) -> type:
    """The KV cache dtype from the manifest's I/O table (past and present caches share it)."""
    import ml_dtypes

    dtypes = {e["dtype"] for e in manifest["io"]["inputs"] if e["name"].startswith("past_key_values.")}
    known = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}
    if len(dtypes) != 1 or not dtypes <= known.keys():
        raise GenerationError(f"manifest I/O table gives KV cache dtypes {sorted(dtypes)}; expected one of "
                              f"{sorted(known)}")  # fmt: skip
    return known[dtypes.pop()]


def _check_bf16(build_dir: Path, manifest: dict, cache_dtype, providers: list[str]) -> None:
    """ONNX Runtime's CPU provider has no bfloat16 MatMul: refuse before it fails deep inside."""
    import ml_dtypes

    precision = manifest.get("optimize", {}).get("precision")
    if (precision == "bf16" or cache_dtype is ml_dtypes.bfloat16) and "CUDAExecutionProvider" not in providers:
        raise GenerationError(
            f"{build_dir} is a bf16 build and ONNX Runtime on CPU has no bf16 MatMul; run an fp32 build "
            "(the fp32/ directory beside it in a --precision bf16 build, which `mixtral-build generate OUT` "
            "picks, or `mixtral-build optimize EXPORT_DIR --precision fp32`) or this build's TensorRT engine "
            "(--backend tensorrt)"
        )


def _session(ort, build_dir: Path, manifest: dict, options, providers: list[str]):
    """The inference session; a model or data file ONNX Runtime cannot read becomes one clear error."""
    names = f"{manifest['export']['model_file']} / {manifest['export'].get('data_file', 'its data file')}"
    try:
        return ort.InferenceSession(_model_bytes(build_dir, manifest, options), options, providers=providers)
    except GenerationError:
        raise
    except Exception as exc:  # ORT's own classes (Fail, InvalidProtobuf, ...) and protobuf's DecodeError
        if type(exc).__name__ == "NotImplemented":  # an op or dtype the chosen providers lack
            raise GenerationError(
                f"ONNX Runtime ({', '.join(providers)}) cannot run {build_dir}: {_first_reason(exc)}; use an fp32 "
                "build or the TensorRT engine (--backend tensorrt)"
            ) from None
        raise GenerationError(
            f"ONNX Runtime cannot load {names} in {build_dir} ({_first_reason(exc)}); the files are damaged or do not "
            "match this build: re-run the stage that wrote the directory (without --no-verify / verify=False every "
            "file's sha256 is checked first)"
        ) from None


def _first_reason(exc: Exception) -> str:
    """The innermost reason of an ONNX Runtime error, on one line, without its C++ source locations."""
    text = " ".join(str(exc).split())
    text = re.split(r"\[ONNXRuntimeError\] : \d+ : \w+ : ", text)[-1]
    text = re.sub(r"^\S+\.(?:cc|h|cpp):\d+ \S+ ", "", text)
    return (text[:300] + "...") if len(text) > 300 else text or type(exc).__name__


def _model_bytes(build_dir: Path, manifest: dict, options) -> bytes | str:
    """The ONNX Runtime model: an 'onnxruntime'-target model as is; an export or a canonical
    precision output ('optimize' stage, target 'canonical') lowered in memory."""
    target = manifest.get("optimize", {}).get("target") if manifest["stage"] == "optimize" else None
    if manifest["stage"] == "optimize" and target not in ("canonical", "onnxruntime"):
        raise GenerationError(f"{build_dir} is an optimize output for target {target!r}; ONNX Runtime loads "
                              "exports and optimize outputs of target 'canonical' or 'onnxruntime'")  # fmt: skip
    import onnx

    from mixtral_trt.onnx_files import ExternalDataError, check_external_data
    from mixtral_trt.optimize.lowering import LoweringError, lower_for_onnxruntime

    path = build_dir / manifest["export"]["model_file"]
    model = onnx.load(str(path), load_external_data=False)
    try:
        check_external_data(path, model)  # before ONNX Runtime follows any location
        if target == "onnxruntime":
            return str(path)
        # The lowered graph references the export's data file; tell ORT where it lies.
        options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(build_dir))
        return lower_for_onnxruntime(model).SerializeToString()
    except (ExternalDataError, LoweringError) as exc:
        raise GenerationError(str(exc)) from None
