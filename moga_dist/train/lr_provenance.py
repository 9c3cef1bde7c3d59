"""Where a preset's MOGA learning rate comes from: `engine_config --config X --explain`.

Each preset's [optimizer.moga] records the width, horizon (steps) and tokens per parameter its
`lr` was tuned at, and `lr_rule`, the rule that moved it to the preset's width and horizon. This
module prints that derivation and says where the preset lies outside the evidence.
"""
from __future__ import annotations

from dataclasses import dataclass

from .config import RunConfig
from .presets import parameter_count

# What the width-transfer evidence covers (docs/width_transfer.md, docs/evidence/): the LR was
# checked across these widths at one short horizon only. Horizon sweeps (issue 24) are pending.
CHECKED_WIDTHS = (64, 512)
HORIZON_TOLERANCE = 2.0      # beyond 2x the tuned tokens/param the best lr has moved (issue 24: ~4x lower at 50x)
RULES = {"none": "none: the tuned lr is used unmoved (no width or horizon rule is fitted yet; the horizon "
                 "sweep of docs/width_transfer.md is pending)"}


@dataclass(frozen=True)
class Derivation:
    """The numbers --explain prints: the preset's and the tuned-at width, steps, tokens/parameter."""
    lr: float
    width: int
    steps: int
    tokens_per_param: float
    tuned_width: int | None
    tuned_steps: int | None
    tuned_tokens_per_param: float | None
    rule: str
    outside: tuple[str, ...]      # where the preset lies beyond the evidence ("" entries never)


def derive(cfg: RunConfig) -> Derivation:
    """The derivation of cfg.optimizer.moga.lr from its tuned-at fields."""
    m, t = cfg.optimizer.moga, cfg.training
    tpp = t.steps * t.global_batch_size * cfg.model.max_seq_len / parameter_count(cfg)
    outside = []
    width = cfg.model.hidden_size
    if m.tuned_width is None or m.tuned_tokens_per_param is None:
        outside.append("the tuned-at width and horizon are not recorded")
    else:
        if not CHECKED_WIDTHS[0] <= width <= CHECKED_WIDTHS[1]:
            outside.append(f"width {width} is outside the widths the lr was checked at "
                           f"({CHECKED_WIDTHS[0]}-{CHECKED_WIDTHS[1]}), {width / CHECKED_WIDTHS[1]:.0f}x the widest")
        ratio = tpp / m.tuned_tokens_per_param
        if not 1 / HORIZON_TOLERANCE <= ratio <= HORIZON_TOLERANCE:
            outside.append(f"{tpp:.1f} tokens/parameter is {ratio:.1f}x the tuned horizon's "
                           f"{m.tuned_tokens_per_param:g}, and the best lr moves with the horizon")
    return Derivation(m.lr, width, t.steps, tpp, m.tuned_width, m.tuned_steps, m.tuned_tokens_per_param,
                      m.lr_rule, tuple(outside))


def explain(cfg: RunConfig) -> str:
    """Lines stating the lr, where it was tuned, the rule that moved it and where it extrapolates."""
    d = derive(cfg)
    tuned = (f"width {d.tuned_width}, {d.tuned_steps} steps, {d.tuned_tokens_per_param:g} tokens/parameter"
             if d.tuned_width is not None else "not recorded")
    lines = [f"{cfg.name}: [optimizer.moga] lr = {d.lr:g}",
             f"  tuned at:    {tuned}",
             f"  this preset: width {d.width}, {d.steps} steps, {d.tokens_per_param:.1f} tokens/parameter",
             f"  rule:        {RULES[d.rule]}",
             f"  lr here:     {d.lr:g} (= the tuned lr)"]
    if d.outside:
        lines.append("  WARNING: the evidence does not support extrapolating the tuned lr to this preset: "
                     + "; ".join(d.outside) + ". Treat the lr as a starting point and tune it on a short run.")
    else:
        lines.append("  within the evidence: width and horizon are inside what the lr was checked at.")
    return "\n".join(lines)
