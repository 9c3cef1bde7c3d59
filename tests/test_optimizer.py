"""MOGA on one process against the float64 reference, for every role and variant."""
import copy
import io

import pytest
import torch

from moga_dist import MOGA, NonFiniteGradientError, RowBlocks, ShardLayout
from moga_dist.core.reference import reference_step

STEPS = 4


def _run(shapes_roles, hparams, fused, dtype=torch.float32, zero_rows=False, layouts=None, seed=0):
    """k MOGA steps on fresh tensors; returns (final params, float64 reference params)."""
    gen = torch.Generator().manual_seed(seed)
    inits = [torch.randn(s, generator=gen) for s, _ in shapes_roles]
    grads = [[torch.randn(s, generator=gen) for s, _ in shapes_roles] for _ in range(STEPS)]
    if zero_rows:
        for step in grads:
            for g in step:
                if g.ndim == 2:
                    g[1].zero_()          # a whole row without gradient: zero update, never NaN
                    g[:, 2].zero_()
    params = [torch.nn.Parameter(x.to(dtype, copy=True)) for x in inits]
    groups = [{"params": [p], "role": role, "param_names": [f"p{i}"]}
              for i, (p, (_, role)) in enumerate(zip(params, shapes_roles))]
    backend = fused if isinstance(fused, str) else ("auto" if fused else "torch")
    opt = MOGA(groups, backend=backend, **hparams,
               layouts={params[i]: lay for i, lay in (layouts or {}).items()})
    ref = [(x.double(), torch.zeros_like(x, dtype=torch.float64)) for x in inits]
    for step in grads:
        for p, g in zip(params, step):
            p.grad = g.to(dtype)
        opt.step()
        new_ref = []
        for (w, m), g, (_, role), i in zip(ref, step, shapes_roles, range(len(ref))):
            blocks = (layouts or {}).get(i)
            new_ref.append(reference_step(w, g.to(dtype).double(), m, role,
                                          row_blocks=blocks.row_blocks if blocks else None, **hparams))
        # The float64 oracle rounds its weights like the parameter dtype (bf16 runs).
        ref = [(w.to(dtype).double(), m) for w, m in new_ref]
    return [p.detach() for p in params], [w for w, _ in ref], [x.double() for x in inits]


def _assert_close(got, want, init, rtol_update):
    """Compare the accumulated *updates* (W_k - W_0), so a wrong scale or norm shows up at O(1);
    the fp32 weights themselves round by ~1 ulp of |W| per step, which is allowed on top."""
    for g, w, x in zip(got, want, init):
        du_got, du_want = g.double() - x, w - x
        err = (du_got - du_want).abs().max().item()
        ulp_budget = STEPS * 2 * torch.finfo(torch.float32).eps * w.abs().max().item()
        assert err <= rtol_update * du_want.abs().max().item() + ulp_budget, (err, du_want.abs().max().item())


SHAPES = [((37, 23), "hidden"), ((11, 40), "hidden"), ((50, 16), "embedding"), ((29, 16), "head"),
          ((16,), "vector"), ((5, 3, 2), "hidden")]

CASES = {
    "row_p2": dict(lr=0.02, norm="row"),
    "col_q2": dict(lr=0.02, norm="col"),
    "row_p3_wd": dict(lr=0.02, norm="row", p=3.0, weight_decay=0.3),
    "row_p1.5": dict(lr=0.01, norm="row", p=1.5),
    "col_q3": dict(lr=0.01, norm="col", q=3.0),
    "lookahead": dict(lr=0.02, lookahead=0.9, momentum=0.8),
    "head_width_scale": dict(lr=0.02, head_width_scale=True, base_width=8, head_mult=2.0,
                             embedding_mult=0.5, vector_mult=3.0, hidden_mult=5.0),
    "no_momentum_no_decay": dict(lr=0.05, momentum=0.0, weight_decay=0.0),
}


