"""Triton Inference Server model repository for a build.

:func:`write_repository` turns a build into one Python-backend model (layout ``executor``, the
default) that loads the build where it lies with ``mixtral_trt.runtime.load`` (ONNX Runtime for an
export, a canonical precision output or an ``optimize --target onnxruntime`` output; the runtime's
TensorRT backend for an engine build) and feeds every concurrent request into one
:class:`~mixtral_trt.runtime.Executor`: the KV cache stays resident in the model's process on its
device, and nothing of the build is copied or linked into the repository.

    REPO/<name>/config.pbtxt            backend python, decoupled; parameters build_dir, build_id, backend
    REPO/<name>/1/                      model.py, mixtral_build.json (+ plugin libraries of an engine)
    REPO/<name>/README.md               how to start tritonserver on this repository

Layout ``bls`` (engine builds only) keeps the engine in Triton's own TensorRT backend as a second
model, one forward step per BLS request, the cache explicit (the Python model sends
``past_key_values.*`` with every request and receives ``present.*`` back, see
:data:`mixtral_trt.triton_readme.KV_CACHE_DOC`); one request at a time per instance:

    REPO/<name>_engine/config.pbtxt     platform tensorrt_plan: one forward step
    REPO/<name>_engine/1/               model.plan (+ plugin libraries), mixtral_build.json
    REPO/<name>/1/                      model.py, build_manifest.json, tokenizer, mixtral_build.json
 Nothing here imports tritonclient, tensorrt or onnxruntime: configs are written
as text. ``mixtral_build.json`` names the build (the sha256 of its manifest.json) in every version
directory; the text model refuses to load beside an engine model of another build. The
repository changes as a whole as far as the filesystem allows (:mod:`mixtral_trt.triton_swap`);
other models in ``REPO`` are never touched.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

from . import triton_swap
from .fsutil import atomic_write_text, overlap_problem
from .manifest import MANIFEST, ManifestError, read_manifest, sha256_file
from .runtime.backends.triton_bls import BUILD_FILE
from .triton_readme import PLUGIN_LIBRARY, readme  # noqa: F401 - PLUGIN_LIBRARY: public name
from .triton_swap import VERSION
LAYOUTS = ("executor", "bls")
MARKER = "# Written by mixtral-trt"  # first line of every config.pbtxt we write: ours to replace
MODEL_PY = Path(__file__).parent / "triton_model" / "model.py"
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json")
_TYPES = {"int64": "TYPE_INT64", "int32": "TYPE_INT32", "float32": "TYPE_FP32", "float16": "TYPE_FP16",
          "bfloat16": "TYPE_BF16", "bool": "TYPE_BOOL", "int8": "TYPE_INT8", "uint8": "TYPE_UINT8"}  # fmt: skip
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_NAME_MAX = 128

class TritonRepositoryError(ValueError):
    """The build cannot become a Triton model repository, or the repository path is not ours to write."""


@dataclasses.dataclass(frozen=True)
class _Build:
    """What write_repository needs from a build directory (validated, nothing written yet)."""

    directory: Path
    manifest: dict
    platform: str  # "tensorrt_plan" (engine + text model) | "onnxruntime" (one in-process text model)
    model_files: tuple[tuple[Path, str], ...]  # (source, name in the engine's version directory)
    plugin_libraries: tuple[tuple[Path, str], ...]  # (source, name beside the engine)
    plugins_without_library: tuple[str, ...]
    tokenizer: Path
    build_id: str  # sha256 of the build's manifest.json


# ---------------------------------------------------------------------------------------------
# Reading the build


def inspect_build(build_dir: str | Path, verify: bool = True, layout: str = "executor") -> _Build:
    """Validate ``build_dir`` as a build servable in ``layout``; raise :class:`TritonRepositoryError` or
    ManifestError."""
    if layout not in LAYOUTS:
        raise TritonRepositoryError(f"layout {layout!r}: choose one of {', '.join(LAYOUTS)}")
    build_dir = Path(build_dir).resolve()
    manifest = read_manifest(build_dir, ("export", "optimize", "engine"), verify=verify)
    stage = manifest["stage"]
    target = manifest.get("optimize", {}).get("target")
    if stage == "optimize" and target not in ("canonical", "onnxruntime"):
        raise TritonRepositoryError(
            f"{build_dir} is an optimize output for target {target!r}; serve an export, a canonical precision "
            "output, an `optimize --target onnxruntime` output or an `mixtral-build engine` output"
        )
    _check_io(build_dir, manifest)
    build_id = sha256_file(build_dir / MANIFEST)
    tokenizer = next((build_dir / n for n in TOKENIZER_FILES if (build_dir / n).is_file()), None)
    if tokenizer is None:
        raise TritonRepositoryError(
            f"{build_dir} has neither tokenizer.model nor tokenizer.json; the text model needs one. "
            "Copy the checkpoint's tokenizer into the build directory"
        )
    if stage == "engine":
        return _engine_build(build_dir, manifest, tokenizer, build_id, layout)
    if layout == "bls":
        raise TritonRepositoryError(
            f"{build_dir} runs on ONNX Runtime; layout 'bls' is for engine builds (a tensorrt_plan model). "
            "Use the default layout 'executor'"
        )
    files = [manifest["export"].get("model_file", "model.onnx"), manifest["export"].get("data_file")]
    missing = [n for n in files if n and not (build_dir / n).is_file()]
    if missing:
        raise TritonRepositoryError(f"{build_dir} has no ONNX model: {', '.join(missing)} missing; rebuild it")
    return _Build(build_dir, manifest, "onnxruntime", (), (), (), tokenizer, build_id)


def _engine_build(build_dir: Path, manifest: dict, tokenizer: Path, build_id: str, layout: str) -> _Build:
    from mixtral_trt.runtime.backends.tensorrt import engine_spec

    spec = engine_spec(build_dir, manifest)  # plan present, plugins named, target known
    if layout == "bls":
        _check_bls_engine(build_dir, manifest, spec)
    libraries, bare = [], []
    for p in spec.plugins:
        if not p.get("library"):
            bare.append(f"{p['name']} v{p.get('version', '1')} (namespace {p.get('namespace', '')!r})")
            continue
        path = Path(p["library"]) if Path(p["library"]).is_absolute() else build_dir / p["library"]
        if not path.is_file():
            raise TritonRepositoryError(f"plugin {p['name']}: library {path} (manifest engine.plugins) is missing")
        if p.get("sha256") and sha256_file(path) != p["sha256"]:
            raise TritonRepositoryError(
                f"plugin {p['name']}: {path} has sha256 {sha256_file(path)[:12]}…, the engine was built against "
                f"{p['sha256'][:12]}…; rebuild the engine or restore the library it was built with"
            )
        libraries.append((path, path.name))
    return _Build(build_dir, manifest, "tensorrt_plan", ((spec.plan, "model.plan"),), tuple(libraries),
                  tuple(bare), tokenizer, build_id)  # fmt: skip


def _check_bls_engine(build_dir: Path, manifest: dict, spec) -> None:
    """An engine in Triton's own TensorRT backend: a datacenter TensorRT plan that writes present.* itself."""
    if spec.target == "tensorrt_rtx":
        raise TritonRepositoryError(
            f"{build_dir} holds a TensorRT-RTX engine; Triton's tensorrt_plan platform (layout 'bls') runs "
            "datacenter TensorRT engines only. Serve it with the default layout 'executor' (the runtime runs it "
            "in the Python model), or build one with `mixtral-build engine --target tensorrt` on the serving GPU"
        )
    if manifest["engine"].get("cache_update", "inplace") != "copy":
        raise TritonRepositoryError(
            f"{build_dir} holds an engine whose present.* outputs alias its past_key_values.* inputs (TensorRT's "
            "in-place KV-cache update); Triton's TensorRT backend gives every output its own buffer, so the cache "
            "would not be updated. Serve it with the default layout 'executor' (the runtime binds both to one "
            "address), or rebuild it for layout 'bls' with `mixtral-build engine SRC --cache-update copy`"
        )


