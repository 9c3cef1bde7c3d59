"""The DeepSpeed JSON, generated from a RunConfig (never hand-copied next to the preset)."""
from __future__ import annotations

import json
import sys

from .config import RunConfig, accumulation_steps, moga_kwargs


def deepspeed_config(cfg: RunConfig, world_size: int) -> dict:
    """DeepSpeed config for this run; MOGA is passed as an object, so there is no optimizer block
    for it (an AdamW baseline gets DeepSpeed's own, from [optimizer.adamw]).

    ZeRO-3 needs only {"stage": 3} (CPU/gloo or GPU/NCCL alike): DeepSpeed's stage-3 defaults hold
    (sub_group_size 1e9, no offload). Not set, on purpose: offload_param and ZeRO++'s
    zero_hpz_partition_size, which MOGA refuses at ZeRO-3 (engines/deepspeed_zero3.check_stage3), and
    stage3_gather_16bit_weights_on_model_save: the job saves MOGA's fp32 state in model space, whose
    full weights model_space_weights assembles, so no rank ever gathers the 16-bit model to save."""
    t = cfg.training
    peak = cfg.optimizer.moga.lr if cfg.optimizer.name == "moga" else cfg.optimizer.adamw.lr
    out = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": accumulation_steps(cfg, world_size),
        "gradient_clipping": t.gradient_clipping,
        "zero_optimization": {"stage": cfg.engine.zero_stage},
        "bf16": {"enabled": cfg.engine.bf16},
        "scheduler": {"type": "WarmupCosineLR", "params": {
            "total_num_steps": t.steps, "warmup_num_steps": t.warmup_steps,
            "warmup_min_ratio": 0.0, "cos_min_ratio": t.min_lr_ratio, "warmup_type": "linear"}},
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
    }
    if cfg.optimizer.name == "adamw":
        a = cfg.optimizer.adamw
        out["optimizer"] = {"type": "AdamW", "params": {"lr": peak, "betas": list(a.betas), "eps": a.eps,
                                                        "weight_decay": a.weight_decay, "torch_adam": True}}
    return out


def megatron_args(cfg: RunConfig) -> list[str]:
    """Megatron-LM `pretrain_gpt.py` flags for the preset (LLaMA: RMSNorm, SwiGLU, RoPE, GQA,
    untied head, no biases), selecting MOGA with the preset's [optimizer.moga] settings: run them
    with `python -m moga_dist.engines.megatron_lm pretrain_gpt.py <flags>`, which accepts them."""
    from ..engines.megatron_lm import to_flags

    if cfg.optimizer.name != "moga":
        raise ValueError(f"optimizer.name={cfg.optimizer.name!r}: Megatron-LM flags are generated for 'moga' only "
                         "(an AdamW baseline is Megatron-LM's own --optimizer adam with its own flags)")
    m, t, p = cfg.model, cfg.training, cfg.parallel
    moga = moga_kwargs(cfg.optimizer.moga)
    lr, weight_decay = moga.pop("lr"), moga.pop("weight_decay")
    args = ["--num-layers", m.num_layers, "--hidden-size", m.hidden_size, "--ffn-hidden-size", m.intermediate_size,
            "--num-attention-heads", m.num_heads, "--seq-length", m.max_seq_len,
            "--max-position-embeddings", m.max_seq_len, "--normalization", "RMSNorm", "--norm-epsilon", m.rms_norm_eps,
            "--swiglu", "--position-embedding-type", "rope", "--rotary-base", int(m.rope_theta),
            "--disable-bias-linear", "--micro-batch-size", t.micro_batch_size,
            "--global-batch-size", t.global_batch_size, "--train-iters", t.steps, "--lr-warmup-iters", t.warmup_steps,
            "--lr-decay-style", "cosine", "--lr", lr, "--min-lr", lr * t.min_lr_ratio, "--weight-decay", weight_decay,
            "--clip-grad", t.gradient_clipping, "--tensor-model-parallel-size", p.tensor_parallel,
            "--pipeline-model-parallel-size", p.pipeline_parallel, "--seed", t.seed, "--optimizer", "moga",
            *to_flags(moga)]
    # A Megatron preset says so; a DeepSpeed one's ZeRO >= 1 shards optimizer state as this does.
    if p.distributed_optimizer if p.engine == "megatron" else cfg.engine.zero_stage >= 1:
        args += ["--use-distributed-optimizer"]
    if m.num_kv_heads != m.num_heads:
        args += ["--group-query-attention", "--num-query-groups", m.num_kv_heads]
    if not m.tie_embeddings:
        args += ["--untie-embeddings-and-output-weights"]
    if cfg.engine.bf16:
        args += ["--bf16"]
    if p.activation_checkpointing:
        args += ["--recompute-granularity", "full", "--recompute-method", "uniform", "--recompute-num-layers", 1]
    return [str(a) for a in args + _megatron_data_args(cfg)]


def _megatron_data_args(cfg: RunConfig) -> list:
    """[data] as Megatron-LM flags: the same PREFIX.bin/.idx (docs/data.md). The shipped corpus
    ('kjv') and the byte / 'kjv-bpe' tokenizers exist only in moga_dist.train: left out."""
    d = cfg.data
    args: list = []
    if "kjv" not in d.paths:
        blend = [x for w, path in zip(d.weights, d.paths) for x in (w, path)] if d.weights else list(d.paths)
        args += ["--data-path", *blend, "--split", d.split]
    if d.tokenizer not in ("bytes", "kjv-bpe"):
        kind = "GPTSentencePieceTokenizer" if d.tokenizer.endswith(".model") else "HuggingFaceTokenizer"
        args += ["--tokenizer-type", kind, "--tokenizer-model", d.tokenizer]
    return args


def main(argv=None) -> int:
    """`python -m moga_dist.train.engine_config --config X.toml [--world-size N] [--megatron | --explain]`:
    print the DeepSpeed JSON (or the Megatron flags, or the lr's derivation) generated from the preset.
    Bad input: one line on stderr, exit 2."""
    import argparse

    from .config import load

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--config", required=True)
    ap.add_argument("--world-size", type=int, default=None, help="default: the preset's data-parallel size")
    ap.add_argument("--megatron", action="store_true", help="print Megatron-LM flags instead")
    ap.add_argument("--explain", action="store_true",
                    help="print where [optimizer.moga] lr comes from (tuned-at width/horizon, rule) instead")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    args = ap.parse_args(argv)
    from .config import data_parallel_size

    try:
        cfg = load(args.config, args.set)
        if args.explain:
            from .lr_provenance import explain

            print(explain(cfg))
            return 0
        out = " ".join(megatron_args(cfg)) if args.megatron else \
            json.dumps(deepspeed_config(cfg, args.world_size or data_parallel_size(cfg)), indent=2)
    except (ValueError, OSError) as exc:
        print(f"moga_dist.train.engine_config: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
