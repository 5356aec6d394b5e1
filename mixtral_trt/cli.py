"""``mixtral-build``: the command line. Heavy dependencies are imported inside each command,
so ``--help`` and argument errors work even where torch or TensorRT are missing."""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import click

MODEL_HELP = "Checkpoint directory (Hugging Face layout, safetensors), or 'tiny' for the built-in random tiny Mixtral."


def _user_errors(fn):
    """Turn our validation errors into one clean 'Error: …' line and exit status 1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from .config import ConfigError
        from .manifest import ManifestError

        handled: tuple[type[BaseException], ...] = (ConfigError, ManifestError, FileExistsError)
        try:
            from mixtral_trt.runtime.generator import GenerationError
            from mixtral_trt.runtime.tokenizer import TokenizerError

            handled += (GenerationError, TokenizerError)
        except ImportError:
            pass
        try:
            from mixtral_trt.export.checkpoint import CheckpointError
            from mixtral_trt.export.onnx_export import ExportError

            handled += (CheckpointError, ExportError)
        except ImportError:  # a missing heavy dependency is reported by the command itself
            pass
        try:
            return fn(*args, **kwargs)
        except handled as exc:
            raise click.ClickException(str(exc)) from None
        except ImportError as exc:
            raise click.ClickException(f"{exc}. Install the missing package (see README: Install)") from None

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="mixtral-trt")
def main() -> None:
    """Compile Mixtral checkpoints into canonical ONNX (opset 24 + mixtral.MoETop2) and engines.

    \b
    Stages (each reads and writes a directory with a manifest.json):
      tiny      write a random-weight Mixtral checkpoint (tests, demos)
      export    checkpoint -> canonical ONNX
      optimize  canonical ONNX -> a target's ONNX (ONNX Runtime lowering)
      generate  run a build: text or token ids in, generated text out
    """


@main.command()
@click.argument("out_dir", type=click.Path(path_type=Path))
@click.option("--layers", type=click.IntRange(min=1), help="num_hidden_layers [default: 2]")
@click.option("--hidden", type=click.IntRange(min=1), help="hidden_size [default: 128]")
@click.option("--intermediate", type=click.IntRange(min=1), help="expert FFN size [default: 256]")
@click.option("--experts", type=click.IntRange(min=1), help="num_local_experts [default: 8]")
@click.option("--top-k", type=click.IntRange(min=1), help="experts per token [default: 2]")
@click.option("--heads", type=click.IntRange(min=1), help="query heads [default: 4]")
@click.option("--kv-heads", type=click.IntRange(min=1), help="key/value heads [default: 2]")
@click.option("--vocab", type=click.IntRange(min=1), help="vocab_size [default: 32000, Mixtral's tokenizer]")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@_user_errors
def tiny(out_dir, layers, hidden, intermediate, experts, top_k, heads, kv_heads, vocab, dtype, seed):
    """Write a random-weight Mixtral checkpoint to OUT_DIR in Hugging Face's file layout.

    The checkpoint has config.json, model.safetensors (model.layers.N.block_sparse_moe.experts.E.w1|w2|w3
    naming) and Mixtral's real tokenizer.model, so it loads in transformers and tokenizes like Mixtral.
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
@click.argument("export_dir", type=click.Path(path_type=Path))
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path), help="Output directory.")
@click.option("--target", type=click.Choice(["onnxruntime"]), default="onnxruntime", show_default=True,
              help="Runtime the graph is lowered for.")
@click.option("--moe", type=click.Choice(["contrib", "decomposed"]), default="contrib", show_default=True,
              help="contrib: com.microsoft.MoE kernel; decomposed: standard ops (portable reference, dense).")
@_user_errors
def optimize(export_dir, out_dir, target, moe):  # fmt: skip
    """Lower an export directory's MoETop2 nodes for a target runtime (weights are shared, not copied)."""
    from mixtral_trt.optimize.lowering import lower_export_dir

    if out_dir.exists() and out_dir.resolve() == export_dir.resolve():
        raise click.BadParameter("must differ from EXPORT_DIR", param_hint="--out")
    path = lower_export_dir(export_dir, out_dir, moe=moe)
    click.echo(f"{target} model: {path / 'model.onnx'}")


def _parse_ids(ctx, param, values):
    out = []
    for value in values:
        try:
            out.append([int(x) for x in value.replace(" ", "").split(",") if x != ""])
        except ValueError:
            raise click.BadParameter(f"{value!r} is not a comma-separated list of integers, e.g. 1,415,2936") from None
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
@click.option("--seed", type=int, help="Random seed: the same seed reproduces the same sample.")
@click.option("--stop", "stop", multiple=True, help="Stop a sequence when its text contains this string (repeatable).")
@click.option("--backend", type=click.Choice(["onnxruntime", "tensorrt"]), default="onnxruntime", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object per prompt instead of streaming text.")
@click.option("--no-verify", is_flag=True, help="Skip re-hashing the build's files against its manifest.")
@_user_errors
def generate(build_dir, prompts, prompt_ids, max_new_tokens, greedy, temperature, top_p, top_k, repetition_penalty,
             seed, stop, backend, as_json, no_verify):  # fmt: skip
    """Generate text with a build directory (an export, an optimize output or an engine build).

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


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
