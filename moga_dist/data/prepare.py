"""Tokenize text / JSONL (optionally .gz) into megatron-core's indexed format: PREFIX.bin + PREFIX.idx,
written by `megatron.core.datasets.indexed_dataset.IndexedDatasetBuilder` (the files Megatron-LM's
`--data-path PREFIX` reads), plus PREFIX.meta.json (the tokenizer and the counts; the job checks it).

Documents: one per JSONL line (its `json_key`), or per paragraph / line / file of a text file.
Undecodable bytes become U+FFFD (what every tokenizer here sees for them) and are counted; empty
documents are skipped and counted. Everything is written under temporary names and renamed into
place at the end (.idx last), so an interrupted or refused run leaves the final names untouched.
"""
from __future__ import annotations

import glob
import gzip
import itertools
import json
import multiprocessing
import os
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from .tokenizer import Tokenizer

JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
TEXT_SUFFIXES = (".txt", ".text", ".md")
TEXT_DOCS = ("paragraph", "line", "file")
CHUNK_BYTES = 1 << 20            # documents handed to a worker at a time (about 1 MB of text)
META_SUFFIX = ".meta.json"


class PrepareError(ValueError):
    """Bad input for `prepare`; one line naming the file, line or value."""


@dataclass
class PrepareOptions:
    inputs: list[str]
    tokenizer: str
    output_prefix: str
    workers: int = 1
    json_key: str = "text"
    append_eod: bool = False
    text_docs: str = "paragraph"
    overwrite: bool = False
    skip_bad_lines: bool = False
    progress: bool = True


@dataclass
class Counts:
    documents: int = 0
    tokens: int = 0
    empty_skipped: int = 0
    bad_lines_skipped: int = 0
    undecodable: int = 0          # documents that held bytes which are not UTF-8
    input_bytes: int = 0
    files: list[str] = field(default_factory=list)


def expand_inputs(inputs: list[str]) -> list[Path]:
    """Files named, directories walked (files with a text or JSONL suffix, optionally .gz), globs
    expanded; sorted within each input. PrepareError naming an input that matches nothing."""
    out: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_file():
            found = [path]
        elif path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and _kind(p) is not None)
        elif any(c in item for c in "*?["):
            found = sorted(Path(p) for p in glob.glob(item, recursive=True) if Path(p).is_file())
        else:
            raise PrepareError(f"--input {item}: no such file or directory")
        if not found:
            raise PrepareError(f"--input {item}: no text (.txt/.text/.md) or JSONL (.jsonl/.json) files, "
                               "optionally .gz, found there")
        out += found
    return out


def _kind(path: Path) -> str | None:
    name = path.name[:-3] if path.name.endswith(".gz") else path.name
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if name.endswith(TEXT_SUFFIXES):
        return "text"
    return None


def _open(path: Path):
    return gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")


def _decode(raw: bytes, counts: Counts) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        counts.undecodable += 1
        return raw.decode("utf-8", errors="replace")


def documents(path: Path, opts: PrepareOptions, counts: Counts) -> Iterator[tuple[str, int]]:
    """(text, raw byte count) of each document of one file, in order."""
    kind = _kind(path) or "text"
    with _open(path) as fh:
        if kind == "jsonl":
            for number, raw in enumerate(fh, 1):
                if not raw.strip():
                    continue
                try:
                    text = json.loads(_decode(raw, counts))[opts.json_key]
                    if not isinstance(text, str):
                        raise TypeError(f"{opts.json_key!r} holds {type(text).__name__}, not a string")
                except (ValueError, KeyError, TypeError) as exc:
                    if not opts.skip_bad_lines:
                        why = f"no key {opts.json_key!r}" if isinstance(exc, KeyError) else _short(exc)
                        raise PrepareError(f"{path}:{number}: not a JSON object with a string {opts.json_key!r} "
                                           f"({why}); fix it or pass --skip-bad-lines to skip such lines") from None
                    counts.bad_lines_skipped += 1
                    continue
                yield text, len(raw)
        elif opts.text_docs == "file":
            raw = fh.read()
            yield _decode(raw, counts), len(raw)
        else:
            # A line's or paragraph's closing newline separates documents: not part of the text.
            block: list[bytes] = []
            for raw in fh:
                if opts.text_docs == "line":
                    yield _decode(raw.rstrip(b"\r\n"), counts), len(raw)
                elif raw.strip():
                    block.append(raw)
                elif block:
                    joined = b"".join(block)
                    block = []
                    yield _decode(joined.rstrip(b"\r\n"), counts), len(joined) + len(raw)
            if block:
                joined = b"".join(block)
                yield _decode(joined.rstrip(b"\r\n"), counts), len(joined)


