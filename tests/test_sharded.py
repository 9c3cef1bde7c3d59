"""Sharded MOGA equals unsharded MOGA at world sizes 2, 3 and 4, and sends only what it must."""
import pytest

from dist_utils import spawn
from sharded_cases import nonfinite_on_one_rank, worker


@pytest.mark.distributed
@pytest.mark.parametrize("world", [2, 3, 4])
def test_sharded_equals_unsharded_and_sends_the_minimum(world):
    spawn(world, worker)


@pytest.mark.distributed
@pytest.mark.parametrize("world", [2, 3])
def test_triton_backend_sharded_equals_unsharded(world):
    """The two-phase Triton kernels (run by Triton's interpreter on CPU) at every layout."""
    spawn(world, worker, "triton")


@pytest.mark.distributed
@pytest.mark.parametrize("world", [2, 3])
def test_a_non_finite_gradient_on_one_rank_is_refused_on_every_rank(world):
    spawn(world, nonfinite_on_one_rank)
