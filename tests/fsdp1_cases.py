"""Workers for tests/test_fsdp1.py: every front door to torch FSDP1 (and Accelerate's FSDP2) runs
4 MOGA steps on a tiny model and is compared element-wise with single-process
MOGA(param_groups(model)) on the same global batches; the first step's update of each parameter is
classified (sign / row-normalized with the hidden or head scale) and compared with its role.

One spawn per world size runs every door in turn; rank 0 writes {door: result} to a JSON file."""
import json
import os
import traceback

import torch
import torch.distributed as dist
import torch.nn.functional as nnf
from torch import nn

from moga_dist import MOGA, assign_roles, param_groups

STEPS = 4
HP = {"lr": 0.02, "momentum": 0.9, "weight_decay": 0.1}
VOCAB, D, HIDDEN, OUT = 11, 32, 48, 7
PER_RANK, SEQ = 2, 3


class Tiny(nn.Module):
    """Embedding, hidden 48x32 / 32x48 with biases, head `output` 7x32: flat sizes that FSDP1
    cuts unevenly at 2 and 3 ranks (some ranks hold nothing of the head)."""

    def __init__(self):
        super().__init__()
        self.tok = nn.Embedding(VOCAB, D)
        self.fc1 = nn.Linear(D, HIDDEN)
        self.fc2 = nn.Linear(HIDDEN, D)
        self.output = nn.Linear(D, OUT)

    def forward(self, tokens):
        return self.output(torch.relu(self.fc2(torch.relu(self.fc1(self.tok(tokens))))))


def batches(world):
    """batches[k * world + r]: rank r's (tokens, targets) at step k."""
    g = torch.Generator().manual_seed(7)
    return [(torch.randint(0, VOCAB, (PER_RANK, SEQ), generator=g), torch.randint(0, OUT, (PER_RANK, SEQ), generator=g))
            for _ in range(STEPS * world)]


def loss_of(model, batch):
    tokens, targets = batch
    logits = model(tokens)
    return nnf.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def fresh(kind="tiny"):
    torch.manual_seed(0)
    if kind == "gpt":                   # litgpt's GPT, one block: fused qkv, lm_head, wte, LayerNorms
        from litgpt import Config
        from litgpt.model import GPT

        # bias=False: the key bias's gradient is exactly zero (softmax ignores a shift), so its sign
        # update would follow rounding noise, which differs with the reduction order.
        return GPT(Config(n_layer=1, n_head=2, n_embd=32, block_size=8, vocab_size=VOCAB, padded_vocab_size=VOCAB,
                          intermediate_size=48, bias=False))
    return Tiny()


def clean(name):
    for wrapper in ("_forward_module.", "_fsdp_wrapped_module.", "_checkpoint_wrapped_module."):
        name = name.replace(wrapper, "")
    return name.removeprefix("module.")


