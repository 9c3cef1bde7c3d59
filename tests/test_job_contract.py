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


# ----- the one table of MOGA's hyper-parameters ----------------------------------------------
import dataclasses  # noqa: E402
import re  # noqa: E402

from moga_dist import MOGA  # noqa: E402
from moga_dist.core import reference  # noqa: E402
from moga_dist.core.hparams import BY_NAME, DEFAULTS, HPARAMS  # noqa: E402

PACKAGE = TRAIN.parent


def test_moga_signature_spells_the_table_in_its_order_with_its_defaults():
    params = [p for p in inspect.signature(MOGA.__init__).parameters.values()
              if p.kind is p.POSITIONAL_OR_KEYWORD and p.name not in ("self", "params")]
    assert [(p.name, p.default) for p in params] == [(h.name, h.default) for h in HPARAMS]


def test_every_other_spelling_is_derived_from_the_table():
    from moga_dist.engines.megatron_lm import FLAGS
    from moga_dist.sweep.runs import MOGA_SETTINGS, RunSpec
    from moga_dist.train.config import LR_PROVENANCE, MOGAConfig

    assert reference.DEFAULTS == DEFAULTS
    moga = [f for f in dataclasses.fields(MOGAConfig) if f.name not in LR_PROVENANCE]
    assert [(f.name, f.type, f.default) for f in moga] == [(h.name, h.annotation, h.default) for h in HPARAMS]
    assert [(f.setting, f.type, f.help) for f in FLAGS] == [(h.name, h.type, h.help) for h in HPARAMS
                                                            if h.name not in ("lr", "weight_decay")]
    spec = {f.name: f for f in dataclasses.fields(RunSpec)}
    for name in MOGA_SETTINGS:
        assert spec[name].type == BY_NAME[name].annotation, name
        # The sweep's own choices: lr is given per cell, hidden_mult is 5.0 (its results' keys say so).
        want = {"lr": dataclasses.MISSING, "hidden_mult": 5.0}.get(name, BY_NAME[name].default)
        assert spec[name].default == want, name


def _literal_settings(text: str) -> set[str]:
    """Table names given a literal value in `text` (`name: type = 1.0`, `name=1.0`, `"name": 1.0`)."""
    names = "|".join(h.name for h in HPARAMS)
    literal = r"""(?:-?\d[\d.e+-]*|None|True|False|"[^"\n]*"|'[^'\n]*')"""
    pattern = rf"""(?<![\w.])["']?({names})["']?\s*(?::\s*[\w\[\]|. ]+)?\s*[=:]\s*{literal}\s*[,)\n]"""
    return set(re.findall(pattern, text))


def test_no_module_spells_out_a_sixth_copy_of_the_hyper_parameters():
    # A copy shows as a file giving literal values to several of MOGA's settings; the table and
    # MOGA's explicit signature (held to the table above) are the only ones allowed.
    allowed = {PACKAGE / "core" / "hparams.py", PACKAGE / "core" / "optimizer.py"}
    copies = {str(path.relative_to(PACKAGE)): sorted(found) for path in sorted(PACKAGE.rglob("*.py"))
              if path not in allowed and len(found := _literal_settings(path.read_text())) >= 4}
    assert not copies, copies
    old_reference = 'DEFAULTS = dict(lr=1e-2, momentum=0.95, weight_decay=0.1, norm="row", p=2.0)\n'
    assert len(_literal_settings(old_reference)) == 5       # the detector sees the copies that were removed
    assert len(_literal_settings("    hidden_mult: float = 20.0\n    eps: float = 1e-8\n")) == 2


def test_bad_moga_settings_in_a_preset_are_refused_before_the_engine_starts():
    from moga_dist.train.config import load

    with pytest.raises(ValueError, match=r"\[optimizer.moga\]: momentum=1.5 is invalid; allowed: 0 <= momentum < 1"):
        load(None, ["optimizer.moga.momentum=1.5"])
    with pytest.raises(ValueError, match=r"\[optimizer.moga\]: norm='rows' is invalid; allowed: \['row', 'col'\]"):
        load(None, ["optimizer.moga.norm='rows'"])
    load(None, ["optimizer.name='adamw'", "optimizer.moga.momentum=1.5"])   # the baseline does not use them


# ----- parallel.distributed_optimizer: Megatron's distributed optimizer, its own knob -----------
def test_megatron_presets_name_the_distributed_optimizer_and_its_flag_follows():
    from moga_dist.train.config import load
    from moga_dist.train.engine_config import megatron_args

    for name in ("llama_13b", "llama_70b"):
        cfg = load(PACKAGE.parent / "configs" / f"{name}.toml")
        assert cfg.parallel.distributed_optimizer and "--use-distributed-optimizer" in megatron_args(cfg)
        replicated = dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, distributed_optimizer=False))
        assert "--use-distributed-optimizer" not in megatron_args(replicated)


@pytest.mark.parametrize("knob,kind", [(True, "distributed optimizer"), (False, "replicated optimizer")])
def test_the_megatron_backend_reads_the_knob_not_the_zero_stage(knob, kind):
    from moga_dist.train.config import load

    cfg = load(None, ["parallel.engine='megatron'", f"parallel.distributed_optimizer={str(knob).lower()}"])
    backend = object.__new__(backend_megatron.MegatronBackend)
    backend.cfg, backend.tp, backend.pp, backend.dp_world = cfg, 1, 1, 2
    assert backend.layout_meta() == {"engine": "megatron", "distributed_optimizer": knob}
    assert backend.describe() == f"Megatron TP1 x DP2, {kind}"


@pytest.mark.parametrize("sets,needle", [
    (["parallel.distributed_optimizer=true"], "parallel.distributed_optimizer=true with parallel.engine='deepspeed'"),
    (["parallel.engine='megatron'", "engine.zero_stage=1"],
     "Megatron's distributed optimizer is parallel.distributed_optimizer=true"),
    (["parallel.engine='megatron'", "parallel.distributed_optimizer=1"],
     "parallel.distributed_optimizer=1: expected true/false"),
], ids=["deepspeed", "old-spelling", "not-a-bool"])
def test_bad_distributed_optimizer_settings_are_one_line_exit_2(sets, needle, monkeypatch, capsys, tmp_path):
    from moga_dist.train import __main__ as cli

    def no_engine(cfg):
        raise AssertionError("the engine was built before the config was checked")

    monkeypatch.setattr(loop, "make_backend", no_engine)
    code = cli.main([a for s in sets for a in ("--set", s)] + ["--set", f"output_dir='{tmp_path}'"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and needle in err[0], err
