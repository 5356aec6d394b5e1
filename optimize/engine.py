"""Engine stage: a canonical (or precision-converted) ONNX directory → ``model.plan`` + manifest.

Steps: read the source manifest and re-hash its files; check the graph's external-data
locations (:mod:`mixtral_trt.onnx_files`); load the graph without its weights; lower it for TensorRT
(:mod:`.trt_lowering`: MoETop2 → ``MixtralMoETop2`` plugin node, cache length pinned); register
the Python plugin creator; parse with TensorRT's ONNX parser (weights come from the source
directory's external data); mark attention layers decomposable; add two optimization profiles
(prefill: batch 1..B × seq 1..S; decode: batch 1..B × seq 1; the cache length is static);
build a strongly typed network (precision is the graph's: TensorRT 11 and TensorRT-RTX have
no FP16/INT8 builder flags); write the plan and a manifest of stage ``engine``.

TensorRT-RTX builds ahead of time for listed compute capabilities (default SM89 and SM120),
with or without a GPU; datacenter TensorRT builds for the GPU of the machine it runs on.
The ``engine`` manifest section is what :mod:`mixtral_trt.runtime.backends.tensorrt` reads.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import sys
import time
from collections import Counter
from pathlib import Path

from mixtral_trt.fsutil import atomic_dir, atomic_write_bytes, output_lock
from mixtral_trt.manifest import MAX_DIM, check_output_dir, read_manifest, tool_versions, write_manifest
from mixtral_trt.onnx_files import check_external_data

from . import trt_compat
from .trt_lowering import count_plugin_nodes, lower_for_tensorrt

PLAN_FILE = "model.plan"
SOURCE_STAGES = ("export", "optimize")
PREFILL_OPT_SEQ = 128
_CHUNK = 16 << 20
_DTYPE_NAMES = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "INT64": "int64", "INT32": "int32",
                "INT8": "int8", "UINT8": "uint8", "BOOL": "bool", "FP8": "float8e4m3fn"}  # fmt: skip


class EngineBuildError(ValueError):
    """The engine cannot be built: bad source, bad limits or target, or TensorRT failed (its words included)."""


@dataclasses.dataclass
class ParsedNetwork:
    """A parsed TensorRT network and everything that must outlive it until the build."""

    trt: trt_compat.TensorRT
    builder: object
    network: object
    parser: object  # owns the weights' memory: keep it alive as long as the network
    manifest: dict
    max_seq_len: int
    moe_nodes: int
    attention_layers: int
    cache_update: str = "inplace"

    def io(self) -> dict[str, list[dict]]:
        return network_io(self.network, self.manifest["io"])

    def layers(self) -> dict[str, int]:
        return inspect_network(self.network)


# ---------------------------------------------------------------------------------------------
# Source, limits, targets


def _source(src_dir: Path, verify: bool = True) -> tuple[dict, Path]:
    """The source manifest (every file re-hashed when ``verify``: a plan built from altered weights
    would carry a manifest of its own that verifies clean) and its graph, checked before TensorRT reads it."""
    manifest = read_manifest(src_dir, SOURCE_STAGES, verify=verify)
    if manifest["stage"] == "optimize":
        target = manifest.get("optimize", {}).get("target")
        if target != "canonical":
            raise EngineBuildError(
                f"{src_dir} is an optimize output for target {target!r}; engines are built from an export "
                "directory or a canonical precision conversion (optimize.target 'canonical')"
            )
    info = {**manifest.get("export", {}), **manifest.get("optimize", {})}
    model = src_dir / info.get("model_file", "model.onnx")
    if not model.is_file():
        raise EngineBuildError(f"{model} is missing (named by {src_dir}/manifest.json)")
    check_external_data(model)
    return manifest, model


def _limits(manifest: dict, max_batch: int | None, max_seq_len: int | None) -> tuple[int, int]:
    exported = int(manifest["export"]["max_seq_len"])
    batch = int(manifest["export"]["max_batch"]) if max_batch is None else max_batch
    seq = exported if max_seq_len is None else max_seq_len
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise EngineBuildError(f"max_batch={max_batch!r}; expected an integer >= 1")
    if isinstance(seq, bool) or not isinstance(seq, int) or not 2 <= seq <= exported:
        raise EngineBuildError(
            f"max_seq_len={max_seq_len!r}; expected 2..{exported} (the export's max_seq_len: its RoPE tables "
            "have that many rows; re-export with a larger --max-seq-len for longer sequences)"
        )
    if batch * seq > MAX_DIM:  # a prefill's batch x sequence tokens form one dimension of the MoE plugin
        raise EngineBuildError(
            f"max_batch={batch} x max_seq_len={seq} = {batch * seq} tokens in one prefill; TensorRT's dimensions "
            f"are 32-bit: at most {MAX_DIM}. Give a smaller --max-batch or --max-seq-len"
        )
    return batch, seq


def normalize_sms(sms) -> list[str]:
    """'89', 'sm_89', 'SM89', '8.9' → '89'."""
    out = []
    for sm in sms:
        text = str(sm).strip().lower().removeprefix("sm_").removeprefix("sm").replace(".", "")
        if not text.isdigit():
            raise EngineBuildError(f"target SM {sm!r} is not a compute capability like '89' or '120'")
        out.append(text)
    return list(dict.fromkeys(out))


def check_target_sms(trt: trt_compat.TensorRT, sms) -> list[str]:
    if trt.is_rtx:
        chosen = normalize_sms(sms) if sms is not None else list(trt_compat.RTX_DEFAULT_SMS)
        bad = [sm for sm in chosen if sm not in trt.aot_sms()]
        if bad or not chosen:
            raise EngineBuildError(
                f"TensorRT-RTX {trt.version} cannot build for SM {', '.join(bad) or '(none given)'}; supported: "
                f"{', '.join(trt.aot_sms())} (it has no SM90/SM100 target: build for H100/B200 with datacenter "
                "TensorRT, --target tensorrt)"
            )
        return chosen
    if sms is not None:
        raise EngineBuildError(
            f"--sm {','.join(map(str, sms))}: datacenter TensorRT builds for the GPU of this machine; ahead-of-time "
            "SM lists are a TensorRT-RTX feature (--target tensorrt-rtx)"
        )
    return _current_gpu_sms()


def _current_gpu_sms() -> list[str]:
    try:
        import torch

        if torch.cuda.is_available():
            return ["%d%d" % torch.cuda.get_device_capability()]
    except ImportError:
        pass
    return []


# ---------------------------------------------------------------------------------------------
# Parsing and inspection


def parse(src_dir: str | Path, *, target: str | None = None, max_seq_len: int | None = None,
          max_batch: int | None = None, cache_update: str = "inplace",
          verify: bool = True) -> ParsedNetwork:  # fmt: skip
    """Lower ``src_dir``'s graph and parse it into a TensorRT network (no build); ``verify`` as in :func:`build`."""
    src_dir = Path(src_dir)
    manifest, model_path = _source(src_dir, verify)
    _, seq = _limits(manifest, max_batch, max_seq_len)
    trt = trt_compat.load(target)
    return _parse(trt, manifest, model_path, seq, cache_update)


