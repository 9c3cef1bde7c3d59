"""bench comm's FSDP2 rows: what MOGA hands to collectives on a (small) torchtitan layer equals
the analytic minimum computed from the placements, at FSDP2 alone (uneven rows at 3 ranks) and
FSDP2 x TP."""
import pytest

from moga_dist.bench.comm_dtensor import run_fsdp_layout


@pytest.mark.slow
@pytest.mark.parametrize("norm", ["row", "col"])
@pytest.mark.parametrize("dp,tp", [(3, 1), (2, 2)])
def test_fsdp_rows_send_the_analytic_minimum(dp, tp, norm):
    r = run_fsdp_layout(dp, tp, norm, steps=1, hidden=20, ffn=54)
    assert r["bytes"] == r["minimum"], r
    if tp == 1 and norm == "row":
        assert r["bytes"] == 0, r
