"""Validation of MOGA's hyper-parameters: a ValueError that names the bad value and what is allowed."""
from __future__ import annotations

import math
from collections.abc import Mapping

from .scaling import NORMS, ROLES


def check_hparams(h: Mapping, where: str) -> None:
    """Raise ValueError for the first invalid setting in `h` (a MOGA group or defaults dict)."""
    def bad(key, allowed):
        raise ValueError(f"{where}: {key}={h[key]!r} is invalid; allowed: {allowed}")

    if not (isinstance(h["lr"], float | int) and h["lr"] >= 0):
        bad("lr", "a number >= 0")
    if not 0.0 <= h["momentum"] < 1.0:
        bad("momentum", "0 <= momentum < 1")
    if h["weight_decay"] < 0:
        bad("weight_decay", ">= 0")
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
