"""REPO/<name>/README.md of a Triton repository written by :mod:`mixtral_trt.triton`."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from .triton_swap import VERSION

if TYPE_CHECKING:
    from .triton import _Build

PLUGIN_LIBRARY = "libmixtral_trt_plugins.so"

KV_CACHE_DOC = """\
The KV cache is explicit. The `{name}` Python model keeps each layer's `past_key_values.{{i}}.key|value`
([batch, kv_heads, max_seq_len, head_dim]) and sends them with every BLS request to `{name}_engine`,
which returns `present.{{i}}.key|value`; these become the next step's inputs without a copy in Python
(a DLPack rename). Triton's implicit state (sequence batcher `state` entries) does not fit this graph
better: the sequence batcher takes only batch-size-1 requests (one row per sequence, so a batch of prompts
becomes many sequences and prefills of different lengths never batch), keeps one state buffer per
sequence (in host memory unless `use_growable_memory`), and the backend gathers those into its own input
binding and scatters its own output binding back on every step (`use_same_buffer_for_input_output`
merges only Triton's per-sequence copies), so the cache is copied in and out all the same; sequences
need correlation ids, start/end flags and an idle timeout. Explicit tensors cost the same two copies per
step, and in exchange one request carries a whole batch with each row's own `position_ids` and
`write_indices` (prefill one request with seq > 1, decode one with seq = 1), the engine model needs no
sequence batcher or control inputs, and it can use Triton's dynamic batcher to merge equal-length steps
of several text-model instances. Each step moves 2 x the batch's cache through Triton (Mixtral-8x7B fp16
at 4096 slots: 512 MiB per row each way), so export with a `--max-seq-len` that fits your use. With an
engine on the GPU the text model asks for outputs in GPU memory: after the first step the cache stays
on the device (this needs torch with CUDA in Triton's Python environment). The cache belongs to a
text-model instance and is reused by its next request: prefill rewrites the slots it reads."""

ALIASING_DOC = """\
Engines and in-place caches: our TensorRT engines turn TensorScatter into TensorRT's KV-cache-update
layer, whose `present.*` output must share its device address with `past_key_values.*`. Triton's
TensorRT backend binds every input and output (implicit state included) to a buffer of its own and has
no notion of aliased tensors, so `present.*` as Triton returns it may not hold the update (not yet run on
a GPU). The text model checks its first step and answers with an error naming this if the returned
cache lacks the new keys. Serve the ONNX Runtime build, or an engine built without in-place cache
aliasing, if you meet it."""


INSTALL_DOC = """\
The Python model imports `mixtral_trt`, which is not on PyPI: install it into Triton's Python environment
from a checkout (`pip install /path/to/mixtral-trt`) or from a wheel built there (`pip wheel --no-deps -w
dist /path/to/mixtral-trt`, then `pip install dist/mixtral_trt-*.whl`); its dependencies come with it.
Run Triton's container with a large enough `--shm-size`: tensors in host memory travel between Triton
and the Python model through shared memory."""


EXECUTOR_DOC = """\
Concurrency: every request an instance receives goes into one executor (in-flight batching): each of the
build's `max_batch` cache rows is a slot; waiting requests are admitted into free slots, prompts are
prefilled in chunks between decode steps, and every decode step runs all admitted requests, each at its
own position. `execute` returns at once (decoupled); each request's tokens are streamed back by a thread
of its own, a cancelled request (`is_cancelled`) frees its slot at once, and a bad request, or one that
finds the queue full, gets an error response of its own. The KV cache stays in the instance's process on
its device for the model's lifetime: nothing of it goes through Triton. Each instance (config
`instance_group`, `--instances`) is a process with its own executor, weights and cache."""


def readme(build: _Build, repo: Path, name: str, command: str, layout: str = "executor") -> str:
    engine = f"{name}_engine"
    cfg, export = build.manifest["config"], build.manifest["export"]
    kind = "TensorRT engine" if build.platform == "tensorrt_plan" else "ONNX Runtime build"
    text_io = (f"- `{name}/`: Python backend, decoupled. Inputs `text_input` (string), optional `max_tokens`, "
               "`temperature`, `top_p`, `top_k`, `seed`, `stream`; outputs `text_output` and `output_ids`.")  # fmt: skip
    if layout == "executor" and build.platform == "tensorrt_plan":
        models = (f"{text_io} It loads the engine build `{build.directory}` in its own process with "
                  "`mixtral_trt.runtime.load(..., backend=\"tensorrt\")` (the runtime's TensorRT backend on the "
                  "GPU Triton gives the instance, in-place KV-cache engines included"
                  + (", with the plugin libraries shipped in its version directory" if build.plugin_libraries else "")
                  + "). The build is referenced, not copied: keep it at that path (config parameter `build_dir`); "
                  "the model refuses to load if the build there is no longer this one (parameter `build_id`).")
    elif build.platform == "tensorrt_plan":
        models = (f"- `{engine}/`: platform `{build.platform}`, one forward step of the graph (inputs `input_ids`, "
                  "`position_ids`, `write_indices`, `past_key_values.*`; outputs `logits`, `present.*`).\n"
                  f"{text_io} It tokenizes, runs prefill and decode against `{engine}` through BLS, samples and "
                  "streams text.")  # fmt: skip
    else:
        models = (f"{text_io} It loads `{build.directory}` in its own process with `mixtral_trt.runtime.load` "
                  "(ONNX Runtime; the KV cache stays in that process) and generates as `mixtral-build generate`. "
                  "The build is referenced, not copied: keep it at that path (config parameter `build_dir`); the "
                  "model refuses to load if the build there is no longer the one this repository was written for "
                  "(parameter `build_id`, the sha256 of its manifest.json).")  # fmt: skip
    parts = [
        f"# Triton model repository: `{name}`",
        (f"Written by mixtral-trt from `{build.directory}` ({kind}, {cfg['num_hidden_layers']} layers, vocab "
         f"{cfg['vocab_size']}, max_batch {export['max_batch']}, max_seq_len {export['max_seq_len']})."),
        models,
        "## Start",
        f"```bash\n{command}\n```",
        *(_plugin_section(build, repo, name) if layout == "bls" else _executor_plugins(build)),
        INSTALL_DOC.replace("\n", " ") + _gpu_needs(build, layout),
        "## Ask",
        (f"```bash\ncurl -s localhost:8000/v2/models/{name}/generate -d "
         "'{\"text_input\": \"The capital of France is\", \"max_tokens\": 32}'\n"
         f"curl -sN localhost:8000/v2/models/{name}/generate_stream -d "
         "'{\"text_input\": \"Once upon a time\", \"max_tokens\": 64, \"stream\": true, \"temperature\": 0.8, "
         "\"seed\": 7}'\n```"),
        ("Without `temperature`, `top_p` or `top_k` decoding is greedy, as `mixtral-build generate`. With "
         "`stream` true each token is its own response (`text_output` is the new text, `output_ids` the "
         "token); otherwise one response carries the whole text."),
        (EXECUTOR_DOC if layout == "executor" else f"Concurrency: each of the `{name}` model's instances (config "
         "`instance_group`) serves one request at a time with its own cache.").replace("\n", " "),
    ]  # fmt: skip
    if layout == "bls":
        parts += ["## KV cache", KV_CACHE_DOC.format(name=name).replace("\n", " "), ALIASING_DOC.replace("\n", " ")]
    return "\n\n".join(parts) + "\n"


def _gpu_needs(build: _Build, layout: str) -> str:
    if build.platform != "tensorrt_plan":
        return ""
    if layout == "bls":
        return " With the engine's cache on the GPU it also needs torch with CUDA."
    module = "tensorrt_rtx" if build.manifest["engine"].get("target") == "tensorrt_rtx" else "tensorrt"
    return (f" For the engine it also needs torch with CUDA and TensorRT's Python module `{module}` of the version "
            f"that built the plan ({build.manifest['engine'].get('trt_version', 'see the manifest')}).")


def _executor_plugins(build: _Build) -> list[str]:
    if build.platform != "tensorrt_plan" or not (build.plugin_libraries or build.plugins_without_library):
        return []
    parts = []
    if build.plugin_libraries:
        parts.append(f"The engine's plugin libraries ({', '.join(f'`{n}`' for _, n in build.plugin_libraries)}) "
                     "ship in the model's version directory; the model loads them before the engine (config "
                     "parameter `plugin_libraries`).")  # fmt: skip
    if build.plugins_without_library:
        parts.append(f"The engine needs the plugin(s) {', '.join(build.plugins_without_library)}, which the build "
                     "registered from Python; the runtime registers them the same way in the model's process where "
                     f"the manifest names their module, else pass the C++ `{PLUGIN_LIBRARY}` with `--plugin-library`.")
    return parts


def _plugin_section(build: _Build, repo: Path, name: str) -> list[str]:
    if build.platform != "tensorrt_plan":
        return []
    parts = []
    if build.plugin_libraries:
        paths = ", ".join(f"`{repo / f'{name}_engine' / VERSION / n}`" for _, n in build.plugin_libraries)
        parts.append(f"The engine's plugin library ships beside it: {paths}. Triton's TensorRT backend loads it "
                     "through `--backend-config=tensorrt,plugins=…` as above (or `LD_PRELOAD=<that path>`).")  # fmt: skip
    if build.plugins_without_library:
        parts.append(
            f"The engine needs the plugin(s) {', '.join(build.plugins_without_library)}, which the build "
            "registered from Python (no library in its manifest). Triton cannot run Python plugin creators: "
            f"build the C++ plugin library `{PLUGIN_LIBRARY}` from `plugins/moe_top2` with CMake "
            "(`cmake -S plugins/moe_top2 -B build/plugins -DTensorRT_INCLUDE_DIR=<dir of NvInferRuntime.h> "
            "-DCMAKE_CUDA_ARCHITECTURES=90a && cmake --build build/plugins`), then either rewrite this repository "
            f"with `mixtral-build triton ... --plugin-library build/plugins/{PLUGIN_LIBRARY}` (it ships beside the "
            "engine and the command above names it) or start tritonserver with "
            f"`--backend-config=tensorrt,plugins=/abs/path/{PLUGIN_LIBRARY}` (or `LD_PRELOAD` it)."
        )
    return parts
