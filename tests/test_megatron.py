"""MOGA through Megatron-core's wrappers equals TP=1 x DP=1 at TP=2, DP=2 and TP=2 x DP=2, with and
without the distributed optimizer, for the row and column variants (QKV and gate/up per block), with
TP-sharded biases, and at PP=2 through megatron-core's pipeline schedule; MoE is refused by name."""
from pathlib import Path

import pytest
import torch

from moga_dist.train.config import load as load_config

pytest.importorskip("megatron.core")

from spawn_phases import WorkerCall, run_phases  # noqa: E402
from moga_dist.engines.megatron import REGISTRY_VERSION, register  # noqa: E402
from megatron_cases import (bf16_wrapper, megatron_job, reference, registry, resume_at_tp1, resume_distopt_at_tp2,  # noqa: E402
                            save_at_tp2, save_distopt_at_dp2, sharded)
from megatron_pipeline_cases import megatron_job_pipeline, pipeline  # noqa: E402


def _calls(base: Path) -> list[WorkerCall]:
    """Every spawned case of this module, in the order they run: consecutive calls of one world size
    are one spawn (spawn_phases), so 4 spawns (1, 2, 4, 1 ranks) run what took one spawn per case."""
    ref, ref_bias, job = str(base / "tp1.pt"), str(base / "tp1_bias.pt"), str(base / "job")
    ckpt_tp2, ckpt_distopt = str(base / "ckpt_tp2"), str(base / "ckpt_distopt")
    for d in (ckpt_tp2, ckpt_distopt, f"{job}_tp2", f"{job}_distopt", f"{job}_pp2"):
        Path(d).mkdir(parents=True, exist_ok=True)
    return [
        WorkerCall("reference", 1, reference, (ref,)),
        WorkerCall("reference_bias", 1, reference, (ref_bias, True)),
        WorkerCall("bf16_tp1", 1, bf16_wrapper, (1, False)),
        WorkerCall("tp2_and_dp2", 2, sharded, (ref, [(2, False), (1, False), (1, True), (2, True)]), ("reference",)),
        WorkerCall("tp2_bias", 2, sharded, (ref_bias, [(2, False), (2, True)], True), ("reference_bias",)),
        WorkerCall("pp2", 2, pipeline, (ref, 1, 2), ("reference",)),
        WorkerCall("bf16_tp2", 2, bf16_wrapper, (2, False)),
        WorkerCall("bf16_dp2_distopt", 2, bf16_wrapper, (1, True)),
        WorkerCall("save_tp2", 2, save_at_tp2, (ckpt_tp2,)),
        WorkerCall("save_distopt_dp2", 2, save_distopt_at_dp2, (ckpt_distopt,)),
        WorkerCall("resume_distopt_tp2", 2, resume_distopt_at_tp2, (ckpt_distopt, ref), ("save_distopt_dp2", "reference")),
        WorkerCall("job_tp2", 2, megatron_job, (f"{job}_tp2", 2, 0)),
        WorkerCall("job_distopt", 2, megatron_job, (f"{job}_distopt", 1, 1)),
        WorkerCall("job_pp2", 2, megatron_job_pipeline, (f"{job}_pp2", 1)),
        # last of the 2-rank spawn: register() changes megatron-core's optimizer registry for the process
        WorkerCall("registry", 2, registry, (ref,), ("reference",)),
        WorkerCall("registry_bf16", 2, bf16_wrapper, (2, False, True)),
        WorkerCall("tp2_x_dp2", 4, sharded, (ref, [(2, False), (2, True)]), ("reference",)),
        WorkerCall("tp2_x_pp2", 4, pipeline, (ref, 2, 2), ("reference",)),
        WorkerCall("resume_tp1", 1, resume_at_tp1, (ckpt_tp2, ref), ("save_tp2", "reference")),
    ]


# The cases each test judges (by the test's node name): a test passes when all of its cases did.
JUDGES = {
    "test_megatron_tp2_and_dp2_equal_tp1": ("tp2_and_dp2",),
    "test_megatron_tp2_with_biases_equals_tp1": ("tp2_bias",),
    "test_megatron_pipeline_parallel_equals_tp1[pp2]": ("pp2",),
    "test_megatron_pipeline_parallel_equals_tp1[tp2_x_pp2]": ("tp2_x_pp2",),
    "test_megatron_tp2_x_dp2_equals_tp1": ("tp2_x_dp2",),
    "test_megatron_checkpoint_continues_at_another_layout[tp2_to_tp1]": ("save_tp2", "resume_tp1"),
    "test_megatron_checkpoint_continues_at_another_layout[distributed_optimizer_dp2_to_tp2]":
        ("save_distopt_dp2", "resume_distopt_tp2"),
    "test_megatron_bf16_step_equals_float64_reference[tp1]": ("bf16_tp1",),
    "test_megatron_bf16_step_equals_float64_reference[tp2]": ("bf16_tp2",),
    "test_megatron_bf16_step_equals_float64_reference[dp2_distributed_optimizer]": ("bf16_dp2_distopt",),
    "test_megatron_training_job_resumes_bit_exact[tp2_replicated]": ("job_tp2",),
    "test_megatron_training_job_resumes_bit_exact[dp2_distributed_optimizer]": ("job_distopt",),
    "test_megatron_training_job_pipeline_parallel_continues_tp2_run_exactly": ("job_pp2",),
    "test_megatron_registry_of_0_18_takes_optimizer_moga": ("registry",),
    "test_megatron_registry_of_0_18_bf16_step_equals_float64_reference": ("registry_bf16",),
}


