"""Tokenizers, all Hugging Face ``tokenizers`` objects so that one code path encodes, decodes and exports.

- ``bpe``: a byte-level BPE trained on the corpus (GPT-2 style pre-tokenization), vocabulary size configurable;
- ``byte``: the same byte-level model with no merges: 256 byte tokens plus the end-of-document token;
- a path to an existing ``tokenizer.json``.

Every tokenizer has an end-of-document token (``<|endoftext|>`` for the ones made here) that starts each
document in the token stream.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from lmsprint.errors import DataError

EOT = "<|endoftext|>"
_EOT_CANDIDATES = (EOT, "</s>", "<|end_of_text|>", "<eos>", "<|eot_id|>", "<|im_end|>")


class TextTokenizer:
    """A ``tokenizers.Tokenizer`` plus the id of its end-of-document token."""

    def __init__(self, tok: Tokenizer) -> None:
        self.tok = tok
        # text that spells a special token ("<|endoftext|>" inside a document) is text, not a document boundary
        # (a runtime setting of the tokenizer: not saved, so the tokenizer's checksum and export are unchanged)
        tok.encode_special_tokens = True
        for name in _EOT_CANDIDATES:
            eot = tok.token_to_id(name)
            if eot is not None:
                self.eot_id: int = eot
                self.eot_token = name
                break
        else:
            raise DataError(f"the tokenizer has no end-of-document token (one of {', '.join(_EOT_CANDIDATES)}); "
                            f"add {EOT!r} as a special token")
        self.vocab_size: int = tok.get_vocab_size(with_added_tokens=True)

    @property
    def sha(self) -> bytes:
        """SHA-256 of the serialised tokenizer: identifies it in shard headers."""
        return hashlib.sha256(self.tok.to_str().encode()).digest()

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text. Runs on all cores.

        Raises:
            DataError: the tokenizer cannot encode the text (e.g. a WordLevel model without an unknown token).
        """
        try:
            return [enc.ids for enc in self.tok.encode_batch(texts, add_special_tokens=False)]
        except Exception as e:  # tokenizers raises plain Exception
            raise DataError(f"the tokenizer cannot encode the text ({(str(e).splitlines() or [repr(e)])[0]}); use a "
                            "tokenizer whose model has an unknown token, or --data.tokenizer=bpe") from None

    def encode_docs(self, texts: list[str]) -> list[np.ndarray]:
        """Token ids of each document, each prefixed with the end-of-document token. Runs on all cores."""
        out = []
        for ids in self.encode_batch(texts):
            doc = np.empty(len(ids) + 1, dtype=np.int64)
            doc[0] = self.eot_id
            doc[1:] = ids
            out.append(doc)
        return out

    def decode(self, ids: Iterable[int]) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def save(self, path: Path) -> None:
        self.tok.save(str(path))


def byte_tokenizer() -> TextTokenizer:
    """256 byte tokens (GPT-2's byte-to-unicode alphabet) and the end-of-document token; no merges."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([EOT])
    return TextTokenizer(tok)


def train_bpe(texts: Iterator[str], vocab_size: int) -> TextTokenizer:
    """Train a byte-level BPE on a stream of documents (``tokenizers`` counts words; the text is not kept)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return TextTokenizer(tok)


def load_tokenizer(path: str | Path) -> TextTokenizer:
    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.exists():
        raise DataError(f"tokenizer {path} not found; pass a tokenizer.json, or --data.tokenizer=bpe to train one")
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises plain Exception subclasses on bad JSON
        raise DataError(f"{path} is not a valid tokenizer.json ({str(e).splitlines()[0]}); pass a Hugging Face "
                        "tokenizers file") from None
    return TextTokenizer(tok)