def _check_io(build_dir: Path, manifest: dict) -> None:
    io = manifest.get("io")
    if not isinstance(io, dict) or not io.get("inputs") or not io.get("outputs"):
        raise TritonRepositoryError(f"{build_dir}/{MANIFEST} has no io table (io.inputs / io.outputs); rebuild it")
    names = {e["name"]: e for e in (*io["inputs"], *io["outputs"])}
    missing = [n for n in ("input_ids", "position_ids", "write_indices", "logits") if n not in names]
    for e in io["inputs"]:
        if e["name"].startswith("past_key_values."):
            present = names.get("present." + e["name"].removeprefix("past_key_values."))
            if present is None or present["dtype"] != e["dtype"]:
                missing.append("present." + e["name"].removeprefix("past_key_values.") + f" ({e['dtype']})")
    if missing:
        raise TritonRepositoryError(f"{build_dir}: the io table lacks {', '.join(missing)}; not a mixtral-trt graph")


# ---------------------------------------------------------------------------------------------
# config.pbtxt


def triton_dims(entry: dict, max_seq_len: int, batched: bool) -> tuple[list[int], list[int] | None]:
    """Triton ``dims`` (and ``reshape`` shape, or None) of one io-table entry.

    The batch dim is Triton's when ``batched``; symbolic dims become -1, except the cache length,
    which is the build's max_seq_len. A batch-only tensor is ``dims [1]`` reshaped to ``[]``
    (Triton refuses empty dims).
    """
    shape = list(entry["shape"])
    if batched:
        if not shape or shape[0] not in ("batch", -1):
            raise TritonRepositoryError(f"{entry['name']}: first dim {shape[:1]} is not the batch dim")
        shape = shape[1:]
    is_cache = entry["name"].startswith(("past_key_values.", "present."))
    dims = [d if isinstance(d, int) and d >= 0 else
            max_seq_len if d == "max_cache_len" or (is_cache and n == (1 if batched else 2)) else -1
            for n, d in enumerate(shape)]  # fmt: skip
    return ([1], []) if not dims else (dims, None)


