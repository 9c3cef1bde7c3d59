"""Checks and a per-GPU memory estimate for the presets in configs/.

`python -m moga_dist.train.presets configs/*.toml` prints, per preset: parameters, layout, and the
estimated per-GPU memory by term against the GPU it names. The estimate is the steady-state peak
of training (no fragmentation, no communication library buffers, no process baseline): it answers
"does this layout plausibly fit", not "how much headroom is left". Checked against the memory
rehearsal (python -m moga_dist.bench memory; docs/benchmarks.md): within 10% of every engine's
measured steady state at 349M (ZeRO-2 and ZeRO-3 fp32 and bf16, Megatron's distributed optimizer,
FSDP2; MOGA and AdamW; tests/test_bench_memory.py holds the committed records to +-15%).

Formula. P = parameters / (TP x PP) on a GPU, DP data-parallel ranks, w = 2 (bf16) or 4 bytes,
S = optimizer state per parameter (MOGA's momentum 4 B, AdamW's two moments 8 B):
  total = weights + optimizer_state + other + transient, transient = max(backward, step)
- DeepSpeed ZeRO-s (DP' = DP at s >= 1, else 1): weights P*w (P*w/DP at s = 3); optimizer_state
  S*P/DP'; other, the fp32 copy of the rank's partition, 4*P/DP' (a clone even for an fp32 model);
  backward = the reduce bucket min(P, 500M)*w (/DP at s = 3) + the reduced gradient partition P*w
  (/DP at s >= 2) + activations; step = the partition's fp32 gradient 4*P/DP' + AdamW's two
  temporaries of its flat partition, 8*P/DP' (torch's single-tensor Adam: sqrt, then the division).
  At s = 3: weights, fp32 master and gradient partitions, and the reduce bucket min(P, 500M)*w stay
  resident (other); transient = gathered weights min(P, 1e9)*w + the bucket's reduce-scatter copy +
  (under bf16, AdamW only) the fp32 gradient partition 4*P/DP + activations (backward and step add
  up: the gathered weights are still live in the step; fitted at 56M, checked at 349M).
  The old formula (weights + sharded grads + state + activations) left out the fp32 partition copy
  and the whole-model gradient bucket of the backward: -42% at 349M fp32.
- FSDP2 (engine='fsdp2', fully_shard per decoder layer and at the root): weights P*w/DP;
  optimizer_state S*P/DP; backward: the root unit's weights and gradient unsharded, 2*R*w
  (R = embedding + head parameters), + the sharded gradients P*w/DP (freed by zero_grad(set_to_none=True))
  + activations.
- Megatron: weights P*w; other: the fp32 gradient buffer 4*P, plus fp32 masters 4*P/DP' under bf16;
  optimizer_state S*P/DP' (DP' = DP with the distributed optimizer); on CPU (gloo, parallel.gpu =
  'cpu') a full-size copy of the buffer, 4*P, during its reduce-scatter/all-gather (fitted at 56M).
- Activations per layer and micro batch per Korthikanti et al. (2022), plus 5 x s x b x V fp32 floats
  of logits, upcast, log-softmax and gradients; with full recomputation only each layer's input is kept, plus one layer's working set.
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
    """Per-GPU bytes by term for the preset's layout (module docstring: the formula): `weights` (the
    model's own), `optimizer_state` (momentum / Adam's moments), `other` (resident engine tensors:
    fp32 masters, gradient buffers), `transient` (the larger of the backward's and the optimizer
    step's short-lived bytes), and their `total`, the steady-state peak. engine: 'fsdp2' for FSDP2
    (default: the preset's parallel.engine at its engine.zero_stage; 3 is DeepSpeed ZeRO-3)."""
    p, m, t = cfg.parallel, cfg.model, cfg.training
    dp = data_parallel_size(cfg)
    shard = parameter_count(cfg) / (p.tensor_parallel * p.pipeline_parallel)
    bf16, stage, adamw = cfg.engine.bf16, cfg.engine.zero_stage, cfg.optimizer.name != "moga"
    engine = engine or p.engine
    w = 2 if bf16 else 4
    moments = shard * (8 if adamw else 4)
    # AdamW's step builds its denominator from two temporaries of each tensor it updates (torch's
    # single-tensor Adam: sqrt, then the division); ZeRO hands it one flat partition, so 8 B x P / DP.
    # MOGA's temporaries are per matrix: left out.
    adam_temps = 8 * shard if adamw else 0.0
    if engine == "deepspeed" and stage >= 3:
        # ZeRO-3: the weight, fp32 master and gradient partitions, plus the reduce bucket (allocated
        # once, written whole at these sizes); a step gathers the weights (up to max_live_parameters,
        # 1e9 elements by default, so all of them here) and reduce-scatters a flat copy of the bucket.
        # The gathered weights are still live in the optimizer step, with the fp32 copy of the
        # gradient partition under bf16; AdamW's temporaries did not show (fitted to the 56M
        # rehearsal, docs/benchmarks.md: the split between the terms is not measured, their sum is).
        state_dp, bucket = dp, min(shard, 5e8) * w
        weights = shard * w / dp
        other = shard * 4 / dp + shard * w / dp + bucket
        # Under bf16 AdamW's peak also holds the fp32 copy of the gradient partition (4 B x P / DP);
        # MOGA's does not (measured at 56M and 349M: without the term MOGA's bf16 estimate is 0.98 and
        # 1.02 of the steady state, with it 1.13 and 1.18). Which phase holds it is not measured.
        backward = min(shard, 1e9) * w + bucket + (shard * 4 / dp if bf16 and adamw else 0.0)
        step = 0.0
    elif engine == "deepspeed":
        state_dp = dp if stage >= 1 else 1
        weights = shard * w
        # ZeRO keeps an fp32 copy of each rank's partition, a clone even when the model is fp32.
        other = shard * 4 / state_dp
        bucket = min(shard, 5e8) * w                                # reduce bucket: 500M elements by default
        grads = shard * w / (dp if stage >= 2 else 1)               # reduced gradient partition
        backward = bucket + grads
        step = (shard * 4 + adam_temps) / state_dp                  # + the partition's gradient in fp32
    elif engine == "fsdp2":
        state_dp = dp
        weights, other = shard * w / dp, 0.0                        # sharded parameters (DTensor)
        # The root unit (embedding, head, final norm: fully_shard(model) after each layer's) stays
        # unsharded through forward and backward, with its unsharded gradient; + the sharded gradients.
        root = m.vocab_size * m.hidden_size * (1 if m.tie_embeddings else 2) / p.tensor_parallel
        backward = 2 * root * w + shard * w / dp
        step = shard * w / dp                                       # torch's per-tensor temporaries: small
    else:                                                           # Megatron: fp32 grad buffer of the
        state_dp = dp if p.distributed_optimizer else 1             # whole model; fp32 masters under bf16
        weights = shard * w
        other = shard * 4 + (shard * 4 / state_dp if bf16 else 0.0)
        # On CPU (gloo) the grad buffer's reduce-scatter and the weights' all-gather go through a
        # full-size copy (fitted at 56M: the transient was 0.25 GiB where activations are 0.10).
        backward, step = (shard * 4 if p.gpu == "cpu" else 0.0), 0.0
    states = moments / state_dp
    # Activations per layer and micro batch (Korthikanti et al. 2022), bf16, TP-sharded where it
    # is; with full recomputation only each layer's input is kept, plus one layer's working set.
    s, b, h, a = m.max_seq_len, t.micro_batch_size, m.hidden_size, m.num_heads
    layer_full = s * b * h * (10 + 24 / p.tensor_parallel + 5 * a * s / (h * p.tensor_parallel))
    layers = m.num_layers / p.pipeline_parallel
    if p.activation_checkpointing:
        acts = layers * 2 * s * b * h + layer_full
    else:
        acts = layers * layer_full
    # fp32 logits, the loss's upcast copy and log-softmax, and their gradients: 5 of s x b x V floats
    # (Hugging Face's cross-entropy path; measured at 56M, where they are ~40% of the transient).
    logits = s * b * m.vocab_size / p.tensor_parallel * 4 * 5
    transient = max(backward + acts + logits, step)
    total = weights + states + other + transient
    budget = GPU_MEMORY_GIB[p.gpu] * 2 ** 30 * USABLE_FRACTION
    return {"params": parameter_count(cfg), "weights": weights, "optimizer_state": states, "other": other,
            "transient": transient, "activations": acts + logits, "total": total,
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
    print(f"{'preset':<14}{'params':>10} {'layout':<24}{'weights':>8}{'optim':>8}{'other':>8}{'transnt':>8}"
          f"{'total':>8}{'GPU':>11}  fits")
    bad = 0
    for path in paths:
        cfg = load(path)
        e = check(cfg)
        p = cfg.parallel
        layout = f"{p.engine[:2]} {p.nodes}x{p.gpus_per_node} tp{p.tensor_parallel} pp{p.pipeline_parallel}"
        print(f"{cfg.name:<14}{e['params'] / 1e9:>9.2f}B {layout:<24}{e['weights'] / gib:>8.1f}{e['optimizer_state'] / gib:>8.1f}"
              f"{e['other'] / gib:>8.1f}{e['transient'] / gib:>8.1f}{e['total'] / gib:>8.1f}"
              f"{p.gpu:>11}  {'yes' if e['fits'] else 'NO'}")
        bad += not e["fits"]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
