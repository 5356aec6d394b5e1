"""The README's Python example runs as written (against a tiny export at the path it names)."""

from __future__ import annotations

import os
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_python_api_example_runs(tmp_path, capsys):
    from mixtral_trt.export.onnx_export import export
    from mixtral_trt.export.tiny import default_tiny
    from mixtral_trt.optimize.lowering import lower_dir

    [example] = [b for b in _python_blocks() if "runtime.load" in b]
    build = re.search(r'runtime\.load\("([^"]+)"\)', example).group(1)
    export(default_tiny(), tmp_path / "export", max_seq_len=64, progress=False)
    lower_dir(tmp_path / "export", tmp_path / build, data="copy")
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        exec(compile(example, "README.md", "exec"), {})
    finally:
        os.chdir(cwd)
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and all("tok/s" in line for line in lines)
