"""One short single-process LLaMA pretraining run per (optimizer, width, lr, multipliers).

All runs see the same batches of the shipped corpus (byte tokens), so losses are comparable across
widths and optimizers. Depth and head dimension stay fixed while the width grows.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from ..train.data import ByteCorpus

OPTIMIZERS = ("moga-row", "moga-col", "adamw", "adamw-mup", "muon")


@dataclass(frozen=True)
class RunSpec:
    """One grid point; `key()` names it in the results CSV (finished runs are not redone)."""
    optimizer: str
    width: int
    lr: float
    steps: int = 300
    layers: int = 2
    head_dim: int = 32
    batch: int = 8
    seq_len: int = 128
    seed: int = 0
    base_width: int = 64
    hidden_mult: float = 5.0
    embedding_mult: float = 1.0
    head_mult: float = 1.0
    vector_mult: float = 1.0

    def key(self) -> str:
        return "|".join(f"{k}={v}" for k, v in asdict(self).items())


def build_model(spec: RunSpec) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    heads = max(1, spec.width // spec.head_dim)
    ffn = 32 * math.ceil(8 * spec.width / 3 / 32)
    torch.manual_seed(spec.seed)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=256, hidden_size=spec.width, intermediate_size=ffn, num_hidden_layers=spec.layers,
        num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=spec.seq_len,
        tie_word_embeddings=False))


def build_optimizer(spec: RunSpec, model: torch.nn.Module) -> list[torch.optim.Optimizer]:
    """The optimizer(s) for one run. adamw-mup scales hidden and head LRs by base_width / width
    (μP for Adam); muon updates hidden matrices with torch.optim.Muon (AdamW-matched RMS, Moonlight's
    0.2·sqrt(max dim) rule) and the rest with AdamW at the same lr."""
    from .. import MOGA, param_groups

    name = spec.optimizer
    if name.startswith("moga"):
        return [MOGA(param_groups(model), lr=spec.lr, norm=name.split("-")[1], hidden_mult=spec.hidden_mult,
                     embedding_mult=spec.embedding_mult, head_mult=spec.head_mult, vector_mult=spec.vector_mult)]
    groups = {g["role"]: g["params"] for g in param_groups(model)}
    adam = dict(betas=(0.9, 0.95), weight_decay=0.1)
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


def run(spec: RunSpec, corpus: ByteCorpus, eval_batches: int = 8) -> dict:
    """Train `spec.steps` steps (linear warmup 10%, cosine to 10%); return losses and the curve."""
    torch.set_num_threads(1)
    model = build_model(spec)
    optimizers = build_optimizer(spec, model)
    warmup = max(1, spec.steps // 10)
    base_lrs = [[g["lr"] for g in opt.param_groups] for opt in optimizers]
    curve = []
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
            return {"val_loss": float("inf"), "train_loss": float("inf"), "curve": curve, "diverged": True}
        value = loss.item()
        if not math.isfinite(value):
            return {"val_loss": float("inf"), "train_loss": float("inf"), "curve": curve, "diverged": True}
        curve.append(value)
    with torch.no_grad():
        val = [model(input_ids=x, labels=x).loss.item()
               for x in (corpus.batch(0, i, 0, spec.batch, split="val") for i in range(eval_batches))]
    tail = curve[-max(1, spec.steps // 10):]
    return {"val_loss": sum(val) / len(val), "train_loss": sum(tail) / len(tail), "curve": curve, "diverged": False}
