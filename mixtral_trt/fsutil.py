"""Atomic file and directory writes: a stage's output appears whole or not at all.

A directory output ``OUT`` is built in a sibling ``.OUT.partial-<owner>-<random>`` and renamed
into place; a previous ``OUT`` is first renamed to ``.OUT.old-<owner>``. ``<owner>`` is
``<pid>.<start time>`` of the writing process, so a later writer can tell the leftovers of a
process that was killed (gone, or its pid now reused by another process) from those of a live
one. Writers of one ``OUT`` take an exclusive ``flock`` on ``.OUT.lock`` beside it: the kernel
drops the lock when its holder dies, so a held lock always means a live writer.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

try:
    import fcntl
except ImportError:  # not POSIX: no locking (the renames stay atomic)
    fcntl = None

SCRATCH_KINDS = ("partial", "old", "precision")
_HELD: dict[tuple[int, str], int] = {}  # (pid, lock path) -> depth: a process may nest its own lock


class OutputBusyError(ValueError):
    """Another live process is writing the same output path."""


class OutputPathError(ValueError):
    """The output path cannot be written (a file where a directory must be, no write permission)."""


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces ``final`` in one rename.

    A previous ``final`` is moved aside first and deleted only after the new one is in place,
    so an interruption leaves either the old or the new directory, never a mixture. The output
    is locked while it is written; leftovers of dead writers of ``final`` are removed first.
    """
    final = Path(final)
    with output_lock(final):
        remove_stale(final)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-{owner_tag()}-", dir=final.parent))
        try:
            os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; give the usual permissions
            yield tmp
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        replace_dir(tmp, final)


