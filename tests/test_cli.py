"""``mixtral-build``: help everywhere without heavy imports, ``tiny`` output that transformers loads."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

from mixtral_trt.cli import main

SUBCOMMANDS = tuple(sorted(main.commands))
SMALL_ARGS = ["--layers", "1", "--hidden", "32", "--intermediate", "48", "--experts", "4", "--top-k", "2",
              "--heads", "2", "--kv-heads", "1", "--vocab", "200"]  # fmt: skip
REPO = Path(__file__).resolve().parents[1]


def invoke(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def assert_clean_error(result, *fragments: str) -> str:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"
    return lines[0]


def test_help():
    assert {"tiny", "export", "optimize"} <= set(SUBCOMMANDS)
    result = invoke("--help")
    assert result.exit_code == 0, result.output
    for name in SUBCOMMANDS:
        assert name in result.output


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_subcommand_help(name):
    result = invoke(name, "--help")
    assert result.exit_code == 0, result.output
    assert f"Usage: main {name}" in result.output or f"{name} [OPTIONS]" in result.output


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, cwd=REPO,
                          timeout=120)  # fmt: skip


def test_help_does_not_import_torch():
    proc = _python(
        """
        import sys
        from mixtral_trt.cli import main
        for args in [["--help"]] + [[name, "--help"] for name in main.commands]:
            try:
                main(args)
            except SystemExit as exc:
                assert exc.code == 0, (args, exc.code)
        heavy = sorted(m for m in ("torch", "tensorrt", "tensorrt_rtx", "onnxruntime", "transformers")
                       if m in sys.modules)
        assert not heavy, heavy
        print("HELP-OK")
        """
    )
    assert proc.returncode == 0, proc.stderr
    assert "HELP-OK" in proc.stdout


def test_missing_torch_is_a_clean_error(tmp_path):
    # sys.modules[name] = None makes "import torch" fail, as where torch is not installed.
    proc = _python(
        f"""
        import sys
        sys.modules["torch"] = None
        from mixtral_trt.cli import main
        main(["--help"], standalone_mode=False)
        main(["tiny", {str(tmp_path / "tiny")!r}] + {SMALL_ARGS!r})
        """
    )
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.startswith("Error: ") and "torch" in proc.stderr, proc.stderr
    assert "Install the missing package" in proc.stderr
    assert not (tmp_path / "tiny").exists()


def test_tiny_loads_in_transformers_with_every_weight(tmp_path):
    transformers = pytest.importorskip("transformers")
    import torch

    out = tmp_path / "tiny"
    result = invoke("tiny", str(out), *SMALL_ARGS, "--seed", "3")
    assert result.exit_code == 0, result.output
    # vocab 200 < the 32000 tokens of Mixtral's tokenizer: no tokenizer, token ids only
    assert {p.name for p in out.iterdir()} == {"config.json", "model.safetensors", "generation_config.json"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny"]  # no temporary leftovers

    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["MixtralForCausalLM"]
    model, info = transformers.MixtralForCausalLM.from_pretrained(out, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert not info["error_msgs"], info
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size) == (1, 32, 48)
    assert (cfg.num_local_experts, cfg.num_experts_per_tok, cfg.vocab_size) == (4, 2, 200)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads) == (2, 1)

    from safetensors.torch import load_file

    weights = load_file(out / "model.safetensors")
    torch.testing.assert_close(model.model.embed_tokens.weight, weights["model.embed_tokens.weight"], rtol=0, atol=0)
    torch.testing.assert_close(model.lm_head.weight, weights["lm_head.weight"], rtol=0, atol=0)



def test_tiny_refuses_non_empty_dir(tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine\n")
    assert_clean_error(invoke("tiny", str(out), *SMALL_ARGS), str(out), "not empty")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert (out / "keep.txt").read_text() == "mine\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


def test_tiny_refuses_a_file(tmp_path):
    out = tmp_path / "file"
    out.write_text("mine\n")
    assert_clean_error(invoke("tiny", str(out), *SMALL_ARGS), str(out), "is a file")
    assert out.read_text() == "mine\n"


def test_tiny_hidden_not_divisible_by_heads(tmp_path):
    out = tmp_path / "tiny"
    assert_clean_error(invoke("tiny", str(out), "--hidden", "30", "--heads", "4"),
                       "hidden_size=30", "num_attention_heads=4", "not divisible")  # fmt: skip
    assert not out.exists()


def test_tiny_kv_heads_must_divide_heads(tmp_path):
    out = tmp_path / "tiny"
    assert_clean_error(invoke("tiny", str(out), "--hidden", "48", "--heads", "4", "--kv-heads", "3"),
                       "num_key_value_heads=3", "num_attention_heads=4")  # fmt: skip
    assert not out.exists()


def test_tiny_top_k_beyond_experts(tmp_path):
    out = tmp_path / "tiny"
    assert_clean_error(invoke("tiny", str(out), "--experts", "2", "--top-k", "3"),
                       "num_experts_per_tok=3", "num_local_experts=2")  # fmt: skip
    assert not out.exists()


def test_export_of_missing_checkpoint(tmp_path):
    out = tmp_path / "out"
    assert_clean_error(invoke("export", "--model", str(tmp_path / "nowhere"), "--out", str(out)), "does not exist")
    assert not out.exists()


def test_optimize_refuses_foreign_output(tmp_path):
    from mixtral_trt.manifest import write_manifest

    export_dir = tmp_path / "export"
    export_dir.mkdir()
    write_manifest(export_dir, "export", {"export": {"model_file": "model.onnx"}})
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine\n")
    assert_clean_error(invoke("optimize", str(export_dir), "--out", str(out)), str(out), "refusing to overwrite")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_optimize_of_non_export(tmp_path):
    out = tmp_path / "out"
    assert_clean_error(invoke("optimize", str(tmp_path), "--out", str(out)), "manifest.json")
    assert not out.exists()
