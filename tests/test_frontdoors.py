"""Front doors that build MOGA from parameters without roles give it the model's roles: the Hugging
Face Trainer without DeepSpeed (2 gloo ranks, its own DDP), torchtitan's OptimizersContainer on its
own model after parallelize_llama (FSDP2, 2 ranks, CheckpointManager resume), litgpt's
instantiate_torch_optimizer and Lightning's configure_optimizers with self.parameters(); each
equals single-process MOGA(param_groups(model)) within 1e-5 and every parameter's update shows the
role param_groups assigns (frontdoors_cases.RoleProbe). Where no model owns the matrices, MOGA
warns once, naming them."""
import tempfile
import warnings

import frontdoors_cases as cases
import pytest
import torch
from dist_utils import spawn
from torch import nn

from moga_dist import MOGA, MissingRolesWarning, param_groups, take_roles


def world2(rank, world, tmp):
    cases.hf_trainer_ddp(rank, world)
    cases.torchtitan_fsdp2(rank, world, tmp)


def test_front_doors_at_two_ranks():
    for name in ("transformers", "deepspeed", "torchtitan"):
        pytest.importorskip(name)
    spawn(2, world2, tempfile.mkdtemp())


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_lightning_deepspeed_strategy(stage):
    """Lightning's DeepSpeedStrategy (its CUDA-only checks bypassed in the test) with
    configure_optimizers returning MOGA(self.parameters()): exact at ZeRO-2 and ZeRO-3."""
    for name in ("lightning", "deepspeed"):
        pytest.importorskip(name)
    spawn(2, cases.lightning_deepspeed, stage)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed, self.fc, self.proj = nn.Embedding(11, 6), nn.Linear(6, 7), nn.Linear(7, 11, bias=False)

    def forward(self, x):
        return self.proj(torch.tanh(self.fc(self.embed(x))))


def _train(model, opt, steps=3):
    x = torch.randint(0, 11, (4, 5), generator=torch.Generator().manual_seed(1))
    for _ in range(steps):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()


def test_bare_parameters_take_the_roles_of_their_model():
    """MOGA(model.parameters()) on a model whose head is named by the caller only is the one
    case the model cannot tell: take_roles(opt, model, head=...) fixes it; without the head the
    update equals param_groups(model) (no head) exactly."""
    torch.manual_seed(0)
    ref = Net()
    opt = MOGA(param_groups(ref, head="proj"), **cases.HP)
    _train(ref, opt)
    torch.manual_seed(0)
    model = Net()
    opt = MOGA(model.parameters(), **cases.HP)
    assert take_roles(opt, model, head="proj") == {"embed.weight": "embedding", "fc.weight": "hidden",
                                                   "fc.bias": "vector", "proj.weight": "head"}
    probe = cases.RoleProbe(opt, model)
    _train(model, opt)
    assert cases.max_rel_error(model, ref) == 0.0
    assert probe.roles()["proj.weight"] == "head" and probe.roles()["embed.weight"] == "embedding"


def test_found_model_gives_the_roles_without_a_call():
    torch.manual_seed(0)
    ref = Net()
    _train(ref, MOGA(param_groups(ref), **cases.HP))
    torch.manual_seed(0)
    model = Net()
    wrapper = nn.ModuleDict({"module": model})      # a DDP-like wrapper is looked through
    opt = MOGA(wrapper.parameters(), **cases.HP)
    probe = cases.RoleProbe(opt, model)
    with warnings.catch_warnings():
        warnings.simplefilter("error", MissingRolesWarning)
        _train(model, opt)
    probe.check("bare parameters of a found model")
    assert probe.roles()["embed.weight"] == "embedding"      # hidden on the old code
    assert cases.max_rel_error(model, ref) == 0.0


def test_group_roles_are_kept_and_orphans_warned_once():
    model = Net()
    orphan = nn.Parameter(torch.randn(5, 4))
    opt = MOGA([{"params": [model.embed.weight], "param_names": ["embed.weight"], "role": "hidden"},
                {"params": [orphan], "param_names": ["orphan"]},
                {"params": list(model.fc.parameters()), "param_names": ["fc.weight", "fc.bias"]}])
    orphan.grad = torch.randn(5, 4)
    with pytest.warns(MissingRolesWarning, match=r"1 matrices .*'orphan' of shape \(5, 4\).*take_roles") as rec:
        _train(model, opt, steps=2)
    assert len([w for w in rec if w.category is MissingRolesWarning]) == 1
    assert "role" not in opt.tensors.options.get(id(model.embed.weight), {})   # its group said hidden


def test_litgpt_instantiate_torch_optimizer():
    """litgpt's --optimizer path (Fabric, instantiate_torch_optimizer with model.parameters()): the
    model's roles, equal to MOGA(param_groups(model)). (litgpt is not in the [all] extra: it pins
    huggingface-hub < 1.4.)"""
    pytest.importorskip("litgpt")
    data = cases.titan_batches(4)
    err = cases.max_rel_error(cases.litgpt_recipe(data), cases.reference_run(cases.tiny_litgpt(), data))
    print(f"front door: litgpt instantiate_torch_optimizer, 1 process: max relative error {err:.2e}")
    assert err <= 1e-5, err


def test_lightning_configure_optimizers_with_self_parameters():
    pytest.importorskip("lightning")
    data = cases.titan_batches(4)
    err = cases.max_rel_error(cases.lightning_recipe(data), cases.lightning_reference(data))
    print(f"front door: Lightning configure_optimizers(self.parameters()), 1 process: max relative error {err:.2e}")
    assert err <= 1e-5, err


def test_torchtitan_docs_recipe_builds_a_moga_config():
    """docs/recipes/torchtitan_config.py (quoted verbatim in docs/torchtitan.md) puts the MOGA
    container into torchtitan's debug-model config; torchtitan's own container refuses the name
    (why the container exists)."""
    pytest.importorskip("torchtitan")
    import re
    from pathlib import Path

    from deepspeed_recipes_cases import recipe
    from torchtitan.components.optimizer import OptimizersContainer

    from moga_dist.engines.torchtitan import MOGAOptimizersContainer

    docs = Path(__file__).resolve().parent.parent / "docs"
    code = (docs / "recipes" / "torchtitan_config.py").read_text()
    assert code[re.search(r"^(import|from) ", code, re.MULTILINE).start():].strip() in (docs / "torchtitan.md").read_text()
    config = recipe("torchtitan_config").llama3_debugmodel_moga()
    assert isinstance(config.optimizer, MOGAOptimizersContainer.Config)
    assert config.optimizer.param_groups[0].optimizer_name == "MOGA"
    with pytest.raises(NotImplementedError, match="MOGA"):
        OptimizersContainer._resolve_optimizer_factory("MOGA")
