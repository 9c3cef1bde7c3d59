"""Workers and helpers for test_frontdoors.py: MOGA built by a front door from parameters without
roles (Hugging Face Trainer without DeepSpeed, litgpt, Lightning, torchtitan) must update every
parameter with the role `param_groups(model)` assigns and equal single-process
`MOGA(param_groups(model))` on the same batches.

`RoleProbe` reads the role each parameter got from its update alone (a sign update, or rows of
a fixed norm: hidden_mult * d_in^-1/2 for hidden, head_mult for the head), so the check does not
trust what MOGA says about itself."""
import torch

from moga_dist import MOGA, assign_roles, param_groups

HP = {"lr": 0.02, "momentum": 0.9, "weight_decay": 0.1, "hidden_mult": 5.0}
TOL = 1e-4


class RoleProbe:
    """Snapshots the parameters around each step of `opt` (a MOGA whose groups hold the model's
    own tensors) and classifies the last update of each one."""

    def __init__(self, opt: MOGA, model: torch.nn.Module):
        self.opt, self.model, self.before, self.after = opt, model, {}, {}
        opt.register_step_pre_hook(lambda *_: self._snap(self.before))
        opt.register_step_post_hook(lambda *_: self._snap(self.after))

    def _snap(self, into):
        for group in self.opt.param_groups:
            for p in group["params"]:
                into[id(p)] = (p.detach().clone(), group)

    def roles(self) -> dict[str, str]:
        """{name: role the last update shows}, "?" where no role fits."""
        out = {}
        for name, p in self.model.named_parameters():
            if id(p) in self.before:
                (w0, group), (w1, _) = self.before[id(p)], self.after[id(p)]
                out[name] = role_of_update(_full(w0), _full(w1), group)
        return out

    def check(self, what: str) -> None:
        """The roles the updates show equal the roles param_groups assigns."""
        want, got = assign_roles(self.model), self.roles()
        wrong = {n: (got[n], want[n]) for n in got if got[n] != want[n]}
        assert not wrong, f"{what}: (role of the update, role param_groups assigns) differ: {wrong}"
        assert set(got) == set(want), (what, sorted(set(want) - set(got)))


def role_of_update(w0: torch.Tensor, w1: torch.Tensor, group: dict) -> str:
    """Which MOGA role maps w0 to w1 under the group's lr, weight decay and multipliers."""
    lr, wd = group["lr"], group["weight_decay"]
    w0, w1 = w0.double(), w1.double()
    for role in ("vector", "embedding", "hidden", "head"):
        u = (w0 * (1.0 if role == "vector" else 1.0 - lr * wd) - w1) / lr
        if role in ("vector", "embedding"):
            mult, size = group[f"{role}_mult"], u.abs()
        elif w0.dim() < 2:
            continue
        else:
            mult = group["hidden_mult"] * w0.flatten(1).shape[1] ** -0.5 if role == "hidden" else group["head_mult"]
            size = u.flatten(1).norm(dim=1)
        # zero momentum (an embedding row never seen) gives a zero update
        if bool((((size - mult).abs() <= TOL * mult) | (size <= TOL * mult)).all()) and bool((size > 0).any()):
            return role
    return "?"


def report(rank, what, err):
    """One line per front door in the test log (-s): the support matrix's measured error."""
    if rank == 0:
        print(f"front door: {what}: max relative error {err:.2e}", flush=True)


def _full(t):
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def max_rel_error(model, ref) -> float:
    """max over parameters of max|p - q| / max|q| (parameters in the same order)."""
    errs = [(_full(p).detach().double() - _full(q).detach().double()).abs().max().item()
            / _full(q).detach().double().abs().max().item()
            for p, q in zip(model.parameters(), ref.parameters())]
    return max(errs)


# ----- Hugging Face Trainer --------------------------------------------------------------------
def hf_reference(tokens, steps, global_batch, clip=1.0):
    """Single-process MOGA(param_groups(model)) on the Trainer's global batches."""
    from deepspeed_recipes_cases import tiny_llama

    ref = tiny_llama()
    opt = MOGA(param_groups(ref), **HP)
    for k in range(steps):
        x = tokens[k * global_batch:(k + 1) * global_batch]
        opt.zero_grad()
        ref(input_ids=x, labels=x).loss.backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), clip)
        opt.step()
    return ref


