#!/usr/bin/env python
"""Prove that export memory is bounded at Mixtral-8x7B dimensions.

Writes random bf16 checkpoints with Mixtral-8x7B's real dimensions but only 1 and 2 decoder
layers (one layer is ~2.9 GB of weights), exports each in a fresh subprocess and compares the
peak RSS. A bounded exporter needs the same memory for 2 layers as for 1; any whole-tensor or
whole-layer buffering would show up as +0.1 to +2.9 GB.

    python scripts/export_memory.py [--workdir DIR] [--keep] [--layers 1,2]

Peak RSS is the child's own ``VmHWM`` (read from /proc/self/status as it finishes), not
``wait4``'s ``ru_maxrss``: Linux folds the parent's high-water mark into the child's
``ru_maxrss`` at exec, so a large parent (a pytest run that imported torch) would inflate it.
Every heavy import happens in a child; this process stays small.

Shards are generated once for the largest layer count, one shard per layer plus one for
embed/norm/lm_head; every checkpoint directory hard-links the shards it lists in its
``model.safetensors.index.json``, so the 1-layer checkpoint costs no extra disk.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

GB = 1e9
PEAK_LIMIT_GB = 4.0
RATIO_LIMIT = 1.10
MAX_SEQ_LEN = 4096
SEED = 0
BYTES_PER_WEIGHT = 2  # bfloat16
MIXTRAL_8X7B = dict(
    vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
    num_attention_heads=32, num_key_value_heads=8, head_dim=128, num_local_experts=8,
    num_experts_per_tok=2, rms_norm_eps=1e-5, rope_theta=1e6, max_position_embeddings=32768,
    torch_dtype="bfloat16",
)  # fmt: skip
REST_SHARD = "rest.safetensors"  # embed_tokens, norm, lm_head
# A child runs one function of this file: python -c CHILD <this file> <function> <args...>
CHILD = "import runpy, sys; runpy.run_path(sys.argv[1])[sys.argv[2]](*sys.argv[3:])"


def config(layers: int):
    from mixtral_trt.config import MixtralConfig

    return MixtralConfig(**{**MIXTRAL_8X7B, "num_hidden_layers": layers})


def shard_of(name: str) -> str:
    """Pool shard holding tensor ``name``: one per layer, one for everything else."""
    if name.startswith("model.layers."):
        return f"layer-{int(name.split('.')[2]):05d}.safetensors"
    return REST_SHARD


# ---- children: each runs in a fresh interpreter and reports its own peak RSS ----------------


def _vmhwm_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/self/status has no VmHWM line (not Linux?)")


def _report(result_file: str, **values) -> None:
    Path(result_file).write_text(json.dumps({**values, "peak_rss": _vmhwm_bytes()}))


def child_baseline(result_file: str) -> None:
    import mixtral_trt.export.trace  # noqa: F401  (imports torch and onnx)

    _report(result_file)


def child_generate(result_file: str, pool: str, layers: str) -> None:
    """Write the pool's shards, one at a time, each atomically; existing shards are kept."""
    import torch
    from safetensors.torch import save_file

    from mixtral_trt.export.checkpoint import expected_tensors

    by_shard: dict[str, dict[str, tuple[int, ...]]] = {}
    for name, shape in expected_tensors(config(int(layers))).items():
        by_shard.setdefault(shard_of(name), {})[name] = shape
    for k, (shard, shapes) in enumerate(sorted(by_shard.items())):
        path = Path(pool) / shard
        if path.is_file():
            continue
        gen = torch.Generator().manual_seed(SEED + k)
        tensors = {name: _random(shape, name, gen) for name, shape in shapes.items()}
        tmp = path.with_name(f".{shard}.partial")
        save_file(tensors, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, path)
        del tensors  # one shard (~2.9 GB) in memory at a time
    _report(result_file)


def _random(shape, name: str, gen):
    import torch

    t = torch.empty(shape, dtype=torch.bfloat16)
    # Values do not matter, only that every byte is real; normal_ in bf16 is the fast path.
    return t.normal_(1.0 if name.endswith("norm.weight") else 0.0, 0.02, generator=gen)


def child_export(result_file: str, model_dir: str, out_dir: str) -> None:
    import time

    from mixtral_trt.export.onnx_export import export

    start = time.perf_counter()
    export(model_dir, out_dir, max_seq_len=MAX_SEQ_LEN, progress=False)
    _report(result_file, wall_s=time.perf_counter() - start)


def run_child(function: str, *args: str | Path) -> dict:
    """Run ``function(result_file, *args)`` in a fresh interpreter; its report, or an error."""
    with tempfile.TemporaryDirectory() as tmp:
        result_file = Path(tmp) / "result.json"
        cmd = [sys.executable, "-c", CHILD, __file__, function, str(result_file), *map(str, args)]
        proc = subprocess.run(cmd, stdin=subprocess.DEVNULL)
        if proc.returncode != 0 or not result_file.is_file():
            raise RuntimeError(f"child {function}{tuple(map(str, args))} failed with exit status {proc.returncode}")
        return json.loads(result_file.read_text())


# ---- parent: lay out checkpoints, measure, judge ---------------------------------------------