@pytest.mark.parametrize("fused", [True, False, "triton"], ids=["fused", "loop", "triton"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_float64_reference(case, fused):
    got, want, init = _run(SHAPES, CASES[case], fused)
    _assert_close(got, want, init, rtol_update=2e-5)


@pytest.mark.parametrize("norm", ["row", "col"])
def test_zero_rows_and_columns_give_zero_update_not_nan(norm):
    got, want, init = _run(SHAPES[:2], dict(lr=0.02, norm=norm, weight_decay=0.0), True, zero_rows=True)
    for g in got:
        assert torch.isfinite(g).all()
    _assert_close(got, want, init, rtol_update=2e-5)
    if norm == "row":   # the zeroed row saw no gradient ever: untouched
        assert torch.equal(got[0][1].double(), init[0][1])


@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_column_variant_normalizes_each_fused_block_with_its_own_d_out(backend):
    qkv = RowBlocks.qkv(num_query_groups=2, heads_per_group=3, head_dim=4)  # 2*(3+2)*4 = 40 rows
    gate_up = RowBlocks.fused(6, 6)
    shapes = [((40, 12), "hidden"), ((12, 9), "hidden")]
    layouts = {0: ShardLayout((40, 12), row_blocks=qkv), 1: ShardLayout((12, 9), row_blocks=gate_up)}
    got, want, init = _run(shapes, dict(lr=0.02, norm="col"), backend, layouts=layouts)
    _assert_close(got, want, init, rtol_update=2e-5)
    # and it differs from treating the fused weight as one block
    plain, _, _ = _run(shapes, dict(lr=0.02, norm="col"), True)
    assert (plain[0] - got[0]).abs().max() > 1e-4


@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_bf16_params_keep_fp32_momentum(backend):
    # Stated tolerance: the oracle rounds to bf16 after each step as the parameter does; the two
    # may land on different sides of a rounding boundary once, and that one-ulp gap carries on,
    # so each element agrees to two bf16 ulps (2^-6 relative) of the largest magnitude it can
    # have passed through: max(|W_0|, |W_k|) + k*lr (a sign update moves it by lr per step).
    got, want, init = _run(SHAPES, dict(lr=0.02), backend, dtype=torch.bfloat16)
    for g, w, x in zip(got, want, init):
        assert g.dtype == torch.bfloat16
        assert ((g.double() - w).abs() <= 2 ** -6 * (torch.maximum(w.abs(), x.abs()) + STEPS * 0.02)).all()
    p = torch.nn.Parameter(torch.ones(4, 4, dtype=torch.bfloat16))
    opt = MOGA([p])
    p.grad = torch.full_like(p, 1e-3)
    opt.step()
    assert opt.state[p]["momentum_buffer"].dtype == torch.float32
    assert opt.state[p]["momentum_buffer"][0, 0].item() == pytest.approx(0.05 * 1e-3 * (1 + 2 ** -10), rel=2e-3)


def test_fused_kernel_equals_plain_loop_path():
    a, _, _ = _run(SHAPES, dict(lr=0.02), fused=True)
    b, _, _ = _run(SHAPES, dict(lr=0.02), fused=False)
    for x, y in zip(a, b):
        assert (x - y).abs().max().item() <= 1e-6 * y.abs().max().item()


def _model_and_opt(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Embedding(20, 8), torch.nn.Linear(8, 16), torch.nn.ReLU(),
                                torch.nn.Linear(16, 20))
    from moga_dist import param_groups
    return model, MOGA(param_groups(model, head="3"), lr=0.02)


def _train(model, opt, steps, seed):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randint(0, 20, (4, 5), generator=gen)
        loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), x.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_state_dict_resume_is_bit_exact():
    model, opt = _model_and_opt()
    _train(model, opt, 3, seed=1)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    _train(model, opt, 3, seed=2)
    straight = [p.detach().clone() for p in model.parameters()]

    model2, opt2 = _model_and_opt(seed=5)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    model2.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])
    _train(model2, opt2, 3, seed=2)
    for a, b in zip(straight, model2.parameters()):
        assert torch.equal(a, b)
    assert all(s["momentum_buffer"].dtype == torch.float32 for s in opt2.state.values())


