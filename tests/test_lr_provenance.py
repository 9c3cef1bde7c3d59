"""Every preset records where its MOGA lr was tuned, and `engine_config --explain` says the same."""
import re
from pathlib import Path

import pytest

from moga_dist.train.config import LR_PROVENANCE, load, moga_kwargs
from moga_dist.train.engine_config import main
from moga_dist.train.lr_provenance import derive, explain

PRESETS = sorted(Path(__file__).resolve().parents[1].glob("configs/*.toml"))


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.stem)
def test_preset_records_tuned_at_fields_and_explain_agrees(path, capsys):
    cfg = load(path)
    m = cfg.optimizer.moga
    assert (m.tuned_width, m.tuned_steps, m.tuned_tokens_per_param, m.lr_rule) == (64, 300, 2.2, "none")
    assert main(["--config", str(path), "--explain"]) == 0
    out = capsys.readouterr().out
    assert out.strip() == explain(cfg)
    tuned = re.search(r"tuned at:\s+width (\d+), (\d+) steps, ([\d.]+) tokens/parameter", out)
    assert tuned and (int(tuned[1]), int(tuned[2]), float(tuned[3])) == (m.tuned_width, m.tuned_steps,
                                                                          m.tuned_tokens_per_param)
    assert f"lr = {m.lr:g}" in out and f"width {cfg.model.hidden_size}, {cfg.training.steps} steps" in out
    assert "rule:        none" in out


@pytest.mark.parametrize("name", ["llama_7b", "llama_13b", "llama_70b"])
def test_large_presets_say_the_evidence_does_not_support_extrapolation(name):
    path = Path(__file__).resolve().parents[1] / "configs" / f"{name}.toml"
    assert "does not support extrapolating" in path.read_text()
    d = derive(load(path))
    assert any("outside the widths" in o for o in d.outside)
    assert "WARNING: the evidence does not support extrapolating" in explain(load(path))


def test_tuned_tokens_per_param_matches_the_tuning_run():
    from moga_dist.sweep.runs import RunSpec, parameter_count

    spec = RunSpec(optimizer="moga-row", width=64, lr=0.016, steps=300)   # docs/evidence/mults.csv's runs
    assert round(spec.steps * spec.tokens_per_step / parameter_count(spec), 1) == load(PRESETS[0]).optimizer.moga.tuned_tokens_per_param


def test_provenance_fields_are_not_moga_arguments_and_a_bad_rule_is_refused(tmp_path):
    import torch

    from moga_dist import MOGA

    cfg = load(PRESETS[0])
    kwargs = moga_kwargs(cfg.optimizer.moga)
    assert not set(LR_PROVENANCE) & set(kwargs)
    MOGA([torch.nn.Parameter(torch.zeros(4, 4))], **kwargs)
    with pytest.raises(ValueError, match="optimizer.moga.lr_rule='fitted'; allowed: \\['none'\\]"):
        load(PRESETS[0], ["optimizer.moga.lr_rule=fitted"])
