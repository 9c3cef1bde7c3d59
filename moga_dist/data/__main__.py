"""`python -m moga_dist.data prepare --input PATH... --tokenizer TOK --output-prefix PREFIX [options]`
tokenizes text / JSONL (optionally .gz; files, directories or globs) into megatron-core's indexed
format (PREFIX.bin, PREFIX.idx: what Megatron-LM's --data-path reads, and moga_dist.train's
[data] paths). `python -m moga_dist.data train-bpe --input PATH... --vocab-size N --output FILE`
trains a byte-level BPE tokenizer.json locally.

TOK: `bytes`, a Hugging Face tokenizer.json or tokenizer directory, or a SentencePiece .model
(local files only; nothing is downloaded). Exit status: 0 done; 2 bad input (one line on stderr,
nothing written under the final names); 130 interrupted (nothing written under the final names)."""
from __future__ import annotations

import argparse
import sys

from .prepare import TEXT_DOCS, PrepareOptions, expand_inputs, prepare, summary_line


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m moga_dist.data", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="tokenize text/JSONL into PREFIX.bin + PREFIX.idx")
    p.add_argument("--input", nargs="+", required=True, metavar="PATH",
                   help="text (.txt/.text/.md) or JSONL (.jsonl/.json) files, optionally .gz; directories; globs")
    p.add_argument("--tokenizer", required=True, metavar="TOK",
                   help="'bytes', a tokenizer.json, a Hugging Face tokenizer directory, or a SentencePiece .model")
    p.add_argument("--output-prefix", required=True, metavar="PREFIX", help="writes PREFIX.bin, PREFIX.idx, PREFIX.meta.json")
    p.add_argument("--workers", type=int, default=1, help="tokenizing processes (default 1)")
    p.add_argument("--json-key", default="text", help="JSONL field holding the document (default 'text')")
    p.add_argument("--append-eod", action="store_true", help="end every document with the tokenizer's EOD id")
    p.add_argument("--text-docs", choices=TEXT_DOCS, default="paragraph",
                   help="documents of a text file: blank-line separated paragraphs (default), lines, or the whole file")
    p.add_argument("--overwrite", action="store_true", help="replace an existing PREFIX.bin/.idx")
    p.add_argument("--skip-bad-lines", action="store_true",
                   help="skip (and count) JSONL lines that are not JSON or lack --json-key, instead of stopping")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    b = sub.add_parser("train-bpe", help="train a byte-level BPE tokenizer.json on local text")
    b.add_argument("--input", nargs="+", required=True, metavar="PATH")
    b.add_argument("--vocab-size", type=int, required=True)
    b.add_argument("--output", required=True, metavar="FILE", help="the tokenizer.json to write")
    b.add_argument("--json-key", default="text")
    return ap


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "prepare":
            summary = prepare(PrepareOptions(
                inputs=args.input, tokenizer=args.tokenizer, output_prefix=args.output_prefix, workers=args.workers,
                json_key=args.json_key, append_eod=args.append_eod, text_docs=args.text_docs,
                overwrite=args.overwrite, skip_bad_lines=args.skip_bad_lines, progress=not args.quiet))
            print(summary_line(summary), flush=True)
        else:
            _train_bpe(args)
    except KeyboardInterrupt:
        print("moga_dist.data: interrupted; nothing written under the final names", file=sys.stderr)
        return 130
    except ValueError as exc:
        print(f"moga_dist.data: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"moga_dist.data: error: {exc.strerror or exc}: {exc.filename or ''}", file=sys.stderr)
        return 2
    return 0


def _train_bpe(args) -> None:
    from pathlib import Path

    from .prepare import Counts, documents
    from .shipped import train_bpe

    if args.vocab_size < 256 + 1:
        raise ValueError(f"--vocab-size {args.vocab_size}: allowed >= 257 (256 byte tokens and the end-of-text token)")
    files = expand_inputs(args.input)
    opts = PrepareOptions(inputs=args.input, tokenizer="bytes", output_prefix="", json_key=args.json_key)
    counts = Counts()
    texts = (text for f in files for text, _ in documents(f, opts, counts))
    out = train_bpe(texts, args.vocab_size, Path(args.output))
    print(f"trained {out}: byte-level BPE, vocab {args.vocab_size:,}, EOS <|endoftext|>", flush=True)


if __name__ == "__main__":
    sys.exit(main())
