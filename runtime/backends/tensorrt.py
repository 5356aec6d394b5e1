"""TensorRT backend: a built engine run through the nvinfer Python API, KV cache updated in place.

The build directory holds ``model.plan`` and a ``manifest.json`` of stage ``"engine"``. Besides
``config``, ``export`` (max_batch, max_seq_len) and ``io`` (the public I/O table, identical across
targets), this backend reads the manifest's ``engine`` section:

    plan_file    file name of the serialized engine in the build directory (default "model.plan")
    target       "tensorrt" (datacenter, module ``tensorrt``; the default) or "tensorrt_rtx"
                 (module ``tensorrt_rtx_bindings``). A plan runs only with the flavour that built it.
    trt_version  version of the TensorRT that built the plan, named in errors and warnings
    cache_dtype  "float32" | "float16" | "bfloat16": dtype of past_key_values.* / present.*
    target_sms   optional, e.g. ["sm_90"]: named in the deserialization error
    plugins      [{name, version, namespace, library, sha256}]: each library (a file name in the
                 build directory or an absolute path) is hashed and loaded before deserialization,
                 then its creator must be registered under (name, version, namespace)

The plan file's own sha256 is checked by :func:`mixtral_trt.runtime.load` against ``files``.

Execution (one CUDA stream, one device):

- Device buffers are CUDA tensors from torch, allocated once: the KV cache per (layer, kind) as
  [max_batch, K, max_seq_len, D] in the engine's cache dtype; flat staging buffers for input_ids,
  position_ids, write_indices; a flat logits buffer. A step over the ``n`` rows ``r0 ..
  r0+n-1`` binds that run of each row-major cache (address base + r0 * row_bytes, shape
  [n, K, L, D]) as both ``past_key_values.{i}.*`` and ``present.{i}.*`` (``step`` is the run at
  row 0): TensorRT's KV-cache-update layer writes the new slots where they lie, and
  ``ICudaEngine.get_aliased_input_tensor`` (TensorRT >= 10.15, TensorRT-RTX) must confirm that
  every present.* aliases its past_key_values.*. (That layer, which the ONNX parser makes of
  TensorScatter, needs a static cache length: the engine build pins ``max_cache_len``.)
- All execution contexts share one activation scratch (USER_MANAGED allocation): they never run
  concurrently. Tensor addresses are set once, when a context is created.
- Prefill (seq > 1): one context per optimization profile, input shapes set per step; its cache
  addresses are re-set when a step's first row differs from the previous one's.
- Decode (seq == 1): one context per row run (r0, n) with its addresses and shapes set once, so
  its CUDA graph (keyed by the same (r0, n)) replays with the right rows; on first use it runs
  one plain ``execute_async_v3`` (TensorRT finishes lazy initialisation there), then captures
  one into a ``torch.cuda.CUDAGraph`` on the backend's (non-default) stream; later steps copy
  their tokens/positions/write indices into the static buffers and replay. A failed capture is
  logged once and decode falls back to plain enqueue.

Engine host code is never enabled here (``Runtime.engine_host_code_allowed`` stays False).
``tensorrt`` and ``torch`` are imported inside functions, so this module imports anywhere.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np

from mixtral_trt.manifest import ManifestError, sha256_file

from ..generator import GenerationError

log = logging.getLogger(__name__)

TARGETS = {
    "tensorrt": ("tensorrt", "pip install tensorrt"),
    "tensorrt_rtx": ("tensorrt_rtx_bindings", "pip install tensorrt-rtx-cu13-bindings tensorrt-rtx-cu13-libs"),
}
CACHE_DTYPES = ("float32", "float16", "bfloat16")
KINDS = ("key", "value")
# nvinfer DataType member name -> the dtype names of the manifest's io table
_DTYPE_NAMES = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "INT64": "int64", "INT32": "int32",
                "INT8": "int8", "UINT8": "uint8", "BOOL": "bool", "FP8": "float8e4m3fn"}  # fmt: skip
_LOADED_LIBRARIES: dict[tuple[str, str], object] = {}  # (module, realpath) -> handle: TensorRT refuses a 2nd load


class TensorRTError(GenerationError):
    """The engine cannot run here: no GPU, wrong TensorRT, missing plugin, a TensorRT call failed."""


# ---------------------------------------------------------------------------------------------
# Pure helpers (no tensorrt, no torch)


@dataclasses.dataclass(frozen=True)
class EngineSpec:
    plan: Path
    target: str | None  # None: the manifest does not say; try tensorrt, then TensorRT-RTX
    trt_version: str | None
    cache_dtype: str | None
    target_sms: tuple[str, ...]
    plugins: tuple[dict, ...]


def engine_spec(build_dir: Path, manifest: dict) -> EngineSpec:
    """The manifest's ``engine`` section, validated; the plan file must exist."""
    stage = manifest.get("stage")
    if stage != "engine":
        raise ManifestError(
            f"{build_dir} holds a {stage!r} artifact, not a TensorRT engine build; build an engine "
            "from it first, or run it with backend='onnxruntime'"
        )
    eng = manifest.get("engine")
    if not isinstance(eng, dict):
        raise ManifestError(f"{build_dir}/manifest.json has stage 'engine' but no 'engine' section; rebuild the engine")
    target = eng.get("target")
    if target is not None and target not in TARGETS:
        raise ManifestError(f"engine.target={target!r} in {build_dir}/manifest.json; expected one of {list(TARGETS)}")
    cache_dtype = eng.get("cache_dtype")
    if cache_dtype is not None and cache_dtype not in CACHE_DTYPES:
        raise ManifestError(f"engine.cache_dtype={cache_dtype!r}; expected one of {list(CACHE_DTYPES)}")
    plugins = tuple(eng.get("plugins") or ())
    for n, p in enumerate(plugins):
        if not isinstance(p, dict) or not p.get("name"):
            raise ManifestError(f"engine.plugins[{n}] = {p!r} has no plugin name")
    plan = Path(build_dir) / eng.get("plan_file", "model.plan")
    if not plan.is_file():
        raise ManifestError(f"engine plan {plan} is missing (manifest engine.plan_file); rebuild the engine there")
    return EngineSpec(plan, target, eng.get("trt_version"), cache_dtype, tuple(eng.get("target_sms") or ()), plugins)


