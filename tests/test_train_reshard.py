"""The training job resumes a DeepSpeed checkpoint written at 2 ranks at 1 or 3 ranks (ZeRO-2,
through MOGA's model-space state) and ends where the uninterrupted 2-rank run ends: fp32 master
weights within 1e-5 relative, MOGA's step count carried. The data are the shipped corpus prepared
into megatron-core's indexed format, read through GPTDataset: step s trains on global samples
[s*B, (s+1)*B) at any DP size, which is what makes the resumed run equal the uninterrupted one.
One uninterrupted run and one run stopped at step 3 are shared by both resumes; the stopped run
writes its checkpoint as the old default did (DeepSpeed's files beside the model-space state,
checkpoint.deepspeed_files=true), and the resumes, at the default, read the model-space state."""
import shutil

import pytest
import torch

pytest.importorskip("deepspeed")
pytest.importorskip("transformers")

from dist_utils import spawn  # noqa: E402
from train_reshard_cases import run_job  # noqa: E402


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("reshard")
    spawn(2, run_job, str(base / "straight"), 6)
    spawn(2, run_job, str(base / "split"), 6, 3, "checkpoint.deepspeed_files=true")
    return base


@pytest.mark.parametrize("world", [3, 1])
def test_job_resumes_at_another_world_size(runs, tmp_path, world):
    from moga_dist.engines.deepspeed_checkpoint import model_space_weights

    split = tmp_path / "split"
    shutil.copytree(runs / "split", split)
    assert list((split / "checkpoints/step00000003").glob("zero_pp_rank_*_optim_states.pt"))   # both sets
    spawn(world, run_job, str(split), 6)
    space = "checkpoints/step00000006/moga_model_space"
    straight = model_space_weights(runs / "straight" / space)
    resumed = model_space_weights(split / space)
    assert straight.keys() == resumed.keys() and straight
    for name, ref in straight.items():
        err = (resumed[name] - ref).abs().max().item() / ref.abs().max().item()
        assert err <= 1e-5, (name, err)
    common = torch.load(split / space / "common.pt", weights_only=True)
    assert common["step"] == 6 and common["world_size"] == world and common["global_steps"] == 6
    meta = (split / "checkpoints/step00000003/meta.json").read_text()
    assert '"dp_world_size": 2' in meta


@pytest.mark.slow            # three job runs (~4.5 min on the busy 2-core machine)
def test_job_without_deepspeed_files_resumes_and_stores_the_state_once(tmp_path):
    """checkpoint.deepspeed_files unset (the default) or false: only MOGA's model-space state is
    written (no ZeRO files), the run stopped at step 3 resumes (at 3 ranks) and ends where the
    straight run ends (1e-5), and the checkpoint is smaller than one with DeepSpeed's duplicate of
    the fp32 weights and momentum (checkpoint.deepspeed_files=true)."""
    from moga_dist.engines.deepspeed_checkpoint import model_space_weights

    spawn(2, run_job, str(tmp_path / "straight"), 6, None, "checkpoint.deepspeed_files=true")
    spawn(2, run_job, str(tmp_path / "split"), 6, 3)
    spawn(3, run_job, str(tmp_path / "split"), 6, None, "checkpoint.deepspeed_files=false")
    space = "checkpoints/step00000006/moga_model_space"
    straight = model_space_weights(tmp_path / "straight" / space)
    resumed = model_space_weights(tmp_path / "split" / space)
    for name, ref in straight.items():
        err = (resumed[name] - ref).abs().max().item() / ref.abs().max().item()
        assert err <= 1e-5, (name, err)

    def files(run, step):
        d = tmp_path / run / "checkpoints" / f"step{step:08d}"
        return {str(p.relative_to(d)): p.stat().st_size for p in d.rglob("*") if p.is_file()}

    only_moga, both = files("split", 3), files("straight", 3)
    assert not [f for f in only_moga if f.endswith("states.pt")], sorted(only_moga)
    assert [f for f in both if f.endswith("optim_states.pt")], sorted(both)
    print("checkpoint bytes at step 3: model space only", sum(only_moga.values()), "with DeepSpeed's files",
          sum(both.values()))
    assert sum(only_moga.values()) < 0.65 * sum(both.values()), (sum(only_moga.values()), sum(both.values()))