def _short(exc: Exception) -> str:
    return str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__


# Worker state: each pool process loads the tokenizer once.
_WORKER: dict = {}


def _init_worker(spec: str, append_eod: bool, dtype: str) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    tok = Tokenizer(spec)
    _WORKER.update(tok=tok, eod=[tok.eod] if append_eod else [], dtype=np.dtype(dtype))


def _encode_chunk(texts: list[str]) -> tuple[np.ndarray, np.ndarray, int]:
    """(tokens of the chunk's documents concatenated, each one's length, empty documents skipped)."""
    tok, eod, dtype = _WORKER["tok"], _WORKER["eod"], _WORKER["dtype"]
    kept = [t for t in texts if t.strip()]
    if tok.kind == "bytes":          # the ids are the bytes: no per-token Python objects
        raw = [t.encode("utf-8") for t in kept]
        data = b"\0".join(raw) + b"\0" if eod else b"".join(raw)        # the byte tokenizer's EOD is 0
        ids = np.frombuffer(data, dtype=np.uint8).astype(dtype)
        lengths = np.fromiter((len(r) + len(eod) for r in raw), dtype=np.int64, count=len(raw))
        return ids, lengths, len(texts) - len(kept)
    docs = [d for d in tok.encode_batch(kept) if d]
    lengths = np.fromiter((len(d) + len(eod) for d in docs), dtype=np.int64, count=len(docs))
    flat = itertools.chain.from_iterable(itertools.chain(d, eod) for d in docs)
    ids = np.fromiter(flat, dtype=dtype, count=int(lengths.sum()))
    return ids, lengths, len(texts) - len(docs)


def _chunks(files: list[Path], opts: PrepareOptions, counts: Counts) -> Iterator[tuple[list[str], int]]:
    texts, size = [], 0
    for path in files:
        for text, nbytes in documents(path, opts, counts):
            texts.append(text)
            size += nbytes
            if size >= CHUNK_BYTES:
                yield texts, size
                texts, size = [], 0
    if texts:
        yield texts, size


def output_paths(prefix: str) -> dict[str, Path]:
    return {"bin": Path(prefix + ".bin"), "idx": Path(prefix + ".idx"), "meta": Path(prefix + META_SUFFIX)}