def _parse(
    trt: trt_compat.TensorRT, manifest: dict, model_path: Path, max_seq_len: int, cache_update: str = "inplace"
) -> ParsedNetwork:
    import onnx

    from mixtral_trt.plugins import moe_plugin

    lowered = lower_for_tensorrt(onnx.load(str(model_path), load_external_data=False), max_seq_len, cache_update)
    trt_compat.ensure_rtx_unversioned_library(trt)  # before the parser meets a plugin node
    moe_plugin.register(trt.module)
    T, logger = trt.module, trt.logger()
    logger.take_errors()
    moe_plugin.take_errors()
    builder = T.Builder(logger)
    network = builder.create_network(trt.network_flags())
    parser = T.OnnxParser(network, logger)
    # The path locates the external data. TensorRT-RTX 1.7's parser maps it rather than reading it:
    # during a build the weights count as file-backed (reclaimable) pages, not anonymous memory.
    with trt_compat.interruptible():
        ok = parser.parse(lowered.SerializeToString(), str(model_path))
    problems = [_parser_error(parser.get_error(i), trt.module) for i in range(parser.num_errors)]
    problems += [f"plugin: {e}" for e in moe_plugin.take_errors()]
    if not ok or problems:
        problems += [f"TensorRT: {e}" for e in logger.take_errors()]
        detail = "\n  ".join(problems or ["(no detail)"])
        raise EngineBuildError(f"TensorRT's ONNX parser rejected {model_path}:\n  {detail}")
    moe_nodes = count_plugin_nodes(lowered)
    layers = inspect_network(network)
    if layers.get("PLUGIN_V3", 0) != moe_nodes:
        raise EngineBuildError(
            f"the network has {layers.get('PLUGIN_V3', 0)} IPluginV3 layers for {moe_nodes} MixtralMoETop2 nodes: "
            "some MoE node was not imported as the plugin"
        )
    attention = set_attention_decomposable(trt.module, network)
    _check_io_contract(network, manifest, model_path)
    return ParsedNetwork(trt, builder, network, parser, manifest, max_seq_len, moe_nodes, attention, cache_update)


