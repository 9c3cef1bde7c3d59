"""Tokenizers for `prepare` and the training job, loaded from local files only (nothing downloaded).

A tokenizer spec (`--tokenizer` / `[data] tokenizer`) is one of:
  - `bytes`: UTF-8 bytes, vocabulary 256, end of document = 0 (NUL, which UTF-8 text does not use);
  - a Hugging Face `tokenizer.json` (the `tokenizers` library), or a directory that
    `transformers.AutoTokenizer` loads offline (`tokenizer.json` / `tokenizer_config.json` ...);
  - a SentencePiece `.model` file (LLaMA's format).
The end-of-document (EOD) id is the tokenizer's own end-of-sequence token. `vocab_size` counts
added tokens too: the model's embedding must have at least that many rows.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

BYTES = "bytes"
# End-of-sequence tokens a bare tokenizer.json may carry, in the order they are tried.
EOS_NAMES = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>", "[EOS]", "<|eot_id|>", "[SEP]")


class TokenizerError(ValueError):
    """A tokenizer spec that does not load; the message names it and what is allowed."""


@dataclass(frozen=True)
class TokenizerInfo:
    """What the job and the dataset's sidecar record of a tokenizer: kind, where it came from,
    vocabulary size, EOD id and a content fingerprint (sha256 of its files)."""
    spec: str
    kind: str            # "bytes", "hf-json", "hf-dir" or "sentencepiece"
    vocab_size: int
    eod: int
    fingerprint: str


class Tokenizer:
    """`encode(text) -> list[int]` without special tokens (EOD is appended by `prepare`)."""

    def __init__(self, spec: str):
        self.spec = spec
        path = Path(spec)
        if spec == BYTES:
            self.kind, self._encode, vocab, eod = "bytes", _encode_bytes, 256, 0
        elif path.is_dir():
            self.kind = "hf-dir"
            vocab, eod = self._load_hf_dir(path)
        elif path.is_file() and path.suffix == ".json":
            self.kind = "hf-json"
            vocab, eod = self._load_hf_json(path)
        elif path.is_file() and path.suffix == ".model":
            self.kind = "sentencepiece"
            vocab, eod = self._load_sentencepiece(path)
        elif not path.exists():
            raise TokenizerError(f"tokenizer {spec!r}: no such file or directory; allowed: 'bytes', a "
                                 "tokenizer.json, a Hugging Face tokenizer directory, a SentencePiece .model")
        else:
            raise TokenizerError(f"tokenizer {spec!r}: unknown kind (suffix {path.suffix!r}); allowed: 'bytes', "
                                 "a tokenizer.json, a Hugging Face tokenizer directory, a SentencePiece .model")
        self.info = TokenizerInfo(spec, self.kind, int(vocab), int(eod), _fingerprint(spec))

    @property
    def vocab_size(self) -> int:
        return self.info.vocab_size

    @property
    def eod(self) -> int:
        return self.info.eod

    def encode(self, text: str) -> list[int]:
        return self._encode(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """encode() of each text, in one call into the tokenizer library (no Python loop per
        document where the library has a batch call)."""
        return self._encode_batch(texts) if hasattr(self, "_encode_batch") else [self._encode(t) for t in texts]

    def _load_hf_json(self, path: Path) -> tuple[int, int]:
        from tokenizers import Tokenizer as HFTokenizer

        try:
            tok = HFTokenizer.from_file(str(path))
        except Exception as exc:  # noqa: BLE001 - the library raises its own Exception subclass
            raise TokenizerError(f"tokenizer {self.spec!r}: not a Hugging Face tokenizer.json ({_first_line(exc)})") from None
        self._encode = lambda text: tok.encode(text, add_special_tokens=False).ids
        batch = getattr(tok, "encode_batch_fast", tok.encode_batch)          # _fast: no offsets (0.20+)
        self._encode_batch = lambda texts: [e.ids for e in batch(texts, add_special_tokens=False)]
        eod = next((tok.token_to_id(n) for n in _eos_candidates(path) if tok.token_to_id(n) is not None), None)
        if eod is None:
            raise TokenizerError(f"tokenizer {self.spec!r} has no end-of-sequence token (looked for "
                                 f"{', '.join(EOS_NAMES)}); add one when training it")
        return tok.get_vocab_size(with_added_tokens=True), eod

    def _load_hf_dir(self, path: Path) -> tuple[int, int]:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")       # a directory never means a download
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        try:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        except Exception as exc:  # noqa: BLE001 - transformers raises many kinds for a bad directory
            raise TokenizerError(f"tokenizer {self.spec!r}: AutoTokenizer could not load this directory offline "
                                 f"({_first_line(exc)})") from None
        if tok.eos_token_id is None:
            raise TokenizerError(f"tokenizer {self.spec!r} has no eos_token; set one in its tokenizer_config.json")
        self._encode = lambda text: tok(text, add_special_tokens=False)["input_ids"]
        self._encode_batch = lambda texts: tok(texts, add_special_tokens=False)["input_ids"]
        return len(tok), tok.eos_token_id

    def _load_sentencepiece(self, path: Path) -> tuple[int, int]:
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor()
        try:
            sp.Load(str(path))
        except Exception as exc:  # noqa: BLE001 - sentencepiece raises OSError or RuntimeError
            raise TokenizerError(f"tokenizer {self.spec!r}: not a SentencePiece model ({_first_line(exc)})") from None
        if sp.eos_id() < 0:
            raise TokenizerError(f"tokenizer {self.spec!r} has no end-of-sequence piece (train it with eos_id >= 0)")
        self._encode = lambda text: sp.EncodeAsIds(text)
        self._encode_batch = lambda texts: sp.Encode(texts, num_threads=1)       # one thread per worker
        return sp.GetPieceSize(), sp.eos_id()


def _encode_bytes(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def _eos_candidates(path: Path) -> list[str]:
    """The eos token a tokenizer_config.json next to the file names, then the usual names."""
    names = []
    config = path.with_name("tokenizer_config.json")
    if config.is_file():
        try:
            eos = json.loads(config.read_text()).get("eos_token")
            names.append(eos.get("content") if isinstance(eos, dict) else eos)
        except ValueError:
            pass
    return [n for n in names if isinstance(n, str)] + list(EOS_NAMES)


def _fingerprint(spec: str) -> str:
    """sha256 over the tokenizer's files (names and bytes); 'bytes' for the byte tokenizer."""
    if spec == BYTES:
        return BYTES
    path = Path(spec)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:16]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__

