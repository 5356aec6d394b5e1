"""``mixtral-build``: the command line. Heavy dependencies are imported inside each command,
so ``--help`` and argument errors work even where torch or TensorRT are missing."""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import re
import shutil
import sys
from pathlib import Path

import click

MODEL_HELP = "Checkpoint directory (Hugging Face layout, safetensors), or 'tiny' for the built-in random tiny Mixtral."


# Errors that mean "your input is wrong": reported as one line, never a traceback. Looked up
# only in modules already imported (a module that raised one is), so nothing heavy is loaded.
_USER_ERRORS = {
    "mixtral_trt.fsutil": ("OutputBusyError", "OutputPathError"),
    "mixtral_trt.config": ("ConfigError",),
    "mixtral_trt.manifest": ("ManifestError",),
    "mixtral_trt.onnx_files": ("ExternalDataError",),
    "mixtral_trt.pipeline": ("PipelineError",),
    "mixtral_trt.export.checkpoint": ("CheckpointError",),
    "mixtral_trt.export.onnx_export": ("ExportError",),
    "mixtral_trt.optimize.precision": ("PrecisionError",),
    "mixtral_trt.optimize.engine": ("EngineBuildError",),
    "mixtral_trt.optimize.lowering": ("LoweringError",),
    "mixtral_trt.optimize.trt_lowering": ("LoweringError",),
    "mixtral_trt.plugins.moe_plugin": ("PluginFieldError", "PluginShapeError"),
    "mixtral_trt.runtime.generator": ("GenerationError",),
    "mixtral_trt.runtime.tokenizer": ("TokenizerError",),
    "mixtral_trt.triton": ("TritonRepositoryError",),
    "mixtral_trt.serve": ("ServeError",),
}


# OSErrors about a path the user chose (mostly the output): errno -> what happened, what to do.
_PATH_ERRORS = {
    errno.ENOSPC: ("no space left on device writing {path}{free}", "free some space or choose another output path"),
    errno.EDQUOT: ("disk quota exceeded writing {path}{free}", "free some space or choose another output path"),
    errno.EROFS: ("{path} is on a read-only file system", "choose another output path"),
    errno.EACCES: ("permission denied: {path}", "choose a path you may write, or change its permissions"),
    errno.EPERM: ("operation not permitted: {path}", "choose another output path"),
    errno.ENOTDIR: ("{path}: a part of this path is a file, not a directory", "choose another output path"),
    errno.EISDIR: ("{path} is a directory where a file is expected", "choose another path"),
    errno.EEXIST: ("{path} already exists", "remove it or choose another output path"),
    errno.ENAMETOOLONG: ("file name too long: {path}", "choose a shorter output path"),
    errno.ENOENT: ("no such file or directory: {path}", "check the path (its file system may not allow creating it)"),
}


def _path_error(exc: OSError, fallback) -> str | None:
    """One line for an OSError in _PATH_ERRORS (None for any other: a bug stays a traceback)."""
    if exc.errno not in _PATH_ERRORS:
        return None
    from mixtral_trt.fsutil import public_name

    what, fix = _PATH_ERRORS[exc.errno]
    name = exc.filename if exc.filename is not None else fallback
    path = public_name(name) if name is not None else "the output directory"
    free = ""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        existing = next((p for p in [Path(path), *Path(path).parents] if p.exists()), Path("."))
        free = f" ({shutil.disk_usage(existing).free / 1e9:.1f} GB free there)"
    return f"{what.format(path=path, free=free)}; {fix}"


def _user_error_types() -> tuple[type[BaseException], ...]:
    found: list[type[BaseException]] = [FileExistsError]
    for module, names in _USER_ERRORS.items():
        if module in sys.modules:
            found += [getattr(sys.modules[module], n) for n in names if hasattr(sys.modules[module], n)]
    return tuple(found)


