"""A readable float64 MOGA on whole (unsharded) tensors: the oracle the tests compare against.

Written from the update rules (README.md's role table, `MOGA`'s docstring) without sharing code
with the step (piece.py, functional.py), on purpose.
"""
from __future__ import annotations

import torch

from .hparams import DEFAULTS as HPARAM_DEFAULTS
from .layout import RowBlocks

DEFAULTS = dict(HPARAM_DEFAULTS)      # MOGA's defaults (the table in hparams.py)


def rownorm(u: torch.Tensor, p: float, eps: float) -> torch.Tensor:
    """rownorm_p(u)[r] = sign(u_r)|u_r|^(p-1) / max(‖u_r‖_p^(p-1), eps); u: [d_out, d_in]."""
    norms = u.abs().pow(p).sum(dim=1, keepdim=True).pow(1.0 / p)
    return u.sign() * u.abs().pow(p - 1.0) / norms.pow(p - 1.0).clamp_min(eps)


def colnorm(u: torch.Tensor, q: float, eps: float) -> torch.Tensor:
    """colnorm_q(u)[:, c]: each column rescaled to unit ℓq norm (q* = q/(q-1) sums); u: [d_out, d_in]."""
    qs = q / (q - 1.0)
    norms = u.abs().pow(qs).sum(dim=0, keepdim=True).pow(1.0 / qs)
    return u.sign() * u.abs().pow(qs - 1.0) / norms.pow(qs - 1.0).clamp_min(eps)


def reference_step(weight: torch.Tensor, grad: torch.Tensor, momentum_buffer: torch.Tensor, role: str,
                   row_blocks: RowBlocks | None = None, **hparams) -> tuple[torch.Tensor, torch.Tensor]:
    """One MOGA step for one whole parameter in float64; returns (new_weight, new_momentum_buffer).

    weight, grad, momentum_buffer: the global tensor (any shape; matrices are [d_out, d_in, ...]).
    """
    h = {**DEFAULTS, **hparams}
    w, g, m_old = weight.double(), grad.double(), momentum_buffer.double()
    beta = h["momentum"]
    m = beta * m_old + (1 - beta) * g
    u = m if h["lookahead"] is None else h["lookahead"] * m_old + (1 - h["lookahead"]) * g
    lr = h["lr"]
    if role in ("hidden", "head") and u.numel() == 0:
        return w * (1 - lr * h["weight_decay"]), m
    if role in ("hidden", "head"):
        mat = u.reshape(u.shape[0], -1)
        d_out, d_in = mat.shape
        if role == "head":
            direction = rownorm(mat, h["p"], h["eps"])
            scale = h["head_mult"] * ((h["base_width"] / d_in) ** (1 / h["p"]) if h["head_width_scale"] else 1.0)
            direction = direction * scale
        elif h["norm"] == "row":
            direction = rownorm(mat, h["p"], h["eps"]) * h["hidden_mult"] * d_in ** (-1 / h["p"])
        else:
            direction = torch.empty_like(mat)
            block_ids = (torch.zeros(d_out, dtype=torch.long) if row_blocks is None else
                         torch.tensor([row_blocks.block_of_global_row(r) for r in range(d_out)]))
            for b in block_ids.unique().tolist():
                rows = block_ids == b
                n_rows = int(rows.sum())
                direction[rows] = colnorm(mat[rows], h["q"], h["eps"]) * h["hidden_mult"] * n_rows ** (1 / h["q"]) / d_in
        direction = direction.reshape(u.shape)
    else:
        direction = u.sign() * h[f"{role}_mult"]
    decay = 1 - lr * h["weight_decay"] if role != "vector" else 1.0
    return w * decay - lr * direction, m