def scratch_dir(final: Path, kind: str) -> Path:
    """A new sibling work directory of ``final`` named like the partials (``kind`` in SCRATCH_KINDS),
    so that :func:`remove_stale` removes it once its owner is dead. The caller deletes it."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{final.name}.{kind}-{owner_tag()}-", dir=final.parent))


def replace_dir(tmp: Path, final: Path) -> None:
    """Put directory ``tmp`` at ``final``; a previous ``final`` is moved aside first and deleted last."""
    old = None
    with _signals_deferred():  # Ctrl-C between the two renames would leave no `final` at all
        if final.exists():
            old = final.parent / f".{final.name}.old-{owner_tag()}"
            os.replace(final, old)
        os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Owners, stale leftovers, the output lock


def remove_stale(final: Path) -> list[Path]:
    """Remove the partial, old and scratch siblings of ``final`` whose writer is dead; returns them.

    A dead writer's ``.old-`` directory with no ``final`` beside it means the writer died between
    its two renames: that directory is the previous output and is put back instead.
    """
    final = Path(final)
    pattern = re.compile(rf"\.{re.escape(final.name)}\.({'|'.join(SCRATCH_KINDS)})-(\d+)\.(\d+)(?:-.*)?")
    try:
        names = sorted(os.listdir(final.parent))
    except FileNotFoundError:
        return []
    removed = []
    for name in names:
        match = pattern.fullmatch(name)
        if match is None or owner_alive(int(match[2]), int(match[3])):
            continue
        path = final.parent / name
        if match[1] == "old" and not os.path.lexists(final):
            os.replace(path, final)
        else:
            shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


@contextlib.contextmanager
def output_lock(final: Path) -> Iterator[None]:
    """Hold the exclusive lock on writing ``final`` (``.NAME.lock`` beside it); refuse with
    :class:`OutputBusyError` naming the holder's pid while another process holds it.
    Re-entrant within a process (a stage holds it throughout; its atomic_dir takes it again)."""
    final = Path(final)
    problem = output_path_problem(final)
    if problem:
        raise OutputPathError(problem)
    final.parent.mkdir(parents=True, exist_ok=True)
    path = final.parent.resolve() / f".{final.name}.lock"
    key = (os.getpid(), str(path))
    if fcntl is None or key in _HELD:
        _HELD[key] = _HELD.get(key, 0) + 1
        try:
            yield
        finally:
            _HELD[key] -= 1
        return
    fd = _acquire(path, final)
    _HELD[key] = 1
    try:
        yield
    finally:
        del _HELD[key]
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # while still locked: a waiter re-checks the inode and retries
        os.close(fd)


def _acquire(path: Path, final: Path) -> int:
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            os.close(fd)
            who = f" (pid {holder})" if holder.isdigit() else ""
            raise OutputBusyError(
                f"another mixtral-build process{who} is writing {final}; wait for it to finish or choose "
                "another output path"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        try:  # the previous holder may have unlinked this file between our open and flock
            current = os.stat(path)
        except FileNotFoundError:
            current = None
        mine = os.fstat(fd)
        if current is not None and (current.st_ino, current.st_dev) == (mine.st_ino, mine.st_dev):
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            return fd
        os.close(fd)


def owner_tag() -> str:
    """``<pid>.<start time>``: names a temporary path so a later run can tell whether its writer lives."""
    pid = os.getpid()
    return f"{pid}.{_start_time(pid) or 0}"


def _start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (Linux /proc); None when it is gone
    or a zombie (killed, not yet reaped), 0 where /proc is not available."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return None if Path("/proc/self/stat").exists() else 0
    except OSError:
        return 0
    fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "; comm may hold spaces
    return None if fields[0] in ("Z", "X") else int(fields[19])


def owner_alive(pid: int, start: int) -> bool:
    """Is the process that wrote ``<pid>.<start>`` still running (and not a reuse of its pid)?"""
    if pid == os.getpid():
        return start == (_start_time(pid) or 0)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    now = _start_time(pid)
    return now is not None and (now == start or 0 in (now, start))


def output_path_problem(path: Path) -> str | None:
    """Why ``path`` cannot become an output directory (None when it can): the nearest existing
    ancestor must be a directory we may write in."""
    path = Path(path)
    for parent in path.parents:
        if not os.path.lexists(parent):
            continue
        if not parent.is_dir():
            return f"output path {path}: {parent} is a file, not a directory; choose another output path"
        if not os.access(parent, os.W_OK | os.X_OK):
            return (f"output path {path}: cannot write in {parent} (read-only or no permission); choose another "
                    "output path")  # fmt: skip
        return None
    return None


def overlap_problem(source: Path, out: Path, replaced: bool = True) -> str | None:
    """Why ``out`` may not be written from ``source`` (None when it may): an output that is its
    source, or lies inside it, writes into the input; a source inside an output that is
    ``replaced`` as a whole (a stage's output, a model repository's models) would go with it."""
    src, dst = Path(source).resolve(), Path(out).resolve()
    if dst == src:
        return f"output path {out} is the input directory {source} itself; choose an output path outside it"
    if src in dst.parents:
        return f"output path {out} is inside the input directory {source}; choose an output path outside it"
    if replaced and dst in src.parents:
        return f"the input directory {source} is inside the output path {out}; choose an output path outside it"
    return None


def public_name(path: str | os.PathLike) -> Path:
    """The output a scratch or lock path belongs to (``D/.OUT.partial-1.2-x/f`` -> ``D/OUT/f``), for messages."""
    path = Path(path)
    pattern = re.compile(rf"\.(.+)\.(?:(?:{'|'.join(SCRATCH_KINDS)})-\d+\.\d+(?:-.*)?|lock)")
    parts = [m[1] if (m := pattern.fullmatch(p)) else p for p in path.parts]
    return Path(*parts) if parts else path


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold SIGINT and SIGTERM until the block is done (main thread of a POSIX process only)."""
    if not hasattr(signal, "pthread_sigmask") or threading.current_thread() is not threading.main_thread():
        yield
        return
    held = {signal.SIGINT, signal.SIGTERM}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
