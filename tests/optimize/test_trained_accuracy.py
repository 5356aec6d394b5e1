"""Precision accuracy judged on the small trained Mixtral (../shared/models/pystdlib-mixtral-30m).

The slow check builds fp32, fp16 and int8 of the trained checkpoint and compares them on the
held-out standard-library source; the fast ones check the perplexity arithmetic against torch's
cross-entropy and the held-out file selection against the interpreter's library.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mixtral_trt.optimize import accuracy as A

TRAINED = Path(__file__).resolve().parents[3] / "shared" / "models" / "pystdlib-mixtral-30m"


def test_perplexity_matches_torch_cross_entropy():
    import torch

    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 9, 50)).astype(np.float32) * 4
    chunks = rng.integers(0, 50, size=(3, 9)).tolist()
    want = torch.exp(torch.nn.functional.cross_entropy(
        torch.from_numpy(logits[:, :-1]).double().reshape(-1, 50), torch.tensor(chunks)[:, 1:].reshape(-1)))  # fmt: skip
    assert A.perplexity(logits, chunks) == pytest.approx(float(want), rel=1e-12)


def test_held_out_files_are_the_held_out_modules_without_tests():
    files = A.held_out_files()
    import sysconfig

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    tops = {p.relative_to(stdlib).parts[0] for p in files}
    assert {t.removesuffix(".py") for t in tops} == set(A.HELD_OUT)
    assert not [p for p in files if "test" in p.parts[-2:-1]], "test folders are left out"


def test_missing_stdlib_is_a_clear_error(tmp_path):
    with pytest.raises(A.AccuracyError, match="held-out modules"):
        A.held_out_files(tmp_path)


@pytest.mark.slow
def test_fp16_and_int8_on_the_trained_model(tmp_path):
    if not (TRAINED / "config.json").is_file():
        pytest.skip(f"the trained test model is not at {TRAINED} (a checkout without ../shared)")
    got = A.measure(TRAINED, tmp_path)
    for precision in ("fp16", "int8"):
        assert got[precision]["top1"] >= 0.99, (precision, got[precision])
        assert abs(got[precision]["ppl_change"]) <= 0.005, (precision, got[precision])
