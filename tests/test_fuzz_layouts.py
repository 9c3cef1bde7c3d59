"""The layout fuzzer: hypothesis draws sharded layouts (shapes incl. 1-row, 1-column, odd and
empty; roles; row/col norm; fused row blocks; TP splits along dim 0/1, strided; flat partitions
with random cut points, so ranks hold nothing, only vectors, only ghosts or only row pieces;
TP x flat; worlds 2-4), a dtype (fp32, bf16, float64), a lr schedule and a NaN gradient in one
step; each drawn layout runs on every backend (torch, cpu, triton through its interpreter) and
every rank is checked against float64 MOGA on the gathered tensors (moga_dist.layout_fuzz).

One pool of 4 gloo ranks serves the module (fuzz_pool.py). The default run draws a fixed
(derandomized) set of DEFAULT_EXAMPLES; `-m slow` draws SLOW_EXAMPLES fresh ones. A failure that
hypothesis shrinks goes into layout_fuzz.REGRESSIONS, which runs by default too.
MOGA_FUZZ_REPORT=<file> writes the example count and max error per backend and dtype there;
MOGA_FUZZ_SURVEY=<file> records every example's outcome there instead of failing (how many
examples it takes to meet a bug: the draws are the same as the failing run's up to its first failure).
"""
import dataclasses
import json
import os
from collections import defaultdict

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fuzz_pool import Pool
from moga_dist.core.layout import RowBlocks
from moga_dist.layout_fuzz import REGRESSIONS, Case, ParamSpec, check, tp_local_numel

DEFAULT_EXAMPLES = int(os.environ.get("MOGA_FUZZ_EXAMPLES", "25"))
SLOW_EXAMPLES = 300
MAX_WORLD = 4
BACKENDS = ("torch", "cpu", "triton")
_STATS: dict = defaultdict(lambda: [0, 0.0, 0.0])      # examples, max error, max error beyond 2 ulps


@pytest.fixture(scope="module")
def pool():
    holder = {}

    def get() -> Pool:
        if "pool" not in holder or not holder["pool"].alive:
            holder["pool"] = Pool(MAX_WORLD)
        return holder["pool"]
    yield get
    if "pool" in holder:
        holder["pool"].close()
    report = os.environ.get("MOGA_FUZZ_REPORT")
    if report:
        with open(report, "w") as fh:
            json.dump({k: {"examples": n, "max_err": e, "max_err_beyond_2ulp": b} for k, (n, e, b) in sorted(_STATS.items())},
                      fh, indent=1)


def run(pool, case: Case) -> None:
    survey = os.environ.get("MOGA_FUZZ_SURVEY")
    if survey:
        try:
            outcome = f"ok {check(case, pool().run(case))[0]:.3g}"
        except AssertionError as exc:
            outcome = "FAIL " + str(exc).strip().splitlines()[-1][:300]
        with open(survey, "a") as fh:
            fh.write(f"{outcome}\t{case}\n")
        return
    raw, beyond = check(case, pool().run(case))
    stat = _STATS[f"{case.backend}/{case.dtype}"]
    stat[0] += 1
    stat[1] = max(stat[1], raw)
    stat[2] = max(stat[2], beyond)


def run_every_backend(pool, case: Case) -> None:
    """One drawn layout on each backend (torch, the fused CPU kernels, Triton's interpreter)."""
    for backend in BACKENDS:
        run(pool, dataclasses.replace(case, backend=backend))


@st.composite
def param_spec(draw, tp: int, roles: list[str]) -> ParamSpec:
    role = draw(st.sampled_from(roles))
    # Hypothesis draws the first choices most (and shrinks towards them): lead with non-trivial ones.
    dims = st.sampled_from([3, 5, 1, 2, 4])
    if role == "vector":
        split = tp > 1 and draw(st.booleans())
        n = draw(dims) * (tp if split else 1)
        return ParamSpec((n,), role, 0 if split else None)
    tp_dim = draw(st.sampled_from([None, 0, 1] if role == "hidden" else [None, 0])) if tp > 1 else None
    if tp_dim is None and draw(st.integers(0, 9)) == 0:        # empty: a zero extent
        return ParamSpec(draw(st.sampled_from([(0, 3), (4, 0), (0, 0)])), role)
    stride, blocks = 1, None
    d_in = draw(st.sampled_from([7, 5, 16, 1, 2, 3, 9])) * (tp if tp_dim == 1 else 1)
    kind = draw(st.sampled_from(["plain", "plain", "fused", "qkv"])) if role == "hidden" else "plain"
    if kind == "fused":             # gate|up style: with TP along rows, equal parts and stride
        parts = draw(st.integers(2, 3))
        if tp_dim == 0:
            size = draw(dims) * tp
            stride, blocks = parts, RowBlocks.fused(*[size] * parts)
        else:
            blocks = RowBlocks.fused(*[draw(dims) for _ in range(parts)])
        d_out = blocks.period
    elif kind == "qkv":
        groups = draw(st.integers(1, 2)) * (tp if tp_dim == 0 else 1)
        blocks = RowBlocks.qkv(groups, draw(st.integers(1, 2)), draw(st.integers(1, 2)))
        d_out = blocks.period * blocks.repeats
    else:
        d_out = draw(st.sampled_from([6, 3, 7, 1, 2, 4])) * (tp if tp_dim == 0 else 1)
    return ParamSpec((d_out, d_in), role, tp_dim, stride, blocks)


