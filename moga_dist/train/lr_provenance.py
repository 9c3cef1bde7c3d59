"""Where a preset's MOGA learning rate comes from: `engine_config --config X --explain`.

Each preset's [optimizer.moga] records the best lr found at a tuned-at cell of the horizon sweep
(`tuned_lr`, `tuned_width`, `tuned_steps`, `tuned_tokens_per_param`) and `lr_rule`, the rule that
moved it to the preset's width and horizon. This module holds the rules' fitted constants, prints
the derivation and says where the preset lies outside the evidence. tests/test_lr_provenance.py
refits the rule from the committed sweep (docs/evidence/horizon/results.jsonl) and holds these
constants, and every preset's lr, to it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from .config import RunConfig
from .presets import parameter_count


@dataclass(frozen=True)
class HorizonRule:
    """lr = tuned_lr * (tokens_per_param / tuned_tokens_per_param) ** exponent, with tokens/parameter
    clamped to the range the sweep covered (the rule is not evidence outside it). The width is not
    moved: MOGA's width factors are in its update; the sweep's fitted width exponent is reported
    (`width_exponent`) but over widths 64-256 with one seed per cell it is not distinguishable
    from the cell-to-cell noise (`rms_factor`), so it is not applied."""
    name: str
    exponent: float
    tokens_per_param: tuple[float, float]
    width_exponent: float
    widths: tuple[int, int]
    rms_factor: float
    points: int

    def clamped(self, tpp: float) -> float:
        """`tpp` held to the tokens/parameter range the sweep covered."""
        lo, hi = self.tokens_per_param
        return min(max(tpp, lo), hi)

    def lr(self, tuned_lr: float, tuned_tpp: float, tpp: float) -> float:
        """The rule's lr at `tpp` tokens/parameter, from the best lr `tuned_lr` at `tuned_tpp`."""
        return tuned_lr * (self.clamped(tpp) / tuned_tpp) ** self.exponent

    def describe(self) -> str:
        return (f"{self.name}: lr = tuned_lr * (tokens/parameter / tuned)^{self.exponent:+.2f}, fitted to MOGA-row's "
                f"best lr in {self.points} bracketed sweep groups at width 64 ({self.tokens_per_param[0]:g}-"
                f"{self.tokens_per_param[1]:g} tokens/parameter; a group's optimum sits off the fit by x{self.rms_factor:.2f} "
                f"rms; docs/width_transfer.md). The width is not moved: the fit over widths {self.widths[0]}-"
                f"{self.widths[1]} gives a width exponent of {self.width_exponent:+.2f}, confounded with the horizon "
                "and not applied")


# moga_dist.sweep.fit.fit(rows of width 64, "moga-row") on docs/evidence/horizon/results.jsonl: the
# horizon exponent over 300, 1,500 and 16,000 steps at the tuned width (2.2-117.4 tokens/parameter);
# the width exponent is the all-widths fit's (64-256), reported only. Presets anchor the rule at the
# measured optimum of width 64 at 16,000 steps (tuned_lr 0.00209 at 117.4 tokens/parameter).
HORIZON_TPP_1 = HorizonRule("horizon-tpp-1", exponent=-0.48, tokens_per_param=(2.2, 117.4), width_exponent=-1.15,
                            widths=(64, 256), rms_factor=1.37, points=3)
RULES = {"none": "none: the tuned lr is used unmoved", HORIZON_TPP_1.name: HORIZON_TPP_1}
CHECKED_WIDTHS = (64, 512)       # widths the lr's transfer was checked at (docs/width_transfer.md)
MATCH = 0.01                     # a preset's lr within 1% of the rule's (3 significant digits)


@dataclass(frozen=True)
class Derivation:
    """The numbers --explain prints: the preset's and the tuned-at cell's width, steps, tokens/parameter."""
    lr: float
    rule_lr: float | None             # what the rule gives here (None: nothing recorded to derive from)
    width: int
    steps: int
    tokens_per_param: float
    tuned_lr: float | None
    tuned_width: int | None
    tuned_steps: int | None
    tuned_tokens_per_param: float | None
    rule: str
    outside: tuple[str, ...]          # where the preset lies beyond the evidence


