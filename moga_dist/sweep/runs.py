"""One single-process LLaMA pretraining run per (optimizer, width, lr, horizon, multipliers).

All runs see the same batches of the shipped corpus (byte tokens), so losses are comparable across
widths, horizons and optimizers; every run is scored on the same held-out tail of the corpus
(ByteCorpus's validation split, never trained on). Depth and head dimension stay fixed while the
width grows.
"""
from __future__ import annotations

import math
import time
from dataclasses import MISSING, asdict, field, make_dataclass

import torch

from ..core.hparams import hparam_fields
from ..train.data import ByteCorpus

OPTIMIZERS = ("moga-row", "moga-col", "adamw", "adamw-mup", "muon")
CURVE_POINTS = 300          # the stored training curve is averaged down to at most this many points


MOGA_SETTINGS = ("lr", "hidden_mult", "embedding_mult", "head_mult", "vector_mult")   # passed to MOGA as they are


def _key(self) -> str:
    return "|".join(f"{k}={v}" for k, v in asdict(self).items())


_RUNSPEC_DOC = """One grid point (a "cell"); `key()` names it in the results file (finished cells are not redone,
so the fields' order and spelling are the results' keys: never reorder them).

`steps` is the horizon; `tokens_per_step` = batch * seq_len. `base_width` is the muP base of adamw-mup
and of the coordinate check (not MOGA's base_width, which the sweep leaves off). lr and the
multipliers are MOGA's settings from the one table of its hyper-parameters (moga_dist.core.hparams),
hidden_mult at the sweep's 5.0; `eval_windows`: held-out windows of seq_len scored at the end (0: the
whole split)."""
RunSpec = make_dataclass("RunSpec", [
    ("optimizer", str), ("width", int), *hparam_fields(["lr"], lr=MISSING),
    ("steps", int, field(default=300)), ("layers", int, field(default=2)), ("head_dim", int, field(default=32)),
    ("batch", int, field(default=8)), ("seq_len", int, field(default=128)), ("seed", int, field(default=0)),
    ("base_width", int, field(default=64)),
    *hparam_fields(MOGA_SETTINGS[1:], hidden_mult=5.0),
    ("eval_windows", int, field(default=0)),
], frozen=True, namespace={"__doc__": _RUNSPEC_DOC, "key": _key,
                            "tokens_per_step": property(lambda self: self.batch * self.seq_len)})
RunSpec.__module__ = __name__


def build_model(spec: RunSpec) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    heads = max(1, spec.width // spec.head_dim)
    ffn = 32 * math.ceil(8 * spec.width / 3 / 32)
    torch.manual_seed(spec.seed)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=256, hidden_size=spec.width, intermediate_size=ffn, num_hidden_layers=spec.layers,
        num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=spec.seq_len,
        tie_word_embeddings=False))


_PARAMS: dict[tuple, int] = {}


def parameter_count(spec: RunSpec) -> int:
    """Parameters of the spec's model (embeddings and head included), cached per shape."""
    shape = (spec.width, spec.layers, spec.head_dim, spec.seq_len)
    if shape not in _PARAMS:
        with torch.device("meta"):
            _PARAMS[shape] = sum(p.numel() for p in build_model(spec).parameters())
    return _PARAMS[shape]


def steps_for_tokens_per_param(spec: RunSpec, tokens_per_param: float) -> int:
    """The horizon (steps) at which the spec's model sees `tokens_per_param` training tokens per parameter."""
    if not tokens_per_param > 0:
        raise ValueError(f"tokens_per_param={tokens_per_param}: allowed a number > 0")
    return max(1, round(tokens_per_param * parameter_count(spec) / spec.tokens_per_step))


