"""One small adapter over the two nvinfer Python flavours: datacenter TensorRT and TensorRT-RTX.

Both share the network, builder and ONNX parser API; they differ in module name, in how the
target GPU is chosen (TensorRT-RTX builds ahead of time for listed compute capabilities, even
without a GPU; datacenter TensorRT builds for the GPU it runs on) and in one packaging trap
(TensorRT-RTX's parser ``dlopen``s the unversioned ``libtensorrt_rtx.so`` when it imports a
plugin node and aborts the process when only ``libtensorrt_rtx.so.1`` is installed).

Nothing here imports TensorRT at module import time: :func:`load` does, and says what to
install when the package is missing.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import importlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)

# flavour -> (module, what to install). Flavour names are the ones users type; the manifest's
# ``engine.target`` uses the runtime backend's spelling (MANIFEST_TARGETS).
FLAVOURS = {
    "tensorrt": ("tensorrt", "pip install tensorrt-cu13"),
    "tensorrt-rtx": ("tensorrt_rtx_bindings", "pip install tensorrt-rtx-cu13-libs tensorrt-rtx-cu13-bindings"),
}
MANIFEST_TARGETS = {"tensorrt": "tensorrt", "tensorrt-rtx": "tensorrt_rtx"}
MIN_TENSORRT_MAJOR = 10
RTX_DEFAULT_SMS = ("89", "120")

_LOGGERS: dict[str, object] = {}  # module name -> logger: TensorRT keeps the first logger a process registers
# Warnings TensorRT repeats for every such input of a healthy model: logged at INFO (shown with --verbose).
_ROUTINE_WARNINGS = ("has Int64 binding.",)


class TensorRTUnavailable(ImportError):
    """The requested nvinfer package is not installed (or too old); the message says what to install."""


def normalize_target(target: str | None) -> str | None:
    """'tensorrt' | 'tensorrt-rtx' (also accepted: the manifest's 'tensorrt_rtx') | None."""
    if target is None:
        return None
    name = target.replace("_", "-").lower()
    if name not in FLAVOURS:
        raise ValueError(f"target={target!r} is not one of {list(FLAVOURS)}")
    return name


@dataclasses.dataclass(frozen=True)
class TensorRT:
    """An imported nvinfer module and what the builder needs to know about it."""

    module: object
    flavour: str  # "tensorrt" | "tensorrt-rtx"
    version: str

    @property
    def manifest_target(self) -> str:
        return MANIFEST_TARGETS[self.flavour]

    @property
    def major(self) -> int:
        return int(self.version.split(".")[0])

    @property
    def is_rtx(self) -> bool:
        return self.flavour == "tensorrt-rtx"

    def aot_sms(self) -> tuple[str, ...]:
        """Compute capabilities this TensorRT-RTX builds for ahead of time ('75', '89', '120', ...),
        read from its ``ComputeCapability`` enum; () for datacenter TensorRT (it builds for this GPU)."""
        enum = getattr(self.module, "ComputeCapability", None)
        if not self.is_rtx or enum is None:
            return ()
        return tuple(name[2:] for name in enum.__members__ if name.startswith("SM") and name[2:].isdigit())

    def set_target_sms(self, config, sms: list[str] | tuple[str, ...]) -> None:
        """Ask the builder for code for each of ``sms`` (TensorRT-RTX, ahead of time)."""
        supported = self.aot_sms()
        bad = [sm for sm in sms if sm not in supported]
        if bad or not sms:
            raise ValueError(
                f"TensorRT-RTX {self.version} cannot build for SM {', '.join(bad) or '(none given)'}; "
                f"it builds ahead of time for SM {', '.join(supported)} (no SM90/SM100: use datacenter TensorRT "
                "on those GPUs)"
            )
        enum = self.module.ComputeCapability
        config.num_compute_capabilities = len(sms)
        for index, sm in enumerate(sms):
            if not config.set_compute_capability(getattr(enum, f"SM{sm}"), index):
                raise RuntimeError(f"TensorRT-RTX refused compute capability SM{sm} at index {index}")

    def logger(self):
        """The process-wide logger of this module (created once: TensorRT keeps the first one)."""
        return process_logger(self.module)

    def network_flags(self) -> int:
        """Creation flags of a strongly typed network (TensorRT >= 11 and RTX are strongly typed only)."""
        flag = getattr(self.module.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
        return 0 if flag is None else 1 << int(flag)


def load(target: str | None = None) -> TensorRT:
    """Import the nvinfer flavour ``target`` ('tensorrt' | 'tensorrt-rtx'); None tries datacenter
    TensorRT first, then TensorRT-RTX."""
    target = normalize_target(target)
    names = [target] if target else list(FLAVOURS)
    failures = []
    for flavour in names:
        module_name, _ = FLAVOURS[flavour]
        try:
            module = importlib.import_module(module_name)
        except (ImportError, OSError) as exc:  # OSError: bindings present, libraries missing
            failures.append(f"{module_name}: {exc}")
            continue
        trt = TensorRT(module, flavour, str(module.__version__))
        if flavour == "tensorrt" and trt.major < MIN_TENSORRT_MAJOR:
            raise TensorRTUnavailable(
                f"TensorRT {trt.version} is too old: engines need TensorRT >= {MIN_TENSORRT_MAJOR} "
                f"(strongly typed networks, IPluginV3): {FLAVOURS['tensorrt'][1]}"
            )
        return trt
    hint = " or ".join(f"`{FLAVOURS[f][1]}` (module {FLAVOURS[f][0]})" for f in names)
    raise TensorRTUnavailable(f"building engines needs {hint}; import failed: {'; '.join(failures)}")


def process_logger(module):
    """One ``ILogger`` per nvinfer module and process: forwards to ``logging``, keeps recent errors."""
    key = module.__name__
    if key not in _LOGGERS:

        class Logger(module.ILogger):
            def __init__(self) -> None:
                module.ILogger.__init__(self)
                self.errors: collections.deque[str] = collections.deque(maxlen=64)

            def log(self, severity, msg) -> None:
                level = int(severity)  # INTERNAL_ERROR 0, ERROR 1, WARNING 2, INFO 3, VERBOSE 4
                if level <= 1:
                    self.errors.append(msg)
                    log.error("TensorRT: %s", msg)
                elif level == 2:
                    routine = any(msg.endswith(tail) for tail in _ROUTINE_WARNINGS)
                    log.log(logging.INFO if routine else logging.WARNING, "TensorRT: %s", msg)
                elif level == 3:
                    log.debug("TensorRT: %s", msg)

            def take_errors(self) -> list[str]:
                errors = list(self.errors)
                self.errors.clear()
                return errors

        _LOGGERS[key] = Logger()
    return _LOGGERS[key]


class Interrupt:
    """Set by :func:`interruptible`'s SIGINT handler; TensorRT callbacks read it to cancel."""

    signum: int | None = None

    @property
    def pending(self) -> bool:
        return self.signum is not None


@contextlib.contextmanager
def interruptible() -> Iterator[Interrupt]:
    """Run a TensorRT call so that Ctrl-C stops it instead of vanishing.

    Python runs a signal handler at the next bytecode of the main thread, which during a build
    is inside one of our callbacks (logger, plugin, stream writer) called from C++: a
    KeyboardInterrupt raised there is swallowed by the bindings and the build goes on. So while
    the block runs, SIGINT only records itself: the progress monitor and the stream writer see
    it and cancel the build, and KeyboardInterrupt is raised here once the C++ call has returned.
    A second Ctrl-C ends the process at once (its partial output is removed by the next run).
    """
    state = Interrupt()
    previous = signal.getsignal(signal.SIGINT)
    if threading.current_thread() is not threading.main_thread() or previous in (signal.SIG_IGN, None):
        yield state  # only the main thread receives Python's signals; an ignored SIGINT stays ignored
        return

    def record(signum, frame) -> None:
        if state.pending:
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGINT)
        state.signum = signum
        print("interrupted: cancelling the TensorRT call (Ctrl-C again to stop at once)", file=sys.stderr)

    signal.signal(signal.SIGINT, record)
    try:
        yield state
    except Exception:
        if not state.pending:
            raise
        _raise_interrupt(previous, state.signum)  # the failure is the cancellation's doing
    finally:
        signal.signal(signal.SIGINT, previous)
    if state.pending:
        _raise_interrupt(previous, state.signum)


def _raise_interrupt(previous, signum: int) -> None:
    if callable(previous) and previous is not signal.default_int_handler:
        previous(signum, None)  # someone else's handler decides
    raise KeyboardInterrupt


def cancelling_monitor(module, state: Interrupt):
    """An IProgressMonitor that cancels the build once ``state`` is pending (None where the
    nvinfer module has no progress monitors). Keep it referenced until the build returns."""
    if not hasattr(module, "IProgressMonitor"):
        return None

    class Monitor(module.IProgressMonitor):
        def __init__(self) -> None:
            module.IProgressMonitor.__init__(self)

        def phase_start(self, phase_name, parent_phase, num_steps) -> None:
            pass

        def step_complete(self, phase_name, step) -> bool:
            return not state.pending  # False cancels the build

        def phase_finish(self, phase_name) -> None:
            pass

    return Monitor()


def ensure_rtx_unversioned_library(trt: TensorRT) -> Path | None:
    """Make sure ``libtensorrt_rtx.so`` (unversioned) exists next to ``libtensorrt_rtx.so.1``.

    TensorRT-RTX's ONNX parser ``dlopen``s the unversioned name when it imports a plugin node and
    aborts the whole process when it is missing; the libraries' rpath is ``$ORIGIN``, so a symlink
    in the ``tensorrt_rtx_libs`` package directory suffices. Returns the link's path (None for
    datacenter TensorRT or when the libraries are not in a ``tensorrt_rtx_libs`` package).
    """
    if not trt.is_rtx:
        return None
    try:
        libs = importlib.import_module("tensorrt_rtx_libs")
    except ImportError:
        return None  # libraries installed another way (system package): their layout is theirs
    directory = Path(libs.__file__).resolve().parent
    return ensure_symlink(directory, "libtensorrt_rtx.so", "libtensorrt_rtx.so.1")


def ensure_symlink(directory: Path, link: str, target: str) -> Path | None:
    """``directory/link -> target``, created when missing; a clear error when it cannot be."""
    path, real = directory / link, directory / target
    if os.path.lexists(path):
        if path.exists():
            return path
        raise TensorRTUnavailable(f"{path} is a broken link; replace it: ln -sf {target} {path}")
    if not real.exists():
        return None  # nothing to point at: another layout, left alone
    try:
        os.symlink(target, path)
    except FileExistsError:  # another process made it meanwhile
        return path
    except OSError as exc:
        raise TensorRTUnavailable(
            f"TensorRT-RTX's ONNX parser needs {path} (it dlopens the unversioned name when it imports a "
            f"plugin node, and aborts the process without it), and it cannot be created here ({exc}). "
            f"Create it once: ln -s {target} {path}"
        ) from None
    log.info("created %s -> %s (TensorRT-RTX's parser loads the unversioned name)", path, target)
    return path
