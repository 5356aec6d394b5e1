"""Accuracy of the precision passes against fp32 on a trained checkpoint, on ONNX Runtime (CPU).

Held-out text: the source files of the Python standard-library modules the small trained test
model never saw (:data:`HELD_OUT`, read from this interpreter's own library), tokenized with the
checkpoint's tokenizer and cut into :data:`PASSAGES` passages of :data:`PASSAGE` tokens, each
after a BOS. For each build: top-1 agreement with the fp32 build over every predicted position,
and the perplexity of the next token (exp of the mean negative log-likelihood), whose relative
change against fp32 is the headline number.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

import numpy as np

HELD_OUT = ("argparse", "collections", "csv", "email", "http", "json", "logging", "pickle", "subprocess",
            "threading", "unittest", "zipfile")  # fmt: skip
PASSAGE, PASSAGES = 128, 32
MAX_BATCH = 8


class AccuracyError(ValueError):
    """The held-out text cannot be found or is too short."""


def held_out_files(stdlib: str | Path | None = None) -> list[Path]:
    """The held-out modules' source files (for a package, its .py files outside test folders), sorted."""
    root = Path(stdlib or sysconfig.get_paths()["stdlib"])
    files: list[Path] = []
    for name in HELD_OUT:
        if (root / f"{name}.py").is_file():
            files.append(root / f"{name}.py")
        elif (root / name).is_dir():
            files += sorted(p for p in (root / name).rglob("*.py") if "test" not in p.relative_to(root).parts[:-1])
    if not files:
        raise AccuracyError(f"no source of the held-out modules {', '.join(HELD_OUT)} under {root}; "
                            "pass the directory of a Python standard library")  # fmt: skip
    return files


def passages(tokenizer, files: list[Path], length: int = PASSAGE, count: int = PASSAGES) -> list[list[int]]:
    """``count`` passages of ``length`` tokens, each after a BOS, spread evenly over the text."""
    text = "\n".join(p.read_text(encoding="utf-8", errors="replace") for p in files)
    ids = tokenizer.encode(text, bos=False)
    if len(ids) < length * count:
        raise AccuracyError(f"the held-out text has {len(ids)} tokens; {count} passages of {length} need more")
    starts = np.linspace(0, len(ids) - length, count).astype(int)
    return [[tokenizer.bos_id, *ids[s : s + length]] for s in starts]


def prefill_logits(build_dir: Path, chunks: list[list[int]]) -> np.ndarray:
    """Logits [passages, tokens, V]: one prefill per passage, in batches of the build's max_batch."""
    from mixtral_trt import runtime

    model = runtime.load(build_dir, verify=False)
    step = model.backend.max_batch
    return np.stack([x for i in range(0, len(chunks), step) for x in model.logits(chunks[i : i + step])])


def perplexity(logits: np.ndarray, chunks: list[list[int]]) -> float:
    """exp(mean NLL) of each next token (position t predicts token t+1), computed in float64."""
    x = logits[:, :-1].astype(np.float64)
    x -= x.max(-1, keepdims=True)
    logp = x - np.log(np.exp(x).sum(-1, keepdims=True))
    target = np.asarray(chunks)[:, 1:]
    nll = -np.take_along_axis(logp, target[..., None], -1)[..., 0]
    return float(np.exp(nll.mean()))


def measure(ckpt: str | Path, root: str | Path, precisions=("fp16", "int8"), stdlib: str | Path | None = None) -> dict:
    """{'fp32': {...}, precision: {...}}: perplexity, and against fp32 its relative change and top-1 agreement."""
    from mixtral_trt import runtime
    from mixtral_trt.export.onnx_export import export
    from mixtral_trt.optimize.precision import convert

    root = Path(root)
    fp32 = export(ckpt, root / "fp32", max_batch=MAX_BATCH, max_seq_len=PASSAGE + 1, progress=False)
    tokenizer = runtime.load(fp32, verify=False).generator.tokenizer
    if tokenizer is None:
        raise AccuracyError(f"{ckpt} has no tokenizer: the held-out text cannot be encoded")
    chunks = passages(tokenizer, held_out_files(stdlib))
    ref = prefill_logits(fp32, chunks)
    positions = int(ref.shape[0] * (ref.shape[1] - 1))
    out = {"fp32": {"perplexity": perplexity(ref, chunks), "positions": positions}}
    for p in precisions:
        got = prefill_logits(convert(fp32, root / p, p, progress=False), chunks)
        ppl = perplexity(got, chunks)
        out[p] = {"perplexity": ppl, "ppl_change": ppl / out["fp32"]["perplexity"] - 1, "positions": positions,
                  "top1": float((got[:, :-1].argmax(-1) == ref[:, :-1].argmax(-1)).mean())}  # fmt: skip
    return out
