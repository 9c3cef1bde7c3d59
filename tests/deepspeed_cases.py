"""Workers for the DeepSpeed tests: k engine steps vs single-process MOGA on the same global batch."""
import copy
import tempfile

import torch
import torch.distributed as dist
from torch import nn

from moga_dist import MOGA, param_groups

STEPS = 3
HP = dict(lr=0.02, momentum=0.9, weight_decay=0.1, hidden_mult=5.0)
VOCAB, SEQ = 37, 6


class Tiny(nn.Module):
    """Odd widths, so ZeRO partition boundaries fall inside rows."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 10)
        self.fc1 = nn.Linear(10, 13)
        self.norm = nn.LayerNorm(13)
        self.fc2 = nn.Linear(13, 11, bias=False)
        self.lm_head = nn.Linear(11, VOCAB, bias=False)

    def forward(self, x):
        return self.lm_head(self.fc2(self.norm(torch.tanh(self.fc1(self.embed(x))))))


def loss_of(model, tokens):
    logits = model(tokens[:, :-1])
    return nn.functional.cross_entropy(logits.reshape(-1, VOCAB), tokens[:, 1:].reshape(-1))


def batches(global_batch, steps, seed=7):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (global_batch, SEQ), generator=gen) for _ in range(steps)]


def reference(data, clip, hp=HP):
    torch.manual_seed(0)
    model = Tiny()
    opt = MOGA(param_groups(model), **hp)
    for tokens in data:
        opt.zero_grad()
        loss_of(model, tokens).backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
    return model


def ds_config(stage, micro, accum, clip=0.0, bf16=False):
    return {"train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": accum,
            "zero_optimization": {"stage": stage}, "gradient_clipping": clip, "bf16": {"enabled": bf16},
            "steps_per_print": 10 ** 9}


def engine_run(rank, world, stage, clip, data, micro, accum, bf16=False, steps=None, engine=None):
    import moga_dist.engines.deepspeed as mds

    if engine is None:
        torch.manual_seed(0)
        model = Tiny()
        engine, *_ = mds.initialize(model=model, optimizer=MOGA(param_groups(model), **HP),
                                    config=ds_config(stage, micro, accum, clip, bf16))
    for tokens in data[:steps]:
        for j in range(accum):
            first = (j * world + rank) * micro
            loss = loss_of(engine, tokens[first:first + micro])
            engine.backward(loss)
            engine.step()
    return engine


def compare(model, ref, what, rtol):
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        err = (p.detach().float() - q.detach()).abs().max().item() / q.detach().abs().max().item()
        assert err <= rtol, (what, name, err)


def worker(rank, world):
    import moga_dist.engines.deepspeed as mds

    mds.skip_shm_comm_build()
    micro, accum = 2, 2
    data = batches(micro * accum * world, STEPS)
    for clip in (0.0, 1.0):
        ref = reference(data, clip)
        for stage in (0, 1, 2):
            engine = engine_run(rank, world, stage, clip, data, micro, accum)
            compare(engine.module, ref, f"stage {stage} clip {clip}", 1e-5)
    # bf16: the oracle is DeepSpeed's ZeRO-0 bf16 run, where MOGA sees whole fp32 master weights.
    # ZeRO-1/2 reduce the bf16 gradients in another order, so they differ by bf16 rounding (~2^-8
    # relative), which moves the normalized update by about as much: allowed, one bf16 ulp of the
    # weight plus 2^-6 of the largest total update. (A wrong partition map is off by O(update).)
    # Sign-updated roles (embedding, biases, norm gains) flip where the momentum is near zero, so
    # for them 98% of the elements must be within that bound. The fp32 runs above are the exact proof.
    torch.manual_seed(0)
    init = [p.detach().float() for p in Tiny().parameters()]
    whole_engine = engine_run(rank, world, 0, 0.0, data, micro, accum, bf16=True)
    assert_moga_ran(whole_engine.basic_optimizer, STEPS)     # DeepSpeed's zero-gradient set-up step not counted
    whole = whole_engine.module
    for stage in (1, 2):
        flat = engine_run(rank, world, stage, 0.0, data, micro, accum, bf16=True).module
        for (name, a), b, w0 in zip(whole.named_parameters(), flat.parameters(), init):
            a, b = a.detach().float(), b.detach().float()
            tol = 2 ** -7 * torch.maximum(a.abs(), b.abs()) + 2 ** -6 * (a - w0).abs().max()
            within = ((a - b).abs() <= tol).float().mean().item()
            sign_role = name.startswith("embed") or a.dim() == 1
            assert within >= (0.98 if sign_role else 1.0), (f"bf16 stage {stage}", name, within)
    # Checkpoint: save after 1 step, load into a fresh engine, continue: equals uninterrupted.
    tmp = [tempfile.mkdtemp() if rank == 0 else None]
    dist.broadcast_object_list(tmp, src=0)
    for stage in (0, 2):
        straight = engine_run(rank, world, stage, 1.0, data, micro, accum)
        first = engine_run(rank, world, stage, 1.0, data, micro, accum, steps=1)
        first.save_checkpoint(tmp[0], tag=f"s{stage}")
        fresh = engine_run(rank, world, stage, 1.0, data, micro, accum, steps=0)
        fresh.load_checkpoint(tmp[0], tag=f"s{stage}")
        resumed = engine_run(rank, world, stage, 1.0, data[1:], micro, accum, engine=fresh)
        for (name, a), b in zip(straight.module.named_parameters(), resumed.module.parameters()):
            assert torch.equal(a, b), (stage, name, (a - b).abs().max().item())


def refusals(rank, world):
    import deepspeed
    import moga_dist.engines.deepspeed as mds

    mds.skip_shm_comm_build()
    torch.manual_seed(0)
    model = Tiny()
    try:
        mds.initialize(model=model, config={**ds_config(1, 2, 1), "optimizer": {"type": "MOGA", "params": {"lrr": 1}}})
    except ValueError as exc:
        assert "lrr" in str(exc)
    else:
        raise AssertionError("unknown optimizer key was not refused")
    # DeepSpeed's config-name path (no MOGA built first) works once moga_dist.engines.deepspeed is imported.
    engine, *_ = deepspeed.initialize(model=Tiny(), config={**ds_config(1, 2, 1),
                                                            "optimizer": {"type": "MOGA", "params": {"lr": 0.01}}})
    assert isinstance(engine.basic_optimizer, MOGA), type(engine.basic_optimizer)
    # What cannot be exact is refused inside deepspeed.initialize, naming the config key, before any step.
    # DeepSpeed's CPU accelerator decides fp16 support from the CPU (mkldnn): where it lacks it,
    # DeepSpeed refuses fp16 itself first. Both refusals are accepted; the second pass simulates
    # such a CPU, so the test means the same on every machine.
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    native = accelerator.is_fp16_supported
    cases = [("fp16.enabled", {"fp16": {"enabled": True}}, native),
             ("fp16.enabled", {"fp16": {"enabled": True}}, lambda: False),
             ("zero_optimization.offload_optimizer",
              {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}},
               "zero_force_ds_cpu_optimizer": False}, native)]
    for key, cfg, fp16_supported in cases:
        accelerator.is_fp16_supported = fp16_supported
        model = Tiny()
        opt = MOGA(param_groups(model))
        try:
            deepspeed.initialize(model=model, optimizer=opt, config={**ds_config(1, 2, 1), **cfg})
        except ValueError as exc:
            msg = str(exc)
            engine_refused_fp16 = key.startswith("fp16") and "fp16 is not supported" in msg
            assert key in msg or engine_refused_fp16, (key, msg)
            assert not opt.state, f"{key}: MOGA stepped before the refusal"
        else:
            raise AssertionError(f"{key} was not refused")
        finally:
            accelerator.is_fp16_supported = native


def plain(rank, world, stage, bf16, grad_accum_fp32=False):
    """The user's own script: deepspeed.initialize(optimizer=MOGA(...)), no moga_dist wrapper."""
    import deepspeed
    import moga_dist.engines.deepspeed as mds

    mds.skip_shm_comm_build()
    micro, accum, clip = 2, 2, 1.0
    data = batches(micro * accum * world, STEPS)
    torch.manual_seed(0)
    model = Tiny()
    config = ds_config(stage, micro, accum, clip, bf16)
    if grad_accum_fp32:
        config["data_types"] = {"grad_accum_dtype": "fp32"}
    engine, *_ = deepspeed.initialize(model=model, optimizer=MOGA(param_groups(model), **HP), config=config)
    if grad_accum_fp32:
        assert type(engine.optimizer).__name__ == "BF16_Optimizer", type(engine.optimizer)
    engine_run(rank, world, stage, clip, data, micro, accum, engine=engine)
    assert_moga_ran(engine.basic_optimizer, STEPS)
    if bf16:
        compare_bf16(engine.module, reference_bf16(data, clip, world, micro, accum), f"bf16 stage {stage}")
    else:
        compare(engine.module, reference(data, clip), f"plain stage {stage}", 1e-5)