def _tensor(name: str, dtype: str, dims: list[int], reshape: list[int] | None = None, optional: bool = False) -> str:
    fields = [f'name: "{name}"', f"data_type: {dtype}", f"dims: {_list(dims)}"]
    if reshape is not None:
        fields.append(f"reshape: {{ shape: {_list(reshape)} }}")
    if optional:
        fields.append("optional: true")
    return "  { " + " ".join(fields) + " }"


def _list(values: list[int]) -> str:
    return f"[ {', '.join(map(str, values))} ]" if values else "[ ]"


def _block(key: str, tensors: list[str]) -> str:
    return f"{key} [\n" + ",\n".join(tensors) + "\n]"


def _header(build: _Build) -> str:
    from mixtral_trt import __version__

    return f"{MARKER} {__version__} from {build.directory} (stage {build.manifest['stage']}); regenerate, don't edit.\n"


def engine_config(build: _Build, name: str) -> str:
    """config.pbtxt of the engine model: the graph's I/O table in Triton's terms."""
    max_batch, max_seq = int(build.manifest["export"]["max_batch"]), int(build.manifest["export"]["max_seq_len"])
    blocks = {}
    for key in ("inputs", "outputs"):
        tensors = []
        for e in build.manifest["io"][key]:
            if e["dtype"] not in _TYPES:
                raise TritonRepositoryError(f"{e['name']}: dtype {e['dtype']!r} has no Triton type")
            tensors.append(_tensor(e["name"], _TYPES[e["dtype"]], *triton_dims(e, max_seq, batched=True)))
        blocks[key] = _block(key[:-1], tensors)
    kind = " kind: KIND_GPU"
    return (
        f'{_header(build)}name: "{name}"\nplatform: "{build.platform}"\nmax_batch_size: {max_batch}\n'
        f"{blocks['inputs']}\n{blocks['outputs']}\n"
        "# Steps of the same seq length from several text-model instances may run as one batch.\n"
        "dynamic_batching { }\n"
        f"instance_group [ {{ count: 1{kind} }} ]\n"
    )


