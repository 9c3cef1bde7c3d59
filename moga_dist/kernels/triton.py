"""Triton kernels of the MOGA step: the CUDA backend (they also run on CPU tensors under
TRITON_INTERPRET=1, which is how CI tests them).

Multi-tensor: every kernel takes a table of runs (int64 addresses of p, m, g; sizes; statistic
offset; fp32 w, decay, alpha) and a table of work items (run, row or tile), so one launch per
kind covers every parameter and the launches per step do not grow with the parameter count.

Kinds, with the same meaning as the CPU kernels (see moga_kernels.cpp):
- rows, one pass (every statistic local): per row, m <- lerp(m, g, w) and Σm² in one loop, then
  p <- p·decay - alpha·m/max(‖m‖, eps) in a second loop that reads the row back from cache:
  20 B per fp32 element. A row whose norm is not finite is left unwritten.
- rows / cols, two phase: A writes m and the partial sums (rows: stored; cols: atomically added
  per tile), the caller all-reduces, B applies the update from the summed statistics.
- sign, one pass: m <- lerp; p <- p·decay - alpha·sign(m); Σ|m| per run as a finiteness probe.
- undo (rows one-pass and sign): restore p and m of a refused step, to rounding; entries whose
  gradient was not finite get momentum 0.
Phase B and undo read a device flag (the non-finite verdict) and exit at once when it says so
(B: refused; undo: not refused), so a sync-free step never asks the host.
"""
from __future__ import annotations

import triton
import triton.language as tl

MODE_ONE_PASS, MODE_A, MODE_B, MODE_UNDO = 0, 1, 2, 3


@triton.jit
def _store(ptr, x, mask, P_TYPE: tl.constexpr):
    """Store fp32 `x` as P_TYPE, rounding to nearest even for bf16 by hand: Triton's interpreter
    truncates a plain cast, and the CPU tests must see the rounding a GPU does."""
    if P_TYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        tl.store(ptr, (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=mask)
    else:
        tl.store(ptr, x, mask=mask)


@triton.jit
def _finite(x):
    return (x == x) & (tl.abs(x) < float("inf"))


@triton.jit
def rows_kernel(items, addr, sizes, coef, stats, flag, MODE: tl.constexpr, P_TYPE: tl.constexpr,
                G_TYPE: tl.constexpr, BLOCK: tl.constexpr):
    """One program per row. items: int64 [n, 2] (run, row); addr: int64 [runs, 3] (p, m, g);
    sizes: int64 [runs, 2] (ncols, stat_start); coef: fp32 [runs, 4] (w, decay, alpha, eps)."""
    pid = tl.program_id(0)
    run = tl.load(items + 2 * pid)
    row = tl.load(items + 2 * pid + 1)
    if MODE == 2:
        if tl.load(flag) != 0:
            return
    if MODE == 3:
        if tl.load(flag) == 0:
            return
    ncols = tl.load(sizes + 2 * run)
    slot = tl.load(sizes + 2 * run + 1) + row
    w = tl.load(coef + 4 * run)
    decay = tl.load(coef + 4 * run + 1)
    alpha = tl.load(coef + 4 * run + 2)
    eps = tl.load(coef + 4 * run + 3)
    base = row * ncols
    p_ptr = tl.load(addr + 3 * run).to(tl.pointer_type(P_TYPE)) + base
    m_ptr = tl.load(addr + 3 * run + 1).to(tl.pointer_type(tl.float32)) + base
    g_ptr = tl.load(addr + 3 * run + 2).to(tl.pointer_type(G_TYPE)) + base
    cols = tl.arange(0, BLOCK)
    if MODE <= 1:
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, ncols, BLOCK):
            c = start + cols
            mask = c < ncols
            m = tl.load(m_ptr + c, mask=mask, other=0.0)
            g = tl.load(g_ptr + c, mask=mask, other=0.0).to(tl.float32)
            m = m + w * (g - m)
            tl.store(m_ptr + c, m, mask=mask)
            acc += m * m
        total = tl.sum(acc, axis=0)
        tl.store(stats + slot, total)
        if MODE == 1:
            return
    else:
        total = tl.load(stats + slot)
    ok = _finite(total)
    if MODE == 0:
        if not ok:          # left unwritten, so a refused step can be undone exactly
            return
    scale = alpha / tl.maximum(tl.sqrt(tl.maximum(total, 0.0)), eps)
    # The update pass (one-pass: reads the row back from cache) or the undo of it.
    for start in range(0, ncols, BLOCK):
        c = start + cols
        mask = c < ncols
        m = tl.load(m_ptr + c, mask=mask, other=0.0)
        p = tl.load(p_ptr + c, mask=mask, other=0.0).to(tl.float32)
        if MODE == 3:
            g = tl.load(g_ptr + c, mask=mask, other=0.0).to(tl.float32)
            if ok:
                _store(p_ptr + c, (p + scale * m) / decay, mask, P_TYPE)
            _undo_momentum(m_ptr + c, m, g, w, mask)
        else:
            _store(p_ptr + c, p * decay - scale * m, mask, P_TYPE)