@pytest.fixture(scope="module")
def megatron_runs(request, tmp_path_factory):
    """{case id: "ok" | why not} for the cases the selected tests of this module judge (and the
    cases those need), run once for the module."""
    here = Path(__file__).resolve()
    selected = {item.name for item in request.session.items if Path(item.path).resolve() == here}
    wanted = {case for name in selected for case in JUDGES.get(name, ())}
    if not _has_registry():         # the registry tests skip; their cases would only fail
        wanted -= {"registry", "registry_bf16"}
    calls = _calls(tmp_path_factory.mktemp("megatron"))
    for call in reversed(calls):    # needs point backwards: one reverse pass closes the set
        if call.id in wanted:
            wanted |= set(call.needs)
    phases: list[list[WorkerCall]] = []
    for call in (c for c in calls if c.id in wanted):
        if phases and phases[-1][0].world == call.world:
            phases[-1].append(call)
        else:
            phases.append([call])
    return run_phases(phases, tmp_path_factory.mktemp("megatron_spawns"))


def _judge(runs, request):
    """This test's cases passed; a failure names the test, the case and the rank's traceback."""
    for case in JUDGES[request.node.name]:
        assert runs[case] == "ok", f"{request.node.name}: case {case!r}: {runs[case]}"


def test_megatron_tp2_and_dp2_equal_tp1(megatron_runs, request):
    _judge(megatron_runs, request)


def test_megatron_tp2_with_biases_equals_tp1(megatron_runs, request):
    """Megatron's default add_bias_linear=True: column-parallel biases are TP-sharded 1-D tensors."""
    _judge(megatron_runs, request)


@pytest.mark.parametrize("layout", ["pp2", pytest.param("tp2_x_pp2", marks=pytest.mark.slow)])
def test_megatron_pipeline_parallel_equals_tp1(megatron_runs, request, layout):
    _judge(megatron_runs, request)


def test_megatron_tp2_x_dp2_equals_tp1(megatron_runs, request):
    _judge(megatron_runs, request)


# tp2_to_tp1: replicated optimizer saved at TP 2, resumed at TP 1 (one rank);
# distributed_optimizer_dp2_to_tp2: distributed optimizer saved at DP 2, resumed at TP 2.
@pytest.mark.parametrize("layouts", ["tp2_to_tp1", "distributed_optimizer_dp2_to_tp2"])
def test_megatron_checkpoint_continues_at_another_layout(megatron_runs, request, layouts):
    _judge(megatron_runs, request)


@pytest.mark.parametrize("layout", ["tp1", "tp2", "dp2_distributed_optimizer"])
def test_megatron_bf16_step_equals_float64_reference(megatron_runs, request, layout):
    _judge(megatron_runs, request)


@pytest.mark.parametrize("layout", ["tp2_replicated", "dp2_distributed_optimizer"])
def test_megatron_training_job_resumes_bit_exact(megatron_runs, request, layout):
    _judge(megatron_runs, request)


def test_megatron_training_job_pipeline_parallel_continues_tp2_run_exactly(megatron_runs, request):
    _judge(megatron_runs, request)


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


def test_megatron_job_refuses_zero_stage_1_the_old_spelling_of_the_distributed_optimizer():
    from moga_dist.train.config import load

    with pytest.raises(ValueError, match="engine.zero_stage=1 with parallel.engine='megatron': Megatron's "
                                         "distributed optimizer is parallel.distributed_optimizer=true"):
        load(None, ["parallel.engine='megatron'", "engine.zero_stage=1"])


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


def test_megatron_registry_of_0_18_takes_optimizer_moga(megatron_runs, request):
    _needs_registry()
    _judge(megatron_runs, request)


def test_megatron_registry_of_0_18_bf16_step_equals_float64_reference(megatron_runs, request):
    _needs_registry()
    _judge(megatron_runs, request)
