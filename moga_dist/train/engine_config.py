"""The DeepSpeed JSON, generated from a RunConfig (never hand-copied next to the preset)."""
from __future__ import annotations

import json

from .config import RunConfig, accumulation_steps


def deepspeed_config(cfg: RunConfig, world_size: int) -> dict:
    """DeepSpeed config for this run; MOGA is passed as an object, so there is no optimizer block
    for it (an AdamW baseline gets DeepSpeed's own, from [optimizer.adamw])."""
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


def main(argv=None) -> None:
    """`python -m moga_dist.train.engine_config --config X.toml --world-size N`: print the JSON."""
    import argparse

    from .config import load

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--config", required=True)
    ap.add_argument("--world-size", type=int, required=True)
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    args = ap.parse_args(argv)
    print(json.dumps(deepspeed_config(load(args.config, args.set), args.world_size), indent=2))


if __name__ == "__main__":
    main()
