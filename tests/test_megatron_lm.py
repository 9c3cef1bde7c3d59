"""Megatron-LM users select MOGA on the command line: the flags generated from each Megatron preset
select MOGA with the preset's settings, and (where Megatron-LM's megatron.training is installed,
megatron-core >= 0.18 wheels) its own parser, validation and optimizer factory build MOGA."""
import argparse
import dataclasses
import importlib.util
from pathlib import Path

import pytest

from moga_dist.engines.megatron_lm import FLAGS, add_moga_args, settings_from_args, to_flags
from moga_dist.train.config import load, moga_kwargs
from moga_dist.train.engine_config import megatron_args

PRESETS = sorted(Path(__file__).parent.parent.joinpath("configs").glob("*.toml"))
MEGATRON_PRESETS = [p for p in PRESETS if load(p).parallel.engine == "megatron"]


def _has_megatron_lm() -> bool:
    if importlib.util.find_spec("megatron") is None or importlib.util.find_spec("megatron.training") is None:
        return False
    import megatron_support

    megatron_support.allow_python_3_12_typing()
    return True


def _parser() -> tuple[argparse.ArgumentParser, bool]:
    """Megatron-LM's real argument parser where installed, else one with its --optimizer flag."""
    if _has_megatron_lm():
        from megatron.training.arguments import add_megatron_arguments

        return add_moga_args(add_megatron_arguments(argparse.ArgumentParser(allow_abbrev=False))), True
    parser = argparse.ArgumentParser(allow_abbrev=False)
    parser.add_argument("--optimizer", default="adam", choices=["adam", "sgd", "muon", "dist_muon", "lion"])
    return add_moga_args(parser), False


def test_there_are_megatron_presets():
    assert {p.stem for p in MEGATRON_PRESETS} >= {"llama_13b", "llama_70b"}


@pytest.mark.parametrize("path", MEGATRON_PRESETS, ids=lambda p: p.stem)
def test_generated_megatron_lm_flags_select_moga_with_the_preset_settings(path):
    cfg = load(path)
    flags = megatron_args(cfg)
    parser, real = _parser()
    args = parser.parse_args(flags) if real else parser.parse_known_args(flags)[0]
    assert args.optimizer == "moga"
    want = {k: v for k, v in moga_kwargs(cfg.optimizer.moga).items()
            if k not in ("lr", "weight_decay") and v is not None and v is not False}
    assert settings_from_args(args) == want
    assert float(flags[flags.index("--lr") + 1]) == cfg.optimizer.moga.lr
    assert float(flags[flags.index("--weight-decay") + 1]) == cfg.optimizer.moga.weight_decay


def test_every_moga_setting_but_lr_and_weight_decay_has_a_flag():
    from moga_dist.train.config import LR_PROVENANCE, MOGAConfig

    settings = {f.name for f in dataclasses.fields(MOGAConfig)} - {"lr", "weight_decay", *LR_PROVENANCE}
    assert settings == {f.setting for f in FLAGS}


def test_to_flags_refuses_a_setting_without_a_flag():
    with pytest.raises(ValueError, match=r"MOGA settings \['lr'\] have no Megatron-LM flag"):
        to_flags({"lr": 0.1, "norm": "row"})


def test_moga_norm_flag_refuses_other_values(capsys):
    parser, _ = _parser()
    with pytest.raises(SystemExit):
        parser.parse_known_args(["--optimizer", "moga", "--moga-norm", "rows"])
    assert "invalid choice: 'rows'" in capsys.readouterr().err


def test_adamw_preset_gets_no_megatron_lm_flags():
    cfg = load(Path("configs/tiny_cpu.toml"), ["optimizer.name='adamw'"])
    with pytest.raises(ValueError, match="optimizer.name='adamw': Megatron-LM flags are generated for 'moga' only"):
        megatron_args(cfg)


def test_install_without_megatron_lm_names_what_it_needs():
    pytest.importorskip("megatron.core")
    if _has_megatron_lm():
        pytest.skip("megatron.training is installed")
    import megatron.core

    from moga_dist.engines.megatron_lm import install

    with pytest.raises(RuntimeError, match=rf"needs its megatron.training package .*installed megatron-core "
                                           rf"{megatron.core.__version__}"):
        install()


def test_megatron_lm_optimizer_moga_trains_like_tp1(tmp_path):
    """Megatron-LM's parse_and_validate_args and its training's get_megatron_optimizer, at TP=2 and
    at DP=2 with --use-distributed-optimizer: 3 steps equal the TP=1 drop-in reference."""
    if not _has_megatron_lm():
        pytest.skip("Megatron-LM's megatron.training is not installed (megatron-core >= 0.18 wheels carry it)")
    from dist_utils import spawn
    from megatron_cases import reference
    from megatron_lm_cases import megatron_lm

    path = str(tmp_path / "tp1.pt")
    spawn(1, reference, path)
    spawn(2, megatron_lm, path, [(2, False), (1, True)])


def test_engine_config_cli_refuses_adamw_megatron_flags_in_one_line(capsys, monkeypatch):
    monkeypatch.chdir(Path(__file__).parent.parent)
    from moga_dist.train.engine_config import main

    assert main(["--config", "configs/tiny_cpu.toml", "--megatron", "--set", "optimizer.name='adamw'"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["moga_dist.train.engine_config: error: optimizer.name='adamw': Megatron-LM flags are generated "
                   "for 'moga' only (an AdamW baseline is Megatron-LM's own --optimizer adam with its own flags)"]


def test_megatron_lm_cli_names_a_missing_script(capsys):
    from moga_dist.engines.megatron_lm import main

    with pytest.raises(SystemExit) as exit_:
        main(["no_such_pretrain_gpt.py", "--optimizer", "moga"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "error: no such file 'no_such_pretrain_gpt.py'" in err[0]


@pytest.mark.parametrize("flag,message", [
    ("optimizer_cpu_offload", "--optimizer-cpu-offload builds Megatron's CPU Adam"),
    ("use_precision_aware_optimizer", "--use-precision-aware-optimizer is for Adam's scaled state"),
    ("use_megatron_fsdp", "Megatron FSDP / torch FSDP2 are not supported"),
], ids=["cpu_offload", "precision_aware", "fsdp"])
def test_megatron_lm_refuses_what_moga_cannot_run_exactly(flag, message):
    from moga_dist.engines.megatron_lm import check_args

    with pytest.raises(ValueError, match=message):
        check_args(argparse.Namespace(optimizer="moga", **{flag: True}))
