"""The training job resumes a DeepSpeed checkpoint written at 2 ranks at 1 or 3 ranks (ZeRO-2,
through MOGA's model-space state) and ends where the uninterrupted 2-rank run ends: fp32 master
weights within 1e-5 relative, MOGA's step count carried."""
import pytest
import torch

pytest.importorskip("deepspeed")
pytest.importorskip("transformers")

from dist_utils import spawn  # noqa: E402
from train_reshard_cases import run_job  # noqa: E402


@pytest.mark.distributed
@pytest.mark.parametrize("world", [pytest.param(3), pytest.param(1, marks=pytest.mark.slow)])
def test_job_resumes_at_another_world_size(tmp_path, world):
    from moga_dist.engines.deepspeed_checkpoint import model_space_weights

    spawn(2, run_job, str(tmp_path / "straight"), 6)
    spawn(2, run_job, str(tmp_path / "split"), 6, 3)
    spawn(world, run_job, str(tmp_path / "split"), 6)
    space = "checkpoints/step00000006/moga_model_space"
    straight = model_space_weights(tmp_path / "straight" / space)
    resumed = model_space_weights(tmp_path / "split" / space)
    assert straight.keys() == resumed.keys() and straight
    for name, ref in straight.items():
        err = (resumed[name] - ref).abs().max().item() / ref.abs().max().item()
        assert err <= 1e-5, (name, err)
    common = torch.load(tmp_path / "split" / space / "common.pt", weights_only=True)
    assert common["step"] == 6 and common["world_size"] == world and common["global_steps"] == 6
    meta = (tmp_path / "split/checkpoints/step00000003/meta.json").read_text()
    assert '"dp_world_size": 2' in meta
