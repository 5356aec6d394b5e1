"""Tokenizer from a model or build directory: ``tokenizer.model`` (SentencePiece, Mixtral's own)
or ``tokenizer.json`` (Hugging Face tokenizers). BOS is prepended as Mixtral expects."""

from __future__ import annotations

from pathlib import Path


class TokenizerError(ValueError):
    """No usable tokenizer in the directory."""


class Tokenizer:
    """encode(text) -> ids with BOS; decode(ids) -> text; incremental decoding for streaming."""

    def __init__(self, directory: str | Path, bos_id: int | None = 1, eos_id: int | None = 2) -> None:
        directory = Path(directory)
        sp_path, json_path = directory / "tokenizer.model", directory / "tokenizer.json"
        if sp_path.is_file():
            import sentencepiece

            self._sp = sentencepiece.SentencePieceProcessor(model_file=str(sp_path))
            self._hf = None
            self.vocab_size = self._sp.vocab_size()
            self.bos_id = self._sp.bos_id() if self._sp.bos_id() >= 0 else bos_id
            self.eos_id = self._sp.eos_id() if self._sp.eos_id() >= 0 else eos_id
        elif json_path.is_file():
            import tokenizers

            self._sp = None
            self._hf = tokenizers.Tokenizer.from_file(str(json_path))
            self.vocab_size = self._hf.get_vocab_size()
            self.bos_id, self.eos_id = bos_id, eos_id
        else:
            raise TokenizerError(
                f"{directory} has neither tokenizer.model (SentencePiece) nor tokenizer.json; "
                "copy the checkpoint's tokenizer there or pass token ids instead of text"
            )

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
