"""A newcomer's path: tokenizer checks at export, progress on long waits, CLI-flag wording in help
and errors, and a dependency set whose pieces work together."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
from click.testing import CliRunner

from mixtral_trt.cli import main
from tests.conftest import make_checkpoint
from tests.export.conftest import SMALL, export_small

WARNING = "no tokenizer in {}: the build will take token ids only (--prompt-ids); copy tokenizer.model there"


def _checkpoint(root, **overrides):
    """SMALL with ``overrides``, and with no tokenizer whatever its vocabulary."""
    ckpt = make_checkpoint(root / "ckpt", seed=2, **{**SMALL, **overrides})
    (ckpt / "tokenizer.model").unlink(missing_ok=True)
    return ckpt


def _edit_config(ckpt, **fields):
    path = ckpt / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))


def _mixtral_tokenizer(ckpt):
    from mixtral_trt.export.tiny import tokenizer_source

    shutil.copyfile(tokenizer_source(), ckpt / "tokenizer.model")


def _export_cli(ckpt, out, *args):
    return CliRunner().invoke(main, ["export", "--model", str(ckpt), "--out", str(out), "--max-seq-len", "16", *args])


def _assert_refused(result, out, *needles):
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert not out.exists()


def test_export_without_tokenizer_warns_once_and_records_it(tmp_path):
    ckpt = _checkpoint(tmp_path)
    result = _export_cli(ckpt, tmp_path / "out", "--quiet")
    assert result.exit_code == 0, result.output
    assert result.stderr.strip().splitlines() == [
        f"warning: {WARNING.format(ckpt)} to generate from text"
    ], result.stderr  # --quiet drops progress, never the warning
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["export"]["tokenizer"] is None
    assert not {"tokenizer.model", "tokenizer.json"} & set(manifest["files"])


def test_export_records_the_tokenizer_and_accepts_a_padded_vocabulary(tmp_path):
    """vocab_size above the tokenizer's 32000 tokens is legal padding (checkpoints pad embeddings)."""
    import sentencepiece

    ckpt = _checkpoint(tmp_path, vocab_size=32064)
    _mixtral_tokenizer(ckpt)
    assert sentencepiece.SentencePieceProcessor(model_file=str(ckpt / "tokenizer.model")).vocab_size() == 32000
    result = _export_cli(ckpt, tmp_path / "out", "--quiet")
    assert result.exit_code == 0, result.output
    assert "warning" not in result.stderr
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["export"]["tokenizer"] == "tokenizer.model" and "tokenizer.model" in manifest["files"]


def test_export_refuses_a_tokenizer_larger_than_the_vocabulary(tmp_path):
    ckpt = _checkpoint(tmp_path)  # vocab_size 200
    _mixtral_tokenizer(ckpt)  # 32000 tokens
    _assert_refused(_export_cli(ckpt, tmp_path / "out"), tmp_path / "out", "32000 tokens", "vocab_size=200",
                    str(ckpt / "tokenizer.model"))  # fmt: skip


@pytest.mark.parametrize("kind, field, value, theirs", [("bos", "bos_token_id", 5, 1), ("eos", "eos_token_id", 7, 2)])
def test_export_refuses_special_ids_that_contradict_the_sentencepiece_model(tmp_path, kind, field, value, theirs):
    import sentencepiece

    ckpt = _checkpoint(tmp_path, vocab_size=32000)
    _mixtral_tokenizer(ckpt)
    sp = sentencepiece.SentencePieceProcessor(model_file=str(ckpt / "tokenizer.model"))
    assert (sp.bos_id(), sp.eos_id())[kind == "eos"] == theirs  # the tokenizer's own id
    _edit_config(ckpt, **{field: value})
    generation = ckpt / "generation_config.json"  # agrees with config.json: only the tokenizer disagrees
    generation.write_text(json.dumps({**json.loads(generation.read_text()), field: value}))
    _assert_refused(_export_cli(ckpt, tmp_path / "out"), tmp_path / "out", f"{kind.upper()} id {theirs}",
                    f"{field}={value}")  # fmt: skip


