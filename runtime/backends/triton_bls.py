"""Generation inside Triton's Python backend: each step is a BLS request to the engine model.

:class:`TritonBlsBackend` satisfies the generator's backend interface (``max_batch``,
``max_seq_len``, ``vocab_size``, ``step``) by sending ``input_ids``, ``position_ids``,
``write_indices`` and the KV cache to the engine model of the same repository
(``pb_utils.InferenceRequest(...).exec()``). The cache is explicit: this backend holds
``past_key_values.*`` as Python-backend tensors; each step's ``present.*`` outputs become the
next step's inputs through a DLPack rename (no copy in Python). With ``cache_memory="gpu"``
the outputs are requested in GPU memory, so the cache stays on the device between steps.

The rest of the module is the plumbing of the decoupled text model (``model.py`` of the
repository, written by :mod:`mixtral_trt.triton`): reading a request's inputs into
:class:`SamplingParams`, building responses. ``pb_utils`` (``triton_python_backend_utils``,
which exists only inside Triton) is passed in, so this module imports anywhere.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from ..generator import GenerationError
from ..sampling import SamplingParams

BUILD_FILE = "mixtral_build.json"  # in every version directory mixtral-build triton writes: which build
CACHE_MEMORY = ("cpu", "gpu")
DEFAULT_MAX_TOKENS = 32
_NUMPY = {"float32": np.float32, "float16": np.float16}


class TritonBlsError(GenerationError):
    """The engine model failed a step or returned something the graph cannot have produced."""


class TritonBlsBackend:
    name = "triton_bls"

    def __init__(self, pb_utils, engine_model: str, manifest: dict, cache_memory: str = "cpu", device_id: int = 0):
        if cache_memory not in CACHE_MEMORY:
            raise ValueError(f"cache_memory={cache_memory!r}; expected one of {CACHE_MEMORY}")
        cfg = manifest["config"]
        self.pb, self.engine_model, self.cache_memory = pb_utils, engine_model, cache_memory
        self.max_batch = int(manifest["export"]["max_batch"])
        self.max_seq_len = int(manifest["export"]["max_seq_len"])
        self.vocab_size = int(cfg["vocab_size"])
        self._cache_tail = (int(cfg["num_key_value_heads"]), self.max_seq_len, int(cfg["head_dim"]))  # [K, L, D]
        pasts = [e for e in manifest["io"]["inputs"] if e["name"].startswith("past_key_values.")]
        self._pasts = [e["name"] for e in pasts]
        self._presents = ["present." + n.removeprefix("past_key_values.") for n in self._pasts]
        self._cache_dtype = pasts[0]["dtype"]
        self._cache: list | None = None  # pb_utils.Tensor per past_key_values.*, [rows, K, L, D]
        self._rows = 0
        self._checked = False
        if cache_memory == "gpu":
            self._memory = {"preferred_memory": pb_utils.PreferredMemory(pb_utils.TRITONSERVER_MEMORY_GPU, device_id)}
        else:
            self._memory = {"preferred_memory": pb_utils.PreferredMemory(pb_utils.TRITONSERVER_MEMORY_CPU, 0)}

    def step(self, input_ids: np.ndarray, position_ids: np.ndarray, write_indices: np.ndarray) -> np.ndarray:
        ids, pos, where = (np.ascontiguousarray(a, dtype=np.int64) for a in (input_ids, position_ids, write_indices))
        if ids.ndim != 2 or pos.shape != ids.shape or where.shape != ids.shape[:1]:
            raise GenerationError(
                f"step expects input_ids and position_ids [batch, seq] and write_indices [batch]; got "
                f"{list(ids.shape)}, {list(pos.shape)}, {list(where.shape)}"
            )
        B, S = ids.shape
        if not 1 <= B <= self.max_batch:
            raise GenerationError(f"batch {B} is outside the engine model's 1..{self.max_batch}")
        if self._cache is None or self._rows != B:
            self._cache, self._rows = [self._zeros(n, B) for n in self._pasts], B
        pb = self.pb
        inputs = [pb.Tensor("input_ids", ids), pb.Tensor("position_ids", pos),
                  pb.Tensor("write_indices", where.reshape(B, 1)),  # Triton's dims [1], reshaped to [] in the model
                  *self._cache]  # fmt: skip
        request = pb.InferenceRequest(model_name=self.engine_model, inputs=inputs,
                                      requested_output_names=["logits", *self._presents], **self._memory)  # fmt: skip
        response = request.exec()
        if response.has_error():
            raise TritonBlsError(f"engine model {self.engine_model!r} failed a [{B}, {S}] step: {response.error().message()}")
        out = {t.name(): t for t in response.output_tensors()}
        missing = [n for n in ("logits", *self._presents) if n not in out]
        if missing:
            raise TritonBlsError(f"engine model {self.engine_model!r} returned no {', '.join(missing[:3])}")
        logits = self._numpy(out["logits"])
        if logits.shape != (B, S, self.vocab_size):
            raise TritonBlsError(f"engine model returned logits {list(logits.shape)}; expected {[B, S, self.vocab_size]}")
        if not self._checked:
            self._check_written(out[self._presents[0]], where, S)
        self._cache = [pb.Tensor.from_dlpack(past, out[present]) for past, present in zip(self._pasts, self._presents)]
        return logits.astype(np.float32, copy=False)

    def _zeros(self, name: str, rows: int):
        """A zero cache tensor [rows, K, L, D] in host memory (numpy; torch for bf16). Triton moves it to
        the engine once; later steps pass on the engine's own outputs, on the GPU with cache_memory="gpu"."""
        shape = (rows, *self._cache_tail)
        if self._cache_dtype in _NUMPY:
            return self.pb.Tensor(name, np.zeros(shape, _NUMPY[self._cache_dtype]))
        torch = _torch()
        return self.pb.Tensor.from_dlpack(name, torch.zeros(shape, dtype=getattr(torch, self._cache_dtype)))

    def _numpy(self, tensor) -> np.ndarray:
        """Logits (float32) as numpy: directly from host memory, through torch from the GPU."""
        if tensor.is_cpu():
            return tensor.as_numpy()
        return _torch().from_dlpack(tensor).float().cpu().numpy()

    def _check_written(self, present, where: np.ndarray, S: int) -> None:
        """First step only, from a zero cache: row 0's new slots of present.0.key must hold keys.

        An engine whose KV-cache-update layer writes past_key_values.* in place leaves a separately
        bound present.* untouched; Triton's TensorRT backend binds it separately.
        """
        start = int(where[0])
        if present.is_cpu() and self._cache_dtype in _NUMPY:
            cache = present.as_numpy()
        else:
            cache = _torch().from_dlpack(present)  # stays on its device; only the verdict is read back
        if not bool((cache[0, :, start : start + S] != 0).any()):
            raise TritonBlsError(
                f"engine model {self.engine_model!r} returned {self._presents[0]} without the keys this step wrote "
                f"(row 0, slots {start}..{start + S - 1} are all zero): the serving backend does not return the "
                "updated cache. An engine whose KV-cache-update layer updates past_key_values.* in place writes "
                "through the input's buffer only, and Triton's TensorRT backend binds present.* to a buffer of its "
                "own. Serve the ONNX Runtime build, or an engine built without in-place cache aliasing"
            )
        self._checked = True


