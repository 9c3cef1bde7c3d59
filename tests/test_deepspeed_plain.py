"""A user's own `deepspeed.initialize(model=..., optimizer=MOGA(...), config=...)`, no moga_dist
wrapper: final weights equal single-process MOGA on the same global batches (fp32: 1e-5 relative;
bf16: the bound in deepspeed_cases.compare_bf16), with gradient accumulation 2 and clipping."""
import pytest

pytest.importorskip("deepspeed")

from deepspeed_cases import plain  # noqa: E402
from dist_utils import spawn  # noqa: E402

CASES = [(world, stage, bf16, False) for world in (2, 3) for stage in (1, 2) for bf16 in (False, True)]
CASES += [(2, 0, True, False), (3, 1, True, True)]      # ZeRO-0 bf16 set-up step; BF16_Optimizer


# The default run covers plain ZeRO-2 fp32 through docs/recipes/own_script.py (test_deepspeed_recipes)
# and the ZeRO-0 bf16 set-up step through test_deepspeed; these are the full matrix.
@pytest.mark.slow
@pytest.mark.parametrize("world,stage,bf16,grad_accum_fp32", CASES)
def test_plain_deepspeed_initialize_is_exact_moga(world, stage, bf16, grad_accum_fp32):
    spawn(world, plain, stage, bf16, grad_accum_fp32)