def hf_trainer_ddp(rank, world):
    """docs/recipes/hf_trainer.py without a DeepSpeed config: the Trainer's own DDP hands MOGA its
    weight-decay / no-decay groups; the update must equal the DeepSpeed run's (single-process
    MOGA(param_groups(model)), which test_deepspeed_recipes checks the DeepSpeed run against)."""
    from deepspeed_cases import STEPS, batches
    from deepspeed_recipes_cases import (
        MICRO,
        _shared_tmp,
        recipe,
        tiny_llama,
        trainer_args,
    )
    from transformers import TrainerCallback

    tokens = torch.cat(batches(MICRO * world, STEPS))
    dataset = [{"input_ids": t, "labels": t} for t in tokens]
    settings = {k: v for k, v in HP.items() if k != "weight_decay"}     # the Trainer's groups set it
    trainer = recipe("hf_trainer").make_trainer(tiny_llama(), dataset, None, settings,
                                                **trainer_args(_shared_tmp(), world))
    probes = []

    class Probe(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
            moga = getattr(optimizer, "optimizer", optimizer)         # Accelerate's wrapper
            assert isinstance(moga, MOGA), type(moga)
            probes.append(RoleProbe(moga, trainer.model))

    trainer.add_callback(Probe())
    trainer.train()
    probes[0].check("HF Trainer DDP")
    err = max_rel_error(trainer.model, hf_reference(tokens, STEPS, MICRO * world))
    report(rank, "HF Trainer, own DDP", err)
    assert err <= 1e-5, ("HF Trainer DDP vs MOGA(param_groups(model))", err)


# ----- torchtitan --------------------------------------------------------------------------------
TT_VOCAB, TT_SEQ, TT_STEPS = 37, 8, 3
SPMD_BACKEND = "partial_dtensor"   # DTensor on the model-parallel axes, FSDP2 for DP (0.3.0's spmd_types default needs its trainer's model set-up)


def torchtitan_cpu_shims():
    """What torchtitan 0.3.0 lacks on CPU, patched in the test only: its device type defaults to
    "cuda" (the device mesh), and FlexAttention has no CPU backward; with one document per row,
    its block mask is plain causal attention, which SDPA computes."""
    import torchtitan.distributed.parallel_dims as pd
    import torchtitan.tools.utils as tu
    from torchtitan.models.common.attention import FlexAttention

    tu.device_type = pd.device_type = "cpu"

    def causal(self, q, k, v, *, attention_masks=None, scale=None, enable_gqa=False, **kwargs):
        out = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                               is_causal=True, scale=scale, enable_gqa=enable_gqa)
        return out.transpose(1, 2)

    FlexAttention.forward = causal


def tiny_titan():
    """torchtitan's own Llama3Model (its debugmodel recipe, narrower): fused QKV, SwiGLU,
    RMSNorm, an nn.Embedding subclass and lm_head."""
    from torchtitan.models.common import ComplexRoPE, Embedding, Linear, RMSNorm
    from torchtitan.models.llama3 import (
        _EMBEDDING_INIT,
        _NORM_INIT,
        Llama3Model,
        _build_llama3_layers,
        _output_linear_init,
    )

    dim, heads = 16, 2
    torch.manual_seed(0)
    return Llama3Model.Config(
        dim=dim, vocab_size=TT_VOCAB,
        tok_embeddings=Embedding.Config(num_embeddings=TT_VOCAB, embedding_dim=dim, param_init=_EMBEDDING_INIT),
        norm=RMSNorm.Config(normalized_shape=dim, param_init=_NORM_INIT),
        lm_head=Linear.Config(in_features=dim, out_features=TT_VOCAB, param_init=_output_linear_init(dim)),
        layers=_build_llama3_layers(fuse_qkv=True, n_layers=2, dim=dim, n_heads=heads, hidden_dim=24,
                                    rope=ComplexRoPE.Config(dim=dim // heads, max_seq_len=64, theta=10000.0),
                                    attn_backend="flex")).build()


def titan_batches(global_batch):
    gen = torch.Generator().manual_seed(3)
    return [torch.randint(0, TT_VOCAB, (global_batch, TT_SEQ + 1), generator=gen) for _ in range(TT_STEPS)]


def titan_step(model, opt, tokens, world=1):
    """One step as torchtitan's trainer takes it: FSDP sums gradients over ranks (torchtitan turns
    its division off) and the loss is summed over tokens and divided by the global token count."""
    x, y = tokens[:, :-1], tokens[:, 1:]
    pos = torch.arange(x.shape[1]).repeat(x.shape[0], 1)
    opt.zero_grad()
    logits = model(x, pos, None)
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, TT_VOCAB).float(), y.reshape(-1), reduction="sum")
    (loss / (y.numel() * world)).backward()
    opt.step()


