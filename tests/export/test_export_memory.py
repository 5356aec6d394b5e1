"""Export memory stays bounded at Mixtral-8x7B dimensions (scripts/export_memory.py).

Writes ~6.3 GB of random bf16 shards and two exports of the same size; minutes of disk I/O.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

from tests.conftest import load_module

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "export_memory.py"
LAYERS = [1, 2]


@pytest.fixture(scope="module")
def bench():
    return load_module(SCRIPT, "export_memory")


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="peak RSS is read from /proc/self/status")
def test_export_peak_rss_is_bounded_and_flat_in_layers(bench, tmp_path):
    need = bench.disk_needed(LAYERS)
    if shutil.disk_usage(tmp_path).free < need:
        pytest.skip(f"needs {need / 1e9:.1f} GB free disk in {tmp_path}")
    try:
        results = bench.measure(tmp_path, LAYERS)
    finally:
        bench.clean(tmp_path, LAYERS, created=False)
    print(bench.table(results, LAYERS))

    for n in LAYERS:
        # Every checkpoint byte must reach the export, or a low peak would prove nothing.
        assert results[n]["export_bytes"] >= results[n]["checkpoint_bytes"] > 2.9e9 * n
        assert results[n]["peak_rss"] < bench.PEAK_LIMIT_GB * 1e9, f"{n}-layer export peak RSS"
    ratio = results[2]["peak_rss"] / results[1]["peak_rss"]
    assert ratio <= bench.RATIO_LIMIT, f"peak RSS 2 layers / 1 layer = {ratio:.3f}"
