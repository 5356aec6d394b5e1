#!/usr/bin/env python3
"""Print the ``polygraphy run`` arguments that give a build directory's graph valid inputs.

Polygraphy invents a shape for every dynamic dim (1) and values in [0, 1]; our graph needs
token ids below the vocabulary size, a cache of the graph's length and ``write_indices + seq <=
max_cache_len``. The shapes and ranges here come from the directory's manifest:

    polygraphy run --onnxrt DIR/model.onnx $(python3 scripts/polygraphy_inputs.py DIR)
    python3 scripts/polygraphy_inputs.py DIR --batch 2 --seq 5    # another input shape
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def polygraphy_args(build_dir: Path, batch: int = 1, seq: int = 4) -> list[str]:
    manifest = json.loads((Path(build_dir) / "manifest.json").read_text())
    cache_len = int(manifest["export"]["max_seq_len"])
    vocab = int(manifest["config"]["vocab_size"])
    if not 1 <= seq <= cache_len:
        raise SystemExit(f"Error: --seq={seq} must be between 1 and the build's max_seq_len={cache_len}")
    sizes = {"batch": batch, "seq": seq, "max_cache_len": cache_len}
    shapes = []
    for entry in manifest["io"]["inputs"]:
        dims = [d if isinstance(d, int) else sizes[d] for d in entry["shape"]]
        shapes.append(f"{entry['name']}:[{','.join(map(str, dims))}]")
    ranges = [f"input_ids:[0,{vocab - 1}]", f"position_ids:[0,{seq - 1}]", f"write_indices:[0,{cache_len - seq}]"]
    return ["--input-shapes", *shapes, "--val-range", *ranges]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("build_dir", type=Path, help="an export, optimize or engine directory (has manifest.json)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=4)
    args = parser.parse_args()
    print(" ".join(polygraphy_args(args.build_dir, args.batch, args.seq)))


if __name__ == "__main__":
    main()
