"""A DeepSpeed run with MOGA checkpointed in model space at 2 ranks continues at 1 and 3 ranks
(other partitions, uneven) equal to uninterrupted single-process MOGA (1e-5 relative), with an lr
schedule, accumulation 2 and clipping; ZeRO stages 1, 2 and 3."""
import pytest

pytest.importorskip("deepspeed")

from deepspeed_reshard_cases import resume_case, save_case  # noqa: E402
from dist_utils import spawn  # noqa: E402

CASES = [pytest.param(2, 3)] + [pytest.param(stage, world, marks=pytest.mark.slow)
                                for stage, world in ((2, 1), (1, 1), (1, 3), (3, 1), (3, 3))]


@pytest.mark.parametrize("stage,world", CASES)
def test_checkpoint_from_two_ranks_continues_at_other_world_sizes(tmp_path, stage, world):
    spawn(2, save_case, stage, str(tmp_path))
    spawn(world, resume_case, stage, str(tmp_path))