def test_export_refuses_special_ids_that_contradict_tokenizer_json(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    ckpt = _checkpoint(tmp_path)
    vocab = {"<unk>": 0, "<s>": 1, "hello": 2, "</s>": 3}
    tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>")).save(str(ckpt / "tokenizer.json"))
    (ckpt / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": {"content": "</s>"}}))
    assert tokenizers.Tokenizer.from_file(str(ckpt / "tokenizer.json")).token_to_id("</s>") == 3
    _assert_refused(_export_cli(ckpt, tmp_path / "out"), tmp_path / "out", "EOS id 3", "eos_token_id=2")


def test_shipped_tokenizers_pass_the_check(tmp_path):
    """The built-in tiny model and Mixtral's real pairing (32000 tokens, BOS 1, EOS 2) are accepted."""
    from mixtral_trt.export.checkpoint import check_tokenizer, open_checkpoint
    from mixtral_trt.export.tiny import default_tiny

    assert check_tokenizer(open_checkpoint(default_tiny())) == "tokenizer.model"
    ckpt = _checkpoint(tmp_path, vocab_size=32000)
    _mixtral_tokenizer(ckpt)
    assert check_tokenizer(open_checkpoint(ckpt)) == "tokenizer.model"


# --- progress on long silent waits ---------------------------------------------------------------


def test_export_reports_tracing_start_and_end(tmp_path):
    result = _export_cli(_checkpoint(tmp_path), tmp_path / "out")
    assert result.exit_code == 0, result.output
    lines = result.stderr.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("tracing the decoder"))
    assert "takes ~15 s" in lines[start]
    assert re.fullmatch(r"  done in \d+\.\d s", lines[start + 1]), lines  # not a terminal: no ticking


def test_tracing_progress_ticks_on_a_terminal(monkeypatch):
    import io
    import time

    from mixtral_trt.export import onnx_export

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    err = Terminal()
    monkeypatch.setattr("sys.stderr", err)
    with onnx_export._timed(True, "tracing", tick=0.05):
        time.sleep(0.3)
    text = err.getvalue()
    assert text.startswith("tracing ...") and "\rtracing ... 0 s" in text
    assert re.search(r"\rtracing \.\.\. done in 0\.\d s\n$", text), text
    err.truncate(0)
    with onnx_export._timed(False, "tracing"):
        pass
    assert err.getvalue() == ""


STUB_NVCC = """#!/bin/sh
# Stands in for nvcc: answers --version, and 'compiles' by creating the -o file after a pause.
if [ "$1" = "--version" ]; then echo "Cuda compilation tools, release 13.0, V13.0.48"; exit 0; fi
out=""; prev=""
for a in "$@"; do [ "$prev" = "-o" ] && out="$a"; prev="$a"; done
sleep 0.3
: > "$out"
"""


def _build_with_stub(tmp_path, *args):
    nvcc = tmp_path / "nvcc"
    nvcc.write_text(STUB_NVCC)
    nvcc.chmod(0o755)
    env = {**os.environ, "MIXTRAL_TRT_CACHE": str(tmp_path / "cache")}
    env.pop("MIXTRAL_TRT_CUTLASS_INCLUDE", None)
    cmd = [sys.executable, "-m", "mixtral_trt.plugins.build", "--nvcc", str(nvcc), "--arch", "80",
           "--out-dir", str(tmp_path / "lib"), *args]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60)


