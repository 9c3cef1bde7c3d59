"""Validation of MOGA's hyper-parameters: a ValueError that names the bad value and what is allowed."""
from __future__ import annotations

import math
from collections.abc import Mapping

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


def check_decay(lr: float, weight_decay: float, where: str) -> None:
    """Refuse lr * weight_decay >= 1: the decay factor 1 - lr*wd would be <= 0, and a refused step's
    undo divides by it (a weight multiplied by 0 cannot be restored). Checked at construction and
    at every step (a schedule may raise lr)."""
    if lr * weight_decay >= 1.0:
        raise ValueError(f"{where}: lr={lr!r} with weight_decay={weight_decay!r} gives lr*weight_decay="
                         f"{lr * weight_decay:.3g} >= 1 (the weights would be decayed by 1 - lr*wd <= 0); "
                         "allowed: lr*weight_decay < 1")


def check_hparams(h: Mapping, where: str) -> None:
    """Raise ValueError for the first invalid setting in `h` (a MOGA group or defaults dict)."""
    def bad(key, allowed):
        raise ValueError(f"{where}: {key}={h[key]!r} is invalid; allowed: {allowed}")

    if not (_real_scalar(h["lr"]) and lr_value(h["lr"]) >= 0):
        bad("lr", "a number >= 0 or a 0-dim real Tensor")
    if not 0.0 <= h["momentum"] < 1.0:
        bad("momentum", "0 <= momentum < 1")
    if h["weight_decay"] < 0:
        bad("weight_decay", ">= 0")
    check_decay(lr_value(h["lr"]), h["weight_decay"], where)
    if h["norm"] not in NORMS:
        bad("norm", list(NORMS))
    if not (h["p"] >= 1.0 and math.isfinite(h["p"])):
        bad("p", "1 <= p < inf")
    if not (h["q"] > 1.0 and math.isfinite(h["q"])):
        bad("q", "1 < q < inf")
    if not h["eps"] > 0:
        bad("eps", "> 0")
    if h["lookahead"] is not None and not 0.0 <= h["lookahead"] < 1.0:
        bad("lookahead", "None or 0 <= lookahead < 1")
    for key in ("hidden_mult", "embedding_mult", "head_mult", "vector_mult"):
        if not h[key] >= 0:
            bad(key, ">= 0")
    if h.get("role") is not None and h["role"] not in ROLES:
        bad("role", list(ROLES))
