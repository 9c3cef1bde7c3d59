"""Checks and a per-GPU memory estimate for the presets in configs/.

`python -m moga_dist.train.presets configs/*.toml` prints, per preset: parameters, layout, and the
estimated per-GPU memory (weights, gradients, fp32 master + MOGA momentum, activations) against the
GPU it names. The estimate is first-order (no fragmentation, no framework buffers): it answers
"does this layout plausibly fit", not "how much headroom is left".

Formula, P = parameters / (TP x PP) on a GPU, DP data-parallel ranks, w = 2 (bf16) or 4 bytes:
weights P*w; gradients P*w/DP at ZeRO >= 2 (else P*w; Megatron keeps an fp32 buffer, P*4);
optimizer state per parameter 4 B (MOGA's momentum) or 8 B (AdamW's two moments), plus 4 B of fp32
master weights under bf16, divided by DP at ZeRO >= 1 / the distributed optimizer; activations
per Korthikanti et al. (2022) plus fp32 logits and their gradient.
"""
from __future__ import annotations

import sys

from .config import RunConfig, accumulation_steps, data_parallel_size, load

GPU_MEMORY_GIB = {"cpu": 24, "A100-40GB": 40, "A100-80GB": 80, "H100-80GB": 80, "H200-141GB": 141}
USABLE_FRACTION = 0.9          # leave 10% for the allocator, NCCL and framework buffers


def parameter_count(cfg: RunConfig) -> int:
    """Parameters of the LLaMA in `cfg.model` (untied head unless tie_embeddings)."""
    m = cfg.model
    head_dim = m.hidden_size // m.num_heads
    attn = m.hidden_size * head_dim * (m.num_heads * 2 + m.num_kv_heads * 2)   # q, o, k, v
    mlp = 3 * m.hidden_size * m.intermediate_size
    per_layer = attn + mlp + 2 * m.hidden_size
    embed = m.vocab_size * m.hidden_size
    return m.num_layers * per_layer + embed * (1 if m.tie_embeddings else 2) + m.hidden_size


def memory_estimate(cfg: RunConfig, engine: str | None = None) -> dict:
    """Per-GPU bytes by term for the preset's layout: `weights` (the model's own), `optimizer_state`
    (momentum / Adam's moments), `other` (resident engine tensors: fp32 masters, gradient partitions
    and buffers), `transient` (what exists only during a step: activations, logits, full-size
    gradients before they are reduced), their `total`. engine: 'fsdp2' for FSDP2 (default: the
    preset's parallel.engine at its engine.zero_stage; 3 is DeepSpeed ZeRO-3)."""
    p, m, t = cfg.parallel, cfg.model, cfg.training
    dp = data_parallel_size(cfg)
    shard = parameter_count(cfg) / (p.tensor_parallel * p.pipeline_parallel)
    bf16, stage = cfg.engine.bf16, cfg.engine.zero_stage
    engine = engine or p.engine
    w = 2 if bf16 else 4
    moments = shard * (4 if cfg.optimizer.name == "moga" else 8)
    if engine == "deepspeed":
        sharded_state = stage >= 1
        weights = shard * w / (dp if stage >= 3 else 1)
        # ZeRO keeps an fp32 copy of each rank's partition (a clone even when the model is fp32),
        # and at ZeRO >= 2 the reduced gradient partition in the model's dtype.
        other = shard * 4 / (dp if stage >= 1 else 1) + shard * w / (dp if stage >= 2 else 1)
        # Backward fills the gradient bucket (500M elements by default, so the whole model at these
        # sizes) before reduce-scatter; ZeRO-3 reduces and frees per layer.
        transient = shard * w if stage <= 2 else 0.0
    elif engine == "fsdp2":
        sharded_state = True
        weights, other = shard * w / dp, shard * w / dp          # sharded parameters and gradients
        transient = 0.0                                          # per-layer unsharded weights/grads: in acts
    else:                                                        # Megatron: fp32 grad buffer of the full
        sharded_state = stage >= 1                               # model; fp32 masters only under bf16
        weights = shard * w
        other = shard * 4 + (shard * 4 / (dp if sharded_state else 1) if bf16 else 0)
        transient = 0.0
    states = moments / (dp if sharded_state else 1)
    # Activations per layer and micro batch (Korthikanti et al. 2022), bf16, TP-sharded where it
    # is; with full recomputation only each layer's input is kept, plus one layer's working set.
    s, b, h, a = m.max_seq_len, t.micro_batch_size, m.hidden_size, m.num_heads
    layer_full = s * b * h * (10 + 24 / p.tensor_parallel + 5 * a * s / (h * p.tensor_parallel))
    layers = m.num_layers / p.pipeline_parallel
    if p.activation_checkpointing:
        acts = layers * 2 * s * b * h + layer_full
    else:
        acts = layers * layer_full
    logits = s * b * m.vocab_size / p.tensor_parallel * 4 * 2          # fp32 logits and their grad
    transient += acts + logits
    total = weights + states + other + transient
    budget = GPU_MEMORY_GIB[p.gpu] * 2 ** 30 * USABLE_FRACTION
    return {"params": parameter_count(cfg), "weights": weights, "optimizer_state": states, "other": other,
            "transient": transient, "grads": other, "activations": acts + logits, "total": total,
            "budget": budget, "fits": total <= budget}


def check(cfg: RunConfig) -> dict:
    """Validate a preset's layout (divisibility, batch) and return its memory estimate."""
    if cfg.parallel.gpu not in GPU_MEMORY_GIB:
        raise ValueError(f"parallel.gpu={cfg.parallel.gpu!r}; known: {sorted(GPU_MEMORY_GIB)}")
    dp = data_parallel_size(cfg)
    accumulation_steps(cfg, dp)
    return memory_estimate(cfg)


def main(argv=None) -> int:
    paths = (argv if argv is not None else sys.argv[1:])
    gib = 2 ** 30
    print(f"{'preset':<14}{'params':>10} {'layout':<24}{'weights':>8}{'grads':>8}{'optim':>8}{'acts':>8}"
          f"{'total':>8}{'GPU':>11}  fits")
    bad = 0
    for path in paths:
        cfg = load(path)
        e = check(cfg)
        p = cfg.parallel
        layout = f"{p.engine[:2]} {p.nodes}x{p.gpus_per_node} tp{p.tensor_parallel} pp{p.pipeline_parallel}"
        print(f"{cfg.name:<14}{e['params'] / 1e9:>9.2f}B {layout:<24}{e['weights'] / gib:>8.1f}{e['grads'] / gib:>8.1f}"
              f"{e['optimizer_state'] / gib:>8.1f}{e['activations'] / gib:>8.1f}{e['total'] / gib:>8.1f}"
              f"{p.gpu:>11}  {'yes' if e['fits'] else 'NO'}")
        bad += not e["fits"]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
