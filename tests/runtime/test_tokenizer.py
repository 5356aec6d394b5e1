"""Our tokenizer against transformers' SentencePiece Llama tokenizer on Mixtral's tokenizer.model."""

from __future__ import annotations

import shutil

import pytest

from mixtral_trt.export.tiny import tokenizer_source
from mixtral_trt.runtime.tokenizer import StreamDecoder, Tokenizer, TokenizerError

TEXTS = ["Hello world", "  leading spaces", "Ünïcödé ✓ 東京 🙂", "line one\nline two\ttab", "x" * 50, "1234.5678"]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    shutil.copyfile(tokenizer_source(), path / "tokenizer.model")
    return path


def test_encode_matches_mistral_reference_with_bos(tok_dir):
    """mistral-common's SentencePieceTokenizer is Mistral's own reference for Mixtral's tokenizer."""
    sp_module = pytest.importorskip("mistral_common.tokens.tokenizers.sentencepiece")
    ours = Tokenizer(tok_dir)
    theirs = sp_module.SentencePieceTokenizer(str(tok_dir / "tokenizer.model"))
    assert (ours.vocab_size, ours.bos_id, ours.eos_id) == (theirs.n_words, theirs.bos_id, theirs.eos_id) == (32000, 1, 2)
    for text in TEXTS:
        ids = theirs.encode(text, bos=True, eos=False)
        assert ours.encode(text) == ids, text
        assert ours.decode(ids) == theirs.decode(ids)


def test_stream_decoder_concatenates_to_the_full_text(tok_dir):
    tok = Tokenizer(tok_dir)
    for text in TEXTS:
        ids = tok.encode(text, bos=False)
        stream = StreamDecoder(tok)
        assert "".join(stream.push(i) for i in ids) == tok.decode(ids), text


def test_tokenizer_json_is_used_when_no_sentencepiece_model(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    model = tokenizers.models.WordLevel({"<unk>": 0, "<s>": 1, "</s>": 2, "hello": 3, "world": 4}, unk_token="<unk>")
    tk = tokenizers.Tokenizer(model)
    tk.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tk.save(str(tmp_path / "tokenizer.json"))
    tok = Tokenizer(tmp_path)
    assert tok.encode("hello world") == [1, 3, 4]
    assert tok.vocab_size == 5


def test_missing_tokenizer_is_a_clear_error(tmp_path):
    with pytest.raises(TokenizerError, match="tokenizer.model"):
        Tokenizer(tmp_path)
