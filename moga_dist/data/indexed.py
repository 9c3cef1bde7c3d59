"""Checks on a prepared dataset (PREFIX.bin / PREFIX.idx) before a job memory-maps it.

Megatron's own reader trusts its files: a truncated `.bin` is found only when a sample past its end
is read, deep in training. `check_prefix` reads the small `.idx` header through megatron-core's
IndexedDataset (memory-mapped, nothing loaded) and compares the `.bin` size it implies.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from .prepare import META_SUFFIX
from .tokenizer import TokenizerInfo


class DatasetError(ValueError):
    """A prepared dataset that cannot be used; the message names the file."""


def check_prefix(prefix: str) -> dict:
    """{'documents', 'tokens', 'dtype', 'meta' (PREFIX.meta.json or None)} of a prepared dataset;
    DatasetError for a missing .bin/.idx, an unreadable .idx, or a .bin whose size disagrees."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    idx, bin_ = Path(prefix + ".idx"), Path(prefix + ".bin")
    for path in (idx, bin_):
        if not path.is_file():
            raise DatasetError(f"data.paths: {path} is missing (prepare it with python -m moga_dist.data prepare "
                               f"... --output-prefix {prefix})")
    try:
        ds = IndexedDataset(prefix, mmap=True)
    except Exception as exc:  # noqa: BLE001 - megatron raises AssertionError / struct / numpy errors
        raise DatasetError(f"data.paths: {idx} is not a megatron-core index file "
                           f"({str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__})") from None
    lengths, pointers = ds.index.sequence_lengths, ds.index.sequence_pointers
    itemsize = ds.index.dtype_size
    expected = int(pointers[-1]) + int(lengths[-1]) * itemsize if len(lengths) else 0
    actual = os.path.getsize(bin_)
    if actual != expected:
        raise DatasetError(f"data.paths: {bin_} holds {actual:,} bytes but {idx} describes {expected:,} "
                           "(a truncated or mismatched copy); copy both files again or re-run prepare")
    meta_path = Path(prefix + META_SUFFIX)
    meta = None
    if meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text())
        except ValueError as exc:
            raise DatasetError(f"data.paths: {meta_path} is malformed JSON ({exc})") from None
    return {"documents": len(ds.document_indices) - 1, "tokens": int(lengths.sum()),
            "dtype": ds.index.dtype.__name__, "meta": meta}


def check_tokenizer(prefix: str, found: dict, tok: TokenizerInfo) -> None:
    """A dataset prepared with another tokenizer (per its meta.json) is refused; without a
    meta.json (e.g. made by Megatron-LM's preprocess_data.py) only the dtype is checked."""
    meta = found["meta"]
    if meta is None:
        return
    made = meta.get("tokenizer", {})
    if (made.get("fingerprint"), made.get("vocab_size"), made.get("eod")) != (tok.fingerprint, tok.vocab_size, tok.eod):
        raise DatasetError(f"data.paths: {prefix} was prepared with tokenizer {made.get('spec')!r} ({made.get('kind')}, "
                           f"vocab {made.get('vocab_size')}, eod {made.get('eod')}), not with data.tokenizer="
                           f"{tok.spec!r} (vocab {tok.vocab_size}, eod {tok.eod}); use the same tokenizer or re-run prepare")