def io_entries(io: dict) -> list[dict]:
    """The manifest's io table ({inputs, outputs}) as one list of {name, mode, dtype, shape}."""
    return [{**e, "mode": mode} for mode, key in (("input", "inputs"), ("output", "outputs")) for e in io.get(key, [])]


def compare_io(expected: list[dict], actual: list[dict]) -> list[str]:
    """Differences between two I/O tables ({name, mode, dtype, shape} each), one line per problem.

    ``expected`` is the manifest's (symbolic dims are strings and match any size), ``actual`` the
    engine's (-1 for a dynamic dim). An integer dim must be the same integer in both.
    """
    want = {e["name"]: e for e in expected}
    have = {e["name"]: e for e in actual}
    problems = [f"{want[n]['mode']} {n!r}: in the manifest, missing from the engine" for n in want if n not in have]
    problems += [f"{have[n]['mode']} {n!r}: in the engine, not in the manifest" for n in have if n not in want]
    for name in (n for n in want if n in have):
        w, h = want[name], have[name]
        if w["mode"] != h["mode"]:
            problems.append(f"{name!r}: an {w['mode']} in the manifest, an {h['mode']} in the engine")
        if w["dtype"] != h["dtype"]:
            problems.append(f"{name!r}: dtype {h['dtype']} in the engine, {w['dtype']} in the manifest")
        ws, hs = list(w["shape"]), list(h["shape"])
        if len(ws) != len(hs) or any(isinstance(a, int) and a != b for a, b in zip(ws, hs)):
            problems.append(f"{name!r}: shape {hs} in the engine, {ws} in the manifest")
    return problems


def choose_profile(profiles: list[tuple[tuple, tuple, tuple]], batch: int, seq: int) -> int | None:
    """Index of the tightest profile (min, opt, max of input_ids) accepting [batch, seq], else None."""
    fits = [p for p, (lo, _, hi) in enumerate(profiles) if lo[0] <= batch <= hi[0] and lo[1] <= seq <= hi[1]]
    return min(fits, key=lambda p: (profiles[p][2][1], profiles[p][2][0], p), default=None)