def test_kernel_build_reports_each_nvcc_command(tmp_path):
    proc = _build_with_stub(tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(tmp_path / "lib" / "libmixtral_moe_top2.so")
    lines = proc.stderr.splitlines()
    starts = [i for i, line in enumerate(lines) if re.fullmatch(r"  nvcc: kernels\.cu for sm_80 \.\.\.", line)]
    ends = [i for i, line in enumerate(lines) if re.fullmatch(r"  nvcc: kernels\.cu for sm_80 done in \d+\.\d s", line)]
    link_done = r"  nvcc: link libmixtral_moe_top2\.so done in .* s"
    link = [i for i, line in enumerate(lines) if re.fullmatch(link_done, line)]
    assert len(starts) == len(ends) == len(link) == 1 and starts[0] < ends[0] < link[0], lines
    seconds = float(re.search(r"done in (\S+) s", lines[ends[0]]).group(1))
    assert seconds >= 0.3  # the stub's compile time, measured


def test_kernel_build_quiet_prints_only_the_library(tmp_path):
    proc = _build_with_stub(tmp_path, "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "" and proc.stdout.strip() == str(tmp_path / "lib" / "libmixtral_moe_top2.so")


# --- help and errors name CLI flags ---------------------------------------------------------------

# `name=value` where name is a Python identifier not preceded by '-' (so `--flag=value` is fine)
KEYWORD_SYNTAX = re.compile(r"(?<![-\w])[a-z_][a-z0-9_]*=(?!=)")


def _all_helps():
    import click

    runner = CliRunner()
    helps = {"mixtral-build": runner.invoke(main, ["--help"])}
    for name, command in main.commands.items():
        helps[f"mixtral-build {name}"] = runner.invoke(main, [name, "--help"])
        assert isinstance(command, click.Command)
    for name, result in helps.items():
        assert result.exit_code == 0, (name, result.output)
    out = {name: r.output for name, r in helps.items()}
    proc = subprocess.run([sys.executable, "-m", "mixtral_trt.plugins.build", "--help"], capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    out["python -m mixtral_trt.plugins.build"] = proc.stdout
    return out


def test_help_texts_name_cli_flags_not_python_keywords():
    helps = _all_helps()
    assert {"mixtral-build generate", "mixtral-build engine", "mixtral-build triton"} <= set(helps)
    assert KEYWORD_SYNTAX.search("pass nvcc=<path>") and not KEYWORD_SYNTAX.search("--max-seq-len=64")
    for name, text in helps.items():
        assert not KEYWORD_SYNTAX.findall(text), (name, KEYWORD_SYNTAX.findall(text))


def test_missing_nvcc_error_names_the_flag(tmp_path):
    cmd = [sys.executable, "-m", "mixtral_trt.plugins.build", "--nvcc", str(tmp_path / "no-nvcc"), "--quiet"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and proc.stderr.startswith("Error: nvcc not found"), proc.stderr
    assert "--nvcc PATH" in proc.stderr and not KEYWORD_SYNTAX.findall(proc.stderr), proc.stderr


def test_engine_target_errors_name_the_flags():
    import types

    from mixtral_trt.optimize import engine, trt_compat

    datacenter = trt_compat.TensorRT(module=None, flavour="tensorrt", version="11.0.0")
    with pytest.raises(engine.EngineBuildError) as info:
        engine.check_target_sms(datacenter, ["89", "120"])
    assert "--sm 89,120" in str(info.value) and "--target tensorrt-rtx" in str(info.value)
    assert not KEYWORD_SYNTAX.findall(str(info.value)), str(info.value)

    caps = types.SimpleNamespace(__members__={"SM89": 0, "SM120": 1})
    rtx = trt_compat.TensorRT(module=types.SimpleNamespace(ComputeCapability=caps), flavour="tensorrt-rtx",
                              version="1.7.0")  # fmt: skip
    with pytest.raises(engine.EngineBuildError) as info:
        engine.check_target_sms(rtx, ["90"])
    assert "--target tensorrt" in str(info.value) and not KEYWORD_SYNTAX.findall(str(info.value)), str(info.value)


# --- the dependency set works together --------------------------------------------------------------


def test_transformers_converts_the_sentencepiece_tokenizer():
    """transformers turns tokenizer.model into its fast tokenizer through sentencepiece's generated
    protobuf code; that code must load under the protobuf the rest of the set (tritonclient) allows."""
    transformers = pytest.importorskip("transformers")
    from google.protobuf import __version__ as protobuf_version
    from mixtral_trt.export.tiny import default_tiny
    from mixtral_trt.runtime.tokenizer import Tokenizer

    try:
        from sentencepiece import sentencepiece_model_pb2
    except Exception as exc:  # protobuf's VersionError: gencode newer than the runtime
        pytest.fail(f"sentencepiece's generated code does not load under protobuf {protobuf_version}: {exc}")
    ckpt = default_tiny()
    proto = sentencepiece_model_pb2.ModelProto.FromString((ckpt / "tokenizer.model").read_bytes())
    assert len(proto.pieces) == 32000
    theirs = transformers.AutoTokenizer.from_pretrained(ckpt)
    ours = Tokenizer(ckpt)
    for text in ("The capital of France is", "def f(x):\n    return x  # ✓ 東京"):
        assert theirs(text, add_special_tokens=False).input_ids == ours.encode(text, bos=False), text


# --- the README tells a newcomer what the install and the tests need ----------------------------------


def _section(text: str, title: str) -> str:
    return text.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def test_readme_install_and_test_sections_say_what_is_needed():
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    readme = (root / "README.md").read_text()
    install, tests = _section(readme, "Install and run"), _section(readme, "Test")
    # The two set-up commands CI runs stay as they are.
    assert "pip install torch==2.13.0 && pip install -e '.[test,rtx]' && mixtral-build --precision fp16" in install
    assert "```bash\npython3 -m pytest -q\n```" in tests
    # PyPI's Linux torch is the CUDA build; the CPU wheel comes from PyTorch's own index.
    assert "2.7 GB" in install and "CUDA build" in install
    assert "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu" in install
    # What the suite needs beyond pip comes before the command: every apt package CI installs, and nvcc.
    before = tests.split("python3 -m pytest -q", 1)[0]
    ci = (root / ".ci" / "run").read_text()
    apt = re.search(r"apt-get install -y -qq ([^>\n]+)", ci).group(1).split()
    assert apt and all(re.search(rf"(?<![\w-]){re.escape(pkg)}(?![\w-])", before) for pkg in apt), apt
    assert "nvcc 13" in before and "skip" in before


def test_tracing_progress_ends_its_line_when_tracing_fails(monkeypatch):
    import io

    from mixtral_trt.export import onnx_export

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    err = Terminal()
    monkeypatch.setattr("sys.stderr", err)
    with pytest.raises(KeyboardInterrupt), onnx_export._timed(True, "tracing", tick=0.05):
        raise KeyboardInterrupt
    assert err.getvalue() == "tracing ...\n"  # no "done" claimed
