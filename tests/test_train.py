"""The pretraining job: resume equals uninterrupted training; bad input is refused, nothing lost."""
import pytest
import torch

from moga_dist.train.config import accumulation_steps, load

pytest.importorskip("deepspeed")
pytest.importorskip("transformers")

from dist_utils import spawn  # noqa: E402
from train_cases import refusals, resume_equivalence  # noqa: E402


def test_unknown_config_key_names_it_and_the_allowed_ones(tmp_path):
    preset = tmp_path / "p.toml"
    preset.write_text("[training]\nstepz = 3\n")
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['stepz'\] in \[training\].*'steps'"):
        load(preset)
    with pytest.raises(ValueError, match=r"\['bogus'\]"):
        load(None, ["bogus.x=1"])


def test_overrides_are_parsed_as_toml_not_evaluated():
    cfg = load(None, ["training.steps=7", "optimizer.name=adamw", "optimizer.moga.lookahead=0.9",
                      "output_dir=__import__('os').system('true')"])
    assert cfg.training.steps == 7 and cfg.optimizer.name == "adamw" and cfg.optimizer.moga.lookahead == 0.9
    assert cfg.output_dir == "__import__('os').system('true')"


def test_deepspeed_files_false_is_refused_where_only_deepspeed_files_hold_the_state():
    assert not load(None, ["checkpoint.deepspeed_files=false"]).checkpoint.deepspeed_files
    for other in ("optimizer.name='adamw'", "parallel.engine='megatron'"):
        with pytest.raises(ValueError, match=r"checkpoint.deepspeed_files=false .*allowed only with 'deepspeed' and 'moga'"):
            load(None, ["checkpoint.deepspeed_files=false", other])


def test_world_size_that_does_not_divide_the_batch_is_refused():
    cfg = load(None, ["training.global_batch_size=16", "training.micro_batch_size=8"])
    assert accumulation_steps(cfg, 2) == 1
    with pytest.raises(ValueError, match="global_batch_size=16 is not divisible by micro_batch_size\\*world_size = 8\\*3"):
        accumulation_steps(cfg, 3)


def _weights(ckpt_dir, tag):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)


def test_resume_equals_uninterrupted_training(tmp_path):
    spawn(2, resume_equivalence, str(tmp_path))
    straight = _weights(tmp_path / "straight/checkpoints", "step00000006")
    split = _weights(tmp_path / "split/checkpoints", "step00000006")
    assert straight.keys() == split.keys()
    for k in straight:
        assert torch.equal(straight[k], split[k]), k
    assert (tmp_path / "split/checkpoints/latest").read_text() == "step00000006"


def test_other_model_or_fresh_start_over_checkpoints_is_refused_and_nothing_is_lost(tmp_path):
    spawn(2, refusals, str(tmp_path))


def test_bpe_preset_trains_a_tokenizer_prepares_the_corpus_and_trains(tmp_path, monkeypatch):
    import json

    from train_cases import bpe_preset

    monkeypatch.setenv("MOGA_DIST_CACHE", str(tmp_path / "cache"))     # nothing cached: all of it runs
    spawn(1, bpe_preset, str(tmp_path / "run"))          # one rank: the data path is what is new here
    tokenizer = json.loads((tmp_path / "cache/kjv-bpe-1024/tokenizer.json").read_text())
    assert tokenizer["model"]["type"] == "BPE" and len(tokenizer["model"]["vocab"]) == 1024
    meta = json.loads(next((tmp_path / "cache/data").glob("kjv-*.meta.json")).read_text())
    assert meta["tokenizer"]["kind"] == "hf-json" and meta["documents"] > 31000          # one per verse
    assert meta["tokens"] < 0.6 * 4_137_452      # fewer tokens than bytes: a real subword vocabulary