def full_state(model):
    """{parameter name: full tensor}, a collective: FSDP1 through summon_full_params (whatever
    state-dict type a framework set), DTensors (FSDP2) through full_tensor()."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    if any(isinstance(m, FSDP) for m in model.modules()):
        with FSDP.summon_full_params(model, writeback=False):
            return {clean(n): p.detach().clone().float() for n, p in model.named_parameters()}
    return {clean(n): (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone().float()
            for n, p in model.named_parameters()}


ROLELESS = ("accelerate-fsdp2-together-parameters",)
KIND = {"litgpt-fsdp": "gpt"}


def reference(world, roles=True, kind="tiny"):
    """Single-process MOGA(param_groups(model)) (roles=False: MOGA(model.parameters())) on the global
    batches: (state after step 1, final state)."""
    model = fresh(kind)
    opt = MOGA(param_groups(model) if roles else model.parameters(), **HP)
    data = batches(world)
    after1 = None
    for k in range(STEPS):
        group = data[k * world:(k + 1) * world]
        batch = (torch.cat([b[0] for b in group]), torch.cat([b[1] for b in group]))
        loss_of(model, batch).backward()
        opt.step()
        opt.zero_grad()
        if k == 0:
            after1 = {n: p.detach().clone() for n, p in model.named_parameters()}
    return after1, {n: p.detach().clone() for n, p in model.named_parameters()}


def observed_role(before, after, d_in):
    """Which update W moved by in MOGA's first step: 'vector' (sign, no decay), 'embedding' (sign,
    decay), 'hidden' (unit rows times 20 d_in^-1/2, decay), 'head' (unit rows, decay), or '?'.
    Entries (rows) with a zero gradient have a zero update and are not looked at."""
    lr, wd = HP["lr"], HP["weight_decay"]

    def unit(x, scale=1.0):
        x = x[x.abs() > 1e-3 * scale]
        return x.numel() > 0 and torch.allclose(x.abs(), torch.full_like(x, scale), rtol=1e-3)

    if before.dim() < 2:
        return "vector" if unit((before - after) / lr) else "?"
    step = (before * (1 - lr * wd) - after) / lr
    if unit(step.flatten()):
        return "embedding"
    rows = step.norm(dim=1)
    for role, scale in (("hidden", 20.0 * d_in ** -0.5), ("head", 1.0)):
        if unit(rows, scale):
            return role
    return "?"


def train(model, opt, step_batches, backward=None):
    """4 steps; the state before and after step 1, and the final state."""
    before = full_state(model)
    after1 = None
    for k, batch in enumerate(step_batches):
        loss = loss_of(model, batch)
        (backward or torch.Tensor.backward)(loss)
        opt.step()
        opt.zero_grad()
        if k == 0:
            after1 = full_state(model)
    return before, after1, full_state(model)


def my_batches(rank, world):
    data = batches(world)
    return [data[k * world + rank] for k in range(STEPS)]


# ----- front doors --------------------------------------------------------------------------------
def _fsdp(model, orig, strategy="FULL_SHARD", wrap=False, **kw):
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import ShardingStrategy
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    policy = ModuleWrapPolicy({nn.Linear}) if wrap else None
    return FSDP(model, device_id=torch.device("cpu"), use_orig_params=orig, auto_wrap_policy=policy,
                sharding_strategy=getattr(ShardingStrategy, strategy), **kw)


def torch_fsdp1(rank, world, orig, strategy="FULL_SHARD", when="after", groups="param_groups", wrap=False,
                attach=False):
    """torch FSDP1; MOGA built `when` before/after wrapping from param_groups(model) or model.parameters()."""
    kw = {}
    if strategy == "HYBRID_SHARD":
        # 2-D layout: shard over all ranks of a node (here: all), replicate across nodes (here: 1 each).
        shard = dist.new_group(list(range(world)))
        replicate = [dist.new_group([r]) for r in range(world)][rank]
        kw["process_group"] = (shard, replicate)
    model = fresh()
    make = (lambda m: MOGA(param_groups(m), **HP)) if groups == "param_groups" else \
        (lambda m: MOGA(m.parameters(), **HP))
    opt = make(model) if when == "before" else None
    model = _fsdp(model, orig, strategy, wrap, **kw)
    opt = opt or make(model)
    if attach:
        from moga_dist.engines.fsdp1 import attach as attach_fn
        attach_fn(model, opt)
    return train(model, opt, my_batches(rank, world))


class _CpuAccelerator:
    """Test-only shims so Accelerate's FSDP paths run on CPU/gloo (Accelerate enables FSDP only
    for accelerator devices): distributed_type forced to FSDP with the plugin, and `device` plain
    "cpu" (Accelerate says cpu:0, which FSDP1 refuses as inconsistent with its compute device)."""

    @staticmethod
    def make(plugin):
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState
        from accelerate.utils import DistributedType

        AcceleratorState._reset_state(True)
        acc = Accelerator(cpu=True)
        acc.state.distributed_type = DistributedType.FSDP
        acc.state.fsdp_plugin = plugin
        acc.__class__ = type("CpuFSDPAccelerator", (type(acc),), {"device": property(lambda self: torch.device("cpu"))})
        return acc


def _loader(world):
    """A loader that Accelerate shards so that rank r gets batches[k * world + r] at step k."""
    data = batches(world)
    samples = [(t, y) for tokens, targets in data for t, y in zip(tokens, targets)]
    return torch.utils.data.DataLoader(samples, batch_size=PER_RANK, shuffle=False)


def accelerate(rank, world, version, orig=None, order="together", groups="param_groups"):
    """Accelerate's FSDP plugin; order 'together' = prepare(model, MOGA(...), loader) (what FSDP2
    requires), 'documented' = FSDP1 guide: prepare(model), then MOGA over the prepared model."""
    from accelerate.utils import FullyShardedDataParallelPlugin

    kw = {"fsdp_version": version}
    if version == 1:
        kw["use_orig_params"] = orig
    acc = _CpuAccelerator.make(FullyShardedDataParallelPlugin(**kw))
    model = fresh()
    make = (lambda m: MOGA(param_groups(m), **HP)) if groups == "param_groups" else \
        (lambda m: MOGA(m.parameters(), **HP))
    if order == "together":
        model, opt, loader = acc.prepare(model, make(model), _loader(world))
    else:
        model = acc.prepare(model)
        opt, loader = acc.prepare(make(model), _loader(world))
    steps = list(loader)
    got = [(t, y) for t, y in steps]
    return train(model, opt, got, backward=acc.backward)


def _cpu_fsdp_strategy():
    from lightning.fabric.strategies import FSDPStrategy
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    class CpuFSDPStrategy(FSDPStrategy):
        def setup_module(self, module):
            module = FSDP(module, cpu_offload=self.cpu_offload, mixed_precision=self.mixed_precision_config,
                          sharding_strategy=self.sharding_strategy, device_id=torch.device("cpu"), **self._fsdp_kwargs)
            return super().setup_module(module)
    return CpuFSDPStrategy


def litgpt_fsdp(rank, world):
    """litgpt's multi-device recipe (pretrain.py/finetune): Fabric FSDPStrategy wrapping each Block,
    full state dicts, then `instantiate_torch_optimizer(optimizer, model.parameters())` with MOGA as
    litgpt's --optimizer class path. Roles come from the module tree (the groups have none).
    litgpt's HYBRID_SHARD needs a CUDA device mesh in Lightning: FULL_SHARD here. Shims as in fabric()."""
    from lightning.fabric import Fabric
    from litgpt.model import Block
    from litgpt.utils import instantiate_torch_optimizer

    strategy = _cpu_fsdp_strategy()(auto_wrap_policy={Block}, state_dict_type="full", sharding_strategy="FULL_SHARD",
                                     process_group_backend="gloo")
    fab = Fabric(accelerator="cpu", devices=world, strategy=strategy)
    fab.launch()
    model = fab.setup(fresh("gpt"))
    opt = instantiate_torch_optimizer({"class_path": "moga_dist.MOGA", "init_args": dict(HP)}, model.parameters())
    opt = fab.setup_optimizers(opt)
    return train(model, opt, my_batches(rank, world), backward=fab.backward)


