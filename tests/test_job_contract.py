"""The training job's contracts, checked without starting an engine: the Backend protocol both
backends satisfy and the loop keeps to."""
import ast
import inspect
import textwrap
from pathlib import Path

import pytest

from moga_dist.train import backend_deepspeed, backend_megatron, loop
from moga_dist.train.backend import Backend

TRAIN = Path(loop.__file__).parent
MEMBERS = sorted({*Backend.__annotations__,
                  *(n for n, v in vars(Backend).items() if inspect.isfunction(v) and not n.startswith("_"))})


def _assigned_in_init(cls) -> set[str]:
    """Attributes `self.X = ...` (also in tuple assignments) in cls.__init__."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls.__init__)))
    return {n.attr for n in ast.walk(tree)
            if isinstance(n, ast.Attribute) and isinstance(n.ctx, ast.Store)
            and isinstance(n.value, ast.Name) and n.value.id == "self"}


def test_the_protocol_names_the_members_the_loop_used_before():
    assert MEMBERS == sorted(["rank", "world", "dp_world", "on_cpu", "layout_meta", "describe", "train_step",
                              "eval_losses", "lr", "skipped_steps", "state_finite", "save", "load"])


@pytest.mark.parametrize("cls", [backend_deepspeed.DeepSpeedBackend, backend_megatron.MegatronBackend],
                         ids=["deepspeed", "megatron"])
def test_each_backend_has_every_member_of_the_protocol(cls):
    # Built without __init__ (no engine); the data members are those __init__ assigns.
    obj = object.__new__(cls)
    for name in _assigned_in_init(cls):
        if not hasattr(type(obj), name):
            setattr(obj, name, None)
    assert isinstance(obj, Backend), [m for m in MEMBERS if not hasattr(obj, m)]
    for name in MEMBERS:
        if callable(getattr(Backend, name, None)):
            ours = inspect.signature(getattr(cls, name)).parameters
            assert list(ours) == list(inspect.signature(getattr(Backend, name)).parameters), (cls, name)


def test_an_object_missing_a_member_is_not_a_backend():
    class Partial:
        rank = world = dp_world = 1
        on_cpu = True

        def train_step(self, step, accum, data):
            return []
    assert not isinstance(Partial(), Backend)


def test_the_loop_uses_only_the_protocol_members():
    tree = ast.parse((TRAIN / "loop.py").read_text())
    used = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)
            and ((isinstance(n.value, ast.Name) and n.value.id == "backend")
                 or (isinstance(n.value, ast.Attribute) and n.value.attr == "backend"))}
    assert used and used <= set(MEMBERS), used - set(MEMBERS)

