"""Sharded MOGA equals unsharded MOGA at world sizes 2, 3 and 4, and sends only what it must.

One spawn per (world, backend) runs every case; each (case, norm) is then its own test, so one
failing layout does not hide the others."""
import json

import pytest

from dist_utils import spawn
from moga_dist.testing import free_port
from sharded_cases import case_ids, nonfinite_on_one_rank, nonfinite_without_shared_statistics, worker

_RUNS: dict = {}


def _outcomes(world, backend, tmp_path_factory):
    """Every rank's outcome per case id, from one spawn (cached for the module)."""
    if (world, backend) not in _RUNS:
        out = tmp_path_factory.mktemp(f"sharded_{world}_{backend}")
        spawn(world, worker, backend, str(out))
        _RUNS[world, backend] = [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]
    return _RUNS[world, backend]


def _check(world, backend, case, tmp_path_factory):
    for rank_outcome in _outcomes(world, backend, tmp_path_factory):
        assert rank_outcome[case] == "ok", rank_outcome[case]


@pytest.mark.distributed
@pytest.mark.parametrize("world,case", [(w, c) for w in (2, 3, 4) for c in case_ids(w)])
def test_sharded_equals_unsharded_and_sends_the_minimum(world, case, tmp_path_factory):
    _check(world, "auto", case, tmp_path_factory)


@pytest.mark.distributed
@pytest.mark.parametrize("world,case", [(w, c) for w in (2, 3) for c in case_ids(w)])
def test_triton_backend_sharded_equals_unsharded(world, case, tmp_path_factory):
    """The two-phase Triton kernels (run by Triton's interpreter on CPU) at every layout."""
    _check(world, "triton", case, tmp_path_factory)


@pytest.mark.distributed
@pytest.mark.parametrize("world", [2, 3])
def test_a_non_finite_gradient_on_one_rank_is_refused_on_every_rank(world):
    spawn(world, nonfinite_on_one_rank)


@pytest.mark.distributed
def test_a_non_finite_gradient_is_refused_on_every_rank_when_nothing_is_shared():
    spawn(2, nonfinite_without_shared_statistics, free_port(), init_process_group=False)