def fabric(rank, world, sharding="FULL_SHARD"):
    """Lightning Fabric's FSDPStrategy (use_orig_params=True, its default), in the order Fabric
    documents for FSDP: setup_module, then MOGA over the set-up module, then setup_optimizers.
    Test-only shims: Fabric refuses `type(strategy) is FSDPStrategy` off GPUs, so a subclass; and
    its FSDP call passes device_id=root_device.index (None on CPU, which FSDP1 refuses), so the
    subclass wraps with device_id=cpu and otherwise Lightning's own arguments."""
    from lightning.fabric import Fabric

    fab = Fabric(accelerator="cpu", devices=world,
                 strategy=_cpu_fsdp_strategy()(process_group_backend="gloo", sharding_strategy=sharding))
    fab.launch()
    model = fab.setup_module(fresh())
    opt = fab.setup_optimizers(MOGA(param_groups(model), **HP))
    return train(model, opt, my_batches(rank, world), backward=fab.backward)


DOORS = {
    "fsdp1-orig0-after-param_groups": (torch_fsdp1, dict(orig=False)),
    "fsdp1-orig0-after-parameters": (torch_fsdp1, dict(orig=False, groups="parameters")),
    "fsdp1-orig1-after-param_groups": (torch_fsdp1, dict(orig=True)),
    "fsdp1-orig1-before-param_groups": (torch_fsdp1, dict(orig=True, when="before")),
    "fsdp1-orig1-after-parameters": (torch_fsdp1, dict(orig=True, groups="parameters")),
    "fsdp1-orig0-nested-units": (torch_fsdp1, dict(orig=False, wrap=True)),
    "fsdp1-orig1-nested-units": (torch_fsdp1, dict(orig=True, wrap=True)),
    "fsdp1-orig0-shard_grad_op": (torch_fsdp1, dict(orig=False, strategy="SHARD_GRAD_OP")),
    "fsdp1-orig1-shard_grad_op": (torch_fsdp1, dict(orig=True, strategy="SHARD_GRAD_OP")),
    "fsdp1-orig1-no_shard": (torch_fsdp1, dict(orig=True, strategy="NO_SHARD")),
    "fsdp1-orig0-no_shard": (torch_fsdp1, dict(orig=False, strategy="NO_SHARD")),
    "fsdp1-orig1-hybrid_shard": (torch_fsdp1, dict(orig=True, strategy="HYBRID_SHARD")),
    "fsdp1-orig0-attach": (torch_fsdp1, dict(orig=False, attach=True)),
    "accelerate-fsdp1-orig0-documented": (accelerate, dict(version=1, orig=False, order="documented")),
    "accelerate-fsdp1-orig1-documented": (accelerate, dict(version=1, orig=True, order="documented")),
    "accelerate-fsdp1-orig1-together": (accelerate, dict(version=1, orig=True, order="together")),
    "accelerate-fsdp2-together-param_groups": (accelerate, dict(version=2, order="together")),
    "lightning-fabric-fsdp": (fabric, {}),
    "lightning-fabric-fsdp-shard_grad_op": (fabric, dict(sharding="SHARD_GRAD_OP")),
    "litgpt-fsdp": (litgpt_fsdp, {}),
    # MOGA(model.parameters()) has no roles: the reference is single-process MOGA(model.parameters()).
    "accelerate-fsdp2-together-parameters": (accelerate, dict(version=2, order="together", groups="parameters")),
}


