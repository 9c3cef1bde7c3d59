"""Every preset records where its MOGA lr was tuned and the rule that moved it, `engine_config
--explain` says the same, and the rule's constants are what the committed horizon sweep gives."""
import json
import math
import re
from pathlib import Path

import pytest

from moga_dist.sweep.fit import fit, optima
from moga_dist.train.config import LR_PROVENANCE, load, moga_kwargs
from moga_dist.train.engine_config import main
from moga_dist.train.lr_provenance import HORIZON_TPP_1, HorizonRule, RULES, derive, explain

REPO = Path(__file__).resolve().parents[1]
PRESETS = sorted(REPO.glob("configs/*.toml"))
MEMORY_REHEARSALS = {"llama_350m_cpu", "llama_60m_cpu"}     # python -m moga_dist.bench memory
SWEEP = [json.loads(line) for line in (REPO / "docs/evidence/horizon/results.jsonl").read_text().splitlines() if line]


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.stem)
def test_preset_records_its_tuned_cell_and_rule_and_explain_agrees(path, capsys):
    cfg = load(path)
    m = cfg.optimizer.moga
    assert None not in (m.tuned_lr, m.tuned_width, m.tuned_steps, m.tuned_tokens_per_param)
    assert main(["--config", str(path), "--explain"]) == 0
    out = capsys.readouterr().out
    assert out.strip() == explain(cfg)
    tuned = re.search(r"tuned at:\s+width (\d+), (\d+) steps, ([\d.]+) tokens/parameter: best lr ([\d.e-]+)", out)
    assert tuned and (int(tuned[1]), int(tuned[2]), float(tuned[3]), float(tuned[4])) == (
        m.tuned_width, m.tuned_steps, m.tuned_tokens_per_param, m.tuned_lr)
    assert f"lr = {m.lr:g}" in out and f"width {cfg.model.hidden_size}, {cfg.training.steps} steps" in out
    assert f"rule:        {m.lr_rule}" in out
    d = derive(cfg)
    assert math.isclose(d.lr, d.rule_lr, rel_tol=0.01), f"{path.stem}: lr {d.lr} is not its rule's {d.rule_lr:.4g}"


def test_training_presets_use_the_horizon_rule_anchored_at_the_sweeps_long_horizon_optimum():
    """The tuned cell is the sweep's MOGA-row optimum at width 64, 16,000 steps; the rule's exponent is
    the width-64 fit over the horizons (recomputed here from docs/evidence/horizon/results.jsonl)."""
    at64 = [r for r in SWEEP if r["width"] == 64]
    rule = fit(at64, "moga-row")
    assert rule.points >= 3 and max(rule.tokens_per_param) > 100            # >= 100 tokens/param at width 64
    assert HORIZON_TPP_1.exponent == pytest.approx(rule.horizon_exponent, abs=0.005)
    assert HORIZON_TPP_1.rms_factor == pytest.approx(2 ** rule.rms_log2_error, abs=0.005)
    assert HORIZON_TPP_1.tokens_per_param == pytest.approx(rule.tokens_per_param, abs=0.05)
    assert HORIZON_TPP_1.width_exponent == pytest.approx(fit(SWEEP, "moga-row").width_exponent, abs=0.005)
    longest = max((o for o in optima(at64) if o.optimizer == "moga-row"), key=lambda o: o.steps)
    for path in PRESETS:
        m = load(path).optimizer.moga
        if path.stem in MEMORY_REHEARSALS:       # a few steps to measure memory: their lr is not a claim
            assert m.lr_rule == "none"
            continue
        assert m.lr_rule == HORIZON_TPP_1.name
        assert (m.tuned_width, m.tuned_steps) == (64, longest.steps)
        assert m.tuned_lr == pytest.approx(longest.lr, rel=0.005)
        assert m.tuned_tokens_per_param == pytest.approx(longest.tokens_per_param, abs=0.05)


def test_rule_moves_with_tokens_per_param_and_holds_outside_the_evidence():
    r = HorizonRule("t", exponent=-0.5, tokens_per_param=(2.0, 100.0), width_exponent=0.0, widths=(64, 64),
                    rms_factor=1.0, points=3)
    assert r.lr(0.002, 100.0, 25.0) == pytest.approx(0.004)
    assert r.lr(0.002, 100.0, 1e4) == pytest.approx(0.002) and r.lr(0.002, 100.0, 0.1) == r.lr(0.002, 100.0, 2.0)


def test_hand_set_lr_and_extrapolation_are_named(tmp_path):
    cfg = load(REPO / "configs/tiny_cpu.toml", ["optimizer.moga.lr=0.05"])
    assert any("is not the rule's" in o for o in derive(cfg).outside)
    assert "WARNING" in explain(cfg)
    assert not derive(load(REPO / "configs/tiny_cpu.toml")).outside      # tiny_cpu lies inside the evidence


@pytest.mark.parametrize("name", ["llama_7b", "llama_13b", "llama_70b"])
def test_large_presets_say_the_evidence_does_not_support_extrapolation(name):
    path = REPO / "configs" / f"{name}.toml"
    assert "does not support extrapolating" in path.read_text()
    d = derive(load(path))
    assert any("outside the widths" in o for o in d.outside)
    assert "WARNING: the evidence does not support extrapolating" in explain(load(path))


def test_provenance_fields_are_not_moga_arguments_and_a_bad_rule_is_refused():
    import torch

    from moga_dist import MOGA

    cfg = load(PRESETS[0])
    kwargs = moga_kwargs(cfg.optimizer.moga)
    assert not set(LR_PROVENANCE) & set(kwargs)
    MOGA([torch.nn.Parameter(torch.zeros(4, 4))], **kwargs)
    with pytest.raises(ValueError, match="optimizer.moga.lr_rule='fitted'; allowed: \\['none', 'horizon-tpp-1'\\]"):
        load(PRESETS[0], ["optimizer.moga.lr_rule=fitted"])
    assert set(RULES) == {"none", "horizon-tpp-1"}