def _torch():
    try:
        import torch
    except ImportError as exc:
        raise ImportError(
            "the Triton text model needs torch for caches in GPU memory or in bfloat16: pip install torch "
            "(with CUDA) in Triton's Python environment"
        ) from exc
    return torch


# ---------------------------------------------------------------------------------------------
# Loading the text model: the build it belongs to


class TritonModelMismatch(GenerationError):
    """The repository's models, or the model and the build it loads, come from different builds."""


def build_record(version_dir: Path) -> dict:
    path = Path(version_dir) / BUILD_FILE
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise TritonModelMismatch(f"{path} is missing or unreadable ({exc}); rerun `mixtral-build triton`") from None
    if not isinstance(record, dict) or not isinstance(record.get("build_id"), str):
        raise TritonModelMismatch(f"{path} names no build_id; rerun `mixtral-build triton`")
    return record


def check_pair(version_dir: Path, engine_version_dir: Path) -> dict:
    """The text model's build record, after checking that the engine model beside it is of the same build
    (an interrupted `mixtral-build triton` can leave one model of each)."""
    ours, theirs = build_record(version_dir), build_record(engine_version_dir)
    if ours["build_id"] != theirs["build_id"]:
        raise TritonModelMismatch(
            f"text model {version_dir} is from build {ours['build_id'][:16]} ({ours.get('build_dir')}) but the "
            f"engine model {engine_version_dir} is from build {theirs['build_id'][:16]} ({theirs.get('build_dir')}): "
            "the repository was left half-written. Rerun `mixtral-build triton BUILD --out REPO` to finish it"
        )
    return ours