def build_optimizer(spec: RunSpec, model: torch.nn.Module) -> list[torch.optim.Optimizer]:
    """The optimizer(s) for one run. adamw-mup scales hidden and head LRs by base_width / width
    (μP for Adam); muon updates hidden matrices with torch.optim.Muon (AdamW-matched RMS, Moonlight's
    0.2·sqrt(max dim) rule) and the rest (embeddings, head, vectors) with AdamW at the same lr."""
    from .. import MOGA, param_groups

    name = spec.optimizer
    if name.startswith("moga"):
        return [MOGA(param_groups(model), norm=name.split("-")[1], **{k: getattr(spec, k) for k in MOGA_SETTINGS})]
    groups = {g["role"]: g["params"] for g in param_groups(model)}
    adam = {"betas": (0.9, 0.95), "weight_decay": 0.1}
    if name == "adamw":
        return [torch.optim.AdamW(model.parameters(), lr=spec.lr, **adam)]
    if name == "adamw-mup":
        scale = spec.base_width / spec.width
        return [torch.optim.AdamW([{"params": groups.get("hidden", []) + groups.get("head", []), "lr": spec.lr * scale},
                                   {"params": groups.get("embedding", []) + groups.get("vector", [])}],
                                  lr=spec.lr, **adam)]
    if name == "muon":
        rest = [p for role in ("embedding", "head", "vector") for p in groups.get(role, [])]
        return [torch.optim.Muon(groups["hidden"], lr=spec.lr, weight_decay=0.1, adjust_lr_fn="match_rms_adamw"),
                torch.optim.AdamW(rest, lr=spec.lr, **adam)]
    raise ValueError(f"optimizer {name!r}; allowed: {list(OPTIMIZERS)}")


def held_out_loss(model: torch.nn.Module, corpus: ByteCorpus, seq_len: int, windows: int, batch: int = 64) -> float:
    """Mean next-byte loss over non-overlapping [seq_len] windows from the start of the validation
    split (all of it when windows == 0): deterministic, and the same text for every run."""
    n = len(corpus.val) // seq_len
    n = min(n, windows) if windows else n
    data = corpus.val[:n * seq_len].view(n, seq_len)
    total = 0.0
    with torch.no_grad():
        for i in range(0, n, batch):
            x = data[i:i + batch]
            total += model(input_ids=x, labels=x).loss.item() * len(x)
    return total / n


def run(spec: RunSpec, corpus: ByteCorpus) -> dict:
    """Train `spec.steps` steps (linear warmup 10%, cosine to 10%); return held-out loss, the mean
    training loss of the last 10% of steps, the (averaged) curve and the wall/CPU seconds taken."""
    torch.set_num_threads(1)
    wall, cpu = time.perf_counter(), time.process_time()
    model = build_model(spec)
    optimizers = build_optimizer(spec, model)
    warmup = max(1, spec.steps // 10)
    base_lrs = [[g["lr"] for g in opt.param_groups] for opt in optimizers]
    losses = []

    def result(val: float, diverged: bool) -> dict:
        every = max(1, math.ceil(len(losses) / CURVE_POINTS))
        curve = [sum(losses[i:i + every]) / len(losses[i:i + every]) for i in range(0, len(losses), every)]
        tail = losses[-max(1, spec.steps // 10):] if not diverged else []
        return {"val_loss": val, "train_loss": sum(tail) / len(tail) if tail else float("inf"), "diverged": diverged,
                "curve": curve, "curve_every": every, "seconds": time.perf_counter() - wall,
                "cpu_seconds": time.process_time() - cpu}

    for step in range(spec.steps):
        frac = (step + 1) / warmup if step < warmup else \
            0.1 + 0.45 * (1 + math.cos(math.pi * (step - warmup) / max(1, spec.steps - warmup)))
        for opt, lrs in zip(optimizers, base_lrs):
            for g, lr in zip(opt.param_groups, lrs):
                g["lr"] = lr * frac
        x = corpus.batch(step, 0, 0, spec.batch)
        loss = model(input_ids=x, labels=x).loss
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        try:
            for opt in optimizers:
                opt.step()
        except ValueError:                      # MOGA refuses non-finite gradients: a divergence
            return result(float("inf"), True)
        value = loss.item()
        if not math.isfinite(value):
            return result(float("inf"), True)
        losses.append(value)
    val = held_out_loss(model, corpus, spec.seq_len, spec.eval_windows)
    return result(val, not math.isfinite(val))
