"""MOGA through Megatron-core's wrappers equals TP=1 x DP=1 at TP=2, DP=2 and TP=2 x DP=2, with and
without the distributed optimizer, for the row and column variants (QKV and gate/up per block), with
TP-sharded biases, and at PP=2 through megatron-core's pipeline schedule; MoE is refused by name."""
from pathlib import Path

import pytest
import torch

from moga_dist.train.config import load as load_config

pytest.importorskip("megatron.core")

from dist_utils import spawn  # noqa: E402
from moga_dist.engines.megatron import REGISTRY_VERSION, register  # noqa: E402
from megatron_cases import (bf16_wrapper, megatron_job, reference, registry, resume_at_tp1, resume_distopt_at_tp2,  # noqa: E402
                            save_at_tp2, save_distopt_at_dp2, sharded)
from megatron_pipeline_cases import megatron_job_pipeline, pipeline  # noqa: E402


@pytest.fixture(scope="module")
def megatron_reference(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("megatron") / "tp1.pt")
    spawn(1, reference, path)
    return path


def test_megatron_tp2_and_dp2_equal_tp1(megatron_reference):
    spawn(2, sharded, megatron_reference, [(2, False), (1, False), (1, True), (2, True)])


def test_megatron_tp2_with_biases_equals_tp1(tmp_path):
    """Megatron's default add_bias_linear=True: column-parallel biases are TP-sharded 1-D tensors."""
    path = str(tmp_path / "tp1_bias.pt")
    spawn(1, reference, path, True)
    spawn(2, sharded, path, [(2, False), (2, True)], True)


@pytest.mark.parametrize("world,tp,pp", [(2, 1, 2), pytest.param(4, 2, 2, marks=pytest.mark.slow)],
                         ids=["pp2", "tp2_x_pp2"])
def test_megatron_pipeline_parallel_equals_tp1(megatron_reference, world, tp, pp):
    spawn(world, pipeline, megatron_reference, tp, pp)


def test_megatron_tp2_x_dp2_equals_tp1(megatron_reference):
    spawn(4, sharded, megatron_reference, [(2, False), (2, True)])


@pytest.mark.parametrize("save,save_world,resume,resume_world", [
    (save_at_tp2, 2, resume_at_tp1, 1),                       # replicated optimizer, TP 2 -> TP 1
    (save_distopt_at_dp2, 2, resume_distopt_at_tp2, 2),       # distributed optimizer, DP 2 -> TP 2
], ids=["tp2_to_tp1", "distributed_optimizer_dp2_to_tp2"])
def test_megatron_checkpoint_continues_at_another_layout(megatron_reference, tmp_path, save, save_world,
                                                         resume, resume_world):
    (tmp_path / "ckpt").mkdir()
    spawn(save_world, save, str(tmp_path / "ckpt"))
    spawn(resume_world, resume, str(tmp_path / "ckpt"), megatron_reference)


@pytest.mark.parametrize("world,tp,distopt", [(1, 1, False), (2, 2, False), (2, 1, True)],
                         ids=["tp1", "tp2", "dp2_distributed_optimizer"])
def test_megatron_bf16_step_equals_float64_reference(world, tp, distopt):
    spawn(world, bf16_wrapper, tp, distopt)


@pytest.mark.parametrize("tp,zero_stage", [(2, 0), (1, 1)], ids=["tp2_replicated", "dp2_distributed_optimizer"])
def test_megatron_training_job_resumes_bit_exact(tmp_path, tp, zero_stage):
    spawn(2, megatron_job, str(tmp_path), tp, zero_stage)


def test_megatron_training_job_pipeline_parallel_continues_tp2_run_exactly(tmp_path):
    spawn(2, megatron_job_pipeline, str(tmp_path), 1)


MEGATRON_PRESETS = [p for p in sorted(Path(__file__).parent.parent.joinpath("configs").glob("*.toml"))
                    if load_config(p).parallel.engine == "megatron"]


@pytest.mark.parametrize("path", MEGATRON_PRESETS, ids=lambda p: p.stem)
def test_megatron_job_accepts_every_megatron_preset(path):
    """Every shipped Megatron preset (the 70B one with PP=4) passes the job's checks."""
    from moga_dist.train.backend_megatron import check_config

    cfg = load_config(path)
    assert cfg.optimizer.name == "moga"
    check_config(cfg)


@pytest.mark.parametrize("override,message", [
    ("parallel.pipeline_parallel=3", r"model.num_layers=4 is not divisible by parallel.pipeline_parallel=3"),
    ("optimizer.name='adamw'", r"optimizer.name='adamw' with parallel.engine='megatron': allowed 'moga'"),
], ids=["pp_not_dividing_layers", "adamw"])
def test_megatron_job_refuses_by_name(override, message):
    from moga_dist.train.backend_megatron import check_config

    with pytest.raises(ValueError, match=message):
        check_config(load_config(None, ["parallel.engine='megatron'", override]))


def test_megatron_job_refuses_zero_stage_2():
    from moga_dist.train.backend_megatron import MegatronBackend
    from moga_dist.train.config import load

    with pytest.raises(ValueError, match="zero_stage=2 with parallel.engine='megatron': allowed 0"):
        MegatronBackend(load(None, ["parallel.engine='megatron'", "engine.zero_stage=2"]))


@pytest.mark.parametrize("ep", [1, 2], ids=["ep1", "ep2"])
def test_megatron_experts_are_refused_by_name(ep):
    """A mixture-of-experts config is refused before any layout is built (its expert groups and
    grouped GEMMs are not described yet): the message names the setting and what is allowed."""
    from megatron.core.transformer import TransformerConfig

    from moga_dist.engines.megatron import describe_params

    cfg = TransformerConfig(num_layers=1, hidden_size=64, num_attention_heads=4, num_moe_experts=4,
                            moe_router_topk=2, expert_model_parallel_size=ep, use_cpu_initialization=True)
    chunk = torch.nn.Linear(64, 64)
    chunk.config = cfg
    with pytest.raises(ValueError, match=rf"num_moe_experts=4 \(expert_model_parallel_size={ep}\).*allowed: "
                                         r"num_moe_experts=None"):
        describe_params([chunk], 0, 1)


def _has_registry() -> bool:
    import megatron.core
    from packaging.version import Version

    return Version(megatron.core.__version__) >= Version(REGISTRY_VERSION)


def _needs_registry():
    import megatron.core

    if not _has_registry():
        pytest.skip(f"megatron-core {megatron.core.__version__} has no emerging-optimizer registry "
                    f"(first in {REGISTRY_VERSION})")


def test_megatron_register_without_registry_names_the_version_it_needs():
    import megatron.core

    if _has_registry():
        pytest.skip(f"megatron-core {megatron.core.__version__} has the registry")
    with pytest.raises(RuntimeError, match=rf"needs megatron-core >= {REGISTRY_VERSION}.*installed: "
                                           rf"{megatron.core.__version__}"):
        register()


def test_megatron_registry_of_0_18_takes_optimizer_moga(megatron_reference):
    _needs_registry()
    spawn(2, registry, megatron_reference)


def test_megatron_registry_of_0_18_bf16_step_equals_float64_reference():
    _needs_registry()
    spawn(2, bf16_wrapper, 2, False, True)