@st.composite
def cases(draw) -> Case:
    # "rows": every piece is a row piece (hidden or head, row norm), what ranks of a large model's
    # distributed optimizer often hold; "mixed": any roles and norms.
    scenario = draw(st.sampled_from(["rows", "mixed"]))
    world = draw(st.sampled_from([3, 4, 2]))
    tp = draw(st.sampled_from([t for t in (1, 1, 1, 2, 3, 4) if world % t == 0]))
    dp = world // tp
    roles = ["hidden", "head"] if scenario == "rows" else ["hidden", "hidden", "head", "embedding", "vector"]
    params = tuple(draw(st.lists(param_spec(tp, roles), min_size=1, max_size=3)))
    sizes = [tp_local_numel(s, tp) for s in params]
    edges = [sum(sizes[:k]) for k in range(len(sizes) + 1)]
    bounds, mode = None, "params"
    if dp > 1 and (tp == 1 or draw(st.integers(0, 4)) > 0):
        # Distinct interior cut points (every rank holds something), or cut points anywhere and on
        # parameters' edges (ranks holding whole vectors, or nothing).
        if edges[-1] >= dp and draw(st.booleans()):
            cuts = draw(st.lists(st.integers(1, edges[-1] - 1), min_size=dp - 1, max_size=dp - 1, unique=True))
        else:
            cut = st.one_of(st.integers(0, edges[-1]), st.sampled_from(edges))
            cuts = draw(st.lists(cut, min_size=dp - 1, max_size=dp - 1))
        bounds = (0, *sorted(cuts), edges[-1])
        mode = draw(st.sampled_from(["megatron", "zero", "params"]))
    steps = draw(st.integers(2, 4))
    lrs = tuple(draw(st.sampled_from([0.005, 0.01, 0.02, 0.05])) for _ in range(steps))
    nan = None
    sized = [i for i, s in enumerate(params) if 0 not in s.shape]
    if sized and draw(st.booleans()):
        i = draw(st.sampled_from(sized))
        n = 1
        for s in params[i].shape:
            n *= s
        nan = (draw(st.integers(0, steps - 1)), i, draw(st.integers(0, n - 1)))
    norm = "row" if scenario == "rows" else draw(st.sampled_from(["row", "col"]))
    return Case(tp, dp, params, bounds, mode, norm, draw(st.sampled_from(["float32", "bfloat16", "float64", "float32"])),
                "torch", lrs, nan, draw(st.integers(0, 2 ** 16)))


@pytest.mark.distributed
@pytest.mark.parametrize("case", REGRESSIONS, ids=[f"regression{i}" for i in range(len(REGRESSIONS))])
def test_regressions(pool, case):
    """Layouts the fuzzer (or an issue) found wrong once, each a fixed case."""
    run(pool, case)


@pytest.mark.distributed
@settings(max_examples=DEFAULT_EXAMPLES, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(case=cases())
def test_fuzz_layouts(pool, case):
    run_every_backend(pool, case)


@pytest.mark.slow
@pytest.mark.distributed
@settings(max_examples=SLOW_EXAMPLES, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(case=cases())
def test_fuzz_layouts_many(pool, case):
    run_every_backend(pool, case)


@pytest.mark.distributed
def test_bench_gpu_layout_check_runs_on_cpu():
    """`python -m moga_dist.bench gpu` runs the regression list on CUDA; the same code path here on
    CPU (one spawn per world size), so the first GPU run does not meet it untried."""
    from moga_dist.layout_fuzz import run_regressions

    small = Case(1, 2, (ParamSpec((3, 4)), ParamSpec((5,), "vector")), (0, 5, 17), mode="megatron", backend="triton")
    assert run_regressions("cpu", (small,)) <= 1e-4          # two ranks: the path, not the list (above)
