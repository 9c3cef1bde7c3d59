"""MOGA through Megatron-core's wrappers equals TP=1 x DP=1 at TP=2, DP=2 and TP=2 x DP=2, with and
without the distributed optimizer, for the row and column variants (QKV and gate/up per block)."""
import pytest

pytest.importorskip("megatron.core")

from dist_utils import spawn  # noqa: E402
from megatron_cases import megatron_job, reference, registry, resume_at_tp1, save_at_tp2, sharded  # noqa: E402


@pytest.fixture(scope="module")
def megatron_reference(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("megatron") / "tp1.pt")
    spawn(1, reference, path)
    return path


@pytest.mark.distributed
def test_megatron_tp2_and_dp2_equal_tp1(megatron_reference):
    spawn(2, sharded, megatron_reference, [(2, False), (1, False), (1, True), (2, True)])


@pytest.mark.distributed
def test_megatron_tp2_x_dp2_equals_tp1(megatron_reference):
    spawn(4, sharded, megatron_reference, [(2, False), (2, True)])


@pytest.mark.distributed
def test_megatron_checkpoint_saved_at_tp2_continues_at_tp1(megatron_reference, tmp_path):
    (tmp_path / "ckpt").mkdir()
    spawn(2, save_at_tp2, str(tmp_path / "ckpt"))
    spawn(1, resume_at_tp1, str(tmp_path / "ckpt"), megatron_reference)


@pytest.mark.distributed
def test_megatron_training_job_resumes_bit_exact_at_tp2(tmp_path):
    spawn(2, megatron_job, str(tmp_path))


def test_megatron_job_refuses_the_distributed_optimizer_until_it_can_checkpoint_moga():
    from moga_dist.train.backend_megatron import MegatronBackend
    from moga_dist.train.config import load

    with pytest.raises(ValueError, match="zero_stage=1 with parallel.engine='megatron'"):
        MegatronBackend(load(None, ["parallel.engine='megatron'", "engine.zero_stage=1"]))


@pytest.mark.distributed
def test_megatron_registry_of_0_17_takes_optimizer_moga(megatron_reference):
    import megatron.core
    from packaging.version import Version

    if Version(megatron.core.__version__) < Version("0.17"):
        pytest.skip(f"megatron-core {megatron.core.__version__} has no emerging-optimizer registry (0.17+)")
    spawn(2, registry, megatron_reference)