def _user_errors(fn):
    """Turn our validation errors into one clean 'Error: …' line and exit status 1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except click.ClickException:
            raise
        except ImportError as exc:
            raise click.ClickException(f"{exc}. Install the missing package (see README: Install)") from None
        except KeyboardInterrupt:
            click.echo("Aborted!", err=True)  # what was being written is removed; finished outputs stay
            raise click.exceptions.Exit(130) from None
        except Exception as exc:
            line = _path_error(exc, kwargs.get("out_dir")) if isinstance(exc, OSError) and exc.errno else None
            if line is not None:
                raise click.ClickException(line) from None
            if isinstance(exc, _user_error_types()):
                raise click.ClickException(str(exc)) from None
            raise

    return wrapper


class _Stderr(logging.Handler):
    """Writes records to the current sys.stderr (which click's test runner replaces)."""

    def emit(self, record: logging.LogRecord) -> None:
        click.echo(self.format(record), err=True)


def _set_verbose(ctx, param, value) -> None:
    if not value:
        return
    logger = logging.getLogger("mixtral_trt")
    if not any(isinstance(h, _Stderr) for h in logger.handlers):
        logger.addHandler(_Stderr())
    logger.setLevel(logging.INFO)


_verbose_option = click.option(
    "--verbose", is_flag=True, expose_value=False, callback=_set_verbose,
    help="Also print informational messages, such as TensorRT's notes on every Int64 input.",
)  # fmt: skip


def _parse_sms(ctx, param, value):
    if value is None:
        return ()
    sms = tuple(v.strip().lower().removeprefix("sm_").removeprefix("sm") for v in value.split(",") if v.strip())
    if not sms:  # an empty list would quietly build for the default SMs
        raise click.BadParameter(f"{value!r} names no SM; give e.g. --sm 89,120, or leave --sm out for the default")
    bad = [v for v in sms if not v.rstrip("a").isdigit()]
    if bad:
        raise click.BadParameter(f"{bad} are not SM numbers; give e.g. --sm 89,120")
    return sms


class _Cli(click.Group):
    """The command group. A bad option or argument exits 1 like every other refusal (click's own
    default is 2), still with click's usage line, a hint and one ``Error:`` line."""

    def make_context(self, *args, **kwargs):
        with _usage_exits_1():
            return super().make_context(*args, **kwargs)

    def invoke(self, ctx):
        with _usage_exits_1():
            return super().invoke(ctx)


@contextlib.contextmanager
def _usage_exits_1():
    try:
        yield
    except click.UsageError as exc:
        exc.exit_code = 1
        raise


@click.group(
    cls=_Cli,
    invoke_without_command=True,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@click.option("--model", default="tiny", show_default=True, help=MODEL_HELP)
@click.option("--precision", type=click.Choice(["fp32", "fp16", "bf16", "int8"]), default="fp16", show_default=True,
              help="Weights/activations of the engine: int8 is weight-only (fp16 activations).")
@click.option("--target", type=click.Choice(["tensorrt", "tensorrt-rtx", "onnxruntime"]),
              help="Engine to build [default: tensorrt if installed, else tensorrt-rtx, else onnxruntime].")
@click.option("--max-batch", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--max-seq-len", type=click.IntRange(min=2),
              help="KV cache capacity in tokens [default: min(4096, max_position_embeddings)].")
@click.option("--sm", "sms", callback=_parse_sms,
              help="TensorRT-RTX ahead-of-time targets, e.g. 89,120 [default: 89,120].")
@click.option("--int8-lm-head", is_flag=True, help="With --precision int8: quantise the LM head too (default fp16).")
@click.option("--int8-router", is_flag=True, help="With --precision int8: quantise the MoE router too (default fp16).")
@click.option("--fp16-attention", is_flag=True,
              help="With --precision int8: keep the attention projections fp16 (int8 experts only; more accurate).")
@click.option("--out", "out_dir", type=click.Path(path_type=Path),
              help="Build directory [default: out/<model name>-<precision>].")
@click.option("--quiet", is_flag=True, help="No progress output.")
@_verbose_option
@click.version_option(package_name="mixtral-trt")
@click.pass_context
@_user_errors
def main(ctx, model, precision, target, max_batch, max_seq_len, sms, int8_lm_head, int8_router, fp16_attention,
         out_dir, quiet):  # fmt: skip
    """Compile a Mixtral checkpoint: export -> precision -> TensorRT engine.

    With no command, runs the whole build for --model (default: the built-in tiny model) and
    prints where everything is. ONNX Runtime runs OUT/<precision> (OUT/fp32 for bf16), lowering
    it when it loads; generate, inspect and triton also take OUT itself. Finished stages whose
    inputs are unchanged are reused, so an interrupted build resumes where it stopped.

    \b
    Stages, also runnable alone (each reads and writes a directory with a manifest.json):
      tiny      write a random-weight Mixtral checkpoint (tests, demos)
      export    checkpoint -> canonical ONNX
      optimize  canonical ONNX -> precision and a target's ONNX
      engine    target ONNX -> TensorRT / TensorRT-RTX plan
      generate  run a build: text or token ids in, generated text out
      inspect   print an artifact's manifest
    """
    if ctx.invoked_subcommand is not None:
        return
    from mixtral_trt import pipeline
    from mixtral_trt.export.tiny import resolve_model

    path = resolve_model(model)
    out_dir = out_dir or Path("out") / f"{'tiny' if model == 'tiny' else path.name}-{precision}"
    plan = pipeline.Plan(model=path, out=out_dir, precision=precision, target=target, max_batch=max_batch,
                         max_seq_len=max_seq_len, sms=sms, int8_lm_head=int8_lm_head, int8_router=int8_router,
                         int8_attention=not fp16_attention)  # fmt: skip
    results = pipeline.run(plan, say=(lambda m: None) if quiet else (lambda m: click.echo(m, err=True)),
                           progress=not quiet)  # fmt: skip
    click.echo("built:")
    for line in pipeline.summary(results):
        click.echo(f"  {line}")
    for line in pipeline.try_it(out_dir, results):
        click.echo(line)


@main.command()
@click.argument("out_dir", type=click.Path(path_type=Path))
@click.option("--layers", type=click.IntRange(min=1), help="num_hidden_layers [default: 2]")
@click.option("--hidden", type=click.IntRange(min=1), help="hidden_size [default: 128]")
@click.option("--intermediate", type=click.IntRange(min=1), help="expert FFN size [default: 256]")
@click.option("--experts", type=click.IntRange(min=1), help="num_local_experts [default: 8]")
@click.option("--top-k", type=click.IntRange(min=1), help="experts per token [default: 2]")
@click.option("--heads", type=click.IntRange(min=1), help="query heads [default: 4]")
@click.option("--kv-heads", type=click.IntRange(min=1), help="key/value heads [default: 2]")
@click.option("--vocab", type=click.IntRange(min=1),
              help="vocab_size [default: 32000, Mixtral's tokenizer; a smaller one gets no tokenizer: token ids only]")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@_user_errors
def tiny(out_dir, layers, hidden, intermediate, experts, top_k, heads, kv_heads, vocab, dtype, seed):
    """Write a random-weight Mixtral checkpoint to OUT_DIR in Hugging Face's file layout.

    The checkpoint has config.json, model.safetensors (model.layers.N.block_sparse_moe.experts.E.w1|w2|w3
    naming) and Mixtral's real tokenizer.model, so it loads in transformers and tokenizes like Mixtral
    (with --vocab below 32000 there is no tokenizer: its ids would have no embedding row).
    """
    from mixtral_trt.export.tiny import tiny_config, write_tiny

    cfg = tiny_config(
        num_hidden_layers=layers, hidden_size=hidden, intermediate_size=intermediate, num_local_experts=experts,
        num_experts_per_tok=top_k, num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab,
        torch_dtype=dtype,
    )  # fmt: skip
    write_tiny(out_dir, cfg, seed=seed)
    click.echo(f"wrote tiny Mixtral checkpoint to {out_dir}")


@main.command()
@click.option("--model", "model", default="tiny", show_default=True, help=MODEL_HELP)
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path),
              help="Output directory; created atomically. A previous export there is replaced, anything else refused.")
