"""Width-aware multipliers of MOGA's update, from *global* shapes only.

A shard never reaches these functions: callers pass `ShardLayout.global_matrix_shape`, so a
row-parallel shard gets the full d_in (the trap Megatron PR #6683 hit with padded shapes).
"""
from __future__ import annotations

ROLES = ("hidden", "embedding", "head", "vector")
NORMS = ("row", "col")


def dual_exponent(q: float) -> float:
    """q* with 1/q + 1/q* = 1 (the column variant sums |m|^(q*) down each column)."""
    return q / (q - 1.0)


def stat_exponent(role: str, norm: str, p: float, q: float) -> float:
    """Exponent r of the partial sums Σ|m|^r kept per statistic (row: p; column: q*)."""
    if role == "hidden" and norm == "col":
        return dual_exponent(q)
    return p


def update_scales(role: str, norm: str, global_matrix_shape: tuple[int, int] | None, *, p: float,
                  q: float, mult: float, head_width_scale: bool = False, base_width: float | None = None,
                  block_rows: list[int] | None = None) -> list[float]:
    """Multiplier on lr for the normalized direction, one per row block (a single entry otherwise).

    hidden/row: mult * d_in^(-1/p);  hidden/col: mult * d_out_block^(1/q) / d_in;
    head: mult (times (base_width / d_in)^(1/p) when head_width_scale); embedding, vector: mult.
    """
    if role in ("hidden", "head") and 0 in global_matrix_shape:
        return [0.0] * len(block_rows or [1])      # no element to update: any scale is exact
    if role == "hidden":
        d_out, d_in = global_matrix_shape
        if norm == "row":
            return [mult * d_in ** (-1.0 / p)]
        rows = block_rows or [d_out]
        return [mult * r ** (1.0 / q) / d_in for r in rows]
    if role == "head" and head_width_scale:
        if base_width is None:
            raise ValueError("head_width_scale=True needs base_width (the width the LR was tuned at)")
        return [mult * (base_width / global_matrix_shape[1]) ** (1.0 / p)]
    return [mult]