def _check_io_contract(network, manifest: dict, model_path: Path) -> None:
    """The network's I/O must be the manifest's (names, kinds, dtypes; fixed dims equal)."""
    from mixtral_trt.runtime.backends.tensorrt import compare_io, io_entries

    problems = compare_io(io_entries(manifest["io"]), io_entries(network_io(network, manifest["io"])))
    if problems:
        raise EngineBuildError(
            f"the TensorRT network of {model_path} does not match the I/O table of its manifest:\n  "
            + "\n  ".join(problems)
        )


def _parser_error(e, module) -> str:
    name = getattr(e, "node_name", lambda: "?")()  # node_name/node_operator: TensorRT >= 10.x
    op = getattr(e, "node_operator", lambda: "?")()
    where = f"node {e.node()} ({name}, op {op})" if e.node() >= 0 else "model"
    text = f"{where}: {e.desc()} [{e.code().name}]"
    if "Plugin not found" in e.desc():
        from mixtral_trt.plugins import moe_plugin as P

        have = [f"{n} version {v} namespace {ns!r}" for n, v, ns in P.registered(module)] or ["none"]
        text += (
            f"; the node asks for plugin {op} version {P.PLUGIN_VERSION} namespace "
            f"{P.PLUGIN_NAMESPACE!r}; registered under that name: {', '.join(have)}"
        )
    return text


def _downcast(module, layer):
    """Python sees ``get_layer``'s result as ILayer; the concrete class is chosen by its type."""
    cls = {"ATTENTION_INPUT": "IAttentionInputLayer", "ATTENTION_OUTPUT": "IAttentionOutputLayer"}.get(layer.type.name)
    if cls and hasattr(module, cls):
        layer.__class__ = getattr(module, cls)
    return layer


def set_attention_decomposable(module, network) -> int:
    """Let TensorRT decompose every IAttention it cannot give a fused kernel (fp32, small head dims);
    returns how many attention blocks were marked."""
    marked = set()
    for i in range(network.num_layers):
        layer = _downcast(module, network.get_layer(i))
        attention = getattr(layer, "attention", None)
        if attention is not None and attention.name not in marked:
            attention.decomposable = True
            marked.add(attention.name)
    return len(marked)


def inspect_network(network) -> dict[str, int]:
    """Layer counts by TensorRT layer type (PLUGIN_V3, KV_CACHE_UPDATE, ATTENTION_INPUT, ...)."""
    counts = Counter(network.get_layer(i).type.name for i in range(network.num_layers))
    return dict(sorted(counts.items()))


def dtype_name(trt_dtype) -> str:
    return _DTYPE_NAMES.get(trt_dtype.name, trt_dtype.name.lower())


def network_io(network, manifest_io: dict) -> dict[str, list[dict]]:
    """The network's I/O tensors as an io table; a dynamic (-1) dim takes the manifest's name for it."""
    names = {e["name"]: e["shape"] for key in ("inputs", "outputs") for e in manifest_io.get(key, [])}

    def entry(tensor) -> dict:
        dims = list(tensor.shape)
        symbolic = names.get(tensor.name, [])
        shape = []
        for k, d in enumerate(dims):
            if d >= 0:
                shape.append(int(d))
            elif k < len(symbolic) and isinstance(symbolic[k], str):
                shape.append(symbolic[k])
            else:
                raise EngineBuildError(f"{tensor.name!r}: dim {k} is dynamic in the network, unnamed in the manifest")
        return {"name": tensor.name, "dtype": dtype_name(tensor.dtype), "shape": shape}

    return {
        "inputs": [entry(network.get_input(i)) for i in range(network.num_inputs)],
        "outputs": [entry(network.get_output(i)) for i in range(network.num_outputs)],
    }