def titan_reference(data):
    ref = tiny_titan()
    opt = MOGA(param_groups(ref), **HP)
    for tokens in data:
        titan_step(ref, opt, tokens)
    return ref


def titan_parallel(world, tp=1):
    """torchtitan's parallelize_llama: FSDP2 over the ranks TP does not take."""
    from torchtitan.config.configs import (
        CompileConfig,
        ParallelismConfig,
        TrainingConfig,
    )
    from torchtitan.distributed import ParallelDims
    from torchtitan.models.llama3 import parallelize_llama

    model = tiny_titan()
    parallelism = ParallelismConfig(spmd_backend=SPMD_BACKEND, data_parallel_shard_degree=world // tp,
                                    tensor_parallel_degree=tp)
    dims = ParallelDims.from_config(parallelism, world)
    dims.build_mesh()
    parallelize_llama(model, parallel_dims=dims, training=TrainingConfig(mixed_precision_param="float32"), parallelism=parallelism,
                      compile_config=CompileConfig(), ac_config=None, dump_folder="/tmp")
    # gloo has no PREMUL_SUM (torchtitan sets a divide factor of 1): the same sum, as two ops
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_force_sum_reduction_for_comms(True)
    return model


def torchtitan_fsdp2(rank, world, tmp):
    """MOGAOptimizersContainer (one import, a catch-all group) on torchtitan's model after its own
    parallelize_llama (FSDP2): roles from the model, equal single-process MOGA within 1e-5; its
    CheckpointManager saves after step 2 and a fresh process state resumes step 3 identically."""
    from torchtitan.components.checkpointer.dcp import CheckpointManager
    from torchtitan.components.optimizer import LRSchedulersContainer

    from moga_dist.engines.torchtitan import moga_optimizer

    torchtitan_cpu_shims()
    data = titan_batches(2 * world)
    mine = [t[rank * 2:(rank + 1) * 2] for t in data]

    def build():
        model = titan_parallel(world)
        opt = moga_optimizer(**HP).build(model_parts=[model])
        sched = LRSchedulersContainer(opt, lambda step: 1.0)
        ckpt = CheckpointManager.Config(enable=True, folder="ckpt", interval=1).build(
            dataloader=None, model_parts=[model], optimizers=opt, lr_schedulers=sched, states={}, sd_adapter=None,
            base_folder=tmp)
        return model, opt, ckpt

    model, opt, ckpt = build()
    probe = RoleProbe(opt.optimizers[0], model)
    for k, tokens in enumerate(mine):
        titan_step(model, opt, tokens, world)
        if k == TT_STEPS - 2:
            ckpt.save(curr_step=k + 1, last_step=False)
    probe.check("torchtitan FSDP2")
    err = max_rel_error(model, titan_reference(data))
    report(rank, f"torchtitan container, parallelize_llama FSDP2 x{world}", err)
    assert err <= 1e-5, ("torchtitan FSDP2 vs MOGA(param_groups(model))", err)

    resumed, opt2, ckpt2 = build()
    assert ckpt2.load(step=TT_STEPS - 1)
    titan_step(resumed, opt2, mine[-1], world)
    err = max_rel_error(resumed, model)
    report(rank, "torchtitan CheckpointManager resume (step 3 after loading step 2)", err)
    assert err <= 1e-6, ("torchtitan resume", err)
    ckpt.close()
    ckpt2.close()


# ----- litgpt and Lightning (one process) --------------------------------------------------------
def tiny_litgpt():
    from litgpt import GPT, Config

    # bias=False: the key part of a QKV bias has an exactly zero gradient (softmax ignores it), so
    # its sign update follows rounding noise and differs between any two summation orders
    torch.manual_seed(0)
    return GPT(Config(block_size=16, vocab_size=TT_VOCAB, padded_vocab_size=TT_VOCAB, n_layer=1, n_head=2, n_embd=16,
                      intermediate_size=24, bias=False))


def lm_loss(model, tokens):
    logits = model(tokens[:, :-1])
    return torch.nn.functional.cross_entropy(logits.reshape(-1, TT_VOCAB), tokens[:, 1:].reshape(-1))


def reference_run(model, data, loss=lm_loss):
    opt = MOGA(param_groups(model), **HP)
    for tokens in data:
        opt.zero_grad()
        loss(model, tokens).backward()
        opt.step()
    return model


def lightning_reference(data):
    model, loss = tiny_lightning_model()
    return reference_run(model, data, loss)


