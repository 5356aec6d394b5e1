"""Tokenizer from a model or build directory: ``tokenizer.model`` (SentencePiece, Mixtral's own)
or ``tokenizer.json`` (Hugging Face tokenizers). BOS is prepended as Mixtral expects."""

from __future__ import annotations

import json
from pathlib import Path

# The files a tokenizer is read from, in the order Tokenizer prefers them.
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json")


class TokenizerError(ValueError):
    """No usable tokenizer in the directory."""


def tokenizer_file(directory: str | Path) -> Path | None:
    """The tokenizer file :class:`Tokenizer` reads from ``directory``, or None when there is none."""
    return next((Path(directory) / n for n in TOKENIZER_FILES if (Path(directory) / n).is_file()), None)


class Tokenizer:
    """encode(text) -> ids with BOS; decode(ids) -> text; incremental decoding for streaming.

    ``own_bos_id`` / ``own_eos_id`` are the ids the tokenizer itself defines (None where it defines
    none); ``bos_id`` / ``eos_id`` fall back to the ids given for what it leaves undefined.
    """

    def __init__(self, directory: str | Path, bos_id: int | None = 1, eos_id: int | None = 2) -> None:
        directory = Path(directory)
        sp_path, json_path = directory / "tokenizer.model", directory / "tokenizer.json"
        if sp_path.is_file():
            import sentencepiece

            self._sp = sentencepiece.SentencePieceProcessor(model_file=str(sp_path))
            self._hf = None
            self.vocab_size = self._sp.vocab_size()
            self.own_bos_id = self._sp.bos_id() if self._sp.bos_id() >= 0 else None
            self.own_eos_id = self._sp.eos_id() if self._sp.eos_id() >= 0 else None
        elif json_path.is_file():
            import tokenizers

            self._sp = None
            self._hf = tokenizers.Tokenizer.from_file(str(json_path))
            self.vocab_size = self._hf.get_vocab_size()
            self.own_bos_id, self.own_eos_id = _hf_special_ids(directory, self._hf)
        else:
            raise TokenizerError(
                f"{directory} has neither tokenizer.model (SentencePiece) nor tokenizer.json; "
                "copy the checkpoint's tokenizer there or pass token ids instead of text"
            )
        self.bos_id = self.own_bos_id if self.own_bos_id is not None else bos_id
        self.eos_id = self.own_eos_id if self.own_eos_id is not None else eos_id

    def encode(self, text: str, bos: bool = True) -> list[int]:
        if self._sp is not None:
            ids = self._sp.encode(text)
        else:
            ids = self._hf.encode(text, add_special_tokens=False).ids
        return ([self.bos_id] if bos and self.bos_id is not None else []) + list(ids)

    def decode(self, ids: list[int]) -> str:
        ids = [int(i) for i in ids if 0 <= int(i) < self.vocab_size]
        if self._sp is not None:
            return self._sp.decode(ids)
        return self._hf.decode(ids, skip_special_tokens=True)


def _hf_special_ids(directory: Path, hf) -> tuple[int | None, int | None]:
    """BOS/EOS ids of a tokenizer.json, from the token names its tokenizer_config.json gives."""
    try:
        config = json.loads((directory / "tokenizer_config.json").read_text())
    except (OSError, ValueError):
        return None, None
    if not isinstance(config, dict):
        return None, None

    def token_id(key: str) -> int | None:
        token = config.get(key)
        token = token.get("content") if isinstance(token, dict) else token
        return hf.token_to_id(token) if isinstance(token, str) else None

    return token_id("bos_token"), token_id("eos_token")


class StreamDecoder:
    """Turns a growing list of token ids into text deltas, holding back incomplete UTF-8.

    SentencePiece pieces carry leading spaces and byte-fallback tokens, so decoding tokens one
    by one is wrong; we decode the whole sequence and emit what is new and stable.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer, self.ids, self.emitted = tokenizer, [], ""

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):  # a multi-byte character is not complete yet
            return ""
        delta = text[len(self.emitted):] if text.startswith(self.emitted) else ""
        self.emitted = text if delta or text.startswith(self.emitted) else self.emitted
        return delta