# ---------------------------------------------------------------------------------------------
# Profiles, timing cache, build


def profile_ranges(max_batch: int, max_seq_len: int) -> list[dict]:
    """(min, opt, max) of the dynamic dims per optimization profile: prefill, then decode."""
    opt_seq = min(PREFILL_OPT_SEQ, max_seq_len)
    return [
        {"name": "prefill", "batch": [1, max_batch, max_batch], "seq": [1, opt_seq, max_seq_len]},
        {"name": "decode", "batch": [1, max_batch, max_batch], "seq": [1, 1, 1]},
    ]


def _add_profiles(parsed: ParsedNetwork, config, ranges: list[dict]) -> None:
    io = parsed.io()
    for spec in ranges:
        profile = parsed.builder.create_optimization_profile()
        for entry in io["inputs"]:
            shapes = []
            for k in range(3):  # min, opt, max
                dims = []
                for d in entry["shape"]:
                    if isinstance(d, int):
                        dims.append(d)
                    elif d in spec:
                        dims.append(spec[d][k])
                    else:
                        raise EngineBuildError(f"input {entry['name']!r}: no profile range for dynamic dim {d!r}")
                shapes.append(dims)
            profile.set_shape(entry["name"], *shapes)
        if config.add_optimization_profile(profile) < 0:
            raise EngineBuildError(f"TensorRT refused the {spec['name']} optimization profile {spec}")


def default_timing_cache(out_dir: Path, trt: trt_compat.TensorRT) -> Path:
    """Shared by the builds next to ``out_dir`` with the same TensorRT (caches are version-specific)."""
    return Path(out_dir).resolve().parent / f"timing-{trt.flavour}-{trt.version}.cache"


def _check_timing_cache(trt: trt_compat.TensorRT, path: str | Path | None) -> None:
    """Before the build, not after it: a cache TensorRT-RTX would ignore, or a path that cannot be written."""
    if path is None:
        return
    if trt.is_rtx:
        raise EngineBuildError(
            f"--timing-cache {path}: TensorRT-RTX keeps no timing cache; drop the option, or build with "
            "datacenter TensorRT (--target tensorrt)"
        )
    if Path(path).exists() and not Path(path).is_file():
        raise EngineBuildError(f"--timing-cache {path} is not a file; give a file path (created if missing)")


def _load_timing_cache(config, path: Path | None):
    data = path.read_bytes() if path is not None and path.is_file() else b""
    try:
        cache = config.create_timing_cache(data)
    except (RuntimeError, TypeError, ValueError):
        cache = None
    if cache is None and data:  # unreadable (other version, corrupt): start afresh
        print(f"timing cache {path} is not usable by this TensorRT; starting a new one", file=sys.stderr)
        cache = config.create_timing_cache(b"")
    if cache is None or not config.set_timing_cache(cache, False):
        raise EngineBuildError(f"TensorRT refused the timing cache {path}")
    return cache