def test_load_takes_the_given_momentum_and_frees_the_old_one_at_once():
    """A resume holds one momentum (4 B x parameters / DP), not two: the loaded fp32 tensors become
    the state without a copy (as torch.optim's load does; DCP loads in place into them), and the
    built step program lets the previous momenta go at the load, not at the next step's rebuild.
    Measured at 349M parameters with FSDP2: the resumed step's peak was one momentum higher."""
    import gc
    import weakref

    model, opt = _model_and_opt()
    _train(model, opt, 2, seed=1)
    old = [weakref.ref(s["momentum_buffer"]) for s in opt.state.values()]
    sd = copy.deepcopy(opt.state_dict())
    opt.load_state_dict(sd)
    gc.collect()
    assert all(r() is None for r in old), "the previous momentum is still referenced after the load"
    given = {id(s["momentum_buffer"]) for s in sd["state"].values()}
    assert {id(s["momentum_buffer"]) for s in opt.state.values()} == given
    _train(model, opt, 1, seed=2)           # and the loaded state steps


def test_load_refuses_a_checkpoint_from_another_layout():
    # A checkpoint whose recorded layout says this [4, 6] tensor was half of an [8, 6] weight.
    sd = MOGA([torch.nn.Parameter(torch.zeros(4, 6))]).state_dict()
    sd["layouts"][0]["global_shape"] = [8, 6]
    with pytest.raises(ValueError, match="saved with layout"):
        MOGA([torch.nn.Parameter(torch.zeros(4, 6))]).load_state_dict(sd)


@pytest.mark.parametrize("kwargs,needle", [
    (dict(lr=-1.0), "lr=-1.0"), (dict(momentum=1.0), "momentum=1.0"), (dict(norm="diag"), "norm='diag'"),
    (dict(p=0.5), "p=0.5"), (dict(q=1.0), "q=1.0"), (dict(eps=0.0), "eps=0.0"),
    (dict(lookahead=1.5), "lookahead=1.5"), (dict(weight_decay=-0.1), "weight_decay=-0.1"),
    (dict(hidden_mult=-1.0), "hidden_mult=-1.0"),
])
def test_invalid_hyperparameters_name_the_value(kwargs, needle):
    with pytest.raises(ValueError, match=needle.replace("(", r"\(").replace(".", r"\.")):
        MOGA([torch.nn.Parameter(torch.zeros(2, 2))], **kwargs)


def test_unknown_role_is_refused():
    with pytest.raises(ValueError, match="role='attention'"):
        MOGA([{"params": [torch.nn.Parameter(torch.zeros(2, 2))], "role": "attention"}])


def test_hidden_role_on_a_vector_is_refused_at_step():
    p = torch.nn.Parameter(torch.zeros(3))
    opt = MOGA([{"params": [p], "role": "hidden", "param_names": ["bias"]}])
    p.grad = torch.ones(3)
    with pytest.raises(ValueError, match="'bias' has role 'hidden'"):
        opt.step()


def test_non_finite_gradient_is_refused_and_the_step_undone():
    model, opt = _model_and_opt()
    _train(model, opt, 2, seed=1)
    before = copy.deepcopy(model.state_dict())
    momenta = {k: v["momentum_buffer"].clone() for k, v in opt.state.items()}
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    model[1].weight.grad[0, 0] = float("nan")
    with pytest.raises(NonFiniteGradientError, match="'1.weight'"):
        opt.step()
    # One-pass kernels write rows as they go; a refused step is inverted exactly up to rounding,
    # and the row holding the NaN is never written.
    for k, v in model.state_dict().items():
        assert torch.allclose(v, before[k], rtol=1e-6, atol=1e-7), k
    assert torch.equal(model[1].weight[0], before["1.weight"][0])
    assert all(opt.state[p]["step"] == 2 for p in model.parameters())
    for p, m in momenta.items():
        restored = opt.state[p]["momentum_buffer"]
        assert torch.allclose(restored, m, atol=1e-6) or p is model[1].weight
    assert torch.allclose(opt.state[model[1].weight]["momentum_buffer"].flatten()[1:],
                          momenta[model[1].weight].flatten()[1:], atol=1e-6)
