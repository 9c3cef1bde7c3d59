"""The width-transfer sweep tool: horizon axis, resumable results, bracketing, report, optimizer wiring."""
import json
import math
import subprocess
import sys
import textwrap
from dataclasses import replace

import pytest
import torch

pytest.importorskip("matplotlib")

from moga_dist.sweep import runs
from moga_dist.sweep.grid import (
    Group,
    bracket,
    default_lrs,
    execute,
    plan,
    read_results,
)
from moga_dist.sweep.report import groups, markdown, unbracketed, write_report
from moga_dist.sweep.runs import RunSpec, build_model, build_optimizer, parameter_count

TINY = RunSpec(optimizer="adamw", width=32, lr=1e-3, steps=3, batch=2, seq_len=32, base_width=32, eval_windows=4)


def test_horizon_axis_orders_groups_and_resolves_tokens_per_parameter():
    gs = plan(["moga-row", "adamw"], [64, 32], [("steps", 40), ("steps", 3), ("tokens_per_param", 0.5)], TINY,
              points=3)
    steps_tpp = {w: round(0.5 * parameter_count(replace(TINY, width=w)) / TINY.tokens_per_step) for w in (32, 64)}
    assert steps_tpp[64] > steps_tpp[32] > 40                      # same tokens/param: more steps when wider
    expected = sorted([(3, 32), (3, 64), (40, 32), (40, 64), (steps_tpp[32], 32), (steps_tpp[64], 64)])
    assert [(g.base.steps, g.base.width) for g in gs[::2]] == expected  # horizon first, then width
    assert [g.base.optimizer for g in gs[:2]] == ["moga-row", "adamw"]
    assert all(len(g.lrs) == 3 for g in gs)
    # the default grid is centred lower for longer horizons, on a shared factor-2 lattice
    short, long = default_lrs("moga-row", 300), default_lrs("moga-row", 16000)
    assert long[2] < short[2] and set(long) & set(short)
    with pytest.raises(ValueError, match="tokens_per_param=0"):
        plan(["adamw"], [32], [("tokens_per_param", 0)], TINY)


def test_horizon_cells_train_their_steps_and_report_per_horizon(tmp_path):
    gs = plan(["adamw", "moga-row"], [32], [("steps", 3), ("steps", 7)], TINY, lrs=[1e-3, 4e-3])
    rows = execute(gs, tmp_path / "r.jsonl", log=lambda *_: None)
    assert len(rows) == 8 and {r["steps"] for r in rows} == {3, 7}
    for r in rows:
        assert len(r["curve"]) == r["steps"] and r["val_loss"] > 0 and r["seconds"] > 0
        assert r["tokens_per_param"] == pytest.approx(r["steps"] * 64 / r["params"], abs=0.01)
    text = markdown(rows, "partial")
    assert text.count("NOT bracketed") + text.count("| bracketed |") == 4   # one verdict per group
    assert "| 32 | 7 |" in text and "| 32 | 3 |" in text                   # a gap row per (width, horizon)
    paths = write_report(rows, tmp_path / "ev", "partial")
    assert all(p.exists() for p in paths) and (tmp_path / "ev" / "loss_vs_lr.png").stat().st_size > 10_000


_KILLED_SWEEP = """
import os, signal, sys
from pathlib import Path
from moga_dist.sweep import runs
from moga_dist.sweep.grid import Group, execute
from moga_dist.sweep.runs import RunSpec

calls, real = [], runs.run
def run(spec, corpus):
    calls.append(spec)
    if len(calls) == 2:                      # the second cell dies mid-run, as under kill -9
        os.kill(os.getpid(), signal.SIGKILL)
    return real(spec, corpus)
runs.run = run
base = RunSpec(optimizer="adamw", width=32, lr=0.0, steps=3, batch=2, seq_len=32, base_width=32, eval_windows=4)
execute([Group(base, (1e-3, 2e-3, 4e-3))], Path(sys.argv[1]), log=lambda *_: None)
"""


