"""The LR rule fitted to a sweep: where each bracketed group's optimum lies, and how it moves.

Each bracketed group (best lr with a worse neighbour on both sides) gives an interpolated optimum:
the vertex of the parabola in log2(lr) through the best lattice LR and its two neighbours (clamped
to within one lattice step of the best). Across groups of one optimizer the rule

    log2 lr* = a + b * log2(tokens_per_param) + c * log2(width)

is fitted by least squares, i.e. lr* = lr_ref * (tpp / tpp_ref)**b * (width / width_ref)**c.
With one horizon or one width in the data, that exponent is not identifiable and is fixed to 0.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .grid import bracket, group_key


@dataclass(frozen=True)
class Optimum:
    """One group's interpolated best lr (bracketed groups only)."""
    optimizer: str
    width: int
    steps: int
    tokens_per_param: float
    lr: float                   # interpolated optimum
    lattice_lr: float           # the best lr actually run
    val_loss: float


@dataclass(frozen=True)
class Rule:
    """lr*(width, tpp) = lr_ref * (tpp / tpp_ref)**horizon_exponent * (width / width_ref)**width_exponent."""
    optimizer: str
    lr_ref: float
    width_ref: int
    tpp_ref: float
    horizon_exponent: float
    width_exponent: float
    points: int                 # bracketed groups the fit used
    rms_log2_error: float       # residual of the fit, in factors of 2
    widths: tuple[int, ...]     # the evidence's range: a rule is not evidence outside it
    tokens_per_param: tuple[float, float]

    def lr(self, width: int, tokens_per_param: float) -> float:
        """The rule's lr at (width, tokens per parameter)."""
        return (self.lr_ref * (tokens_per_param / self.tpp_ref) ** self.horizon_exponent
                * (width / self.width_ref) ** self.width_exponent)

    def describe(self) -> str:
        return (f"{self.optimizer}: lr* = {self.lr_ref:.3g} * (tokens_per_param / {self.tpp_ref:g})^{self.horizon_exponent:+.2f}"
                f" * (width / {self.width_ref})^{self.width_exponent:+.2f}  ({self.points} bracketed groups, "
                f"widths {min(self.widths)}-{max(self.widths)}, {self.tokens_per_param[0]:g}-"
                f"{self.tokens_per_param[1]:g} tokens/param, rms error x{2 ** self.rms_log2_error:.2f})")


def optimum(rows: list[dict]) -> Optimum | None:
    """The interpolated optimum of one group's rows, or None when the group is not bracketed."""
    b = bracket(rows)
    if not b["bracketed"]:
        return None
    pts = sorted(rows, key=lambda r: r["lr"])
    i = pts.index(b["best"])
    lo, mid, hi = pts[i - 1], pts[i], pts[i + 1]
    x0 = math.log2(mid["lr"])
    vertex = x0
    if not (lo["diverged"] or hi["diverged"]):
        xs = [math.log2(r["lr"]) for r in (lo, mid, hi)]
        a, bb, _ = np.polyfit(xs, [r["val_loss"] for r in (lo, mid, hi)], 2)
        if a > 0:
            vertex = min(max(-bb / (2 * a), xs[0]), xs[2])
    return Optimum(mid["optimizer"], mid["width"], mid["steps"], mid["tokens_per_param"], 2.0 ** vertex,
                   mid["lr"], mid["val_loss"])


def optima(rows: list[dict]) -> list[Optimum]:
    """Optimum per bracketed group, sorted by optimizer, horizon, width."""
    by: dict[str, list[dict]] = {}
    for r in rows:
        by.setdefault(group_key(r), []).append(r)      # the sweep's own grouping: every setting but lr
    out = [o for g in by.values() if (o := optimum(g)) is not None]
    return sorted(out, key=lambda o: (o.optimizer, o.steps, o.width))


def fit(rows: list[dict], optimizer: str, width_ref: int = 64, tpp_ref: float | None = None) -> Rule | None:
    """Least-squares rule over `optimizer`'s bracketed groups (None when there are none)."""
    pts = [o for o in optima(rows) if o.optimizer == optimizer]
    if not pts:
        return None
    widths = sorted({o.width for o in pts})
    tpps = [o.tokens_per_param for o in pts]
    tpp_ref = tpp_ref if tpp_ref is not None else min(tpps)
    cols = [np.ones(len(pts))]
    vary_t = len({o.steps for o in pts}) > 1
    vary_w = len(widths) > 1
    if vary_t:
        cols.append(np.array([math.log2(o.tokens_per_param / tpp_ref) for o in pts]))
    if vary_w:
        cols.append(np.array([math.log2(o.width / width_ref) for o in pts]))
    design = np.stack(cols, axis=1)
    target = np.array([math.log2(o.lr) for o in pts])
    coef, *_ = np.linalg.lstsq(design, target, rcond=None)
    resid = target - design @ coef
    b = float(coef[1]) if vary_t else 0.0
    c = float(coef[-1]) if vary_w else 0.0
    return Rule(optimizer, float(2.0 ** coef[0]), width_ref, tpp_ref, b, c, len(pts),
                float(math.sqrt(float(np.mean(resid ** 2)))), tuple(widths), (min(tpps), max(tpps)))
