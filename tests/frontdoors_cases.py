"""Workers and helpers for test_frontdoors.py: MOGA built by a front door from parameters without
roles (Hugging Face Trainer without DeepSpeed, litgpt, Lightning, torchtitan) must update every
parameter with the role `param_groups(model)` assigns and equal single-process
`MOGA(param_groups(model))` on the same batches.

`RoleProbe` reads the role each parameter got from its update alone (a sign update, or rows of
a fixed norm: hidden_mult * d_in^-1/2 for hidden, head_mult for the head), so the check does not
trust what MOGA says about itself."""
import torch

from moga_dist import MOGA, assign_roles, param_groups

HP = dict(lr=0.02, momentum=0.9, weight_decay=0.1, hidden_mult=5.0)
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
    from deepspeed_recipes_cases import MICRO, _shared_tmp, recipe, tiny_llama, trainer_args
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