def text_model_config(build: _Build, name: str, engine_name: str, instances: int, verify: bool = True,
                      layout: str = "executor") -> str:  # fmt: skip
    """config.pbtxt of the decoupled Python model (text in, streamed text out): loading the build in its
    own process (layout executor), or over the engine model through BLS (layout bls)."""
    optional = (("max_tokens", "TYPE_INT32"), ("temperature", "TYPE_FP32"), ("top_p", "TYPE_FP32"),
                ("top_k", "TYPE_INT32"), ("seed", "TYPE_INT64"), ("stream", "TYPE_BOOL"))  # fmt: skip
    inputs = [_tensor("text_input", "TYPE_STRING", [1])] + [_tensor(n, t, [1], optional=True) for n, t in optional]
    outputs = [_tensor("text_output", "TYPE_STRING", [-1]), _tensor("output_ids", "TYPE_INT64", [-1])]
    engine = build.platform == "tensorrt_plan"
    if layout == "bls":
        params, kind = {"engine_model": engine_name, "cache_memory": "gpu"}, "KIND_CPU"
    else:  # the build stays where it is; the model checks at load that it is still the same build
        params = {"build_dir": str(build.directory), "build_id": build.build_id, "verify": str(verify).lower(),
                  "backend": "tensorrt" if engine else "onnxruntime"}  # fmt: skip
        if build.plugin_libraries:  # shipped in the version directory, loaded before the engine
            params["plugin_libraries"] = ";".join(n for _, n in build.plugin_libraries)
        kind = "KIND_GPU" if engine else "KIND_CPU"  # an engine's instance runs on the GPU Triton gives it
    return (
        f'{_header(build)}name: "{name}"\nbackend: "python"\nmax_batch_size: 0\n'
        "model_transaction_policy { decoupled: true }\n"
        f"{_block('input', inputs)}\n{_block('output', outputs)}\n"
        f"instance_group [ {{ count: {instances} kind: {kind} }} ]\n"
        + "".join(f'parameters {{ key: "{k}" value: {{ string_value: "{_quoted(v)}" }} }}\n' for k, v in params.items())
    )


def _quoted(value: str) -> str:
    """A protobuf text-format string body (a build path may hold quotes or backslashes)."""
    return value.replace("\\", "\\\\").replace('"', '\\"')


# ---------------------------------------------------------------------------------------------
# Writing


def serve_command(repo: Path, build: _Build, name: str, layout: str = "executor") -> str:
    """The tritonserver command line for this repository (layout bls: plugins through the TensorRT backend)."""
    line = f"tritonserver --model-repository={repo}"
    if build.plugin_libraries and layout == "bls":
        paths = ";".join(str(repo / f"{name}_engine" / VERSION / n) for _, n in build.plugin_libraries)
        line += f' --backend-config=tensorrt,plugins="{paths}"'
    return line


def write_repository(build_dir: str | Path, repo: str | Path, name: str = "mixtral", instances: int = 1,
                     plugin_libraries: list[str | Path] = (), verify: bool = True,
                     say: Callable[[str], None] | None = None, layout: str = "executor") -> Path:  # fmt: skip
    """Write the models of ``build_dir`` into the Triton model repository ``repo``; return ``repo``.

    ``build_dir`` may be the main job's OUT (the engine if it can be served in ``layout``, else
    the ONNX Runtime directory). Layout ``executor`` gives ``<name>`` alone, which loads the build
    from where it lies (keep it there) and serves every request through one executor; layout
    ``bls`` (engines) gives ``<name>_engine`` and ``<name>``.
    ``plugin_libraries``: C++ plugin libraries to ship with an engine whose manifest names none
    (engines built with the Python plugin creator), e.g. ``libmixtral_trt_plugins.so``.
    Models already in ``repo`` stay untouched; a previous output of ours under the same names is
    replaced as a whole, or left as it was if this fails. Nothing is written when the build
    cannot be served.
    """
    if not _NAME.match(name) or name.isdigit():
        raise TritonRepositoryError(f"model name {name!r}: use letters, digits, '_', '-', '.' (not only digits)")
    if len(name) > _NAME_MAX:  # NAME_engine and its staging names must stay valid file names
        raise TritonRepositoryError(f"model name of {len(name)} characters; use at most {_NAME_MAX}")
    if instances < 1:
        raise TritonRepositoryError(f"instances={instances} must be >= 1")
    if layout not in LAYOUTS:
        raise TritonRepositoryError(f"layout {layout!r}: choose one of {', '.join(LAYOUTS)}")
    repo = Path(repo).resolve()
    if repo.exists() and not repo.is_dir():
        raise TritonRepositoryError(f"model repository {repo} exists and is not a directory")
    build_dir = resolve(build_dir, layout)[0]
    problem = overlap_problem(build_dir, repo)  # Triton would take a build inside the repository for a model
    if problem:
        raise TritonRepositoryError(problem)
    build = _with_libraries(inspect_build(build_dir, verify=verify, layout=layout), plugin_libraries)
    engine_name = f"{name}_engine"
    for model in (engine_name, name):
        _check_ours(repo / model)
    text = (text_model_config(build, name, engine_name, instances, verify, layout), _text_files(build, layout), _copy)
    if layout == "bls":
        models = {engine_name: (engine_config(build, engine_name), _engine_files(build), _link_or_copy), name: text}
    else:
        models = {name: text}
    retired = [repo / engine_name] if engine_name not in models and (repo / engine_name).exists() else []
    new_dirs = [d for d in (repo, *(repo / m for m in models)) if not d.exists()]
    repo.mkdir(parents=True, exist_ok=True)
    for model in (engine_name, name):
        triton_swap.remove_leftovers(repo / model)  # of runs that were killed
    _apply(repo, models, retired, new_dirs)
    command = serve_command(repo, build, name, layout)
    atomic_write_text(repo / name / "README.md", readme(build, repo, name, command, layout))
    if say is not None:
        say(f"Triton model repository: {repo} (models {', '.join(models)})")
        say(f"start it:  {command}")
    return repo