def build(
    src_dir: str | Path,
    out_dir: str | Path,
    *,
    target: str | None = None,
    sms: list[str] | None = None,
    max_batch: int | None = None,
    max_seq_len: int | None = None,
    timing_cache: str | Path | None = None,
    cache_update: str = "inplace",
    progress: bool = True,
    verify: bool = True,
) -> Path:
    """Build ``out_dir/model.plan`` (+ tokenizer files, manifest.json) from an export or canonical
    optimize directory. ``out_dir`` appears whole or not at all; a previous engine there is replaced.

    ``target``: 'tensorrt' | 'tensorrt-rtx' | None (datacenter TensorRT if importable, else RTX).
    ``sms``: TensorRT-RTX ahead-of-time targets (default ['89', '120']). ``max_batch`` /
    ``max_seq_len``: default the export's; the cache length is pinned to ``max_seq_len``.
    ``timing_cache``: datacenter TensorRT only (TensorRT-RTX's timing-cache calls are no-ops);
    default a file next to ``out_dir`` shared by builds with the same TensorRT version.
    ``cache_update``: 'inplace' (TensorRT's KV-cache-update layer: ``present.*`` aliases
    ``past_key_values.*``, as our runtimes bind them) or 'copy' (``present.*`` is a new tensor,
    for servers that give every output its own buffer, such as Triton's TensorRT backend).
    ``verify``: re-hash every source file against its manifest first (``False`` skips only that;
    the graph's external-data locations are always checked).
    """
    started = time.perf_counter()
    src_dir, out_dir = Path(src_dir), Path(out_dir)
    manifest, model_path = _source(src_dir, verify)
    batch, seq = _limits(manifest, max_batch, max_seq_len)
    check_output_dir(out_dir, "engine", EngineBuildError, source=src_dir)
    try:
        trt = trt_compat.load(target)
    except ValueError as exc:
        raise EngineBuildError(str(exc)) from None
    target_sms = check_target_sms(trt, sms)
    _check_timing_cache(trt, timing_cache)

    with output_lock(out_dir):  # held for the whole stage: a second writer is refused at once
        _say(progress, f"parsing {model_path} with {trt.flavour} {trt.version}")
        parsed = _parse(trt, manifest, model_path, seq, cache_update)
        config = parsed.builder.create_builder_config()
        ranges = profile_ranges(batch, seq)
        _add_profiles(parsed, config, ranges)
        cache_path = cache = None
        if trt.is_rtx:
            trt.set_target_sms(config, target_sms)  # RTX: no timing cache (its timing-cache calls are no-ops)
        else:
            cache_path = Path(timing_cache) if timing_cache is not None else default_timing_cache(out_dir, trt)
            cache = _load_timing_cache(config, cache_path)
        _say(progress, f"building for {', '.join('SM' + s for s in target_sms) or 'this GPU'} "
                       f"(batch <= {batch}, seq <= {seq}, {parsed.moe_nodes} MoE plugin layers)")  # fmt: skip
        built = time.perf_counter()
        with atomic_dir(out_dir) as tmp:
            plan_file = _PlanFile(tmp / PLAN_FILE)
            try:
                _build_plan(parsed, config, plan_file)
                build_seconds = time.perf_counter() - built
                sha = plan_file.finish()
            finally:
                plan_file.close()
            if cache is not None:
                atomic_write_bytes(cache_path, bytes(cache.serialize()))
            body = _manifest_body(parsed, manifest, src_dir, batch, seq, ranges, target_sms, cache_path, build_seconds)
            _link_side_files(src_dir, tmp, model_path, parsed)
            write_manifest(tmp, "engine", body, {PLAN_FILE: sha})
        _say(progress, f"wrote {out_dir} ({plan_file.size / 1e6:.1f} MB plan, build {build_seconds:.1f} s, "
                       f"total {time.perf_counter() - started:.1f} s)")  # fmt: skip
    return out_dir


