"""Changing a Triton model repository as a whole, as far as the filesystem allows.

A repository change (one or two models of ours, their configs, perhaps a model of ours that the
new layout no longer has) is staged completely first: every version directory is written to a
hidden ``.partial-<pid>-*`` directory inside its model directory (Triton skips non-numeric names
there). Then each version is swapped in (an atomic exchange where Linux has renameat2, else two
renames) and each config written; the previous versions are kept aside (``.old-<pid>-*``) until
every swap has succeeded, and put back if any step fails, so an exception leaves the previous
repository. Only a process killed between two swaps can leave a mixed pair on disk; the text
model refuses to load one (both build ids named) and the next run removes what a dead run left.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import shutil
import tempfile
from pathlib import Path

from .fsutil import atomic_write_text, owner_alive, owner_tag

VERSION = "1"
_LEFTOVER = re.compile(r"^\.(?:partial|old)-(\d+)\.(\d+)-")


def stage_version(model_dir: Path, files, copy) -> Path:
    """A hidden directory inside ``model_dir`` holding a whole version. ``files``: (source, name) with
    source a Path (placed with ``copy(src, dst)``) or a str (the file's text)."""
    model_dir.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".partial-{owner_tag()}-", dir=model_dir))
    os.chmod(stage, 0o755)
    try:
        for source, dest in files:
            if isinstance(source, str):
                (stage / dest).write_text(source)
            else:
                copy(source, stage / dest)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return stage


def remove_leftovers(model_dir: Path) -> list[Path]:
    """Remove staging and old-version directories of runs whose process is gone; return them."""
    removed = []
    if not model_dir.is_dir():
        return removed
    for path in model_dir.iterdir():
        match = _LEFTOVER.match(path.name)
        if match and path.is_dir() and not owner_alive(int(match[1]), int(match[2])):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


class Change:
    """Swaps and retirements done in order, undone in reverse on failure, finished by :meth:`commit`."""

    def __init__(self) -> None:
        self._undo: list = []  # callables, newest last
        self._finish: list[Path] = []  # removed on commit (previous versions, retired models)

    def swap(self, model_dir: Path, config: str, stage: Path) -> None:
        """Write ``config`` (if changed) and put ``stage`` at ``model_dir/1``."""
        config_path = model_dir / "config.pbtxt"
        old_config = config_path.read_text() if config_path.is_file() else None
        if old_config != config:
            atomic_write_text(config_path, config)  # an unchanged config would still make a server reload
            self._undo.append(lambda: _restore(config_path, old_config))
        final = model_dir / VERSION
        if not final.exists():
            os.rename(stage, final)
            self._undo.append(lambda: os.rename(final, stage))
        elif _exchange(stage, final):
            self._undo.append(lambda: _exchange(stage, final))
            self._finish.append(stage)  # now holds the previous version
        else:  # no atomic exchange: a moment without the version, never a half-written one
            old = model_dir / f".old-{owner_tag()}-{VERSION}"
            os.rename(final, old)
            self._undo.append(lambda: os.rename(old, final))
            os.rename(stage, final)
            self._undo.append(lambda: os.rename(final, stage))
            self._finish.append(old)

    def retire(self, model_dir: Path) -> None:
        """Take a model of ours out of the repository (its version first, so Triton unloads it)."""
        final, old = model_dir / VERSION, model_dir / f".old-{owner_tag()}-retired"
        if final.exists():
            os.rename(final, old)
            self._undo.append(lambda: os.rename(old, final))
        self._finish.append(model_dir)

    def rollback(self) -> None:
        for undo in reversed(self._undo):
            with contextlib.suppress(OSError):
                undo()
        self._undo.clear()

    def commit(self) -> None:
        for path in self._finish:
            shutil.rmtree(path, ignore_errors=True)
        self._undo.clear()


def _restore(path: Path, text: str | None) -> None:
    if text is None:
        path.unlink(missing_ok=True)
    else:
        atomic_write_text(path, text)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE); False where the OS has none."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0