def _apply(repo: Path, models: dict, retired: list[Path], new_dirs: list[Path]) -> None:
    """Stage every version, then swap them in (engine first) and retire models of ours the new layout
    lacks; on any failure undo the swaps, so the previous repository stays."""
    staged, change = [], triton_swap.Change()
    try:
        for model, (_, files, copy) in models.items():
            staged.append(triton_swap.stage_version(repo / model, files, copy))
        for (model, (config, _, _)), stage in zip(models.items(), staged):
            _swap_in(change, repo / model, config, stage)
        for model_dir in retired:
            change.retire(model_dir)
    except BaseException:
        change.rollback()
        for path in staged:
            shutil.rmtree(path, ignore_errors=True)
        for path in reversed(new_dirs):  # directories this call created and left empty
            with contextlib.suppress(OSError):
                path.rmdir()
        raise
    change.commit()


def _swap_in(change: triton_swap.Change, model_dir: Path, config: str, stage: Path) -> None:
    """One model's config and version (a seam for tests that interrupt between two models)."""
    change.swap(model_dir, config, stage)


def resolve(build_dir: str | Path, layout: str = "executor") -> tuple[Path, str | None]:
    """The build to serve for ``build_dir`` (a build, or the main job's OUT) and a line saying which."""
    from .pipeline import resolve_build

    def servable(directory: Path) -> str | None:
        try:
            inspect_build(directory, verify=False, layout=layout)
        except (TritonRepositoryError, ManifestError) as exc:
            return str(exc).split(";")[0]
        return None

    return resolve_build(build_dir, "any", accept=servable)


def _with_libraries(build: _Build, paths: list[str | Path]) -> _Build:
    if not paths:
        return build
    if build.platform != "tensorrt_plan":
        raise TritonRepositoryError("plugin libraries go with TensorRT engines; this build runs on ONNX Runtime")
    extra = []
    for path in map(Path, paths):
        if not path.is_file():
            raise TritonRepositoryError(f"plugin library {path} does not exist")
        if ";" in path.name:  # the config parameter plugin_libraries is a ';'-separated list of names
            raise TritonRepositoryError(f"plugin library {path}: rename it without ';'")
        if path.name in {n for _, n in (*build.plugin_libraries, *extra)} or path.name == "model.plan":
            raise TritonRepositoryError(f"plugin library {path}: a file named {path.name} is already shipped")
        extra.append((path.resolve(), path.name))
    return dataclasses.replace(build, plugin_libraries=(*build.plugin_libraries, *extra), plugins_without_library=())


