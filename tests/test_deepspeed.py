"""MOGA through DeepSpeed (ZeRO 0/1/2, fp32 and bf16, accumulation, clipping, checkpoints) equals
single-process MOGA on the same global batch."""
import pytest

pytest.importorskip("deepspeed")

from deepspeed_cases import refusals, worker  # noqa: E402
from dist_utils import spawn  # noqa: E402


@pytest.mark.parametrize("world", [2, 3])
def test_deepspeed_zero_stages_equal_single_process_moga(world):
    spawn(world, worker)


def test_deepspeed_refuses_what_it_cannot_do_exactly():
    spawn(2, refusals)