def load_in_process(version_dir: Path, params: dict, device_id: int = 0):
    """The build loaded in this process (a runtime ``Model``; config parameters build_dir, build_id,
    verify, backend, plugin_libraries), after checking that the build at build_dir is the one the
    repository names. An engine runs on GPU ``device_id`` (the instance's device)."""
    ours = build_record(version_dir)
    build_dir, build_id = Path(params["build_dir"]), params["build_id"]
    if ours["build_id"] != build_id:
        raise TritonModelMismatch(
            f"{version_dir} is from build {ours['build_id'][:16]} but its config.pbtxt names build {build_id[:16]}: "
            "the repository was left half-written. Rerun `mixtral-build triton BUILD --out REPO` to finish it"
        )
    try:
        actual = hashlib.sha256((build_dir / "manifest.json").read_bytes()).hexdigest()
    except OSError as exc:
        raise TritonModelMismatch(
            f"the build this model serves, {build_dir} (config parameter build_dir), cannot be read ({exc}); "
            "the repository references the build where it was: put it back, or rerun `mixtral-build triton` "
            "with its new path"
        ) from None
    if actual != build_id:
        raise TritonModelMismatch(
            f"{build_dir} is now build {actual[:16]}, not build {build_id[:16]} that this repository was written "
            "for (rebuilt since?); rerun `mixtral-build triton` on it"
        )
    from mixtral_trt import runtime

    backend, options = params.get("backend", "onnxruntime"), {}
    if backend == "tensorrt":
        libraries = [str(Path(version_dir) / n) for n in params.get("plugin_libraries", "").split(";") if n]
        options = {"device": device_id, "plugin_libraries": libraries}
    return runtime.load(build_dir, backend=backend, verify=params.get("verify", "true") != "false", **options)


# ---------------------------------------------------------------------------------------------
# Requests and responses of the text model


def request_params(pb_utils, request) -> tuple[str, SamplingParams, bool]:
    """(prompt, sampling, stream) from a text-model request; greedy unless temperature/top_p/top_k is given."""

    def scalar(name):
        tensor = pb_utils.get_input_tensor_by_name(request, name)
        if tensor is None:
            return None
        values = tensor.as_numpy().reshape(-1)
        if values.size != 1:
            raise GenerationError(f"input {name!r} must hold one value; got shape {list(tensor.as_numpy().shape)}")
        return values[0]

    text = scalar("text_input")
    if text is None:
        raise GenerationError("input 'text_input' is required")
    prompt = text.decode("utf-8") if isinstance(text, bytes) else str(text)
    max_tokens = scalar("max_tokens")
    sampling = {"max_new_tokens": int(max_tokens) if max_tokens is not None else DEFAULT_MAX_TOKENS}
    for name, cast in (("temperature", float), ("top_p", float), ("top_k", int)):
        value = scalar(name)
        if value is not None:
            sampling[name] = cast(value)
    sampling["greedy"] = not any(k in sampling for k in ("temperature", "top_p", "top_k"))
    seed = scalar("seed")
    if seed is not None:
        sampling["seed"] = int(seed)
    stream = scalar("stream")
    try:
        params = SamplingParams(**sampling)
    except ValueError as exc:
        raise GenerationError(str(exc)) from None
    return prompt, params, bool(stream) if stream is not None else False


def text_response(pb_utils, text: str, ids: list[int]):
    """One response: ``text_output`` [1] (UTF-8 bytes) and ``output_ids`` [n]."""
    return pb_utils.InferenceResponse(output_tensors=[
        pb_utils.Tensor("text_output", np.array([text.encode("utf-8")], dtype=np.object_)),
        pb_utils.Tensor("output_ids", np.asarray(ids, dtype=np.int64)),
    ])  # fmt: skip


def error_response(pb_utils, message: str):
    return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(message))
