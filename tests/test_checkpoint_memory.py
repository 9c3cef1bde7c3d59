"""A checkpoint's extra memory per rank grows with parameters / DP, not with the whole model: the
peak-RSS rise of a rank during save and during load, at ~3.4M and ~40M parameters on 2 ranks. The
slope between the sizes, in bytes per parameter of the whole model, must stay under what a copy of
the rank's own fp32 state (8 B x parameters / DP = 4 B/param at DP 2) or less would cost; a full
assembly of weights and momentum (Megatron's old `_assemble`: 16 B/param) fails it."""
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


def test_megatron_distributed_optimizer_checkpoint_memory_scales_with_params_over_dp(tmp_path, steady_malloc):
    out = str(tmp_path / "rss.json")
    spawn(2, megatron_distopt, str(tmp_path), out)
    slope, raw = _slopes(out)
    print("megatron distopt checkpoint RSS rise, B/param of the model:", slope, raw)
    # Save: views of the rank's own state, nothing per parameter (goal <= 1 B/param at DP 4).
    assert slope["save"] <= 1.0, (slope, raw)
    # Load: at most one copy of the rank's own range (8 B x params / 2 = 4 B/param at DP 2).
    assert slope["load"] <= 4.0, (slope, raw)