def import_tensorrt(target: str | None = "tensorrt"):
    """The nvinfer Python module for ``target``; ``None`` tries tensorrt, then tensorrt_rtx_bindings."""
    import importlib

    names = [target] if target else list(TARGETS)
    failures = []
    for name in names:
        module, _ = TARGETS[name]
        try:
            return importlib.import_module(module)
        except (ImportError, OSError) as exc:  # OSError: the bindings found but not the libraries
            failures.append(exc)
    hint = "; or ".join(f"{TARGETS[n][1]} (module {TARGETS[n][0]})" for n in names)
    raise ImportError(f"the TensorRT backend needs the nvinfer Python package for this engine: {hint}") from failures[0]


# ---------------------------------------------------------------------------------------------
# TensorRT-facing helpers


def _cuda_torch(device: int):
    try:
        import torch
    except ImportError as exc:
        raise ImportError("the TensorRT backend needs PyTorch with CUDA for device buffers: pip install torch") from exc
    if not torch.cuda.is_available():
        build = "a CPU-only build of torch" if torch.version.cuda is None else "no CUDA device visible"
        raise TensorRTError(f"TensorRT backend needs an NVIDIA GPU; use --backend onnxruntime ({build})")
    if not 0 <= device < torch.cuda.device_count():
        raise TensorRTError(f"device={device}, but torch sees {torch.cuda.device_count()} CUDA device(s)")
    return torch


def _logger(trt):
    """The process-wide nvinfer logger, shared with the engine builder (TensorRT keeps the first one)."""
    from mixtral_trt.optimize.trt_compat import process_logger

    return process_logger(trt)


def _said(logger) -> str:
    """TensorRT's errors since the last call, for an exception message (empty when none reached us)."""
    errors = list(logger.errors)
    logger.errors.clear()
    return f" TensorRT said: {' | '.join(errors)}" if errors else ""


def dtype_name(trt_dtype) -> str:
    return _DTYPE_NAMES.get(trt_dtype.name, trt_dtype.name.lower())


def load_plugins(trt, build_dir: Path, plugins: tuple[dict, ...], extra: list[str]) -> None:
    """Hash and load each plugin library of the manifest (``extra`` paths override by file name,
    or add libraries), then require every listed creator to be registered."""
    registry = trt.get_plugin_registry()
    overrides = {Path(p).name: Path(p) for p in extra}
    problems, to_load = [], []
    for p in plugins:
        lib = p.get("library")
        if not lib:
            if p.get("python"):  # built with our Python creator: register it in this process
                import importlib

                importlib.import_module(p["python"]).register(trt)
            continue
        path = overrides.pop(Path(lib).name, None) or (Path(lib) if Path(lib).is_absolute() else build_dir / lib)
        if not path.is_file():
            problems.append(f"plugin {p['name']}: library {path} not found; pass plugin_libraries=[<its path>]")
        elif p.get("sha256") and sha256_file(path) != p["sha256"]:
            problems.append(
                f"plugin {p['name']}: {path} has sha256 {sha256_file(path)[:12]}…, the manifest says "
                f"{p['sha256'][:12]}…: the engine was built against another build of the plugin; rebuild "
                "the engine or pass the library it was built with"
            )
        else:
            to_load.append(path)
    if problems:
        raise TensorRTError("cannot load the engine's plugins:\n  " + "\n  ".join(problems))
    for path in to_load + list(overrides.values()):
        _load_library(trt, registry, path)
    for p in plugins:
        version, namespace = str(p.get("version", "1")), p.get("namespace", "")
        if registry.get_creator(p["name"], version, namespace) is None:
            where = f"after loading {p['library']}" if p.get("library") else "and the manifest names no library"
            problems.append(f"plugin {p['name']!r} version {version} namespace {namespace!r} is not registered {where}")
    if problems:
        raise TensorRTError("cannot load the engine's plugins:\n  " + "\n  ".join(problems))


def _load_library(trt, registry, path: Path) -> None:
    key = (trt.__name__, str(path.resolve()))
    if key in _LOADED_LIBRARIES:
        return
    handle = registry.load_library(str(path))  # None when one of its creators is already registered
    if handle is None:
        import ctypes  # a library that registers its creators from static initialisers

        handle = ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
    _LOADED_LIBRARIES[key] = handle


@dataclasses.dataclass
class _Decoder:
    context: object
    graph: object | None = None


