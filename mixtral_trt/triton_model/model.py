"""Triton Python-backend model (decoupled): text in, streamed text out.

Written into the repository by ``mixtral-build triton``; the logic is mixtral_trt's own runtime.
With config parameter build_dir (the default layout) the model loads the build in this process (ONNX
Runtime, or an engine through the runtime's TensorRT backend) and every request of every ``execute``
call joins one executor (in-flight batching; responses stream from per-request threads). With
engine_model (layout bls) each forward step is a BLS request to that model, one request at a time.
Triton's Python environment needs mixtral_trt installed from a checkout or a wheel built from
one (``pip install /path/to/mixtral-trt``).
"""

import json
from pathlib import Path

import triton_python_backend_utils as pb_utils
from mixtral_trt.runtime.backends.triton_bls import (
    TritonBlsBackend,
    check_pair,
    error_response,
    load_in_process,
    request_params,
    text_response,
)
from mixtral_trt.runtime.backends.triton_serve import ExecutorServer
from mixtral_trt.runtime.generator import GenerationError, Generator
from mixtral_trt.runtime.tokenizer import Tokenizer


class _Cancelled(Exception):
    pass


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        version_dir = Path(args["model_repository"]) / args["model_version"]
        self.server = None
        if "build_dir" in params:  # the build runs in this process, on this instance's device
            device = int(args.get("model_instance_device_id") or 0)
            self.server = ExecutorServer(pb_utils, load_in_process(version_dir, params, device))
            return
        # The engine model beside this one must be of the same build (refused with both ids otherwise).
        check_pair(version_dir, Path(args["model_repository"]).parent / params["engine_model"] / "1")
        manifest = json.loads((version_dir / "build_manifest.json").read_text())
        backend = TritonBlsBackend(pb_utils, params["engine_model"], manifest, cache_memory=params["cache_memory"],
                                   device_id=int(args.get("model_instance_device_id") or 0))  # fmt: skip
        cfg = manifest["config"]
        self.generator = Generator(backend, Tokenizer(version_dir, cfg.get("bos_token_id"), cfg.get("eos_token_id")))

    def execute(self, requests):
        # Decoupled: execute returns nothing; every response goes through the request's sender.
        if self.server is not None:  # returns at once; the executor's loop and response threads serve them
            for request in requests:
                self.server.submit(request)
            return None
        for request in requests:
            self._serve(request)

    def _serve(self, request):
        sender = request.get_response_sender()
        final = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        try:
            prompt, params, stream = request_params(pb_utils, request)
            sent = []

            def on_token(row, token, delta):
                if sender.is_cancelled():
                    raise _Cancelled
                if stream:
                    sender.send(text_response(pb_utils, delta, [token]))
                    sent.append(delta)

            [result] = self.generator.generate([prompt], params, on_token)
            if not stream:
                sender.send(text_response(pb_utils, result.text, result.output_ids), flags=final)
                return
            rest = result.text[len("".join(sent)):] if result.text.startswith("".join(sent)) else ""
            if rest:  # text held back at the end (an incomplete UTF-8 sequence resolved by decode)
                sender.send(text_response(pb_utils, rest, []))
            sender.send(flags=final)
        except _Cancelled:
            sender.send(flags=final)
        except Exception as exc:  # noqa: BLE001  the client must get an answer and the final flag
            message = str(exc) if isinstance(exc, GenerationError) else f"{type(exc).__name__}: {exc}"
            sender.send(error_response(pb_utils, message), flags=final)

    def finalize(self):
        if self.server is not None:
            self.server.close()
        self.generator = self.server = None