def assert_moga_ran(optimizer, steps):
    """The optimizer that stepped is MOGA, and every tensor it holds took exactly `steps` steps
    (a set-up step with zero gradients would count one more)."""
    assert isinstance(optimizer, MOGA), type(optimizer)
    held = [p for g in optimizer.param_groups for p in g["params"]]
    assert held, "MOGA holds no tensors"
    for p in held:
        state = optimizer.state[p]
        assert "momentum_buffer" in state and state["step"] == steps, (tuple(p.shape), state.get("step"))


def reference_bf16(data, clip, world, micro, accum):
    """Single-process MOGA on fp32 master weights whose gradients come from a bf16 copy, summed in
    fp32 over the same micro-batches (DeepSpeed sums them in another order and precision)."""
    torch.manual_seed(0)
    master = Tiny()
    opt = MOGA(param_groups(master), **HP)
    for tokens in data:
        low = copy.deepcopy(master).to(torch.bfloat16)
        total = [torch.zeros_like(p) for p in master.parameters()]
        for j in range(accum):
            for rank in range(world):
                first = (j * world + rank) * micro
                low.zero_grad()
                (loss_of(low, tokens[first:first + micro]) / (accum * world)).backward()
                for t, p in zip(total, low.parameters()):
                    t += p.grad.float()
        for p, t in zip(master.parameters(), total):
            p.grad = t
        if clip:
            torch.nn.utils.clip_grad_norm_(master.parameters(), clip)
        opt.step()
    return master


def compare_bf16(model, ref, what):
    """bf16 gradients differ by rounding (~2^-8 relative) from the reference's, which moves the
    normalized update by about as much: allowed, 2^-7 of the weight plus 2^-6 of the largest total
    update. Sign-updated roles (embedding, biases, norm gains) flip where the momentum is near zero,
    so 98% of their elements must be within that bound. A wrong partition map or role is off by
    O(update) everywhere; the fp32 runs are the exact proof."""
    torch.manual_seed(0)
    init = [p.detach().float() for p in Tiny().parameters()]
    for (name, a), b, w0 in zip(model.named_parameters(), ref.parameters(), init):
        a, b = a.detach().float(), b.detach().float()
        tol = 2 ** -7 * torch.maximum(a.abs(), b.abs()) + 2 ** -6 * (b - w0).abs().max()
        within = ((a - b).abs() <= tol).float().mean().item()
        sign_role = name.startswith("embed") or a.dim() == 1
        assert within >= (0.98 if sign_role else 1.0), (what, name, within)
