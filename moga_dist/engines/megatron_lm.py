"""Megatron-LM's own training (`pretrain_gpt.py`, megatron.training) with `--optimizer moga`.

    python -m moga_dist.engines.megatron_lm pretrain_gpt.py --optimizer moga --moga-norm row \\
        --moga-hidden-mult 10 ... <the usual Megatron-LM flags>

Megatron-LM hard-codes the choices of `--optimizer` and builds its optimizer with
`megatron.training.training.get_megatron_optimizer`. `install()` adds `moga` and MOGA's own
`--moga-*` flags to its argument parser, validates a MOGA run as Megatron validates Adam (so
`--use-distributed-optimizer` keeps Megatron's regular DistributedOptimizer, whose checkpoints
moga_dist.engines.megatron_distopt makes MOGA's), and has Megatron-LM build MOGA through
moga_dist.engines.megatron.get_megatron_optimizer. lr, weight decay, their schedules and gradient
clipping stay Megatron's flags. The `--moga-*` flags are the one spelling of MOGA's settings:
moga_dist.train.engine_config generates them from a preset with `to_flags`.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import runpy
import sys
from collections.abc import Mapping

from ..core.hparams import HPARAMS


@dataclasses.dataclass(frozen=True)
class Flag:
    """One MOGA keyword argument as a Megatron-LM flag (`--moga-<setting with dashes>`)."""
    setting: str
    type: type
    help: str

    @property
    def name(self) -> str:
        return "--moga-" + self.setting.replace("_", "-")


# MOGA's keyword arguments other than lr and weight_decay (Megatron's --lr / --weight-decay), from
# the one table of MOGA's hyper-parameters.
FLAGS = tuple(Flag(h.name, h.type, h.help) for h in HPARAMS if h.name not in ("lr", "weight_decay"))
_BY_SETTING = {f.setting: f for f in FLAGS}


def to_flags(settings: Mapping) -> list[str]:
    """`--moga-*` flags for MOGA keyword arguments {setting: value} (None values are left out:
    MOGA's default applies); unknown settings are refused."""
    unknown = sorted(set(settings) - set(_BY_SETTING))
    if unknown:
        raise ValueError(f"MOGA settings {unknown} have no Megatron-LM flag; allowed: {sorted(_BY_SETTING)} "
                         "(lr and weight_decay are Megatron's --lr and --weight-decay)")
    out = []
    for setting, value in settings.items():
        flag = _BY_SETTING[setting]
        if value is None or (flag.type is bool and not value):
            continue
        out += [flag.name] if flag.type is bool else [flag.name, str(value)]
    return out


def add_moga_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """extra_args_provider for Megatron-LM: `moga` joins the choices of its `--optimizer` and the
    `--moga-*` flags are added (their default None means MOGA's own default)."""
    optimizer = next((a for a in parser._actions if "--optimizer" in a.option_strings), None)
    if optimizer is None:
        raise ValueError("this parser has no --optimizer flag: add_moga_args extends Megatron-LM's argument parser")
    if optimizer.choices is not None and "moga" not in optimizer.choices:
        optimizer.choices = [*optimizer.choices, "moga"]
    group = parser.add_argument_group("MOGA", "settings of --optimizer moga (moga_dist)")
    for flag in FLAGS:
        if flag.type is bool:
            group.add_argument(flag.name, action="store_true", default=None, help=flag.help)
        elif flag.setting == "norm":
            group.add_argument(flag.name, choices=["row", "col"], default=None, help=flag.help)
        else:
            group.add_argument(flag.name, type=flag.type, default=None, help=flag.help)
    return parser


def settings_from_args(args: argparse.Namespace) -> dict:
    """MOGA keyword arguments given on the command line ({} when none were)."""
    given = {f.setting: getattr(args, "moga_" + f.setting, None) for f in FLAGS}
    return {k: v for k, v in given.items() if v is not None}


def check_args(args: argparse.Namespace) -> None:
    """Megatron-LM settings that would not run MOGA exactly are refused by name."""
    if getattr(args, "optimizer_cpu_offload", False):
        raise ValueError("--optimizer-cpu-offload builds Megatron's CPU Adam; it is not supported with --optimizer moga")
    if getattr(args, "use_precision_aware_optimizer", False):
        raise ValueError("--use-precision-aware-optimizer is for Adam's scaled state; not supported with --optimizer moga")
    if getattr(args, "use_megatron_fsdp", False) or getattr(args, "use_torch_fsdp2", False):
        raise ValueError("Megatron FSDP / torch FSDP2 are not supported with --optimizer moga; use "
                         "--use-distributed-optimizer")


def get_megatron_optimizer(config, model_chunks, *args, **kwargs):
    """What Megatron-LM's training calls: MOGA (settings from the parsed `--moga-*` flags) when
    config.optimizer == 'moga', Megatron's own optimizers otherwise."""
    from megatron.training.global_vars import get_args

    from .megatron import get_megatron_optimizer as build

    moga = settings_from_args(get_args()) if config.optimizer == "moga" else None
    return build(config, model_chunks, *args, moga=moga, **kwargs)


def install() -> None:
    """Patch Megatron-LM (megatron.training of megatron-core >= 0.17.1 wheels, or a Megatron-LM
    checkout) in place: its parse_args adds the MOGA flags, validate_args checks a MOGA run as Adam's,
    its training builds the optimizer with this module's get_megatron_optimizer. Call before
    Megatron-LM parses arguments; calling it twice is a no-op."""
    import importlib

    import megatron.core
    try:
        modules = {name: importlib.import_module(f"megatron.training.{name}")
                   for name in ("arguments", "training", "initialize")}
    except ImportError as exc:
        raise RuntimeError(f"--optimizer moga in Megatron-LM needs its megatron.training package (megatron-core "
                           f"wheels ship it from 0.17.1 on, or put a Megatron-LM checkout on PYTHONPATH); installed megatron-core "
                           f"{megatron.core.__version__}: {exc}") from exc
    arguments, training = modules["arguments"], modules["training"]
    for module, name in ((arguments, "parse_args"), (arguments, "validate_args"), (training, "get_megatron_optimizer")):
        if not callable(getattr(module, name, None)):
            raise RuntimeError(f"{module.__name__}.{name} not found (megatron-core {megatron.core.__version__}): "
                               "this Megatron-LM is not one moga_dist.engines.megatron_lm knows")
    if getattr(arguments.parse_args, "_moga", False):
        return
    original_parse, original_validate = arguments.parse_args, arguments.validate_args

    def parse_args(extra_args_provider=None, ignore_unknown_args=False):
        def provider(parser):
            return add_moga_args(parser if extra_args_provider is None else extra_args_provider(parser))
        return original_parse(provider, ignore_unknown_args)

    def validate_args(args, defaults={}):  # noqa: B006 -- Megatron-LM's own signature
        if args.optimizer != "moga":
            return original_validate(args, defaults)
        check_args(args)
        # Megatron-LM turns --use-distributed-optimizer into its layer-wise optimizer for any
        # optimizer but Adam/SGD; MOGA runs inside the regular one, as Adam does.
        args.optimizer = "adam"
        try:
            return original_validate(args, defaults)
        finally:
            args.optimizer = "moga"

    parse_args._moga = True
    replacements = [(original_parse, parse_args), (original_validate, validate_args),
                    (training.get_megatron_optimizer, get_megatron_optimizer)]
    # Megatron-LM modules import these by name (`from megatron.training.arguments import parse_args`).
    for name, module in list(sys.modules.items()):
        if not name.startswith("megatron.training") or module is None:
            continue
        for attr, value in list(vars(module).items()):
            for original, replacement in replacements:
                if value is original:
                    setattr(module, attr, replacement)


def main(argv: list[str] | None = None) -> None:
    """`python -m moga_dist.engines.megatron_lm SCRIPT [ARGS...]`: run a Megatron-LM training
    script (e.g. pretrain_gpt.py) as __main__ with MOGA installed."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0].startswith("-") or not os.path.isfile(argv[0]):
        got = f"no such file {argv[0]!r}; " if argv and not argv[0].startswith("-") else ""
        print(f"moga_dist.engines.megatron_lm: error: {got}usage: python -m moga_dist.engines.megatron_lm "
              "SCRIPT.py [Megatron-LM flags] --optimizer moga [--moga-* flags]", file=sys.stderr)
        raise SystemExit(2)
    try:
        install()
    except RuntimeError as exc:
        print(f"moga_dist.engines.megatron_lm: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    sys.argv = list(argv)
    sys.path.insert(0, os.path.dirname(os.path.abspath(argv[0])))     # the script's own helper modules
    runpy.run_path(argv[0], run_name="__main__")


if __name__ == "__main__":
    main()
