"""The width-transfer sweep tool: grid, resumable CSV, report, plots, optimizer wiring."""
import csv
from dataclasses import replace

import pytest
import torch

pytest.importorskip("matplotlib")

from moga_dist.sweep.grid import execute, plot, report  # noqa: E402
from moga_dist.sweep.runs import RunSpec, build_model, build_optimizer  # noqa: E402


def test_grid_runs_once_reports_and_plots(tmp_path):
    base = RunSpec(optimizer="adamw", width=32, lr=1e-3, steps=3, batch=2, seq_len=32, base_width=32)
    specs = [replace(base, optimizer=o, width=w, lr=lr) for o in ("adamw", "moga-row") for w in (32, 64)
             for lr in (1e-3, 4e-3)]
    rows = execute(specs, tmp_path / "r.csv", jobs=2)
    assert len(rows) == 8 and all(float(r["val_loss"]) > 0 for r in rows)
    before = (tmp_path / "r.csv").read_text()
    execute(specs, tmp_path / "r.csv", jobs=2)                    # everything already done
    assert (tmp_path / "r.csv").read_text() == before
    with open(tmp_path / "r.csv") as fh:
        assert len(list(csv.DictReader(fh))) == 8
    text = report(rows, tmp_path)
    assert text.count("yes") == 4                                  # 2-point grids: every optimum is on an edge
    assert all(p.exists() and p.stat().st_size > 10_000 for p in plot(rows, tmp_path))


def test_mup_scales_only_hidden_and_head_learning_rates():
    spec = RunSpec(optimizer="adamw-mup", width=128, lr=1e-3, base_width=32)
    (opt,) = build_optimizer(spec, build_model(spec))
    assert [g["lr"] for g in opt.param_groups] == [pytest.approx(1e-3 * 32 / 128), 1e-3]


def test_muon_takes_the_hidden_matrices_and_adamw_the_rest():
    spec = RunSpec(optimizer="muon", width=64, lr=1e-3)
    model = build_model(spec)
    muon, adamw = build_optimizer(spec, model)
    assert isinstance(muon, torch.optim.Muon) and all(p.ndim == 2 for g in muon.param_groups for p in g["params"])
    n = sum(len(g["params"]) for o in (muon, adamw) for g in o.param_groups)
    assert n == len(list(model.parameters()))
