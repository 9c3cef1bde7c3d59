"""A checkpoint's extra memory per rank grows with parameters / DP, not with the whole model: the
peak-RSS rise of a rank during save and during load, at ~3.4M and ~40M parameters on 2 ranks (and
4 with -m slow). The slope between the sizes, in bytes per parameter of the whole model, must stay
under a bound that shrinks with DP; a full assembly of weights and momentum (Megatron's old
`_assemble`: 16 B/param at save, 13.7 at load, at any DP) fails it."""
import json
import os

import pytest

from dist_utils import spawn
from moga_dist.bench.rss import STEADY_MALLOC

pytest.importorskip("megatron.core")

from memory_cases import megatron_distopt  # noqa: E402


def _slopes(path):
    with open(path) as f:
        r = json.load(f)
    dp = r["large"]["params"] - r["small"]["params"]
    return {k: (r["large"][k] - r["small"][k]) / dp for k in ("save", "load")}, r


@pytest.fixture
def steady_malloc(monkeypatch):
    for k, v in STEADY_MALLOC.items():
        monkeypatch.setitem(os.environ, k, v)


# DP 4 is the goal size (save <= 1 B/param at DP 4); 4 processes on 2 cores take a few
# minutes, so it runs with -m slow, and its measured figures are in docs/benchmarks.md.
@pytest.mark.parametrize("world", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_megatron_distributed_optimizer_checkpoint_memory_scales_with_params_over_dp(tmp_path, steady_malloc, world):
    out = str(tmp_path / "rss.json")
    spawn(world, megatron_distopt, str(tmp_path), out)
    slope, raw = _slopes(out)
    print(f"megatron distopt checkpoint RSS rise at DP {world}, B/param of the model:", slope, raw)
    # Save: views of the rank's own state, nothing per parameter (goal <= 1 B/param at DP 4).
    assert slope["save"] <= 1.0, (slope, raw)
    # Load: the model side's own transient, megatron-core merging SwiGLU's fc1 halves into one fp32
    # tensor with any optimizer (4 B x fc1's 47% share of the large model = 1.89 B/param; measured
    # 1.89 at DP 2 and at DP 4), plus at most half of the rank's own fp32 state (8 B x params / DP),
    # which loads in place (measured ~0). The old full assembly read 13.7 B/param.
    assert slope["load"] <= 2.0 + 4.0 / world, (slope, raw)
