"""Artifact manifests: what produced a directory, what it holds, and proof it is intact.

Every stage writes ``manifest.json`` last; a later stage reads it with :func:`read_manifest`,
which refuses a different format version or stage and (optionally) files whose sha256 differs.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from pathlib import Path
from typing import Any

from .fsutil import atomic_write_text, output_path_problem

FORMAT = "mixtral-trt"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
_CHUNK = 16 << 20


class ManifestError(ValueError):
    """A manifest is missing, from another format version or stage, or its files do not match."""


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
    """Hash every file in ``directory`` (reusing ``hashes`` computed while writing) and write the manifest."""
    hashes = hashes or {}
    files = {
        p.name: file_entry(p, hashes.get(p.name))
        for p in sorted(Path(directory).iterdir())
        if p.is_file() and p.name != MANIFEST and not p.name.startswith(".")
    }
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "stage": stage, **body, "files": files}
    manifest.setdefault("tools", tool_versions())
    atomic_write_text(Path(directory) / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    return manifest


def read_manifest(directory: Path, stage: str | tuple[str, ...] | None = None, verify: bool = True) -> dict:
    """Load and check ``directory/manifest.json``; ``verify`` re-hashes every listed file."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise ManifestError(f"{directory} has no {MANIFEST}: it is not a mixtral-trt artifact directory")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ManifestError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ManifestError(f"{path} is not a {FORMAT} manifest (format={manifest.get('format')!r})")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ManifestError(
            f"{path} has format_version={manifest.get('format_version')!r}; this mixtral-trt reads "
            f"version {FORMAT_VERSION}. Re-run the stage that produced it with this version"
        )
    stages = (stage,) if isinstance(stage, str) else stage
    if stages and manifest.get("stage") not in stages:
        raise ManifestError(f"{path} is a {manifest.get('stage')!r} artifact; expected one of {list(stages)}")
    if verify:
        verify_files(Path(directory), manifest)
    return manifest


def verify_files(directory: Path, manifest: dict) -> None:
    """Check every listed file is a regular file of the directory (not a link: a link could be
    repointed after hashing) with the recorded size and sha256."""
    problems = []
    for name, entry in manifest.get("files", {}).items():
        path = directory / name
        if not isinstance(name, str) or Path(name).name != name or name in (".", ".."):
            problems.append(f"{name!r}: not a plain file name in the directory (manifest corrupt or crafted)")
        elif path.is_symlink():
            problems.append(f"{name}: a symbolic link to {os.readlink(path)}; artifact files must be regular "
                            "files (replace the link with the file, or re-run the stage)")  # fmt: skip
        elif not path.is_file():
            problems.append(f"{name}: missing")
        elif path.stat().st_size != entry["bytes"]:
            problems.append(f"{name}: {path.stat().st_size} bytes, manifest says {entry['bytes']}")
        elif sha256_file(path) != entry["sha256"]:
            problems.append(f"{name}: sha256 differs from the manifest (file modified or corrupt)")
    if problems:
        raise ManifestError(f"{directory} does not match its manifest:\n  " + "\n  ".join(problems))


def is_artifact(directory: Path, stage: str | None = None) -> bool:
    """True when ``directory`` holds a manifest of ours (of ``stage`` when given); nothing is hashed."""
    try:
        read_manifest(directory, stage, verify=False)
    except ManifestError:
        return False
    return True


def check_output_dir(out_dir: Path, stage: str, error: type[Exception] = FileExistsError) -> None:
    """Refuse an output path holding anything but a previous artifact of ``stage`` (which may be replaced)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise error(f"output path {out_dir} exists and is a file; choose a directory path")
    problem = output_path_problem(out_dir)
    if problem:
        raise error(problem)
    if out_dir.is_dir() and any(out_dir.iterdir()) and not is_artifact(out_dir, stage):
        raise error(
            f"output directory {out_dir} exists, is not empty and holds no previous {stage} output "
            f"({MANIFEST} with stage {stage!r}); refusing to overwrite it. Choose a new path or remove it"
        )