def tokens_per_param(cfg: RunConfig) -> float:
    """Training tokens per parameter of the preset: steps x global batch x sequence / parameters."""
    t = cfg.training
    return t.steps * t.global_batch_size * cfg.model.max_seq_len / parameter_count(cfg)


def derive(cfg: RunConfig) -> Derivation:
    """The derivation of cfg.optimizer.moga.lr from its tuned-at fields and rule."""
    m = cfg.optimizer.moga
    tpp, width, outside = tokens_per_param(cfg), cfg.model.hidden_size, []
    rule_lr = None
    if m.tuned_width is None or m.tuned_tokens_per_param is None or m.tuned_lr is None:
        outside.append("the tuned-at cell (tuned_lr, tuned_width, tuned_tokens_per_param) is not recorded")
    else:
        rule = RULES[m.lr_rule]
        rule_lr = rule.lr(m.tuned_lr, m.tuned_tokens_per_param, tpp) if isinstance(rule, HorizonRule) else m.tuned_lr
        if not CHECKED_WIDTHS[0] <= width <= CHECKED_WIDTHS[1]:
            outside.append(f"width {width} is outside the widths the lr was checked at "
                           f"({CHECKED_WIDTHS[0]}-{CHECKED_WIDTHS[1]}), {width / CHECKED_WIDTHS[1]:.0f}x the widest")
        if isinstance(rule, HorizonRule):
            lo, hi = rule.tokens_per_param
            if not lo <= tpp <= hi:
                outside.append(f"{tpp:.1f} tokens/parameter is outside the swept {lo:g}-{hi:g} (the rule was held at "
                               "the nearest end)")
        elif not 0.5 <= tpp / m.tuned_tokens_per_param <= 2.0:
            outside.append(f"{tpp:.1f} tokens/parameter is {tpp / m.tuned_tokens_per_param:.1f}x the tuned "
                           f"horizon's {m.tuned_tokens_per_param:g}, and the best lr moves with the horizon")
        if not math.isclose(m.lr, rule_lr, rel_tol=MATCH):
            outside.append(f"lr {m.lr:g} is not the rule's {rule_lr:.3g} (set by hand or by --set)")
    return Derivation(m.lr, rule_lr, width, cfg.training.steps, tpp, m.tuned_lr, m.tuned_width, m.tuned_steps,
                      m.tuned_tokens_per_param, m.lr_rule, tuple(outside))


def explain(cfg: RunConfig) -> str:
    """Lines stating the lr, where it was tuned, the rule that moved it and where it extrapolates."""
    d = derive(cfg)
    rule = RULES[d.rule]
    tuned = (f"width {d.tuned_width}, {d.tuned_steps} steps, {d.tuned_tokens_per_param:g} tokens/parameter: "
             f"best lr {d.tuned_lr:g}" if d.tuned_lr is not None and d.tuned_width is not None else "not recorded")
    lines = [f"{cfg.name}: [optimizer.moga] lr = {d.lr:g}",
             f"  tuned at:    {tuned}",
             f"  this preset: width {d.width}, {d.steps} steps, {d.tokens_per_param:.1f} tokens/parameter",
             f"  rule:        {rule.describe() if isinstance(rule, HorizonRule) else rule}"]
    if d.rule_lr is not None and isinstance(rule, HorizonRule):
        used = rule.clamped(d.tokens_per_param)
        lines.append(f"  lr here:     {d.tuned_lr:g} * ({used:.1f} / {d.tuned_tokens_per_param:g})^{rule.exponent:+.2f}"
                     f" = {d.rule_lr:.3g}")
    elif d.rule_lr is not None:
        lines.append(f"  lr here:     {d.rule_lr:g} (= the tuned lr)")
    if d.outside:
        lines.append("  WARNING: the evidence does not support extrapolating the tuned lr to this preset: "
                     + "; ".join(d.outside) + ". Treat the lr as a starting point and tune it on a short run.")
    else:
        lines.append("  within the evidence: width and horizon are inside what the lr was checked at.")
    return "\n".join(lines)
