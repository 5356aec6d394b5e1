"""Artifact manifests: what produced a directory, what it holds, and proof it is intact.

Every stage writes ``manifest.json`` last; a later stage reads it with :func:`read_manifest`,
which refuses a different format version or stage, a manifest whose fields are not what the
stages rely on (:func:`check_fields`), and (optionally) files whose sha256 differs.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
from pathlib import Path
from typing import Any, Callable, NoReturn

from .config import ConfigError, MixtralConfig
from .fsutil import atomic_write_text, output_path_problem, overlap_problem

FORMAT = "mixtral-trt"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
STAGES = ("export", "optimize", "engine")
# The most tokens (batch x sequence) a build may be made for: TensorRT's dimensions are 32-bit.
MAX_DIM = 2**31 - 1
_CHUNK = 16 << 20
_SHA256 = re.compile(r"[0-9a-f]{64}")


class ManifestError(ValueError):
    """A manifest is missing, malformed, from another format version or stage, or its files do not
    match; or a directory holds what no manifest may list (a symbolic link)."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def tool_versions() -> dict[str, str]:
    """Versions of the packages that shape an artifact (those importable here)."""
    from importlib import metadata

    out = {"python": platform.python_version()}
    for dist in ("mixtral-trt", "torch", "onnx", "onnxscript", "onnxruntime", "transformers"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


def file_entry(path: Path, sha256: str | None = None) -> dict[str, Any]:
    return {"bytes": path.stat().st_size, "sha256": sha256 or sha256_file(path)}


def write_manifest(directory: Path, stage: str, body: dict[str, Any], hashes: dict[str, str] | None = None) -> dict:
    """Hash every file in ``directory`` (reusing ``hashes`` computed while writing) and write the manifest.

    A symbolic link is refused, not listed: its target could be repointed after hashing, and
    :func:`verify_files` refuses links, so the manifest would vouch for a directory it then rejects."""
    hashes = hashes or {}
    entries = [p for p in sorted(Path(directory).iterdir()) if p.name != MANIFEST and not p.name.startswith(".")]
    links = [p.name for p in entries if p.is_symlink()]
    if links:
        raise ManifestError(f"{directory} holds symbolic links {links}; an artifact lists regular files only. "
                            "Replace each link with the file it points to")  # fmt: skip
    files = {p.name: file_entry(p, hashes.get(p.name)) for p in entries if p.is_file()}
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "stage": stage, **body, "files": files}
    manifest.setdefault("tools", tool_versions())
    atomic_write_text(Path(directory) / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    return manifest


def read_manifest(directory: Path, stage: str | tuple[str, ...] | None = None, verify: bool = True) -> dict:
    """Load and check ``directory/manifest.json``; ``verify`` re-hashes every listed file."""
    manifest, path = _identify(Path(directory), stage)
    check_fields(manifest, str(path))
    if verify:
        verify_files(Path(directory), manifest)
    return manifest


def _identify(directory: Path, stage: str | tuple[str, ...] | None) -> tuple[dict, Path]:
    """The manifest, refused unless it is ours, of this format version and (given) of ``stage``."""
    path = directory / MANIFEST
    if not path.is_file():
        raise ManifestError(_no_manifest(directory))
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ManifestError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = f"format={manifest.get('format')!r}" if isinstance(manifest, dict) else "not a JSON object"
        raise ManifestError(f"{path} is not a {FORMAT} manifest ({found})")
    version = manifest.get("format_version")
    if not _is_int(version, 0) or version != FORMAT_VERSION:
        raise ManifestError(
            f"{path} has format_version={version!r}; this mixtral-trt reads "
            f"version {FORMAT_VERSION}. Re-run the stage that produced it with this version"
        )
    stages = (stage,) if isinstance(stage, str) else stage
    if stages and manifest.get("stage") not in stages:
        raise ManifestError(
            f"{path} is a {manifest.get('stage')!r} stage's output; this reads the output of {' or '.join(stages)}: "
            "give such a directory"
        )
    return manifest, path


def _no_manifest(directory: Path) -> str:
    """Why ``directory`` is not an artifact directory, and what to give instead."""
    if not directory.exists():
        return f"{directory} does not exist; give a directory written by mixtral-build (export, optimize, engine)"
    if not directory.is_dir():
        if (directory.parent / MANIFEST).is_file():
            return f"{directory} is a file; give the directory that holds it, {directory.parent}"
        return f"{directory} is a file, not an artifact directory; give a directory written by mixtral-build"
    if (directory / "config.json").is_file() and any(directory.glob("*.safetensors")):
        return (
            f"{directory} is a Hugging Face checkpoint, not a build: it has no {MANIFEST}. Build it first "
            f"(mixtral-build --model {directory}, or mixtral-build export --model {directory} --out DIR)"
        )
    return (
        f"{directory} has no {MANIFEST}: it is not a mixtral-trt artifact directory; give one written by "
        "mixtral-build (export, optimize, engine)"
    )


def verify_files(directory: Path, manifest: dict) -> None:
    """Check every listed file is a regular file of the directory (not a link: a link could be
    repointed after hashing) with the recorded size and sha256."""
    problems = []
    for name, entry in manifest.get("files", {}).items():
        path = directory / name
        if not plain_name(name):
            problems.append(f"{name!r}: not a plain file name in the directory (manifest corrupt or crafted)")
        elif path.is_symlink():
            problems.append(f"{name}: a symbolic link to {os.readlink(path)}; artifact files must be regular "
                            "files (replace the link with the file, or re-run the stage)")  # fmt: skip
        elif not path.exists():
            problems.append(f"{name}: missing")
        elif not path.is_file():
            problems.append(f"{name}: not a regular file")
        elif path.stat().st_size != entry["bytes"]:
            problems.append(f"{name}: {path.stat().st_size} bytes, manifest says {entry['bytes']}")
        elif sha256_file(path) != entry["sha256"]:
            problems.append(f"{name}: sha256 differs from the manifest (file modified or corrupt)")
    if problems:
        raise ManifestError(f"{directory} does not match its manifest:\n  " + "\n  ".join(problems))


def check_fields(manifest: dict, where: str) -> None:
    """Check, once when a manifest is read, the fields the stages and runtimes rely on, so that a
    hand-edited or damaged manifest is refused naming the field, never met later as a KeyError or
    TypeError; and that the I/O table is the one the config describes (a runtime sizes its KV cache
    from the config and binds it by the table's names). ``manifest["config"]`` gets its defaults."""
    f = _Fields(where)
    stage = f.get(manifest, "stage", f"one of {list(STAGES)}", lambda v: v in STAGES)
    raw = f.get(manifest, "config", "an object of model config fields", _is_object)
    try:
        cfg = MixtralConfig.from_dict(raw, source=f"{where}: config")
    except ConfigError as exc:
        message = str(exc) if str(exc).startswith(where) else f"{where}: {exc}"
        raise ManifestError(f"{message}; {_FIX}") from None
    manifest["config"] = cfg.to_dict()  # every field present (defaults filled in) for the readers
    files = f.get(manifest, "files", "an object {name: {bytes, sha256}}", _is_object)
    for name, entry in files.items():
        if not plain_name(name):
            f.refuse(f"files lists {name!r}: not a plain file name in the directory")
        f.check(f"files.{name}", "an object {bytes, sha256}", entry, _is_object)
        f.get(entry, "bytes", "an integer >= 0", lambda v: _is_int(v, 0), f"files.{name}.")
        f.get(entry, "sha256", "64 lower-case hex digits", _is_sha256, f"files.{name}.")
    _check_export(f, manifest, stage, cfg, files)
    _check_io(f, f.get(manifest, "io", "an object {inputs, outputs}", _is_object), cfg)
    for key in ("optimize", "engine", "tools"):
        f.get(manifest, key, "an object", _is_object, required=key == stage)
    if stage == "optimize":
        f.get(manifest["optimize"], "target", "a target name", _is_text, "optimize.")
        f.get(manifest["optimize"], "precision", "a precision name", _is_text, "optimize.", required=False)
    if stage == "engine":
        _check_engine(f, manifest["engine"], files)


_FIX = "the manifest is damaged or was edited: re-run the stage that wrote it"
_MISSING = object()


class _Fields:
    """Typed reads of manifest fields; a bad one is refused with its dotted path (``export.max_batch``)."""

    def __init__(self, where: str) -> None:
        self.where = where

    def refuse(self, what: str) -> NoReturn:
        raise ManifestError(f"{self.where}: {what}; {_FIX}")

    def get(self, obj: dict, key: str, expected: str, ok: Callable[[Any], Any], prefix: str = "",
            required: bool = True) -> Any:  # fmt: skip
        if key not in obj:
            if required:
                self.refuse(f"{prefix}{key} must be {expected}, it is missing")
            return None
        return self.check(prefix + key, expected, obj[key], ok)

    def check(self, field: str, expected: str, value: Any, ok: Callable[[Any], Any]) -> Any:
        if not ok(value):
            self.refuse(f"{field} must be {expected}, found {_shown(value)}")
        return value


def _check_export(f: _Fields, manifest: dict, stage: str, cfg: MixtralConfig, files: dict) -> None:
    export = f.get(manifest, "export", "an object {max_batch, max_seq_len, model_file, ...}", _is_object)
    f.get(export, "max_batch", "an integer >= 1", lambda v: _is_int(v, 1), "export.")
    f.get(export, "max_seq_len", f"an integer from 1 to config.max_position_embeddings={cfg.max_position_embeddings}",
          lambda v: _is_int(v, 1) and v <= cfg.max_position_embeddings, "export.")  # fmt: skip
    graph = stage != "engine"  # an engine build keeps the export's section, not its ONNX files
    f.get(export, "precision", "a precision name", _is_text, "export.", required=graph)
    for key in ("model_file", "data_file"):
        f.get(export, key, "a file name of the directory", plain_name, "export.", required=graph)
        if graph and export[key] not in files:
            f.refuse(f"export.{key}={export[key]!r} is not listed in files")


def _check_io(f: _Fields, io: dict, cfg: MixtralConfig) -> None:
    names: dict[str, dict] = {}
    for key in ("inputs", "outputs"):
        for n, entry in enumerate(f.get(io, key, "a list of {name, dtype, shape}", _is_list, "io.")):
            at = f"io.{key}[{n}]."
            f.check(at[:-1], "an object {name, dtype, shape}", entry, _is_object)
            name = f.get(entry, "name", "a tensor name", _is_text, at)
            f.get(entry, "dtype", "a dtype name", _is_text, at)
            f.get(entry, "shape", "a list of sizes (integers >= 0) and dim names", _is_shape, at)
            if name in names:
                f.refuse(f"io lists {name!r} twice")
            names[name] = entry
    wanted = {"input_ids", "position_ids", "write_indices", "logits", "past_key_values.0.key", "present.0.key"}
    missing = sorted(wanted - set(names))
    if missing:
        f.refuse(f"io lacks {missing} (every build has them)")
    layers = cfg.num_hidden_layers  # counted, not enumerated: a damaged count may be huge
    for prefix in ("past_key_values.", "present."):
        caches = [n for n in names if n.startswith(prefix)]
        slots = {_cache_slot(n, prefix) for n in caches} - {None}
        if len(slots) != len(caches) or len(caches) != 2 * layers or any(i >= layers for i, _ in slots):
            f.refuse(f"io lists {len(caches)} {prefix}* tensors; config.num_hidden_layers={layers} needs "
                     f"{prefix}<layer>.key and .value for each layer 0..{layers - 1}")  # fmt: skip
        for n in caches:
            shape = names[n]["shape"]
            if len(shape) != 4 or shape[1] != cfg.num_key_value_heads or shape[3] != cfg.head_dim:
                f.refuse(f"io {n!r} has shape {shape}; config gives [batch, num_key_value_heads="
                         f"{cfg.num_key_value_heads}, max_cache_len, head_dim={cfg.head_dim}]")  # fmt: skip
    logits = names["logits"]["shape"]
    if logits[-1:] != [cfg.vocab_size]:
        f.refuse(f"io 'logits' has shape {logits}; config gives [batch, seq, vocab_size={cfg.vocab_size}]")


def _check_engine(f: _Fields, engine: dict, files: dict) -> None:
    plan = f.get(engine, "plan_file", "a file name of the directory", plain_name, "engine.", required=False)
    if (plan or "model.plan") not in files:
        f.refuse(f"engine.plan_file={plan or 'model.plan'!r} is not listed in files")
    for key in ("target", "cache_dtype", "trt_version"):
        f.get(engine, key, "a string or null", lambda v: v is None or isinstance(v, str), "engine.", required=False)
    f.get(engine, "target_sms", "a list of names (sm_90)", lambda v: _is_list(v) and all(map(_is_text, v)), "engine.",
          required=False)  # fmt: skip
    f.get(engine, "profiles", "a list", _is_list, "engine.", required=False)
    for n, p in enumerate(f.get(engine, "plugins", "a list", _is_list, "engine.", required=False) or ()):
        at = f"engine.plugins[{n}]."
        f.check(at[:-1], "an object {name, version, namespace, library, ...}", p, _is_object)
        f.get(p, "name", "a plugin name", _is_text, at)
        for key in ("namespace", "sha256"):
            f.get(p, key, "a string or null", lambda v: v is None or isinstance(v, str), at, required=False)
        f.get(p, "library", "null, a file name of the directory or an absolute path", _is_library, at, required=False)
        f.get(p, "version", "a version (\"1\")", lambda v: _is_text(v) or _is_int(v, 0), at, required=False)
        # Imported by the runtime to register its creator: only our own plugin modules.
        f.get(p, "python", "null or a module of mixtral_trt.plugins", _is_plugin_module, at, required=False)


def _cache_slot(name: str, prefix: str) -> tuple[int, str] | None:
    """(layer, kind) of a cache tensor name such as past_key_values.3.value; None for another name."""
    layer, _, kind = name[len(prefix) :].partition(".")
    if kind not in ("key", "value") or not (layer.isascii() and layer.isdigit() and len(layer) < 10):
        return None
    if str(int(layer)) != layer:  # "03": not a name the exporter writes
        return None
    return int(layer), kind


def _is_object(v: Any) -> bool:
    return isinstance(v, dict)


def _is_list(v: Any) -> bool:
    return isinstance(v, list)


def _is_text(v: Any) -> bool:
    return isinstance(v, str) and v != ""


def _is_int(v: Any, minimum: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= minimum


def _is_shape(v: Any) -> bool:
    return isinstance(v, list) and all(_is_int(d, 0) or _is_text(d) for d in v)


def _is_sha256(v: Any) -> bool:
    return isinstance(v, str) and _SHA256.fullmatch(v) is not None


def _is_library(v: Any) -> bool:
    return v is None or plain_name(v) or (isinstance(v, str) and "\0" not in v and os.path.isabs(v))


def _is_plugin_module(v: Any) -> bool:
    return v is None or (isinstance(v, str) and (v == "mixtral_trt.plugins" or v.startswith("mixtral_trt.plugins.")))


def _shown(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def plain_name(name: Any) -> bool:
    """A file name of the directory itself: no separator, not '.' or '..', not absolute, encodable."""
    if not isinstance(name, str) or name in ("", ".", "..") or "\0" in name or Path(name).name != name:
        return False
    try:
        os.fsencode(name)
    except UnicodeError:  # a lone surrogate: no file can have this name
        return False
    return True


def is_artifact(directory: Path, stage: str | None = None) -> bool:
    """True when ``directory`` holds a manifest of ours (of ``stage`` when given), even a damaged one
    (a rerun of the stage may replace it); nothing is hashed."""
    try:
        _identify(Path(directory), stage)
    except ManifestError:
        return False
    return True


def check_output_dir(out_dir: Path, stage: str, error: type[Exception] = FileExistsError,
                     source: Path | None = None) -> None:  # fmt: skip
    """Refuse an output path holding anything but a previous artifact of ``stage`` (which may be replaced),
    or one that overlaps the stage's input directory ``source``."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise error(f"output path {out_dir} exists and is a file; choose a directory path")
    problem = (overlap_problem(source, out_dir) if source is not None else None) or output_path_problem(out_dir)
    if problem:
        raise error(problem)
    if out_dir.is_dir() and any(out_dir.iterdir()) and not is_artifact(out_dir, stage):
        raise error(
            f"output directory {out_dir} exists, is not empty and holds no previous {stage} output "
            f"({MANIFEST} with stage {stage!r}); refusing to overwrite it. Choose a new path or remove it"
        )