def tiny_lightning_model():
    """deepspeed_cases.Tiny (embedding, hidden, LayerNorm, lm_head; no litgpt needed) and its loss."""
    from deepspeed_cases import Tiny, loss_of

    torch.manual_seed(0)
    return Tiny(), loss_of


def litgpt_recipe(data):
    """litgpt pretrain/finetune's optimizer path: Fabric wraps the model, then
    instantiate_torch_optimizer(--optimizer, model.parameters(), fused=...), then
    fabric.setup_optimizers; the --optimizer value is what docs/lightning.md shows."""
    import lightning as L
    from litgpt.utils import instantiate_torch_optimizer

    fabric = L.Fabric(accelerator="cpu", devices=1)
    model = fabric.setup(tiny_litgpt())
    optimizer = {"class_path": "moga_dist.MOGA", "init_args": dict(HP)}        # --optimizer
    moga = instantiate_torch_optimizer(optimizer, model.parameters(), fused=False)
    probe = RoleProbe(moga, model.module)
    optimizer = fabric.setup_optimizers(moga)
    for tokens in data:
        optimizer.zero_grad()
        fabric.backward(lm_loss(model, tokens))
        optimizer.step()
    probe.check("litgpt instantiate_torch_optimizer")
    return model.module


def lit_module():
    """A LightningModule whose configure_optimizers returns MOGA(self.parameters()) (no roles)."""
    import lightning as L

    class LitLM(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.model, self.loss = tiny_lightning_model()

        def training_step(self, batch, _):
            return self.loss(self.model, batch)

        def configure_optimizers(self):
            return MOGA(self.parameters(), **HP)

    return LitLM()


def lightning_recipe(data, **trainer_kwargs):
    """A LightningModule whose configure_optimizers returns MOGA(self.parameters())."""
    import lightning as L

    lit = lit_module()
    probes = []

    class Probe(L.Callback):
        def on_train_start(self, trainer, pl_module):
            probes.append(RoleProbe(trainer.optimizers[0], pl_module.model))

    loader = torch.utils.data.DataLoader(torch.cat(data), batch_size=data[0].shape[0], shuffle=False)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=len(data), logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[Probe()], **trainer_kwargs)
    trainer.fit(lit, loader)
    probes[0].check("Lightning configure_optimizers(self.parameters())")
    return lit.model


def lightning_deepspeed(rank, world, stage=2):
    """Lightning's DeepSpeedStrategy with configure_optimizers returning MOGA(self.parameters()),
    2 gloo ranks. Test-only shims: Lightning refuses any accelerator but CUDA in
    DeepSpeedStrategy.setup_environment and checks device indices (None on CPU) against local
    ranks in setup_distributed, and hands DeepSpeed root_device.index as its device rank (None on
    CPU); the subclass below skips those two checks and names CPU device 0."""
    import deepspeed
    import lightning as L
    from deepspeed_cases import assert_moga_ran
    from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy

    import moga_dist.engines.deepspeed as mds

    mds.skip_shm_comm_build()

    class CPUDeepSpeed(DeepSpeedStrategy):
        def setup_environment(self):
            DDPStrategy.setup_environment(self)

        def setup_distributed(self):        # without the check that CPU devices have CUDA indices
            self.set_world_ranks()
            self._init_deepspeed_distributed()

        @property
        def root_device(self):              # DeepSpeed reads its index as device_rank (None on CPU)
            return torch.device("cpu", 0)

    data = titan_batches(2 * world)
    mine = torch.cat([t[rank * 2:(rank + 1) * 2] for t in data])
    lit = lit_module()
    loader = torch.utils.data.DataLoader(mine, batch_size=2, shuffle=False)
    strategy = CPUDeepSpeed(stage=stage, process_group_backend="gloo")
    trainer = L.Trainer(accelerator="cpu", devices=world, strategy=strategy, max_steps=len(data), logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        use_distributed_sampler=False)
    trainer.fit(lit, loader)
    moga = trainer.strategy.model.basic_optimizer
    assert isinstance(moga, MOGA), type(moga)
    if stage < 3:                           # ZeRO-3's MOGA holds its sub-group partitions instead
        assert_moga_ran(moga, len(data))
    params = list(lit.model.parameters())
    with deepspeed.zero.GatheredParameters(params, enabled=stage == 3):
        err = max_rel_error(lit.model, lightning_reference(data))
    report(rank, f"Lightning DeepSpeedStrategy ZeRO-{stage}, configure_optimizers(self.parameters())", err)
    assert err <= 1e-5, ("Lightning DeepSpeedStrategy", err)
