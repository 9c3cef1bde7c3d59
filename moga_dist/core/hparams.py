"""MOGA's hyper-parameters: the one table of their names, defaults, types, help and validation
(`HPARAMS`), and the checks: a ValueError that names the bad value and what is allowed.

Everything else that spells a MOGA setting derives from `HPARAMS`: reference.DEFAULTS, the job's
[optimizer.moga] (moga_dist.train.config.MOGAConfig), Megatron-LM's `--moga-*` flags
(moga_dist.engines.megatron_lm.FLAGS) and the sweep's RunSpec (moga_dist.sweep.runs). MOGA.__init__
keeps an explicit signature for readers and IDEs; tests/test_job_contract.py holds its defaults,
and every other spelling, to this table.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping

import torch

from .scaling import NORMS, ROLES


def _real_scalar(x) -> bool:
    if isinstance(x, torch.Tensor):
        return x.dim() == 0 and x.is_floating_point() and not x.is_complex()
    return isinstance(x, float | int) and not isinstance(x, bool)


def lr_value(lr) -> float:
    """A group's lr as a float. A Tensor lr (0-dim, as torch optimizers accept) is read each step:
    on CUDA that is one host read per step, so a step with a CUDA Tensor lr is not graph-capturable."""
    return float(lr.item()) if isinstance(lr, torch.Tensor) else float(lr)


@dataclasses.dataclass(frozen=True)
class HParam:
    """One MOGA keyword argument. `type` is the value's type (float, str or bool); `optional`:
    None is allowed too (the setting is off). `valid(value)` is the check, `allowed` says it in
    words for the error message (None: not checked)."""
    name: str
    default: object
    type: type
    help: str
    allowed: str | None = None
    valid: Callable[[object], bool] | None = None
    optional: bool = False

    @property
    def annotation(self):
        """The type as a dataclass annotation (`float | None` when optional)."""
        return self.type | None if self.optional else self.type


def _mult(role: str, what: str) -> HParam:
    return HParam(f"{role}_mult", 20.0 if role == "hidden" else 1.0, float,
                  f"update multiplier of {what}", ">= 0", lambda v: v >= 0)


# In MOGA.__init__'s order (also the order of [optimizer.moga] and of reference.DEFAULTS).
HPARAMS: tuple[HParam, ...] = (
    HParam("lr", 1e-2, float, "learning rate (Megatron-LM: its own --lr)",
           "a number >= 0 or a 0-dim real Tensor", lambda v: _real_scalar(v) and lr_value(v) >= 0),
    HParam("momentum", 0.95, float, "momentum coefficient beta", "0 <= momentum < 1", lambda v: 0.0 <= v < 1.0),
    HParam("weight_decay", 0.1, float, "decoupled weight decay of hidden, embedding and head weights "
           "(Megatron-LM: its own --weight-decay)", ">= 0", lambda v: v >= 0),
    HParam("norm", "row", str, "'row' (normalize each output row) or 'col' (each input column, per fused block)",
           str(list(NORMS)), lambda v: v in NORMS),
    HParam("p", 2.0, float, "row geometry: rows are normalized in the l_p norm (hidden, norm=row; head)",
           "1 <= p < inf", lambda v: v >= 1.0 and math.isfinite(v)),
    HParam("q", 2.0, float, "column geometry: columns are normalized in the l_q norm (hidden, norm=col)",
           "1 < q < inf", lambda v: v > 1.0 and math.isfinite(v)),
    _mult("hidden", "hidden matrices"),
    _mult("embedding", "embeddings (sign updates)"),
    _mult("head", "the output layer"),
    _mult("vector", "biases and norm gains (sign updates)"),
    HParam("head_width_scale", False, bool, "scale the head's update by (base_width / d_in)^(1/p)"),
    HParam("base_width", None, float, "reference width of the width scale", optional=True),
    HParam("eps", 1e-8, float, "denominator floor of the normalization", "> 0", lambda v: v > 0),
    HParam("lookahead", None, float, "Nesterov-style lookahead coefficient (Algorithm 1's beta2)",
           "None or 0 <= lookahead < 1", lambda v: v is None or 0.0 <= v < 1.0, optional=True),
)
BY_NAME: dict[str, HParam] = {h.name: h for h in HPARAMS}
DEFAULTS: dict[str, object] = {h.name: h.default for h in HPARAMS}


def hparam_fields(names=None, **defaults) -> list[tuple]:
    """(name, annotation, dataclasses.field) of the named settings (all, in table order, when
    `names` is None), for dataclasses.make_dataclass; `defaults` overrides a table default
    (dataclasses.MISSING: a required field)."""
    unknown = sorted(set(names or ()) - set(BY_NAME) | set(defaults) - set(BY_NAME))
    if unknown:
        raise ValueError(f"{unknown} are not MOGA hyper-parameters; allowed: {list(BY_NAME)}")
    chosen = [BY_NAME[n] for n in names] if names is not None else HPARAMS
    return [(h.name, h.annotation, dataclasses.field(default=defaults.get(h.name, h.default))) for h in chosen]


def check_decay(lr: float, weight_decay: float, where: str) -> None:
    """Refuse lr * weight_decay >= 1: the decay factor 1 - lr*wd would be <= 0, and a refused step's
    undo divides by it (a weight multiplied by 0 cannot be restored). Checked at construction and
    at every step (a schedule may raise lr)."""
    if lr * weight_decay >= 1.0:
        raise ValueError(f"{where}: lr={lr!r} with weight_decay={weight_decay!r} gives lr*weight_decay="
                         f"{lr * weight_decay:.3g} >= 1 (the weights would be decayed by 1 - lr*wd <= 0); "
                         "allowed: lr*weight_decay < 1")


def check_hparams(h: Mapping, where: str) -> None:
    """Raise ValueError for the first invalid setting in `h` (a MOGA group or defaults dict, holding
    every setting of HPARAMS): each checked in the table's order, then lr * weight_decay, then role."""
    def bad(key, allowed):
        raise ValueError(f"{where}: {key}={h[key]!r} is invalid; allowed: {allowed}")

    for hp in HPARAMS:
        if hp.valid is not None and not hp.valid(h[hp.name]):
            bad(hp.name, hp.allowed)
    check_decay(lr_value(h["lr"]), h["weight_decay"], where)
    if h.get("role") is not None and h["role"] not in ROLES:
        bad("role", list(ROLES))
