"""The sweep's LR rule (moga_dist/sweep/fit.py): interpolated optima and the fitted exponents."""
import math

import pytest

from moga_dist.sweep.fit import fit, optima, optimum


def _rows(optimizer, width, steps, tpp, lr_star, lrs):
    # loss is a parabola in log2(lr) with its vertex at lr_star: the interpolation must find it exactly
    return [{"optimizer": optimizer, "width": width, "steps": steps, "tokens_per_param": tpp, "lr": lr,
             "val_loss": 1.5 + 0.05 * (math.log2(lr) - math.log2(lr_star)) ** 2, "diverged": False} for lr in lrs]


LATTICE = [0.001 * 2 ** k for k in range(7)]


def test_optimum_is_the_parabola_vertex_and_needs_a_bracket():
    rows = _rows("moga-row", 64, 300, 2.0, 0.011, LATTICE)
    assert optimum(rows).lr == pytest.approx(0.011, rel=1e-9)
    assert optimum(rows).lattice_lr == 0.008
    assert optimum([r for r in rows if r["lr"] <= 0.008]) is None       # best at the edge: not bracketed
    diverged = [dict(r, diverged=True, val_loss=float("nan")) if r["lr"] >= 0.016 else r for r in rows]
    assert optimum(diverged).lr == 0.008                                 # a diverged neighbour: no parabola


def test_fit_recovers_the_horizon_and_width_exponents():
    rows = []
    for width in (64, 128, 256):
        for steps, tpp in ((300, 2.0), (1500, 10.0), (16000, 100.0)):
            tpp_w = tpp * (64 / width) ** 2
            rows += _rows("moga-row", width, steps, tpp_w, 0.02 * (tpp_w / 2.0) ** -0.3 * (width / 64) ** -0.2,
                          [0.0001 * 2 ** k for k in range(12)])
    rule = fit(rows, "moga-row", tpp_ref=2.0)
    assert rule.horizon_exponent == pytest.approx(-0.3, abs=1e-9)
    assert rule.width_exponent == pytest.approx(-0.2, abs=1e-9)
    assert rule.lr(64, 2.0) == pytest.approx(0.02, rel=1e-9)
    assert rule.points == 9 and rule.rms_log2_error < 1e-9
    assert len(optima(rows)) == 9 and fit(rows, "adamw") is None


def test_one_horizon_fixes_its_exponent_to_zero():
    rows = _rows("muon", 64, 300, 2.0, 0.01, LATTICE) + _rows("muon", 128, 300, 0.5, 0.005, LATTICE)
    rule = fit(rows, "muon", tpp_ref=2.0)
    assert rule.width_exponent == pytest.approx(-1.0, abs=1e-9)
    assert rule.horizon_exponent == 0.0