@triton.jit
def _undo_momentum(m_ptr, m, g, w, mask):
    gf = _finite(g)
    old = (m - w * tl.where(gf, g, 0.0)) / (1.0 - w)
    tl.store(m_ptr, tl.where(gf & _finite(old), old, 0.0), mask=mask)


@triton.jit
def cols_kernel(items, addr, sizes, coef, stats, flag, MODE: tl.constexpr, P_TYPE: tl.constexpr,
                G_TYPE: tl.constexpr, TILE_R: tl.constexpr, TILE_C: tl.constexpr):
    """One program per [TILE_R, TILE_C] tile. items: int64 [n, 3] (run, row0, col0); sizes: int64
    [runs, 3] (nrows, ncols, stat_start); statistics of column c land at stat_start + c."""
    pid = tl.program_id(0)
    run = tl.load(items + 3 * pid)
    row0 = tl.load(items + 3 * pid + 1)
    col0 = tl.load(items + 3 * pid + 2)
    if MODE == 2:
        if tl.load(flag) != 0:
            return
    nrows = tl.load(sizes + 3 * run)
    ncols = tl.load(sizes + 3 * run + 1)
    slot0 = tl.load(sizes + 3 * run + 2)
    w = tl.load(coef + 4 * run)
    decay = tl.load(coef + 4 * run + 1)
    alpha = tl.load(coef + 4 * run + 2)
    eps = tl.load(coef + 4 * run + 3)
    r = row0 + tl.arange(0, TILE_R)
    c = col0 + tl.arange(0, TILE_C)
    cmask = c < ncols
    mask = (r[:, None] < nrows) & cmask[None, :]
    offs = r[:, None] * ncols + c[None, :]
    m_ptr = tl.load(addr + 3 * run + 1).to(tl.pointer_type(tl.float32))
    m = tl.load(m_ptr + offs, mask=mask, other=0.0)
    if MODE == 1:
        g_ptr = tl.load(addr + 3 * run + 2).to(tl.pointer_type(G_TYPE))
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        m = m + w * (g - m)
        tl.store(m_ptr + offs, m, mask=mask)
        tl.atomic_add(stats + slot0 + c, tl.sum(m * m, axis=0), mask=cmask)
    else:
        p_ptr = tl.load(addr + 3 * run).to(tl.pointer_type(P_TYPE))
        total = tl.load(stats + slot0 + c, mask=cmask, other=1.0)
        scale = alpha / tl.maximum(tl.sqrt(tl.maximum(total, 0.0)), eps)
        p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        _store(p_ptr + offs, p * decay - scale[None, :] * m, mask, P_TYPE)


@triton.jit
def sign_kernel(items, addr, sizes, coef, stats, flag, MODE: tl.constexpr, P_TYPE: tl.constexpr,
                G_TYPE: tl.constexpr, BLOCK: tl.constexpr):
    """One program per BLOCK elements of a flat run. items: int64 [n, 2] (run, start); sizes: int64
    [runs, 2] (numel, stat slot)."""
    pid = tl.program_id(0)
    run = tl.load(items + 2 * pid)
    start = tl.load(items + 2 * pid + 1)
    if MODE == 3:
        if tl.load(flag) == 0:
            return
    numel = tl.load(sizes + 2 * run)
    slot = tl.load(sizes + 2 * run + 1)
    w = tl.load(coef + 4 * run)
    decay = tl.load(coef + 4 * run + 1)
    alpha = tl.load(coef + 4 * run + 2)
    e = start + tl.arange(0, BLOCK)
    mask = e < numel
    p_ptr = tl.load(addr + 3 * run).to(tl.pointer_type(P_TYPE))
    m_ptr = tl.load(addr + 3 * run + 1).to(tl.pointer_type(tl.float32))
    g_ptr = tl.load(addr + 3 * run + 2).to(tl.pointer_type(G_TYPE))
    m = tl.load(m_ptr + e, mask=mask, other=0.0)
    g = tl.load(g_ptr + e, mask=mask, other=0.0).to(tl.float32)
    p = tl.load(p_ptr + e, mask=mask, other=0.0).to(tl.float32)
    if MODE == 0:
        m = m + w * (g - m)
        tl.store(m_ptr + e, m, mask=mask)
        sign = tl.where(m > 0, 1.0, 0.0) - tl.where(m < 0, 1.0, 0.0)
        _store(p_ptr + e, p * decay - alpha * sign, mask, P_TYPE)
        tl.atomic_add(stats + slot, tl.sum(tl.abs(m), axis=0))
    else:
        sign = tl.where(m > 0, 1.0, 0.0) - tl.where(m < 0, 1.0, 0.0)
        _store(p_ptr + e, (p + alpha * sign) / decay, mask, P_TYPE)
        _undo_momentum(m_ptr + e, m, g, w, mask)