@click.option("--max-batch", type=click.IntRange(min=1), default=8, show_default=True,
              help="Largest batch the artifacts will be built and checked for (recorded in the manifest).")
@click.option("--max-seq-len", type=click.IntRange(min=2),
              help="KV cache capacity in tokens (prompt + generated) [default: min(4096, max_position_embeddings)].")
@click.option("--quiet", is_flag=True, help="No progress output.")
@_user_errors
def export(model, out_dir, max_batch, max_seq_len, quiet):  # fmt: skip
    """Export a Mixtral checkpoint to canonical ONNX with external weights.

    Writes model.onnx (opset 24: RMSNormalization, RotaryEmbedding, TensorScatter into a static KV
    cache, Attention with GQA, one mixtral.MoETop2 per layer), model.onnx.data, the tokenizer and
    manifest.json. Memory stays bounded: the decoder is traced on meta tensors and weights are
    streamed from the safetensors files in chunks.
    """
    from mixtral_trt.export.onnx_export import export as run_export
    from mixtral_trt.export.tiny import resolve_model

    path = run_export(resolve_model(model), out_dir, max_batch=max_batch, max_seq_len=max_seq_len, progress=not quiet)
    click.echo(f"canonical ONNX: {path / 'model.onnx'}")


@main.command()
@click.argument("src_dir", type=click.Path(path_type=Path))
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path), help="Output directory.")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "bf16", "int8"]), default="fp32", show_default=True)
@click.option("--target", type=click.Choice(["onnxruntime", "canonical"]), default="onnxruntime", show_default=True,
              help="onnxruntime: MoETop2 lowered for ONNX Runtime; canonical: MoETop2 kept (input of `engine`).")
