"""DTensor parameters as they are: MOGA(param_groups(model)) over FSDP2 (fully_shard, uneven and
empty shards), TP (parallelize_module) and FSDP2 x TP equals single-process MOGA on the same
batches, and FSDP2's row norms send no statistics; MOGA's state saved through
torch.distributed.checkpoint at 2 ranks resumes at 1 and 3 equal to uninterrupted training."""
import pytest
from dist_utils import spawn
from dtensor_cases import dcp_resume, dcp_save, equal_to_single_process, refusals

# (vocab, d_model, ffn, mix): at 3 ranks FSDP2 cuts the 4-row `mix.up` 2/2/0 and the 9-row
# `ffn.up` 3/3/3, at 2 ranks 5/4; under TP 2 x FSDP 2 the 10-row ffn.up is TP-local 5 -> 3/2.
FSDP_SIZES = (14, 6, 9, 4)
TP_SIZES = (14, 6, 10, 4)
SLOW = pytest.mark.slow
# The default run keeps the uneven/empty FSDP2 case and FSDP2 x TP columns (which also cover TP's
# Shard(0)/Shard(1) and Replicate); the rest run with -m slow (each is a spawn of 2-4 ranks).
CASES = [pytest.param(2, 2, 1, FSDP_SIZES, "row", id="fsdp2-2ranks-row", marks=SLOW),
         pytest.param(2, 2, 1, FSDP_SIZES, "col", id="fsdp2-2ranks-col", marks=SLOW),
         pytest.param(3, 3, 1, FSDP_SIZES, "row", id="fsdp2-3ranks-uneven-empty-row"),
         pytest.param(3, 3, 1, FSDP_SIZES, "col", id="fsdp2-3ranks-uneven-empty-col"),
         pytest.param(2, 1, 2, TP_SIZES, "row", id="tp2-row", marks=SLOW),
         pytest.param(2, 1, 2, TP_SIZES, "col", id="tp2-col", marks=SLOW),
         pytest.param(4, 2, 2, TP_SIZES, "row", id="fsdp2x-tp2-row", marks=SLOW),
         pytest.param(4, 2, 2, TP_SIZES, "col", id="fsdp2x-tp2-col")]


@pytest.mark.parametrize("world,dp,tp,sizes,norm", CASES)
def test_dtensor_moga_equals_single_process(world, dp, tp, sizes, norm):
    spawn(world, equal_to_single_process, dp, tp, norm, sizes)


@pytest.fixture(scope="module")
def dcp_checkpoint(tmp_path_factory):
    """A DCP checkpoint of an FSDP2 model and its MOGA (column norms) written by 2 ranks."""
    path = str(tmp_path_factory.mktemp("dcp") / "step2")
    spawn(2, dcp_save, path, "col", FSDP_SIZES)
    return path


@pytest.mark.parametrize("world", [1, 3])
def test_dcp_checkpoint_from_2_ranks_resumes_at_another_size(dcp_checkpoint, world):
    spawn(world, dcp_resume, dcp_checkpoint, 2, "col", FSDP_SIZES)


def test_what_is_not_exact_is_refused_naming_the_placement():
    spawn(2, refusals)