def make_checkpoint(workdir: Path, pool: Path, layers: int) -> Path:
    """A Hugging Face checkpoint directory whose shards are hard links into ``pool``."""
    from mixtral_trt.export.checkpoint import expected_tensors

    cfg = config(layers)
    shapes = expected_tensors(cfg)
    pool_names = sorted({shard_of(n) for n in shapes})
    hf_name = {s: f"model-{i + 1:05d}-of-{len(pool_names):05d}.safetensors" for i, s in enumerate(pool_names)}
    ckpt = workdir / f"mixtral-8x7b-{layers}layer"
    shutil.rmtree(ckpt, ignore_errors=True)
    ckpt.mkdir(parents=True)
    for shard, name in hf_name.items():
        os.link(pool / shard, ckpt / name)
    total = sum(_numel(s) * BYTES_PER_WEIGHT for s in shapes.values())
    index = {"metadata": {"total_size": total}, "weight_map": {n: hf_name[shard_of(n)] for n in shapes}}
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (ckpt / "config.json").write_text(json.dumps(cfg.to_hf(), indent=2) + "\n")
    return ckpt


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def dir_bytes(path: Path, suffix: str = "") -> int:
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file() and p.name.endswith(suffix))


def disk_needed(layers: list[int]) -> int:
    """Bytes of the shard pool plus the largest export (exports are removed one by one)."""
    from mixtral_trt.export.checkpoint import expected_tensors

    return 2 * sum(_numel(s) for s in expected_tensors(config(max(layers))).values()) * BYTES_PER_WEIGHT


def check_disk(workdir: Path, layers: list[int]) -> None:
    need, free = disk_needed(layers), shutil.disk_usage(workdir).free
    if free < need:
        raise SystemExit(
            f"{workdir} has {free / GB:.1f} GB free; this benchmark needs {need / GB:.1f} GB. "
            "Point --workdir at a larger disk"
        )


def measure(workdir: Path, layers: list[int], keep: bool = False) -> dict:
    """Baseline, generator and per-layer-count export measurements (bytes and seconds)."""
    workdir.mkdir(parents=True, exist_ok=True)
    check_disk(workdir, layers)
    pool = workdir / "shards"
    pool.mkdir(exist_ok=True)
    results = {"baseline": run_child("child_baseline")}
    results["generate"] = run_child("child_generate", pool, max(layers))
    for n in layers:
        ckpt = make_checkpoint(workdir, pool, n)
        out = workdir / f"export-{n}layer"
        shutil.rmtree(out, ignore_errors=True)
        r = run_child("child_export", ckpt, out)
        r.update(checkpoint_bytes=dir_bytes(ckpt, ".safetensors"), export_bytes=dir_bytes(out))
        results[n] = r
        if not keep:  # exports are as large as checkpoints; keep disk use at one of each
            shutil.rmtree(out)
    return results


def judge(results: dict, layers: list[int]) -> list[str]:
    """Every broken limit, as a sentence; empty when memory is bounded."""
    problems = [
        f"{n}-layer export peak RSS {results[n]['peak_rss'] / GB:.2f} GB >= {PEAK_LIMIT_GB} GB"
        for n in layers
        if results[n]["peak_rss"] >= PEAK_LIMIT_GB * GB
    ]
    ratio = peak_ratio(results, layers)
    if ratio is not None and ratio > RATIO_LIMIT:
        problems.append(f"peak RSS grows with layers: {max(layers)}/{min(layers)} layers = {ratio:.3f} > {RATIO_LIMIT}")
    return problems


def peak_ratio(results: dict, layers: list[int]) -> float | None:
    lo, hi = min(layers), max(layers)
    return None if lo == hi else results[hi]["peak_rss"] / results[lo]["peak_rss"]


def table(results: dict, layers: list[int]) -> str:
    lines = [f"{'layers':>6}  {'checkpoint GB':>13}  {'export GB':>9}  {'wall s':>7}  {'peak RSS GB':>11}"]
    for n in layers:
        r = results[n]
        lines.append(
            f"{n:>6}  {r['checkpoint_bytes'] / GB:>13.2f}  {r['export_bytes'] / GB:>9.2f}  "
            f"{r['wall_s']:>7.1f}  {r['peak_rss'] / GB:>11.3f}"
        )
    floor, generator = results["baseline"]["peak_rss"] / GB, results["generate"]["peak_rss"] / GB
    lines.append(f"baseline peak RSS (import torch, onnx, mixtral_trt.export.trace): {floor:.3f} GB")
    lines.append(f"checkpoint generator peak RSS (one shard at a time): {generator:.3f} GB")
    ratio = peak_ratio(results, layers)
    if ratio is not None:
        lines.append(f"peak RSS ratio {max(layers)} layers / {min(layers)} layer(s): {ratio:.3f} (limit {RATIO_LIMIT})")
    return "\n".join(lines)


def parse_layers(text: str) -> list[int]:
    try:
        layers = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"--layers={text!r} must be comma-separated integers, e.g. 1,2") from None
    if not layers or layers[0] < 1:
        raise argparse.ArgumentTypeError(f"--layers={text!r} must list layer counts >= 1")
    return layers


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, help="where to write checkpoints and exports (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep generated checkpoints and exports")
    parser.add_argument("--layers", type=parse_layers, default=[1, 2], help="layer counts to export (default 1,2)")
    args = parser.parse_args(argv)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="export-memory-"))
    try:
        results = measure(workdir, args.layers, keep=args.keep)
    except RuntimeError as exc:  # a child failed; its own traceback is already on stderr
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        if not args.keep:
            clean(workdir, args.layers, created=args.workdir is None)
    print(table(results, args.layers))
    problems = judge(results, args.layers)
    for p in problems:
        print(f"FAIL: {p}", file=sys.stderr)
    if args.keep:
        print(f"kept {workdir}")
    return 1 if problems else 0


def clean(workdir: Path, layers: list[int], created: bool) -> None:
    """Remove what we wrote; a user-given --workdir itself stays."""
    if created:
        shutil.rmtree(workdir, ignore_errors=True)
        return
    for name in ["shards", *(f"{kind}-{n}layer" for n in layers for kind in ("mixtral-8x7b", "export"))]:
        shutil.rmtree(workdir / name, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
