#!/usr/bin/env python3
"""Accuracy of the fp16 and int8 (weight-only, default options) precision passes against fp32,
on ONNX Runtime (CPU), for the built-in tiny model and a larger random Mixtral.

For each model: max |logit error| and top-1 agreement over every position of a batch of
real-text prompts (one prefill), and greedy agreement over 64 generated tokens per prompt:
the share of tokens identical before the first divergence, and the share identical overall.

Two more rows separate the error of int8 *weights* from the error of int8 *execution*:
"int8 oracle" is the fp32 export with every weight the int8 build quantized replaced by
q · scale (read from the int8 build, computed in numpy), run in fp32; "int8 vs oracle"
compares the int8 build with it. "int8 fp16-attention" is int8 with the attention projections
kept fp16 (``--fp16-attention``: int8 experts only).

A second table measures the larger model's top-1 agreement on many more positions (long
real-text passages: the docstrings of Python standard-library modules, cut into chunks), and
adds an "int9 oracle": the same weights rounded the same way (symmetric, per output channel)
to 9 bits, i.e. what one more bit of weight precision would give.

Exits non-zero unless int8 top-1 agreement with fp32 on the larger model (the prompts) is at
least 95%.

    python scripts/precision_accuracy.py
    python scripts/precision_accuracy.py --out /tmp/acc   # keep the artifacts

With ``--model PATH`` (a trained checkpoint, e.g. ../shared/models/pystdlib-mixtral-30m) it
measures that checkpoint instead, on held-out text (the source files of the standard-library
modules in ``mixtral_trt.optimize.accuracy.HELD_OUT``): perplexity change and top-1 agreement
of fp16 and int8 against fp32; it exits non-zero unless both keep top-1 >= 99% and
|perplexity change| <= 0.5%.

    python scripts/precision_accuracy.py --model ../shared/models/pystdlib-mixtral-30m
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from mixtral_trt.export.tiny import SAMPLE_PROMPTS as PROMPTS

LARGER = dict(hidden_size=512, intermediate_size=1024, num_local_experts=8, num_attention_heads=8,
              num_key_value_heads=2, num_hidden_layers=4, vocab_size=32000)  # fmt: skip
NEW_TOKENS = 64
MAX_SEQ_LEN = 128
THRESHOLD = 0.95
LONG_MODULES = ("argparse", "collections", "logging", "subprocess", "threading", "json", "zipfile", "unittest",
                "email", "http", "pickle", "csv")  # fmt: skip
LONG_CHUNK, LONG_CHUNKS = 96, 24  # tokens per passage (plus BOS), passages


def measure(directory: Path, ids: list[list[int]]) -> tuple[np.ndarray, list[list[int]]]:
    """Prefill logits of every position [P, V], and NEW_TOKENS greedy tokens per prompt (EOS ignored)."""
    from mixtral_trt import runtime

    model = runtime.load(directory)
    logits = np.concatenate(model.logits(ids))
    model.generator.eos_id = -1  # every row decodes exactly NEW_TOKENS tokens
    outputs = [r.output_ids for r in model.generate(ids, max_new_tokens=NEW_TOKENS, greedy=True)]
    return logits, outputs


def compare(ref, got) -> dict[str, float]:
    (ref_logits, ref_out), (logits, out) = ref, got
    prefix = []
    for a, b in zip(ref_out, out, strict=True):
        same = np.array(a) == np.array(b)
        prefix.append(len(same) if same.all() else int(np.argmin(same)))
    return {
        "max_err": float(np.abs(logits - ref_logits).max()),
        "median_err": float(np.median(np.abs(logits - ref_logits).max(-1))),
        "top1": float((logits.argmax(-1) == ref_logits.argmax(-1)).mean()),
        "prefix": float(np.mean(prefix) / NEW_TOKENS),
        "overall": float(np.mean([np.mean(np.array(a) == np.array(b)) for a, b in zip(ref_out, out, strict=True)])),
    }


def dequantized_export(export_dir: Path, int8_dir: Path, out: Path, bits: int = 8) -> Path:
    """``export_dir`` (fp32 weights) with each weight that ``int8_dir`` quantized replaced by q · scale.

    ``bits=8`` takes q and scale from the int8 build itself; other widths round the fp32 weight
    the same way (symmetric, per output channel, scale = max|row| / (2^(bits-1) - 1)) in numpy.
    """
    import onnx

    from mixtral_trt.manifest import read_manifest, write_manifest

    def tensors(d):
        return {t.name: t for t in onnx.load(str(d / "model.onnx"), load_external_data=False).graph.initializer}

    def where(t):
        return int({e.key: e.value for e in t.external_data}["offset"])

    def read(d, t, dtype):
        return np.fromfile(d / "model.onnx.data", dtype, int(np.prod(t.dims)), offset=where(t)).reshape(tuple(t.dims))

    from mixtral_trt.manifest import is_artifact

    if is_artifact(out, "export"):  # from an earlier --out run
        shutil.rmtree(out)
    shutil.copytree(export_dir, out)
    src, q = tensors(export_dir), tensors(int8_dir)
    with open(out / "model.onnx.data", "r+b") as f:
        for name, t in src.items():
            if f"{name}.int8" in q:
                assert t.data_type == onnx.TensorProto.FLOAT, f"{name}: the oracle needs an fp32 export"
                if bits == 8:
                    scale = read(int8_dir, q[f"{name}.scale"], np.float16).astype(np.float32)
                    w = read(int8_dir, q[f"{name}.int8"], np.int8) * scale[..., None]
                else:
                    w = read(export_dir, t, np.float32)
                    qmax = 2 ** (bits - 1) - 1
                    scale = np.abs(w).max(-1, keepdims=True) / qmax
                    scale[scale == 0] = 1
                    w = np.clip(np.round(w / scale), -qmax, qmax) * scale
                f.seek(where(t))
                f.write(w.astype("<f4").tobytes())
    manifest = read_manifest(out, "export", verify=False)
    body = {k: v for k, v in manifest.items() if k not in ("format", "format_version", "stage", "files")}
    write_manifest(out, "export", body)
    return out


def long_text(model) -> list[list[int]]:
    """LONG_CHUNKS passages of LONG_CHUNK tokens of real English prose, each after a BOS."""
    import importlib

    docs = (importlib.import_module(m).__doc__ for m in LONG_MODULES)
    tok = model.generator.tokenizer
    ids = tok.encode(" ".join(" ".join(d.split()) for d in docs if d), bos=False)
    chunks = [[tok.bos_id, *ids[i : i + LONG_CHUNK]] for i in range(0, len(ids) - LONG_CHUNK + 1, LONG_CHUNK)]
    return chunks[:LONG_CHUNKS]


def long_top1(dirs: dict[str, Path], pairs) -> list[tuple[str, int, float, float]]:
    """(compared, positions, max |logit error|, top-1 agreement) on the long text, prefill only."""
    from mixtral_trt import runtime

    logits = {}
    for name, d in dirs.items():
        model = runtime.load(d, verify=False)
        chunks = long_text(model)
        step = model.backend.max_batch
        logits[name] = np.concatenate([x for i in range(0, len(chunks), step) for x in model.logits(chunks[i : i + step])])
    rows = []
    for a, b in pairs:
        err = np.abs(logits[a] - logits[b]).max()
        rows.append((f"{a} vs {b}", len(logits[b]), float(err), float((logits[a].argmax(-1) == logits[b].argmax(-1)).mean())))
    return rows


def run_model(name: str, ckpt: Path, root: Path, long: bool = False):
    from mixtral_trt import runtime
    from mixtral_trt.export.onnx_export import export
    from mixtral_trt.optimize.precision import convert

    start = time.perf_counter()
    export_dir = export(ckpt, root / f"{name}-fp32", max_batch=len(PROMPTS), max_seq_len=MAX_SEQ_LEN, progress=False)
    dirs = {"fp32": export_dir}
    for precision in ("fp16", "int8"):
        dirs[precision] = convert(export_dir, root / f"{name}-{precision}", precision, progress=False)
    dirs["int8 fp16-attention"] = convert(export_dir, root / f"{name}-int8-fp16-attention", "int8",
                                          int8_attention=False, progress=False)  # fmt: skip
    dirs["int8 oracle"] = dequantized_export(export_dir, dirs["int8"], root / f"{name}-int8-oracle")

    ids = runtime.load(export_dir, verify=False).generator.encode(PROMPTS)
    got = {p: measure(d, ids) for p, d in dirs.items()}
    pairs = [("fp16", "fp32"), ("int8", "fp32"), ("int8 oracle", "fp32"), ("int8", "int8 oracle"),
             ("int8 fp16-attention", "fp32")]  # fmt: skip
    rows = [(name, f"{a} vs {b}", len(got[b][0]), compare(got[b], got[a])) for a, b in pairs]
    long_rows = []
    if long:
        dirs["int9 oracle"] = dequantized_export(export_dir, dirs["int8"], root / f"{name}-int9-oracle", bits=9)
        long_rows = long_top1(dirs, pairs[:3] + pairs[4:] + [("int9 oracle", "fp32")])
    print(f"  {name}: built and measured in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return rows, long_rows


def trained(model: Path, out: Path | None) -> int:
    """The --model table: fp16 and int8 against fp32 on the held-out text."""
    from mixtral_trt.optimize import accuracy as A

    with tempfile.TemporaryDirectory() as tmp:
        root = out or Path(tmp)
        got = A.measure(model, root / "trained")
    print(f"{model}: {A.PASSAGES} held-out passages of {A.PASSAGE} tokens ({got['fp32']['positions']} predicted "
          f"positions) from {', '.join(A.HELD_OUT)}; ONNX Runtime CPU; fp32 perplexity {got['fp32']['perplexity']:.3f}")
    print()
    print("| build | perplexity | change vs fp32 | top-1 agreement |")
    print("|---|---|---|---|")
    bad = []
    for p in ("fp16", "int8"):
        m = got[p]
        print(f"| {p} | {m['perplexity']:.3f} | {m['ppl_change']:+.4%} | {m['top1']:.2%} |")
        if m["top1"] < 0.99 or abs(m["ppl_change"]) > 0.005:
            bad.append(p)
    if bad:
        print(f"\nFAIL: {', '.join(bad)} below top-1 99% or beyond 0.5% perplexity change")
        return 1
    print("\nOK: fp16 and int8 keep top-1 >= 99% and |perplexity change| <= 0.5%")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, help="keep the checkpoints and builds here (default: a temporary directory)")
    ap.add_argument("--layers", type=int, default=LARGER["num_hidden_layers"], metavar="N",
                    help="decoder layers of the larger model (default %(default)s)")  # fmt: skip
    ap.add_argument("--model", type=Path, metavar="PATH",
                    help="measure this (trained) checkpoint on held-out standard-library source instead")  # fmt: skip
    args = ap.parse_args()
    if args.model:
        return trained(args.model, args.out)

    from mixtral_trt.export.tiny import default_tiny, tiny_config, write_tiny

    with tempfile.TemporaryDirectory() as tmp:
        root = args.out or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        if args.layers < 1:
            ap.error(f"--layers {args.layers}: the larger model needs at least one layer")
        larger = root / f"larger-{args.layers}-ckpt"
        if not (larger / "config.json").is_file():
            write_tiny(larger, tiny_config(**{**LARGER, "num_hidden_layers": args.layers}), seed=0)
        rows, _ = run_model("tiny", default_tiny(), root)
        larger_rows, long_rows = run_model("larger", larger, root, long=True)
        rows += larger_rows

    print(f"{len(PROMPTS)} real-text prompts (Mixtral tokenizer), one batched prefill; greedy {NEW_TOKENS} new tokens "
          "per prompt; ONNX Runtime CPU; reference: the fp32 export")  # fmt: skip
    print(f"larger = hidden 512, FFN 1024, 8 experts top-2, 8/2 heads, {args.layers} layers, vocab 32000 "
          "(random weights)")  # fmt: skip
    print()
    print("| model | compared | positions | max abs logit error | median per-position max error | top-1 agreement "
          "| greedy identical before first divergence | greedy identical overall |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for name, precision, positions, m in rows:
        print(f"| {name} | {precision} | {positions} | {m['max_err']:.4f} | {m['median_err']:.4f} | {m['top1']:.1%} "
              f"| {m['prefix']:.1%} | {m['overall']:.1%} |")  # fmt: skip
    print(f"\nlarger model, long text ({LONG_CHUNKS} passages of {LONG_CHUNK} tokens from the docstrings of "
          f"{', '.join(LONG_MODULES)}; Python {sys.version.split()[0]}): prefill only")  # fmt: skip
    print()
    print("| compared | positions | max abs logit error | top-1 agreement |")
    print("|---|---|---|---|")
    for compared, positions, err, top1 in long_rows:
        print(f"| {compared} | {positions} | {err:.4f} | {top1:.1%} |")
    top1 = {p: m["top1"] for name, p, _, m in rows if name == "larger"}
    int8_larger = top1["int8 vs fp32"]
    if int8_larger < THRESHOLD:
        print(f"\nFAIL: int8 top-1 agreement on the larger model is {int8_larger:.1%} < {THRESHOLD:.0%} "
              f"(fp32 math on the same int8 weights reaches {top1['int8 oracle vs fp32']:.1%}; the int8 build "
              f"agrees with that oracle on {top1['int8 vs int8 oracle']:.1%} of positions)")  # fmt: skip
        return 1
    print(f"\nOK: int8 top-1 agreement on the larger model {int8_larger:.1%} >= {THRESHOLD:.0%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