def test_a_killed_sweep_resumes_with_only_the_unfinished_cells(tmp_path, monkeypatch):
    path = tmp_path / "results.jsonl"
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(_KILLED_SWEEP), str(path)], timeout=300, check=False)
    assert proc.returncode == -9
    first = read_results(path)
    assert len(first) == 1                                          # the finished cell, nothing of the killed one
    with open(path, "a") as fh:
        fh.write('{"key": "cut off mid-wri')                        # a write interrupted by the kill
    ran, real = [], runs.run
    monkeypatch.setattr(runs, "run", lambda spec, corpus: ran.append(spec.lr) or real(spec, corpus))
    group = Group(replace(TINY, lr=0.0), (1e-3, 2e-3, 4e-3))
    rows = execute([group], path, log=lambda *_: None)
    assert len(ran) == 2 and (next(iter(first.values()))["lr"] not in ran)
    assert sorted(r["lr"] for r in rows) == [1e-3, 2e-3, 4e-3]
    lines = path.read_text().splitlines()
    assert sum(1 for line in lines if line.startswith('{"key": "optimizer=')) == 3
    execute([group], path, log=lambda *_: None)                   # all finished: nothing runs
    assert len(ran) == 2


def _row(lr, loss, diverged=False):
    return {"lr": lr, "val_loss": float("inf") if diverged else loss, "diverged": diverged}


def test_bracketing_needs_a_worse_neighbour_on_both_sides():
    assert bracket([_row(1, 2.0), _row(2, 1.5), _row(4, 1.7)])["bracketed"]
    assert bracket([_row(1, 2.0), _row(2, 1.5), _row(4, 0, diverged=True)])["bracketed"]   # diverged is worse
    edge = bracket([_row(1, 1.4), _row(2, 1.5), _row(4, 1.7)])
    assert (edge["bracketed"], edge["lower"], edge["upper"], edge["best"]["lr"]) == (False, False, True, 1)
    assert bracket([_row(1, 0, True), _row(2, 0, True)])["best"] is None


def test_extend_adds_lattice_lrs_until_the_best_is_bracketed(tmp_path, monkeypatch):
    def fake(spec, corpus):                   # a bowl with its minimum at lr = 0.064
        return {"val_loss": 1 + (math.log2(spec.lr / 0.064)) ** 2, "train_loss": 1.0, "diverged": False,
                "curve": [1.0], "curve_every": 1, "seconds": 0.0, "cpu_seconds": 0.0}
    monkeypatch.setattr(runs, "run", fake)
    monkeypatch.setattr("moga_dist.train.data.ByteCorpus", lambda *a: None)
    group = Group(replace(TINY, lr=0.0), (0.004, 0.008, 0.016))
    rows = execute([group], tmp_path / "r.jsonl", extend=1, log=lambda *_: None)
    assert sorted(r["lr"] for r in rows) == [0.004, 0.008, 0.016, 0.032]          # the budget of one ran out
    assert unbracketed(rows) == ["adamw width 32 steps 3: best lr 0.032 NOT bracketed (needs a higher lr)"]
    rows = execute([group], tmp_path / "r.jsonl", extend=3, log=lambda *_: None)
    assert sorted(r["lr"] for r in rows)[-2:] == [0.064, 0.128] and groups(rows)[0]["bracketed"]
    assert unbracketed(rows) == []


def test_mup_scales_only_hidden_and_head_learning_rates():
    spec = RunSpec(optimizer="adamw-mup", width=128, lr=1e-3, base_width=32)
    (opt,) = build_optimizer(spec, build_model(spec))
    assert [g["lr"] for g in opt.param_groups] == [pytest.approx(1e-3 * 32 / 128), 1e-3]


def test_muon_takes_the_hidden_matrices_with_adamw_matched_rms_and_adamw_the_rest():
    spec = RunSpec(optimizer="muon", width=64, lr=1e-3)
    model = build_model(spec)
    muon, adamw = build_optimizer(spec, model)
    assert isinstance(muon, torch.optim.Muon) and isinstance(adamw, torch.optim.AdamW)
    assert muon.param_groups[0]["adjust_lr_fn"] == "match_rms_adamw"
    assert all(p.ndim == 2 and p.shape[0] != 256 and p.shape[1] != 256 for g in muon.param_groups for p in g["params"])
    n = sum(len(g["params"]) for o in (muon, adamw) for g in o.param_groups)
    assert n == len(list(model.parameters()))


def test_results_lines_round_trip(tmp_path):
    rows = execute([Group(replace(TINY, lr=0.0), (1e-3,))], tmp_path / "r.jsonl", log=lambda *_: None)
    again = json.loads((tmp_path / "r.jsonl").read_text().splitlines()[0])
    assert again == rows[0]