class TensorRTBackend:
    name = "tensorrt"

    def __init__(self, build_dir: Path, manifest: dict, device: int = 0, cuda_graphs: bool = True,
                 plugin_libraries: list[str] | None = None) -> None:  # fmt: skip
        build_dir = Path(build_dir)
        spec = engine_spec(build_dir, manifest)
        cfg = manifest["config"]
        self.max_batch = int(manifest["export"]["max_batch"])
        self.max_seq_len = int(manifest["export"]["max_seq_len"])
        self.vocab_size = int(cfg["vocab_size"])
        self.layers = int(cfg["num_hidden_layers"])
        self.cuda_graphs = cuda_graphs
        self._trt = trt = import_tensorrt(spec.target)
        load_plugins(trt, build_dir, spec.plugins, list(plugin_libraries or ()))  # before any engine exists
        self._torch = torch = _cuda_torch(device)
        self.device = torch.device("cuda", device)
        self._logger = _logger(trt)
        self._graph_error: str | None = None
        with torch.cuda.device(self.device):
            self._runtime = trt.Runtime(self._logger)
            self.engine = self._deserialize(spec)
            self._check_engine(spec, manifest)
            self.stream = torch.cuda.Stream(self.device)
            self._allocate(cfg)
        self._prefill: dict[int, object] = {}  # profile -> context
        self._prefill_rows: dict[int, int] = {}  # profile -> the first row its cache addresses point at
        self._decoders: dict[tuple[int, int], _Decoder] = {}  # row run (r0, n) -> context (+ graph)

    # -- loading ---------------------------------------------------------------------------

    def _deserialize(self, spec: EngineSpec):
        version = self._trt.__version__
        if spec.trt_version and spec.trt_version != version:
            log.warning("%s was built with TensorRT %s; this is %s", spec.plan, spec.trt_version, version)
        _said(self._logger)  # forget older errors: the message below is about this call
        engine = self._runtime.deserialize_cuda_engine(spec.plan.read_bytes())
        if engine is None:
            cc = "sm_%d%d" % self._torch.cuda.get_device_capability(self.device)
            built = f"TensorRT {spec.trt_version or '(version not recorded)'}"
            if spec.target_sms:
                built += f" for {', '.join(spec.target_sms)}"
            raise TensorRTError(
                f"TensorRT {version} could not deserialize {spec.plan} (built with {built}; this GPU is {cc}). "
                "Engines run only with the TensorRT version that built them, on the GPU architectures they were "
                f"built for: install that version or rebuild the engine on this machine.{_said(self._logger)}"
            )
        return engine

    def _check_engine(self, spec: EngineSpec, manifest: dict) -> None:
        trt, engine = self._trt, self.engine
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        modes = {trt.TensorIOMode.INPUT: "input", trt.TensorIOMode.OUTPUT: "output"}
        actual = [{"name": n, "mode": modes.get(engine.get_tensor_mode(n), "none"),
                   "dtype": dtype_name(engine.get_tensor_dtype(n)), "shape": list(engine.get_tensor_shape(n))}
                  for n in names]  # fmt: skip
        problems = compare_io(io_entries(manifest["io"]), actual)
        for n in names:
            if engine.get_tensor_location(n) != trt.TensorLocation.DEVICE:
                problems.append(f"{n!r}: TensorRT wants it in host memory (a shape tensor); expected a device tensor")
            if engine.get_tensor_format(n) != trt.TensorFormat.LINEAR:
                problems.append(f"{n!r}: format {engine.get_tensor_format(n).name}; expected LINEAR")
        if problems:
            lines = "\n  ".join(problems)
            raise ManifestError(f"{spec.plan} does not match the I/O table of its manifest:\n  {lines}")
        self._dtypes = {e["name"]: e["dtype"] for e in actual}
        cache = self._dtypes["past_key_values.0.key"]
        if spec.cache_dtype and cache != spec.cache_dtype:
            raise ManifestError(f"{spec.plan} keeps its KV cache in {cache}; the manifest says {spec.cache_dtype}")
        length = engine.get_tensor_shape("past_key_values.0.key")[2]
        if length not in (-1, self.max_seq_len):
            raise ManifestError(f"{spec.plan} has a KV cache of {length} slots; the manifest says {self.max_seq_len}")
        self._check_aliases()
        self._profiles = [tuple(tuple(d) for d in engine.get_tensor_profile_shape("input_ids", p))
                          for p in range(engine.num_optimization_profiles)]  # fmt: skip

    def _check_aliases(self) -> None:
        if not hasattr(self.engine, "get_aliased_input_tensor"):
            raise TensorRTError(
                f"TensorRT {self._trt.__version__} cannot report in-place outputs "
                "(ICudaEngine.get_aliased_input_tensor); the KV cache is updated in place, which needs "
                "TensorRT >= 10.15 or TensorRT-RTX: pip install -U tensorrt"
            )
        wrong = []
        for i in range(self.layers):
            for kind in KINDS:
                got = self.engine.get_aliased_input_tensor(f"present.{i}.{kind}")
                if got != f"past_key_values.{i}.{kind}":
                    wrong.append(f"present.{i}.{kind} aliases {got or 'no input'}")
        if wrong:
            raise TensorRTError(
                "the engine does not update the KV cache in place (TensorScatter must become TensorRT's "
                "KV-cache-update layer), so its present.* outputs cannot share the cache memory: "
                + "; ".join(wrong[:4]) + ("; …" if len(wrong) > 4 else "") + ". Rebuild with TensorRT >= 10.15"
            )

    def _allocate(self, cfg: dict) -> None:
        torch, engine = self._torch, self.engine
        dtypes = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                  "int64": torch.int64, "int32": torch.int32}  # fmt: skip
        dev, B, L = self.device, self.max_batch, self.max_seq_len
        # The engine writes logits [b, s, V] densely from the bound address: flat buffers, sized by the
        # largest batch x seq any profile accepts (at most the build's max_batch x max_seq_len).
        tokens = min(B * L, max(hi[0] * hi[1] for _, _, hi in self._profiles))
        sizes = {"input_ids": tokens, "position_ids": tokens, "write_indices": B}
        self._inputs = {n: torch.zeros(k, dtype=dtypes[self._dtypes[n]], device=dev) for n, k in sizes.items()}
        self._host_inputs = {n: torch.zeros(t.numel(), dtype=t.dtype, pin_memory=True)
                             for n, t in self._inputs.items()}  # fmt: skip
        self._logits = torch.zeros(tokens * self.vocab_size, dtype=dtypes[self._dtypes["logits"]], device=dev)
        self._host_logits = torch.zeros(B * self.vocab_size, dtype=torch.float32, pin_memory=True)  # decode readback
        shape = (B, cfg["num_key_value_heads"], L, cfg["head_dim"])
        cache_dtype = dtypes[self._dtypes["past_key_values.0.key"]]
        # Zeros, not garbage: masked slots still meet a 0 weight in P.V, and 0 x NaN would be NaN.
        self.cache = {(i, k): torch.zeros(shape, dtype=cache_dtype, device=dev)
                      for i in range(self.layers) for k in KINDS}  # fmt: skip
        self._scratch = torch.empty(max(engine.device_memory_size_v2, 256), dtype=torch.uint8, device=dev)
        self._addresses = {n: t.data_ptr() for n, t in self._inputs.items()}
        self._addresses["logits"] = self._logits.data_ptr()
        for (i, kind), buf in self.cache.items():
            self._addresses[f"past_key_values.{i}.{kind}"] = self._addresses[f"present.{i}.{kind}"] = buf.data_ptr()

    @property
    def row_bytes(self) -> int:
        """Bytes of one cache row [K, L, D] (every cache has the same shape and dtype)."""
        buf = self.cache[(0, "key")]
        return buf[0].numel() * buf.element_size()

    def _addresses_at(self, r0: int) -> dict[str, int]:
        """Every tensor address, the caches at row ``r0`` (row-major [max_batch, K, L, D]: row r0 is r0 rows in)."""
        offset = r0 * self.row_bytes
        cache = ("past_key_values.", "present.")
        return {n: a + offset if n.startswith(cache) else a for n, a in self._addresses.items()}

    # -- contexts ----------------------------------------------------------------------------

    def _new_context(self, profile: int, batch: int, seq: int | None, r0: int = 0):
        """A context on ``profile`` with every tensor address bound, the caches at row ``r0`` (and the
        shapes, when seq is given)."""
        ctx = self.engine.create_execution_context(self._trt.ExecutionContextAllocationStrategy.USER_MANAGED)
        if ctx is None:
            raise TensorRTError(f"TensorRT could not create an execution context.{_said(self._logger)}")
        ctx.set_device_memory(self._scratch.data_ptr(), self._scratch.numel())
        if profile:
            ctx.set_optimization_profile_async(profile, self.stream.cuda_stream)
        self._bind(ctx, self._addresses_at(r0))
        if seq is not None:
            self._set_shapes(ctx, batch, seq)
        return ctx

    def _bind(self, ctx, addresses: dict[str, int]) -> None:
        for name, address in addresses.items():
            if not ctx.set_tensor_address(name, address):
                raise TensorRTError(f"TensorRT refused the address of {name!r}.{_said(self._logger)}")

    def _prefill_context(self, profile: int, r0: int):
        """The profile's prefill context, its cache addresses moved to row ``r0`` when they point elsewhere."""
        if profile not in self._prefill:
            self._prefill[profile] = self._new_context(profile, 1, None, r0)
        elif self._prefill_rows[profile] != r0:
            cache = {n: a for n, a in self._addresses_at(r0).items() if n.startswith(("past_key_values.", "present."))}
            self._bind(self._prefill[profile], cache)
        self._prefill_rows[profile] = r0
        return self._prefill[profile]

    def _set_shapes(self, ctx, batch: int, seq: int) -> None:
        K, D = self.cache[(0, "key")].shape[1], self.cache[(0, "key")].shape[3]
        shapes = {"input_ids": (batch, seq), "position_ids": (batch, seq), "write_indices": (batch,)}
        shapes.update({f"past_key_values.{i}.{k}": (batch, K, self.max_seq_len, D) for i, k in self.cache})
        for name, shape in shapes.items():
            if not ctx.set_input_shape(name, shape):
                raise TensorRTError(f"TensorRT rejected shape {list(shape)} for {name!r}.{_said(self._logger)}")

    def _profile(self, batch: int, seq: int) -> int:
        p = choose_profile(self._profiles, batch, seq)
        if p is None:
            have = "; ".join(f"#{n}: batch {lo[0]}..{hi[0]}, seq {lo[1]}..{hi[1]}"
                             for n, (lo, _, hi) in enumerate(self._profiles))  # fmt: skip
            raise GenerationError(f"no optimization profile of the engine accepts input_ids [{batch}, {seq}] ({have})")
        return p

    def _enqueue(self, ctx) -> None:
        if not ctx.execute_async_v3(self.stream.cuda_stream):
            raise TensorRTError(f"TensorRT could not enqueue the step (execute_async_v3 failed).{_said(self._logger)}")

    def _capture(self, ctx, run: tuple[int, int]):
        """The decode step of ``ctx`` as a CUDA graph, or None (logged once) when it cannot be captured."""
        if self._graph_error is not None:
            return None
        torch, handle = self._torch, self.stream.cuda_stream
        capturable = getattr(ctx, "is_stream_capturable", None)  # TensorRT-RTX only
        if capturable is not None and not capturable(handle):
            return self._no_graphs("the context is not stream-capturable (RTX: build with REQUIRE_USER_ALLOCATION)")
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, stream=self.stream, capture_error_mode="thread_local"):
                if not ctx.execute_async_v3(handle):
                    raise RuntimeError(f"execute_async_v3 returned False under capture.{_said(self._logger)}")
        except Exception as exc:  # noqa: BLE001  any failure here only means: run without graphs
            return self._no_graphs(f"capturing the decode step of rows {run[0]}..{sum(run) - 1} failed: {exc}")
        return graph

    def _no_graphs(self, why: str) -> None:
        self._graph_error = why
        log.warning("TensorRT backend: decode runs without CUDA graphs: %s", why)
        return None

    # -- stepping ----------------------------------------------------------------------------

    def cache_address(self, layer: int, kind: str) -> int:
        return self.cache[(layer, kind)].data_ptr()

    def step(self, input_ids: np.ndarray, position_ids: np.ndarray, write_indices: np.ndarray) -> np.ndarray:
        return self.step_rows(0, input_ids, position_ids, write_indices)

    def step_rows(self, r0: int, input_ids: np.ndarray, position_ids: np.ndarray,
                  write_indices: np.ndarray) -> np.ndarray:  # fmt: skip
        """One step over the cache rows r0 .. r0+B-1 (B = len(input_ids)); other rows are not touched."""
        ids, pos, where = self._check_step(input_ids, position_ids, write_indices, r0)
        B, S = ids.shape
        profile = self._profile(B, S)
        torch = self._torch
        with torch.cuda.device(self.device), torch.cuda.stream(self.stream):
            self._stage({"input_ids": ids, "position_ids": pos, "write_indices": where})
            if S == 1:
                self._decode((r0, B), profile)
            else:
                ctx = self._prefill_context(profile, r0)
                self._set_shapes(ctx, B, S)
                self._enqueue(ctx)
            return self._read_logits(B, S)

    def _check_step(self, input_ids, position_ids, write_indices, r0: int = 0):
        ids, pos, where = (np.asarray(a) for a in (input_ids, position_ids, write_indices))
        if ids.ndim != 2 or pos.shape != ids.shape or where.shape != ids.shape[:1]:
            raise GenerationError(
                f"step expects input_ids and position_ids [batch, seq] and write_indices [batch]; got "
                f"{list(ids.shape)}, {list(pos.shape)}, {list(where.shape)}"
            )
        for name, a in (("input_ids", ids), ("position_ids", pos), ("write_indices", where)):
            if not np.issubdtype(a.dtype, np.integer):
                raise GenerationError(f"{name} must hold integers, got dtype {a.dtype}")
        B, S = ids.shape
        if not (1 <= B <= self.max_batch and 1 <= S <= self.max_seq_len):
            raise GenerationError(
                f"batch {B} x seq {S} is outside the build's 1..{self.max_batch} x 1..{self.max_seq_len}"
            )
        if not 0 <= r0 <= self.max_batch - B:
            raise GenerationError(f"rows {r0}..{r0 + B - 1} are outside the cache's rows 0..{self.max_batch - 1}")
        bad = ids[(ids < 0) | (ids >= self.vocab_size)]
        if bad.size:
            raise GenerationError(f"input_ids hold token id {bad[0]}, outside the vocabulary [0, {self.vocab_size})")
        if where.min() < 0 or where.max() + S > self.max_seq_len:
            b = int(np.argmax((where < 0) | (where + S > self.max_seq_len)))
            raise GenerationError(
                f"row {b} would write cache slots {where[b]}..{where[b] + S - 1}; slots are 0..{self.max_seq_len - 1}"
            )
        return ids, pos, where

    def _stage(self, arrays: dict[str, np.ndarray]) -> None:
        """Copy the step's inputs into the static device buffers (on the backend's stream)."""
        for name, a in arrays.items():
            n = a.size
            host = self._host_inputs[name][:n]
            host.numpy()[:] = a.reshape(-1)  # casts to the engine's integer type
            self._inputs[name][:n].copy_(host, non_blocking=True)

    def _decode(self, run: tuple[int, int], profile: int) -> None:
        dec = self._decoders.get(run)
        if dec is None:
            ctx = self._new_context(profile, run[1], 1, run[0])
            dec = self._decoders[run] = _Decoder(ctx)
            self._enqueue(ctx)  # this step's result, and TensorRT's lazy init before any capture
            if self.cuda_graphs:
                dec.graph = self._capture(ctx, run)  # capture records; it does not run the step again
        elif dec.graph is not None:
            dec.graph.replay()
        else:
            self._enqueue(dec.context)

    def _read_logits(self, batch: int, seq: int) -> np.ndarray:
        n = batch * seq * self.vocab_size
        out = self._logits[:n].float()  # no copy when the engine's logits are float32
        if n <= self._host_logits.numel():
            host = self._host_logits[:n]
            host.copy_(out, non_blocking=True)
            self.stream.synchronize()
            return host.numpy().reshape(batch, seq, self.vocab_size).copy()
        return out.cpu().numpy().reshape(batch, seq, self.vocab_size)

    def close(self) -> None:
        """Release graphs, contexts, engine and buffers now (in that order) rather than at collection."""
        self.stream.synchronize()
        self._decoders.clear()
        self._prefill.clear()
        self.engine = None
        self.cache, self._inputs, self._logits, self._scratch = {}, {}, None, None
