"""Checks on the files an ``.onnx`` graph points at, made before any runtime or parser opens them.

An initializer stored outside the graph names a ``location`` (relative to the graph's
directory), an ``offset`` and a ``length``. ONNX Runtime and TensorRT follow that location
wherever it leads, so a crafted or damaged graph could make them read a file outside the
build (``../x``, ``/etc/...``, a symbolic link) or past the end of its data file. Every
location must name a regular file (not a symbolic link) inside the graph's directory, and the
tensor's bytes must lie inside that file.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path, PurePosixPath, PureWindowsPath

_FIX = "re-export the model, or restore the data file the graph was written with"


class ExternalDataError(ValueError):
    """An ``.onnx`` graph's external data points outside its directory, at a link, or past a file's end."""


def check_external_data(model_path: str | Path, model=None) -> None:
    """Refuse ``model_path`` (an ``onnx.ModelProto`` already loaded without its weights may be given)
    when any external tensor breaks a rule; the error names the tensor, the location and the rule."""
    import onnx

    model_path = Path(model_path)
    if model is None:
        model = onnx.load(str(model_path), load_external_data=False)
    root = model_path.parent.resolve()
    sizes: dict[str, int] = {}
    for tensor in _tensors(model.graph):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in tensor.external_data}
        where = f"{model_path}: tensor {tensor.name!r} external data location {info.get('location')!r}"
        location = info.get("location", "")
        if location not in sizes:
            sizes[location] = _file_size(root, location, where)
        _check_range(tensor, info, sizes[location], where)


def _tensors(graph) -> Iterator:
    """Every TensorProto of ``graph``: initializers, tensor attributes, and those of subgraphs."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from _tensors(attr.g)
            for sub in attr.graphs:
                yield from _tensors(sub)


def _file_size(root: Path, location: str, where: str) -> int:
    """The size of the data file ``location`` names, once it is known to be a regular file inside ``root``."""
    if not location:
        raise ExternalDataError(f"{where}: the location is empty; {_FIX}")
    windows = PureWindowsPath(location)
    if PurePosixPath(location).is_absolute() or windows.is_absolute() or windows.drive:
        raise ExternalDataError(f"{where} is an absolute path; locations must be relative to the graph's directory "
                                f"{root}; {_FIX}")  # fmt: skip
    parts = PurePosixPath(location.replace("\\", "/")).parts
    if ".." in parts:
        raise ExternalDataError(f"{where} contains '..'; locations must stay inside the graph's directory {root}; "
                                f"{_FIX}")  # fmt: skip
    path = root
    for part in parts:  # no component may be a link: a link can point anywhere
        path = path / part
        if path.is_symlink():
            raise ExternalDataError(f"{where}: {path} is a symbolic link; external data must be a regular file inside "
                                    f"{root}. Replace the link with the file itself")  # fmt: skip
    if not path.resolve().is_relative_to(root):
        raise ExternalDataError(f"{where} resolves to {path.resolve()}, outside {root}; {_FIX}")
    try:
        st = os.stat(path, follow_symlinks=False)
    except OSError as exc:
        raise ExternalDataError(f"{where}: {path} cannot be read ({exc.strerror}); {_FIX}") from None
    if not stat.S_ISREG(st.st_mode):
        raise ExternalDataError(f"{where}: {path} is not a regular file; {_FIX}")
    return st.st_size


def _check_range(tensor, info: dict[str, str], size: int, where: str) -> None:
    """``offset`` and ``length`` are non-negative integers and the tensor's bytes end inside the file."""
    values = {}
    for key in ("offset", "length"):
        text = info.get(key)
        try:
            values[key] = None if text is None else int(text)
        except ValueError:
            values[key] = -1
        if values[key] is not None and values[key] < 0:
            raise ExternalDataError(f"{where}: {key}={text!r} is not a non-negative integer; {_FIX}")
    offset = values["offset"] or 0
    length = values["length"] if values["length"] is not None else _nbytes(tensor)
    if length is None:
        length = max(size - offset, 0)
    if offset + length > size:
        raise ExternalDataError(
            f"{where}: offset {offset} + length {length} = {offset + length} is beyond the end of the file "
            f"({size} bytes; truncated or replaced?); {_FIX}"
        )


def _nbytes(tensor) -> int | None:
    """Bytes of a tensor of a whole-byte numeric type; None for strings and packed sub-byte types."""
    import math

    import numpy as np
    from onnx import TensorProto, helper

    packed = {getattr(TensorProto, n, None) for n in ("INT4", "UINT4", "FLOAT4E2M1", "INT2", "UINT2")}
    if tensor.data_type in packed or tensor.data_type == TensorProto.STRING:
        return None
    try:
        itemsize = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
    except (KeyError, TypeError, ValueError):
        return None
    return math.prod(tensor.dims) * itemsize