@click.option("--moe", type=click.Choice(["contrib", "decomposed"]), default="contrib", show_default=True,
              help="ONNX Runtime MoE: contrib com.microsoft kernels, or standard ops (portable reference, dense).")
@click.option("--int8-lm-head", is_flag=True, help="With --precision int8: quantise the LM head too.")
@click.option("--int8-router", is_flag=True, help="With --precision int8: quantise the MoE router too.")
@click.option("--fp16-attention", is_flag=True, help="With --precision int8: keep the attention projections fp16.")
@click.option("--no-verify", is_flag=True, help="Skip re-hashing SRC_DIR's files against its manifest.")
@click.option("--quiet", is_flag=True, help="No progress output.")
@_user_errors
def optimize(src_dir, out_dir, precision, target, moe, int8_lm_head, int8_router, fp16_attention, no_verify,
             quiet):  # fmt: skip
    """Apply a precision to an export directory and lower it for a target runtime.

    Weights are rewritten once (streamed, one tensor chunk at a time) into the new precision;
    lowering is a graph rewrite, and the converted weights move into --out (written once, one link).
    """
    from mixtral_trt.fsutil import scratch_dir
    from mixtral_trt.optimize.lowering import lower_dir
    from mixtral_trt.optimize.precision import convert

    from mixtral_trt.manifest import check_output_dir, is_artifact, read_manifest

    if not is_artifact(src_dir, "export"):  # what SRC_DIR is instead comes before anything about --out
        read_manifest(src_dir, "export", verify=False)
    check_output_dir(out_dir, "optimize", source=src_dir)
    options = dict(int8_lm_head=int8_lm_head, int8_router=int8_router, int8_attention=not fp16_attention,
                   progress=not quiet, verify=not no_verify)  # fmt: skip
    if target == "canonical":
        path = convert(src_dir, out_dir, precision, **options)
    else:
        staging = scratch_dir(out_dir, "precision")  # removed by a later run if this one is killed
        try:
            converted = convert(src_dir, staging / "canonical", precision, **options)
            # converted was written (and hashed) just now by this process: no second pass over the weights
            path = lower_dir(converted, out_dir, target="onnxruntime", moe=moe, data="move", verify=False)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    click.echo(f"{target} {precision} model: {path / 'model.onnx'}")


@main.command()
@click.argument("src_dir", type=click.Path(path_type=Path))
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path), help="Output directory.")
@click.option("--target", type=click.Choice(["tensorrt", "tensorrt-rtx"]),
              help="[default: tensorrt if installed, else tensorrt-rtx]")