def _check_ours(model_dir: Path) -> None:
    if not model_dir.exists():
        return
    config = model_dir / "config.pbtxt"
    ours = config.is_file() and config.read_text(errors="replace").startswith(MARKER)
    if not ours and (not model_dir.is_dir() or any(model_dir.iterdir())):
        raise TritonRepositoryError(
            f"{model_dir} exists and was not written by mixtral-trt (no '{MARKER}' config.pbtxt); "
            "refusing to replace another model. Choose another --name or remove it"
        )


def _build_record(build: _Build) -> str:
    """mixtral_build.json: which build a version directory belongs to (compared by the text model)."""
    return json.dumps({"build_id": build.build_id, "build_dir": str(build.directory),
                       "stage": build.manifest["stage"]}, indent=2) + "\n"  # fmt: skip


def _engine_files(build: _Build) -> list[tuple[Path | str, str]]:
    return [*build.model_files, *build.plugin_libraries, (_build_record(build), BUILD_FILE)]


def _text_files(build: _Build, layout: str = "executor") -> list[tuple[Path | str, str]]:
    record = (_build_record(build), BUILD_FILE)
    if layout == "executor":  # loads the build itself: tokenizer, weights and plan stay there
        return [(MODEL_PY, "model.py"), record, *build.plugin_libraries]
    manifest = json.dumps(build.manifest, indent=2) + "\n"
    return [(MODEL_PY, "model.py"), (build.tokenizer, build.tokenizer.name), (manifest, "build_manifest.json"), record]


def _link_or_copy(src: Path, dst: Path) -> None:
    """Hard-link an engine's files (the plan is tens of GB and not ONNX, so no loader refuses a linked
    one; builds replace files by rename, never in place), else copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _copy(src: Path, dst: Path) -> None:
    """The text model's small files are copied."""
    shutil.copy2(src, dst)


# ---------------------------------------------------------------------------------------------
# Command line


def triton_command():
    """``mixtral-build triton``: a click command to add with ``main.add_command``."""
    import click

    from .pipeline import PipelineError

    @click.command("triton")
    @click.argument("build_dir", type=click.Path(path_type=Path))
    @click.option("--out", "--repo", "repo", required=True, type=click.Path(path_type=Path),
                  help="Triton model repository (created if missing; other models in it are left alone).")
    @click.option("--name", default="mixtral", show_default=True,
                  help="Text model name; the engine model is NAME_engine.")
    @click.option("--instances", type=click.IntRange(min=1), default=1, show_default=True,
                  help="Instances of the text model: processes, each with its own executor, weights and KV cache.")
    @click.option("--layout", type=click.Choice(LAYOUTS), default="executor", show_default=True,
                  help="executor: one model that loads the build and batches every request in flight; bls: "
                       "an engine in Triton's TensorRT backend stepped through BLS (needs --cache-update copy).")
    @click.option("--plugin-library", "plugin_libraries", multiple=True, type=click.Path(path_type=Path),
                  help="C++ TensorRT plugin library to ship with the engine (libmixtral_trt_plugins.so); repeatable.")
    @click.option("--no-verify", is_flag=True,
                  help="Skip re-hashing the build's files against its manifest (now, and when Triton loads it).")
    def triton(build_dir, repo, name, instances, layout, plugin_libraries, no_verify):  # fmt: skip
        """Write a Triton Inference Server model repository for an engine or ONNX Runtime build.

        BUILD_DIR is a build or the main job's OUT (its engine if it can be served, else its ONNX
        Runtime directory). The default layout gives one model NAME (Python backend, decoupled) that
        loads the build in its process from where it lies (ONNX Runtime, or the engine through the
        runtime's TensorRT backend; nothing copied, keep it there) and runs every concurrent request in
        one in-flight batch. --layout bls gives an engine two models: NAME_engine (tensorrt_plan, one
        forward step) and NAME (steps it through BLS, one request at a time). Prints the tritonserver
        command line; REPO/NAME/README.md says the same and how to call it.
        """
        try:
            build_dir, why = resolve(build_dir, layout)
            if why:
                click.echo(why, err=True)
            write_repository(build_dir, repo, name=name, instances=instances, plugin_libraries=list(plugin_libraries),
                             verify=not no_verify, say=click.echo, layout=layout)  # fmt: skip
        except (TritonRepositoryError, ManifestError, PipelineError) as exc:
            raise click.ClickException(str(exc)) from None

    return triton
