"""The decoupled Triton text model over one executor: every concurrent request in one in-flight batch.

``execute(requests)`` hands each request to :meth:`ExecutorServer.submit`, which checks it, submits it
to the build's :class:`~mixtral_trt.runtime.Executor` (its loop runs on a background thread) and
returns; a thread per request streams that request's deltas to its response sender and ends it with
the final flag. A watcher thread polls every live request's ``is_cancelled()`` (a queued or
unstreamed request sends nothing that would notice), and a cancelled request's handle is cancelled,
which frees its slot at once. A request that cannot be served (bad inputs, too long, queue full, a
backend error) gets an error response of its own; the others carry on.

``pb_utils`` (``triton_python_backend_utils``) is passed in, so this module imports anywhere.
"""

from __future__ import annotations

import contextlib
import logging
import threading

from ..generator import GenerationError
from .triton_bls import error_response, request_params, text_response

log = logging.getLogger(__name__)


class ExecutorServer:
    def __init__(self, pb_utils, model, poll_s: float = 0.1) -> None:
        self.pb, self.model, self.executor = pb_utils, model, model.executor
        self.poll_s = poll_s
        self._live: dict = {}  # handle -> its response sender
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._threads: set[threading.Thread] = set()
        self.executor.start()
        self._watcher = threading.Thread(target=self._watch, name="mixtral-triton-cancel", daemon=True)
        self._watcher.start()

    def submit(self, request) -> None:
        """Start one request; never raises (what goes wrong becomes that request's error response)."""
        sender = request.get_response_sender()
        try:
            prompt, params, stream = request_params(self.pb, request)
            handle = self.executor.submit(prompt, params)
        except Exception as exc:  # noqa: BLE001  the client must get an answer and the final flag
            return self._fail(sender, exc)
        thread = threading.Thread(target=self._respond, args=(handle, sender, stream), daemon=True,
                                  name=f"mixtral-triton-{handle.request_id}")  # fmt: skip
        with self._lock:
            self._live[handle] = sender
            self._threads.add(thread)
        thread.start()

    def _respond(self, handle, sender, stream: bool) -> None:
        final = self.pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        try:
            sent = []
            for delta in handle:
                if sender.is_cancelled():
                    handle.cancel()
                    break
                if stream:
                    sender.send(text_response(self.pb, delta.text, [delta.token_id]))
                    sent.append(delta.text)
            result = handle.result()
            if result.finish_reason == "cancelled":
                sender.send(flags=final)
            elif not stream:
                sender.send(text_response(self.pb, result.text, result.output_ids), flags=final)
            else:
                streamed = "".join(sent)
                rest = result.text[len(streamed):] if result.text.startswith(streamed) else ""
                if rest:  # text held back at the end (an incomplete UTF-8 sequence resolved by decode)
                    sender.send(text_response(self.pb, rest, []))
                sender.send(flags=final)
        except Exception as exc:  # noqa: BLE001
            handle.cancel()
            self._fail(sender, exc)
        finally:
            with self._lock:
                self._live.pop(handle, None)
                self._threads.discard(threading.current_thread())

    def _fail(self, sender, exc: BaseException) -> None:
        message = str(exc) if isinstance(exc, GenerationError) else f"{type(exc).__name__}: {exc}"
        try:
            sender.send(error_response(self.pb, message), flags=self.pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        except Exception:  # noqa: BLE001  the client is gone: nothing left to tell it
            log.warning("could not send the error response: %s", message)

    def _watch(self) -> None:
        while not self._closed.wait(self.poll_s):
            with self._lock:
                live = list(self._live.items())
            for handle, sender in live:
                with contextlib.suppress(Exception):  # a sender already finished may refuse the call
                    if sender.is_cancelled():
                        handle.cancel()

    def close(self, timeout: float = 10.0) -> None:
        """Cancel every request (each still gets its final flag) and stop the executor's loop."""
        self._closed.set()
        self.executor.close()
        with self._lock:
            threads = list(self._threads)
        for thread in threads:
            thread.join(timeout)
        self._watcher.join(timeout)