@click.option("--sm", "sms", callback=_parse_sms, help="TensorRT-RTX ahead-of-time targets, e.g. 89,120.")
@click.option("--max-batch", type=click.IntRange(min=1), help="[default: the export's max_batch]")
@click.option("--max-seq-len", type=click.IntRange(min=2), help="[default: the export's max_seq_len]")
@click.option("--timing-cache", type=click.Path(path_type=Path), help="Timing cache file (read and updated).")
@click.option("--cache-update", type=click.Choice(["inplace", "copy"]), default="inplace", show_default=True,
              help="inplace: present.* aliases past_key_values.* (our runtimes); copy: a new present tensor "
                   "each step, for Triton's TensorRT backend.")
@click.option("--no-verify", is_flag=True, help="Skip re-hashing SRC_DIR's files against its manifest.")
@click.option("--quiet", is_flag=True, help="No progress output.")
@_verbose_option
@_user_errors
def engine(src_dir, out_dir, target, sms, max_batch, max_seq_len, timing_cache, cache_update, no_verify,
           quiet):  # fmt: skip
    """Build a TensorRT or TensorRT-RTX plan from an export or a canonical-precision directory.

    MoETop2 becomes the MixtralMoETop2 plugin (namespace mixtral, version 1); the plan and a
    manifest (I/O table, profiles, TensorRT version, target SMs, plugin needs) go to --out.
    """
    from mixtral_trt.optimize.engine import build
    from mixtral_trt.pipeline import choose_target

    target, _ = choose_target(target)
    if target == "onnxruntime":
        raise click.UsageError(
            "no TensorRT here: pip install tensorrt-rtx-cu13-libs tensorrt-rtx-cu13-bindings (or tensorrt-cu13)"
        )
    path = build(src_dir, out_dir, target=target, sms=list(sms) or None, max_batch=max_batch,
                 max_seq_len=max_seq_len, timing_cache=timing_cache, cache_update=cache_update,
                 progress=not quiet, verify=not no_verify)  # fmt: skip
    click.echo(f"{target} engine: {path / 'model.plan'}")


@main.command()
@click.argument("artifact_dir", type=click.Path(path_type=Path))
@click.option("--verify", is_flag=True, help="Also re-hash every file against the manifest.")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
@_user_errors
def inspect(artifact_dir, verify, as_json):
    """Print what an artifact directory holds: model, precision, I/O, files, TensorRT needs.

    Given the main job's OUT directory, describes each of its stages (as listed in OUT/build.json).
    """
    import json

    from mixtral_trt.inspect import describe
    from mixtral_trt.manifest import MANIFEST, read_manifest
    from mixtral_trt.pipeline import RECORD, RUNTIMES, main_job_stages

    if (artifact_dir / MANIFEST).is_file() or not (artifact_dir / RECORD).is_file():
        manifest = read_manifest(artifact_dir, verify=verify)
        click.echo(json.dumps(manifest, indent=2) if as_json else describe(manifest))
    else:
        stages = main_job_stages(artifact_dir)
        click.echo(f"{artifact_dir} is a main-job build directory with {len(stages)} stage(s) ({RECORD})", err=True)
        manifests = {name: read_manifest(s["path"], verify=verify) for name, s in stages.items()}
        if as_json:
            click.echo(json.dumps({name: {"path": str(stages[name]["path"]), "serves": stages[name]["serves"],
                                          "manifest": m} for name, m in manifests.items()}, indent=2))  # fmt: skip
        else:
            for name, manifest in manifests.items():
                serves = stages[name]["serves"]
                click.echo(f"== {name}: {stages[name]['path']}" + (f" (runs on {RUNTIMES[serves]})" if serves else ""))
                click.echo(describe(manifest) + "\n")
    if verify:
        click.echo("all files match their sha256", err=True)


def _parse_ids(ctx, param, values):
    out = []
    for value in values:
        items = [x.strip() for x in value.split(",") if x.strip()]
        # ASCII digits only: int() would also take '1_000' and non-ASCII digits such as '１'.
        if not all(re.fullmatch(r"-?[0-9]+", x) for x in items):
            raise click.BadParameter(f"{value!r} is not a comma-separated list of integers, e.g. 1,415,2936")
        out.append([int(x) for x in items])
    return out


