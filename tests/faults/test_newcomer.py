"""A newcomer's path: tokenizer checks at export, progress on long waits, CLI-flag wording in help
and errors, and a dependency set whose pieces work together."""

from __future__ import annotations

import json
import shutil

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