def run_doors(rank, world, names, out_path):
    """Run each named door; rank 0 writes {door: {"max_err", "roles", "error"}} to out_path."""
    torch.use_deterministic_algorithms(False)
    results = {}
    for name in names:
        fn, kw = DOORS[name]
        kind = KIND.get(name, "tiny")
        ref1, ref = reference(world, name not in ROLELESS, kind)
        model = fresh(kind)
        roles = assign_roles(model) if name not in ROLELESS else \
            {n: "hidden" if p.dim() > 1 else "vector" for n, p in model.named_parameters()}
        try:
            before, after1, final = fn(rank, world, **kw)
            err = max(float((final[n] - ref[n]).abs().max()) for n in ref)
            err1 = max(float((after1[n] - ref1[n]).abs().max()) for n in ref)
            seen = {n: observed_role(before[n], after1[n], before[n].flatten(1).shape[1] if before[n].dim() > 1 else 1)
                    for n in ref}
            results[name] = {"max_err": max(err, err1), "roles": seen, "expected_roles": roles, "error": None}
        except Exception as exc:  # noqa: BLE001 -- recorded, so one door's failure does not hide the others'
            traceback.print_exc()
            results[name] = {"max_err": None, "roles": None, "expected_roles": roles,
                             "error": f"{type(exc).__name__}: {exc}"}
        dist.barrier()
    if rank == 0:
        with open(out_path, "w") as fh:
            json.dump(results, fh, indent=1)
    os.environ.pop("ACCELERATE_USE_FSDP", None)
