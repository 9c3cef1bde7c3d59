"""The training job resumes a DeepSpeed checkpoint written at 2 ranks at 1 or 3 ranks (ZeRO-2,
through MOGA's model-space state) and ends where the uninterrupted 2-rank run ends: fp32 master
weights within 1e-5 relative, MOGA's step count carried. The data are the shipped corpus prepared
into megatron-core's indexed format, read through GPTDataset: step s trains on global samples
[s*B, (s+1)*B) at any DP size, which is what makes the resumed run equal the uninterrupted one.
One uninterrupted run and one run stopped at step 3 are shared by both resumes."""
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
    spawn(2, run_job, str(base / "split"), 6, 3)
    return base


@pytest.mark.distributed
@pytest.mark.parametrize("world", [3, 1])
def test_job_resumes_at_another_world_size(runs, tmp_path, world):
    from moga_dist.engines.deepspeed_checkpoint import model_space_weights

    split = tmp_path / "split"
    shutil.copytree(runs / "split", split)
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