class _PlanFile:
    """model.plan, written as TensorRT serializes it and hashed on the way (the plan is never
    held whole in memory when the builder can stream: the engine's weights are its bulk)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._f = open(path, "wb")
        self._sha = hashlib.sha256()
        self.size = 0

    def write(self, data) -> None:
        try:
            self._f.write(data)
        except OSError as exc:  # a failed write() names no file: name it for the message
            raise OSError(exc.errno, exc.strerror, str(self.path)) from exc
        self._sha.update(data)
        self.size += len(data)

    def finish(self) -> str:
        """Flush to disk; returns the sha256."""
        self._f.flush()
        os.fsync(self._f.fileno())
        return self._sha.hexdigest()

    def close(self) -> None:
        self._f.close()


def _build_plan(parsed: ParsedNetwork, config, plan_file: _PlanFile) -> None:
    """Build and serialize into ``plan_file``: streamed through an IStreamWriter where the builder
    has ``build_serialized_network_to_stream`` (TensorRT >= 10.9, TensorRT-RTX), else the whole
    serialized plan, written in chunks."""
    from mixtral_trt.plugins import moe_plugin

    module, builder = parsed.trt.module, parsed.builder

    def failed() -> EngineBuildError:
        said = [f"plugin: {e}" for e in moe_plugin.take_errors()] + parsed.trt.logger().take_errors()
        return EngineBuildError("TensorRT could not build the engine:\n  " + "\n  ".join(said or ["(no detail)"]))

    with trt_compat.interruptible() as interrupt:
        monitor = trt_compat.cancelling_monitor(module, interrupt)
        if monitor is not None:
            config.progress_monitor = monitor
        if hasattr(builder, "build_serialized_network_to_stream") and hasattr(module, "IStreamWriter"):
            writer = _stream_writer(module, plan_file, interrupt)
            ok = builder.build_serialized_network_to_stream(parsed.network, config, writer)
            if writer.error is not None:  # a failed write (disk full...) is the cause, whatever TensorRT says
                raise writer.error
            if not ok:
                raise failed()
            return
        plan = builder.build_serialized_network(parsed.network, config)
    if plan is None:
        raise failed()
    view = memoryview(plan).cast("B")
    for start in range(0, len(view), _CHUNK):
        plan_file.write(view[start : start + _CHUNK])


def _stream_writer(module, plan_file: _PlanFile, interrupt: trt_compat.Interrupt):
    """An IStreamWriter that appends to ``plan_file``. An exception must not cross back into
    TensorRT: it is kept (and re-raised after the build) and the write reports 0 bytes, which makes
    TensorRT abandon the build; so does a pending Ctrl-C."""

    class Writer(module.IStreamWriter):
        def __init__(self) -> None:
            module.IStreamWriter.__init__(self)
            self.error: BaseException | None = None

        def write(self, data) -> int:
            if self.error is not None or interrupt.pending:
                return 0
            try:
                plan_file.write(data)
            except BaseException as exc:  # noqa: BLE001 - kept and re-raised by _build_plan
                self.error = exc
                return 0
            return len(data)

    return Writer()


def _link_side_files(src_dir: Path, dst: Path, model_path: Path, parsed: ParsedNetwork) -> None:
    """Tokenizer and config files come along (copies: they are small); the graph and its weights do not."""
    skip = {model_path.name, "manifest.json"} | _external_files(model_path)
    for path in src_dir.iterdir():
        if path.is_file() and path.name not in skip and not path.name.startswith(".") and path.suffix != ".onnx":
            shutil.copyfile(path, dst / path.name)


def _external_files(model_path: Path) -> set[str]:
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    return {
        kv.value
        for t in model.graph.initializer
        if t.data_location == onnx.TensorProto.EXTERNAL
        for kv in t.external_data
        if kv.key == "location"
    }


def _manifest_body(parsed: ParsedNetwork, src: dict, src_dir: Path, batch: int, seq: int, ranges: list[dict],
                   target_sms: list[str], cache_path: Path | None, build_seconds: float) -> dict:  # fmt: skip
    from mixtral_trt.plugins import moe_plugin as P

    trt = parsed.trt
    io = parsed.io()
    cache_dtype = next(e["dtype"] for e in io["inputs"] if e["name"].startswith("past_key_values."))
    precision = src.get("optimize", {}).get("precision") or src["export"].get("precision", "fp32")
    body = {
        "config": src["config"],
        "export": {**src["export"], "max_batch": batch, "max_seq_len": seq},
        "io": io,
        "source": {"directory": str(src_dir.resolve()), "stage": src["stage"]},
        "engine": {
            "plan_file": PLAN_FILE,
            "target": trt.manifest_target,
            "trt_version": trt.version,
            "cache_dtype": cache_dtype,
            "cache_update": parsed.cache_update,
            "precision": precision,
            "target_sms": [f"sm_{s}" for s in target_sms],
            "strongly_typed": True,
            "profiles": ranges,
            "plugins": [{"name": P.PLUGIN_NAME, "version": P.PLUGIN_VERSION, "namespace": P.PLUGIN_NAMESPACE,
                         "library": None, "sha256": None, "python": P.__name__}],  # fmt: skip
            "attention_decomposable": parsed.attention_layers > 0,
            "layers": parsed.layers(),
            "timing_cache": str(cache_path) if cache_path else None,
            "build_seconds": round(build_seconds, 3),
        },
        "tools": {**tool_versions(), trt.module.__name__: trt.version},
    }
    if "optimize" in src:
        body["optimize"] = src["optimize"]
    return body


def _say(enabled: bool, message: str) -> None:
    if enabled:
        print(message, file=sys.stderr)