@main.command()
@click.argument("build_dir", type=click.Path(path_type=Path))
@click.option("--prompt", "prompts", multiple=True, help="Prompt text (repeat for a batch).")
@click.option("--prompt-ids", "prompt_ids", multiple=True, callback=_parse_ids,
              help="Prompt as comma-separated token ids, e.g. 1,415,2936 (repeat for a batch).")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--greedy", is_flag=True, help="Pick the most likely token (the default when no sampling option is given).")
@click.option("--temperature", type=click.FloatRange(min=0), help="Sampling temperature (0 = greedy).")
@click.option("--top-p", type=click.FloatRange(min=0, max=1, min_open=True), help="Nucleus sampling mass.")
@click.option("--top-k", type=click.IntRange(min=0), help="Sample among the K most likely tokens (0 = all).")
@click.option("--repetition-penalty", type=click.FloatRange(min=0, min_open=True), default=1.0, show_default=True)
@click.option("--seed", type=int, help="Random seed (an integer >= 0): the same seed reproduces the same sample.")
@click.option("--stop", "stop", multiple=True, help="Stop a sequence when its text contains this string (repeatable).")
@click.option("--backend", type=click.Choice(["onnxruntime", "tensorrt"]), default="onnxruntime", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object per prompt instead of streaming text.")
@click.option("--no-verify", is_flag=True, help="Skip re-hashing the build's files against its manifest.")
@_user_errors
def generate(build_dir, prompts, prompt_ids, max_new_tokens, greedy, temperature, top_p, top_k, repetition_penalty,
             seed, stop, backend, as_json, no_verify):  # fmt: skip
    """Generate text with a build directory (an export, an optimize output, an engine build, or the
    main job's OUT: its ONNX Runtime directory, or OUT/engine with --backend tensorrt).

    Give prompts as text (--prompt, tokenized with the build's tokenizer, BOS prepended as
    Mixtral expects) or as ids (--prompt-ids). Text streams as it is produced; --json prints
    prompt_ids, output_ids, text, finish_reason and timings per prompt.
    """
    import json

    from mixtral_trt import runtime

    if bool(prompts) == bool(prompt_ids):
        raise click.UsageError("give prompts with --prompt TEXT or with --prompt-ids 1,2,3 (one kind, not both)")
    sampled = any(v is not None for v in (temperature, top_p, top_k))
    if greedy and sampled:
        raise click.UsageError("--greedy cannot be combined with --temperature/--top-p/--top-k")
    sampling = {"max_new_tokens": max_new_tokens, "greedy": not sampled, "repetition_penalty": repetition_penalty,
                "seed": seed, "stop": stop}  # fmt: skip
    sampling.update({k: v for k, v in (("temperature", temperature), ("top_p", top_p), ("top_k", top_k)) if v is not None})
    from mixtral_trt.pipeline import resolve_build

    build_dir, why = resolve_build(build_dir, backend)
    if why:
        click.echo(why, err=True)
    model = runtime.load(build_dir, backend=backend, verify=not no_verify)
    batch = list(prompts) or prompt_ids
    stream = not as_json and len(batch) == 1 and model.tokenizer is not None

    def on_token(row, token, delta):
        if stream and delta:
            click.echo(delta, nl=False)

    results = model.generate(batch, on_token=on_token, **sampling)
    for n, result in enumerate(results):
        if as_json:
            click.echo(json.dumps(result.to_dict()))
            continue
        if stream:
            click.echo()
        elif result.text is not None:
            click.echo(f"[{n}] {result.text}")
        else:
            click.echo(f"[{n}] {' '.join(map(str, result.output_ids))}")
        click.echo(
            f"[{n}] {len(result.output_ids)} tokens, finish: {result.finish_reason}, prefill "
            f"{result.prefill_ms:.1f} ms, decode {result.decode_tokens_per_s:.1f} tok/s",
            err=True,
        )


def _add_triton_command() -> None:
    from mixtral_trt.triton import triton_command

    command = triton_command()
    command.callback = _user_errors(command.callback)  # path errors and Ctrl-C as in every other command
    main.add_command(command)


_add_triton_command()


def _add_serve_command() -> None:
    from mixtral_trt.serve import serve_command

    command = serve_command()
    command.callback = _user_errors(command.callback)  # a taken port, a bad build: one Error: line
    main.add_command(command)


_add_serve_command()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
