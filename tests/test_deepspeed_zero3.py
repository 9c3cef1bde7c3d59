"""Plain `deepspeed.initialize(optimizer=MOGA(...))` under ZeRO-3: gathered weights equal
single-process MOGA on the same global batches (1e-5 relative), gradient accumulation 2 and
clipping, one momentum step per optimizer step, statistics all-reduced with the minimum bytes."""
import pytest

pytest.importorskip("deepspeed")

from deepspeed_zero3_cases import stage3, stage3_refusals, stage3_sub_groups_one_step  # noqa: E402
from dist_utils import spawn  # noqa: E402

# (world, norm, sub_group_size): sub_group_size 100 cuts the model into several sub-groups (ZeRO-3
# calls its inner optimizer once per sub-group; the adapter makes that one MOGA step).
CASES = [pytest.param(2, "row", None), pytest.param(3, "row", None, marks=pytest.mark.slow),
         pytest.param(3, "col", None, marks=pytest.mark.slow), pytest.param(2, "col", 100, marks=pytest.mark.slow)]


@pytest.mark.parametrize("world,norm,sub_group_size", CASES)
def test_zero3_equals_single_process_moga(world, norm, sub_group_size):
    spawn(world, stage3, norm, sub_group_size)


def test_zero3_refuses_what_it_does_not_map():
    spawn(2, stage3_refusals)


def test_zero3_sub_groups_step_once_with_one_verdict():
    spawn(2, stage3_sub_groups_one_step)
