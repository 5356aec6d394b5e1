#!/usr/bin/env python3
"""Decode tokens/s and prefill time: our ONNX Runtime backend vs transformers eager, same model,
same process, same prompt, greedy. Prints a table and the ratios (ours / transformers).

    python scripts/bench_generate.py                 # built-in tiny model
    python scripts/bench_generate.py --model DIR --max-seq-len 512 --new-tokens 64
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def bench_ours(export_dir: Path, prompt: list[int], new_tokens: int, repeats: int, threads: int) -> tuple[float, float]:
    from mixtral_trt import runtime

    model = runtime.load(export_dir, threads=threads)
    model.generator.eos_id = -1  # never stop early: every run decodes exactly new_tokens
    model.generate([prompt], max_new_tokens=4, greedy=True)  # warm-up
    prefill, rate = [], []
    for _ in range(repeats):
        [r] = model.generate([prompt], max_new_tokens=new_tokens, greedy=True)
        prefill.append(r.prefill_ms)
        rate.append(r.decode_tokens_per_s)
    return float(np.median(prefill)), float(np.median(rate))


def bench_transformers(ckpt: Path, prompt: list[int], new_tokens: int, repeats: int) -> tuple[float, float]:
    import transformers

    transformers.logging.set_verbosity_error()
    hf = transformers.MixtralForCausalLM.from_pretrained(ckpt, dtype=torch.float32, attn_implementation="eager").eval()
    ids = torch.tensor([prompt])
    prefill, rate = [], []
    with torch.inference_mode():
        for n in range(repeats + 1):
            start = time.perf_counter()
            out = hf(ids, use_cache=True)
            p_ms = (time.perf_counter() - start) * 1e3
            cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
            start = time.perf_counter()
            for _ in range(new_tokens - 1):
                out = hf(token, cache=cache, use_cache=True)
                cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
            elapsed = time.perf_counter() - start
            if n:  # first pass is warm-up
                prefill.append(p_ms)
                rate.append((new_tokens - 1) / elapsed)
    return float(np.median(prefill)), float(np.median(rate))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny", help="checkpoint directory or 'tiny'")
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--max-seq-len", type=int, default=256, help="KV cache capacity of the export")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0 = all cores)")
    args = ap.parse_args()

    from mixtral_trt.export.onnx_export import export
    from mixtral_trt.export.tiny import resolve_model

    ckpt = resolve_model(args.model)
    torch.manual_seed(0)
    prompt = [1] + torch.randint(3, 32000, (args.prompt_tokens - 1,)).tolist()
    with tempfile.TemporaryDirectory() as tmp:
        export_dir = export(ckpt, Path(tmp) / "export", max_batch=1, max_seq_len=args.max_seq_len, progress=False)
        ours = bench_ours(export_dir, prompt, args.new_tokens, args.repeats, args.threads)
    theirs = bench_transformers(ckpt, prompt, args.new_tokens, args.repeats)

    print(f"model {args.model}, prompt {args.prompt_tokens} tokens, {args.new_tokens} new tokens, batch 1, "
          f"cache capacity {args.max_seq_len}, torch threads {torch.get_num_threads()}")  # fmt: skip
    print(f"{'':28}{'prefill ms':>12}{'decode tok/s':>14}")
    print(f"{'transformers eager (fp32)':28}{theirs[0]:12.2f}{theirs[1]:14.1f}")
    print(f"{'mixtral-trt onnxruntime':28}{ours[0]:12.2f}{ours[1]:14.1f}")
    print(f"ratio ours/transformers: decode {ours[1] / theirs[1]:.2f}x faster, prefill {theirs[0] / ours[0]:.2f}x faster")


if __name__ == "__main__":
    main()
