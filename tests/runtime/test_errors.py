"""Bad requests and bad build directories: clear errors naming the value and the limit, and the
loaded model stays usable afterwards."""

from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner

from mixtral_trt import runtime
from mixtral_trt.cli import main
from mixtral_trt.manifest import ManifestError

MAX_BATCH, MAX_SEQ = 2, 24


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    from mixtral_trt.export.onnx_export import export
    from mixtral_trt.export.tiny import default_tiny

    return export(default_tiny(), tmp_path_factory.mktemp("rt-err") / "export", max_batch=MAX_BATCH,
                  max_seq_len=MAX_SEQ, progress=False)  # fmt: skip


@pytest.fixture(scope="module")
def model(export_dir):
    return runtime.load(export_dir)


@pytest.mark.parametrize(
    "prompts, kwargs, message",
    [
        ([""], {}, "prompt 0 is empty"),
        ([[]], {}, "prompt 0 is empty"),
        ([[1, -1]], {}, r"token id -1 outside the vocabulary \[0, 32000\)"),
        ([[1, 32000]], {}, r"token id 32000 outside the vocabulary \[0, 32000\)"),
        ([[1] * 20], {"max_new_tokens": 5}, "prompt of 20 tokens \\+ max_new_tokens=5 = 25 exceeds the build's max_seq_len=24"),
        ([[1, 2]] * 3, {}, "batch of 3 prompts exceeds the build's max_batch=2"),
        ([], {}, "no prompts given"),
        ("hello", {}, "list of strings"),
        ([[1]], {"top_p": 2.0}, "top_p=2.0"),
    ],
)  # fmt: skip
def test_bad_requests_name_value_and_limit(model, prompts, kwargs, message):
    with pytest.raises(runtime.GenerationError, match=message):
        model.generate(prompts, **({"max_new_tokens": 4} | kwargs))
    # The process (and the loaded model) stays usable.
    [ok] = model.generate([[1, 415]], max_new_tokens=2, greedy=True)
    assert len(ok.output_ids) == 2


def test_missing_manifest(tmp_path, export_dir):
    shutil.copytree(export_dir, tmp_path / "b")
    (tmp_path / "b" / "manifest.json").unlink()
    with pytest.raises(ManifestError, match="has no manifest.json"):
        runtime.load(tmp_path / "b")


def test_other_format_version(tmp_path, export_dir):
    shutil.copytree(export_dir, tmp_path / "b")
    path = tmp_path / "b" / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["format_version"] = 99
    path.write_text(json.dumps(manifest))
    with pytest.raises(ManifestError, match="format_version=99.*reads version 1"):
        runtime.load(tmp_path / "b")


def test_modified_file_fails_sha256(tmp_path, export_dir):
    shutil.copytree(export_dir, tmp_path / "b")
    data = tmp_path / "b" / "model.onnx.data"
    with open(data, "r+b") as f:
        f.seek(5000)
        byte = f.read(1)
        f.seek(5000)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(ManifestError, match="model.onnx.data: sha256 differs"):
        runtime.load(tmp_path / "b")


def test_cli_errors_are_one_line(export_dir):
    runner = CliRunner()
    cases = [
        (["--prompt-ids", "1,2", "--prompt", "x"], "one kind, not both"),
        (["--prompt", ""], "prompt 0 is empty"),
        (["--prompt-ids", "1," + "1," * 30, "--max-new-tokens", "4"], "exceeds the build's max_seq_len=24"),
        (["--prompt-ids", "5,1e3"], "not a comma-separated list of integers"),
        (["--greedy", "--temperature", "0.5", "--prompt-ids", "1"], "--greedy cannot be combined"),
    ]
    for args, message in cases:
        result = runner.invoke(main, ["generate", str(export_dir), *args])
        assert result.exit_code != 0, args
        assert message in result.output, (args, result.output)
        assert "Traceback" not in result.output


def test_cli_json_output_fields(export_dir):
    args = ["generate", str(export_dir), "--prompt", "Hello there", "--prompt", "Paris is", "--json",
            "--max-new-tokens", "3"]  # fmt: skip
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.output.strip().splitlines()]
    assert len(rows) == 2
    for row in rows:
        assert {"prompt_ids", "output_ids", "text", "finish_reason", "prefill_ms", "decode_tokens_per_s"} <= set(row)
        assert len(row["output_ids"]) == 3 and row["finish_reason"] == "length"
        assert row["prompt_ids"][0] == 1


def test_cli_streams_text_for_one_prompt(export_dir, model):
    [expected] = model.generate(["Hello there"], max_new_tokens=6, greedy=True)
    result = CliRunner().invoke(main, ["generate", str(export_dir), "--prompt", "Hello there", "--max-new-tokens", "6"])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[0] == expected.text