def prepare(opts: PrepareOptions) -> dict:
    """Run `prepare`; returns the summary written to PREFIX.meta.json. PrepareError / TokenizerError
    (ValueError) for bad input, before anything is written under the final names."""
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    if opts.workers < 1:
        raise PrepareError(f"--workers {opts.workers}: allowed an integer >= 1")
    if opts.text_docs not in TEXT_DOCS:
        raise PrepareError(f"--text-docs {opts.text_docs}: allowed {', '.join(TEXT_DOCS)}")
    final = output_paths(opts.output_prefix)
    existing = [str(p) for p in final.values() if p.exists()]
    if existing and not opts.overwrite:
        raise PrepareError(f"{existing[0]} already exists: pass --overwrite to replace it, or choose another "
                           "--output-prefix")
    files = expand_inputs(opts.inputs)
    clash = [str(f) for f in files if f.resolve() in {p.resolve() for p in final.values()}]
    if clash:
        raise PrepareError(f"--input {clash[0]} is also an output file of --output-prefix {opts.output_prefix}")
    tok = Tokenizer(opts.tokenizer)
    dtype = np.dtype(DType.optimal_dtype(tok.vocab_size))
    parent = final["bin"].parent
    if not parent.is_dir():
        raise PrepareError(f"--output-prefix {opts.output_prefix}: directory {parent} does not exist")
    tmp = {k: p.with_name(f".{p.name}.tmp{os.getpid()}") for k, p in final.items()}
    counts = Counts(files=[str(f) for f in files])
    start = time.perf_counter()
    bar = _progress(opts, files)
    pool = None
    try:
        builder = IndexedDatasetBuilder(str(tmp["bin"]), dtype=dtype.type)
        if opts.workers > 1:
            pool = multiprocessing.get_context("fork").Pool(
                opts.workers, initializer=_init_worker, initargs=(opts.tokenizer, opts.append_eod, dtype.str))
        else:
            _init_worker(opts.tokenizer, opts.append_eod, dtype.str)
        for ids, lengths, empty, size in _encoded(_chunks(files, opts, counts), pool, opts.workers):
            # Whole chunks at once through the builder's public lists: add_document per
            # document would convert every short document separately.
            builder.data_file.write(ids.tobytes(order="C"))
            first = len(builder.sequence_lengths)
            builder.sequence_lengths.extend(lengths.tolist())
            builder.document_indices.extend(range(first + 1, first + 1 + len(lengths)))
            counts.documents += len(lengths)
            counts.tokens += int(lengths.sum())
            counts.empty_skipped += empty
            counts.input_bytes += size
            if bar is not None:
                bar.update(size)
                bar.set_postfix(docs=f"{counts.documents:,}", tokens=f"{counts.tokens:,}", refresh=False)
        if counts.documents == 0:
            raise PrepareError(f"--input {' '.join(opts.inputs)}: no non-empty documents "
                               f"({counts.empty_skipped} empty, {counts.bad_lines_skipped} bad lines skipped)")
        builder.finalize(str(tmp["idx"]))
        seconds = time.perf_counter() - start
        summary = {"format": "megatron-core IndexedDataset (mmap)", "prefix": opts.output_prefix,
                   "tokenizer": asdict(tok.info), "dtype": dtype.name, "append_eod": opts.append_eod,
                   "json_key": opts.json_key, "text_docs": opts.text_docs, **asdict(counts),
                   "seconds": round(seconds, 3), "workers": opts.workers}
        tmp["meta"].write_text(json.dumps(summary, indent=1))
        if final["idx"].exists():        # a crash between the renames then leaves no stale .idx
            final["idx"].unlink()
        for key in ("bin", "meta", "idx"):
            os.replace(tmp[key], final[key])
        return summary
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
        if bar is not None:
            bar.close()
        for p in tmp.values():
            p.unlink(missing_ok=True)


def _encoded(chunks, pool, workers: int):
    """(tokens, lengths, empty, bytes) per chunk, in input order; at most 2 chunks per worker in
    flight, so memory stays bounded however large the input (Pool.imap would read it all ahead)."""
    if pool is None:
        for texts, size in chunks:
            yield (*_encode_chunk(texts), size)
        return
    inflight: deque = deque()
    for texts, size in chunks:
        inflight.append((pool.apply_async(_encode_chunk, (texts,)), size))
        if len(inflight) >= 2 * workers:
            job, nbytes = inflight.popleft()
            yield (*job.get(), nbytes)
    while inflight:
        job, nbytes = inflight.popleft()
        yield (*job.get(), nbytes)


def _progress(opts: PrepareOptions, files: list[Path]):
    if not opts.progress:
        return None
    from tqdm.auto import tqdm

    total = None if any(f.name.endswith(".gz") for f in files) else sum(f.stat().st_size for f in files)
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="prepare", dynamic_ncols=True)


def summary_line(s: dict) -> str:
    mb = s["input_bytes"] / 2 ** 20
    rate = mb / s["seconds"] if s["seconds"] else float("inf")
    return (f"prepared {s['prefix']}.bin/.idx: {s['documents']:,} documents, {s['tokens']:,} tokens "
            f"({s['dtype']}) from {len(s['files'])} file(s), {mb:,.1f} MB in {s['seconds']:.1f} s "
            f"({rate:,.1f} MB/s, {s['workers']} worker(s)); skipped {s['empty_skipped']:,} empty, "
            f"{s['bad_lines_skipped']:,} bad lines; {s['undecodable']:,} with undecodable bytes; tokenizer "
            f"{s['tokenizer']['kind']} vocab {s['tokenizer']['vocab_size']:,} eod {s['tokenizer']['eod']}")
