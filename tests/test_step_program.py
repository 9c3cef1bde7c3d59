"""MOGA caches each step's plan (pieces, arena, kernel argument lists) across steps. Every change a
training loop or an engine can make between steps must reach the update: checked step by step
against the float64 reference, with a change before every step."""
import gc
import weakref

import pytest
import torch

from moga_dist import MOGA
from moga_dist.core.reference import reference_step

SHAPES = [(13, 7), (9, 20), (11,)]
ROLES = ["hidden", "hidden", "vector"]


def _set(key, value):
    """A change of one group setting, mirrored in the oracle's settings."""
    def change(params, opt, ref):
        for g in opt.param_groups:
            g[key] = value
        ref[key] = value
    return change


def _changes():
    """(description, fn(params, opt, ref_state)) applied before each step; ref_state mirrors the
    settings the float64 oracle must use."""
    def new_storage(params, opt, ref):
        # What ZeRO-3/FSDP-style engines do: the same Parameter, new storage.
        params[0].data = params[0].data.clone()

    def non_contiguous_grad(params, opt, ref):
        ref["transpose_grad"] = True

    return [("none", lambda *a: None), ("lr", _set("lr", 0.03)), ("momentum", _set("momentum", 0.5)),
            ("weight_decay", _set("weight_decay", 0.3)), ("norm", _set("norm", "col")),
            ("storage", new_storage), ("grad layout", non_contiguous_grad), ("eps", _set("eps", 1e-6))]


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "loop"])
def test_every_change_between_steps_reaches_the_update(fused):
    gen = torch.Generator().manual_seed(0)
    inits = [torch.randn(s, generator=gen) for s in SHAPES]
    params = [torch.nn.Parameter(x.clone()) for x in inits]
    hp = dict(lr=0.02, momentum=0.9, weight_decay=0.1, hidden_mult=5.0)
    opt = MOGA([{"params": [p], "role": r} for p, r in zip(params, ROLES)], fused=fused, **hp)
    ref_hp = dict(hp)
    ref = [(x.double(), torch.zeros_like(x, dtype=torch.float64)) for x in inits]
    for name, change in _changes():
        change(params, opt, ref_hp)
        transpose = ref_hp.pop("transpose_grad", False)
        grads = [torch.randn(s, generator=gen) for s in SHAPES]
        for p, g in zip(params, grads):
            # A fresh gradient tensor every step, as zero_grad(set_to_none=True) + backward gives.
            p.grad = g.t().contiguous().t() if (transpose and g.ndim == 2) else g.clone()
        opt.step()
        ref = [reference_step(w, g.double(), m, role, **ref_hp) for (w, m), g, role in zip(ref, grads, ROLES)]
        for p, (w, m), role in zip(params, ref, ROLES):
            err = (p.detach().double() - w).abs().max().item()
            assert err <= 1e-5 * w.abs().max().item(), (f"after change {name!r}", role, err)
            mom = opt.state[p]["momentum_buffer"].double()
            assert (mom - m).abs().max().item() <= 1e-6 * m.abs().max().item() + 1e-12, (name, role)


def test_a_parameter_without_gradient_is_skipped_then_rejoins():
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(6, 5)) for _ in range(2)]
    opt = MOGA(params, lr=0.02, hidden_mult=5.0)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    frozen = params[1].detach().clone()
    params[1].grad = None
    params[0].grad = torch.randn_like(params[0])
    opt.step()
    assert torch.equal(params[1].detach(), frozen)
    assert opt.state[params[1]]["step"] == 1 and opt.state[params[0]]["step"] == 2
    params[1].grad = torch.randn_like(params[1])
    opt.step()
    assert opt.state[params[1]]["step"] == 2 and not torch.equal(params[1].detach(), frozen)


def test_the_optimizer_does_not_keep_freed_gradients_alive():
    p = torch.nn.Parameter(torch.randn(8, 4))
    opt = MOGA([p], lr=0.01)
    p.grad = torch.randn_like(p)
    opt.step()
    probe = weakref.ref(p.grad)
    opt.zero_grad(set_to_none=True)
    gc.collect()
    assert probe() is None, "MOGA still references a gradient the caller freed"


def test_loading_a_state_dict_replaces_the_momentum_the_step_uses():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(5, 6))
    opt = MOGA([p], lr=0.02, momentum=0.5)
    p.grad = torch.randn_like(p)
    opt.step()
    saved = {k: v for k, v in opt.state_dict().items()}
    saved["state"] = {0: {"momentum_buffer": torch.full((5, 6), 2.0), "step": 1}}
    opt.load_state_dict(saved)
    w0, g = p.detach().double().clone(), torch.randn(5, 6)
    p.grad = g.clone()
    opt.step()
    want, _ = reference_step(w0, g.double(), torch.full((5, 6), 2.0, dtype=torch.float64), "hidden",
                             lr=0.02, momentum=0.5)
    assert (p.detach().double() - want).abs().max().item() <= 1e-6 * want.abs().max().item()


def test_the_optimizer_steps_through_the_public_functional_moga(monkeypatch):
    # One step path: MOGA.step calls functional.moga (the function users call) with its cached
    # program, the same one every step (no per-step rebuild). Fails on a step that runs its own path.
    from moga_dist.core import functional, optimizer

    calls = []

    def spy(pieces, **kwargs):
        calls.append((pieces, kwargs["program"]))
        return functional.moga(pieces, **kwargs)

    monkeypatch.setattr(optimizer, "moga", spy)
    p = torch.nn.Parameter(torch.randn(6, 5))
    opt = MOGA([{"params": [p], "role": "hidden"}], lr=0.02)
    for _ in range(3):
        p.grad = torch.randn(6, 5)
        opt.step()
    assert len(calls) == 3
    assert all(program is opt.last_program and pieces is program.pieces for pieces, program in calls)
