"""The pretraining job: resume equals uninterrupted training; bad input is refused, nothing lost."""
from pathlib import Path

import pytest
import torch

from moga_dist.train.config import accumulation_steps, load

pytest.importorskip("deepspeed")
pytest.importorskip("transformers")

from dist_utils import spawn  # noqa: E402
from train_cases import checkpoint_bytes, refusals, resume_equivalence  # noqa: E402


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
    assert load(None, ["checkpoint.deepspeed_files=false"]).checkpoint.deepspeed_files is False
    for other in ("optimizer.name='adamw'", "parallel.engine='megatron'"):
        with pytest.raises(ValueError, match=r"checkpoint.deepspeed_files=false .*allowed only with 'deepspeed' and 'moga'"):
            load(None, ["checkpoint.deepspeed_files=false", other])


def test_deepspeed_files_are_written_only_where_needed_unless_asked_for():
    from moga_dist.train.config import deepspeed_files_written

    # Unset (the default): DeepSpeed + MOGA writes the model-space state alone; AdamW's files are its state.
    assert load(None).checkpoint.deepspeed_files is None
    assert not deepspeed_files_written(load(None))
    assert deepspeed_files_written(load(None, ["optimizer.name='adamw'"]))
    for opt in ("moga", "adamw"):                      # an explicit true is honoured
        assert deepspeed_files_written(load(None, ["checkpoint.deepspeed_files=true", f"optimizer.name='{opt}'"]))
    assert not deepspeed_files_written(load(None, ["checkpoint.deepspeed_files=false"]))
    with pytest.raises(ValueError, match=r"checkpoint.deepspeed_files=true with parallel.engine='megatron': allowed only "
                                         r"with 'deepspeed'"):
        load(None, ["checkpoint.deepspeed_files=true", "parallel.engine='megatron'"])
    load(None, ["parallel.engine='megatron'"])        # the default does not trip either check
    load(None, ["optimizer.name='adamw'"])


def test_world_size_that_does_not_divide_the_batch_is_refused():
    cfg = load(None, ["training.global_batch_size=16", "training.micro_batch_size=8"])
    assert accumulation_steps(cfg, 2) == 1
    with pytest.raises(ValueError, match="global_batch_size=16 is not divisible by micro_batch_size\\*world_size = 8\\*3"):
        accumulation_steps(cfg, 3)


def _weights(ckpt_dir, tag):
    """The fp32 master weights of a MOGA checkpoint, from its model-space state (DeepSpeed's own
    files are not written by default)."""
    from moga_dist.engines.deepspeed_checkpoint import model_space_weights

    return model_space_weights(ckpt_dir / tag / "moga_model_space")


def _files(ckpt: Path) -> dict[str, int]:
    return {str(p.relative_to(ckpt)): p.stat().st_size for p in ckpt.rglob("*") if p.is_file()}


def test_resume_equals_uninterrupted_training(tmp_path):
    spawn(2, resume_equivalence, str(tmp_path))
    # The interrupted run's step 3 was written as the old default wrote it: both sets of files.
    old = _files(tmp_path / "split/checkpoints/step00000003")
    assert [f for f in old if f.endswith("optim_states.pt")] and [f for f in old if f.startswith("moga_model_space/")]
    straight = _weights(tmp_path / "straight/checkpoints", "step00000006")
    split = _weights(tmp_path / "split/checkpoints", "step00000006")
    assert straight.keys() == split.keys() and straight
    for k in straight:
        assert torch.equal(straight[k], split[k]), k
    assert (tmp_path / "split/checkpoints/latest").read_text() == "step00000006"


def test_default_moga_checkpoint_holds_no_deepspeed_state_and_is_smaller_than_adamws(tmp_path):
    """checkpoint.deepspeed_files unset: a DeepSpeed + MOGA checkpoint is MOGA's model-space state
    (fp32 weights + momentum) alone, no ZeRO files duplicating it, and fewer bytes than the same job
    with AdamW writes (its DeepSpeed files: fp32 weights, master copy, two moments)."""
    spawn(2, checkpoint_bytes, str(tmp_path))
    moga, adamw = (_files(tmp_path / run / "checkpoints/step00000003") for run in ("moga", "adamw"))
    assert {"moga_model_space/common.pt", "moga_model_space/rank00000.pt", "moga_model_space/rank00001.pt"} <= set(moga)
    assert not [f for f in moga if f.endswith(".pt") and not f.startswith("moga_model_space/")], sorted(moga)
    assert len([f for f in adamw if f.endswith("optim_states.pt")]) == 2, sorted(adamw)
    ratio = sum(moga.values()) / sum(adamw.values())
    params = sum(w.numel() for w in _weights(tmp_path / "moga/checkpoints", "step00000003").values())
    space = sum(n for f, n in moga.items() if f.startswith("moga_model_space/"))
    print(f"checkpoint bytes: MOGA {sum(moga.values())} (model space {space / params:.2f} B/param), "
          f"AdamW {sum(adamw.values())}, ratio {ratio:.2f}")
    assert ratio < 1, (sorted(moga.items()), sorted(adamw.items()))
    # fp32 weights + momentum, each element once over the ranks (a rank's pieces must not drag the
    # flat buffer they are views of into its file): 8 B/param and the files' framing.
    assert space <= 1.15 * 8 * params, (space, params)


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
