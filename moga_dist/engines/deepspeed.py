"""DeepSpeed adapter: `deepspeed.initialize(optimizer=MOGA(...))` is exact MOGA at ZeRO stages 0-3.

`install` wraps DeepSpeedEngine._configure_optimizer, the one place every route into DeepSpeed
passes (own script, Hugging Face Trainer, Accelerate): settings that cannot be exact are refused
there, naming the config key, and MOGA is told which tensors of the wrapper DeepSpeed built stand
for which parameters (deepspeed_wrappers.py, deepspeed_zero3.py).

How the patch gets installed (never by `import moga_dist` alone):
  - importing this module (moga_dist.engines.deepspeed) installs it;
  - constructing any MOGA installs it (moga_dist/__init__.py registers `install` with the core's
    on-construct hooks), so `deepspeed.initialize(optimizer=MOGA(...))`, the HF Trainer and
    Accelerate need nothing else;
  - DeepSpeed's config-name path (`"optimizer": {"type": "MOGA"}` with no MOGA object built first)
    needs this module imported, or moga_dist.engines.deepspeed.initialize.
If DeepSpeed is already imported, `install` patches DeepSpeedEngine at once; otherwise it adds a
one-shot import hook to sys.meta_path that patches deepspeed.runtime.engine when it is imported.
"""
from __future__ import annotations

import copy
import functools
import gc
import importlib.abc
import importlib.util
import inspect
import json
import sys
from collections.abc import Mapping
from pathlib import Path

import torch

from ..core.optimizer import MOGA
from ..core.param_groups import param_groups
from .deepspeed_wrappers import adopt, describe, merge_groups
from .deepspeed_zero3 import adopt_stage3, check_stage3

SUPPORTED_STAGES = (0, 1, 2, 3)
_ENGINE_MODULE = "deepspeed.runtime.engine"


def moga_kwargs() -> list[str]:
    """Keyword arguments MOGA accepts from a DeepSpeed config's optimizer.params."""
    return [n for n, p in inspect.signature(MOGA.__init__).parameters.items()
            if n not in ("self", "params", "layouts", "process_groups") and p.kind != p.VAR_KEYWORD]


def _load_config(config) -> dict:
    if config is None:
        raise ValueError("moga_dist.engines.deepspeed.initialize needs config= (a dict or a JSON file path)")
    if isinstance(config, str | Path):
        with open(config) as fh:
            return json.load(fh)
    if isinstance(config, Mapping):
        return copy.deepcopy(dict(config))
    raise ValueError(f"config must be a dict or a path, got {type(config).__name__}")


def build_optimizer(model: torch.nn.Module, block: Mapping) -> MOGA:
    """MOGA from a DeepSpeed config's {"type": "MOGA", "params": {...}} block, roles by param_groups."""
    if str(block.get("type", "")).lower() != "moga":
        raise ValueError(f"optimizer.type={block.get('type')!r}: moga_dist.engines.deepspeed.initialize builds only "
                         "'MOGA'; pass another optimizer to deepspeed.initialize directly")
    params = dict(block.get("params", {}))
    unknown = sorted(set(params) - set(moga_kwargs()))
    if unknown:
        raise ValueError(f"unknown MOGA setting(s) in optimizer.params: {unknown}; allowed: {moga_kwargs()}")
    return MOGA(param_groups(model), **params)


def initialize(*, model: torch.nn.Module, optimizer: MOGA | None = None, config=None, **kwargs):
    """Same arguments and return value as `deepspeed.initialize` (engine, optimizer, dataloader,
    lr_scheduler); MOGA comes from `optimizer=` or from config["optimizer"] = {"type": "MOGA", ...}.

    Kept for existing jobs: plain `deepspeed.initialize` is exact too once moga_dist is imported
    (see `install`). This wrapper adds only the refusal of a MOGA given both ways."""
    import deepspeed

    install()
    cfg = _load_config(config)
    block = cfg.pop("optimizer", None)
    if optimizer is None:
        if block is None:
            raise ValueError("no MOGA given: pass optimizer=MOGA(...) or config['optimizer'] = "
                             "{'type': 'MOGA', 'params': {...}}")
        optimizer = build_optimizer(model, block)
    elif block is not None:
        raise ValueError("both optimizer= and config['optimizer'] were given; DeepSpeed would silently "
                         "ignore the config block. Keep one")
    if not isinstance(optimizer, MOGA):
        raise ValueError(f"optimizer must be a moga_dist.MOGA, got {type(optimizer).__name__}")
    return deepspeed.initialize(model=model, optimizer=optimizer, config=cfg, **kwargs)


def install() -> None:
    """Make `deepspeed.initialize` put MOGA exactly inside whatever DeepSpeed builds around it.

    Called when this module is imported and when a MOGA is constructed (see the module docstring),
    so a user's own `deepspeed.initialize(optimizer=MOGA(...))`, the Hugging Face Trainer and
    Accelerate need nothing else; idempotent. Does not import DeepSpeed: if it is not imported
    yet, the patch is applied when it is."""
    module = sys.modules.get(_ENGINE_MODULE)
    if module is not None:
        _patch(module)
    elif not any(isinstance(f, _PatchWhenImported) for f in sys.meta_path):
        sys.meta_path.insert(0, _PatchWhenImported())


class _PatchWhenImported(importlib.abc.MetaPathFinder):
    """Patches deepspeed.runtime.engine as soon as it has been executed (a post-import hook)."""

    def find_spec(self, fullname, path, target=None):
        if fullname != _ENGINE_MODULE:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        execute = spec.loader.exec_module

        def execute_and_patch(module):
            execute(module)
            _patch(module)

        spec.loader.exec_module = execute_and_patch
        return spec


def _patch(engine_module) -> None:
    engine_cls = engine_module.DeepSpeedEngine
    if getattr(engine_cls, "_moga_patched", False):
        return
    for name in ("_configure_optimizer", "_is_supported_optimizer"):
        if not callable(getattr(engine_cls, name, None)):
            raise ImportError(f"moga_dist cannot put MOGA inside this DeepSpeed ({engine_module.__file__}): "
                              f"DeepSpeedEngine.{name} is missing; use deepspeed==0.19.8 (pyproject's deepspeed extra)")
    from deepspeed.runtime.zero import utils as zero_utils

    # Exact at ZeRO 1/2 through this adapter, so DeepSpeed need not ask for zero_allow_untested_optimizer.
    if MOGA not in zero_utils.ZERO_SUPPORTED_OPTIMIZERS:
        zero_utils.ZERO_SUPPORTED_OPTIMIZERS.append(MOGA)
    configure, supported = engine_cls._configure_optimizer, engine_cls._is_supported_optimizer

    @functools.wraps(configure)
    def _configure_optimizer(engine, client_optimizer, model_parameters):
        return configure_optimizer(engine, configure, client_optimizer, model_parameters)

    @functools.wraps(supported)
    def _is_supported_optimizer(engine, optimizer_name):
        return str(optimizer_name).lower() == "moga" or supported(engine, optimizer_name)

    engine_cls._configure_optimizer = _configure_optimizer
    engine_cls._is_supported_optimizer = _is_supported_optimizer
    engine_cls._moga_patched = True


def configure_optimizer(engine, configure, client_optimizer, model_parameters) -> None:
    """DeepSpeedEngine._configure_optimizer with MOGA mapped into the wrapper DeepSpeed builds.

    Everything that cannot be exact is refused here, inside `deepspeed.initialize`, naming the
    config key; a MOGA over this model that DeepSpeed was not given is refused too."""
    if client_optimizer is not None and not isinstance(client_optimizer, torch.optim.Optimizer):
        client_optimizer = client_optimizer(model_parameters)     # DeepSpeed's rule for a callable
    if client_optimizer is None and str(engine.optimizer_name()).lower() == "moga":
        client_optimizer = build_optimizer(engine.module, {"type": "MOGA", "params": engine.optimizer_params() or {}})
    if not isinstance(client_optimizer, MOGA):
        configure(engine, client_optimizer, model_parameters)
        _refuse_bypassed_moga(engine)
        return
    moga = client_optimizer
    check_config(engine)
    specs = describe(moga, engine.module)
    if engine.zero_optimization_stage() >= 1:
        merge_groups(moga, specs)
    # DeepSpeed's wrappers may call step() once with zero gradients while setting up; with
    # decoupled weight decay that would move the weights and count a step.
    with moga.suspended():
        configure(engine, moga, model_parameters)
    (adopt_stage3 if engine.zero_optimization_stage() == 3 else adopt)(engine.optimizer, moga, specs)


def check_config(engine) -> None:
    """Refuse, naming the config key, every DeepSpeed setting under which MOGA is not exact."""
    stage = engine.zero_optimization_stage()
    if stage not in SUPPORTED_STAGES:
        raise ValueError(f"zero_optimization.stage={stage}: MOGA through DeepSpeed supports ZeRO stages "
                         f"{SUPPORTED_STAGES}")
    if stage == 3:
        check_stage3(engine)
    refused = [("fp16.enabled", engine.fp16_enabled(), "use bf16 (fp16 loss scaling is not verified with MOGA)"),
               ("zero_optimization.offload_optimizer", engine.zero_offload_optimizer() is not None
                and str(getattr(engine.zero_offload_optimizer(), "device", "none")).split(".")[-1] != "none",
                "MOGA steps on the device; remove the offload block"),
               ("zero_optimization.zenflow", engine.zenflow_config() is not None, "remove it"),
               ("torch_autocast.enabled", engine.torch_autocast_enabled(), "use bf16.enabled instead"),
               ("bf16.bf16_master_weights_and_grads", engine.bf16_master_weights_and_gradients(),
                "MOGA keeps fp32 master weights; set it to false"),
               ("bf16.bf16_optimizer_states", engine.bf16_optimizer_states(), "set it to false")]
    for key, bad, advice in refused:
        if bad:
            raise ValueError(f"{key}={bad!r} is not supported with MOGA: {advice}")


def _refuse_bypassed_moga(engine) -> None:
    """DeepSpeed built its engine with another optimizer while a MOGA over this model's
    parameters is alive: the silent swap the Trainer's `optimizers=(MOGA(...), None)` causes."""
    if engine.basic_optimizer is None:
        return
    model = {id(p) for p in engine.module.parameters()}
    for obj in gc.get_objects():
        if isinstance(obj, MOGA) and obj is not engine.basic_optimizer \
                and any(id(p) in model for g in obj.param_groups for p in g["params"]):
            raise ValueError(
                f"DeepSpeed is building its engine with {type(engine.basic_optimizer).__name__}, but a MOGA over "
                "this model's parameters exists and was not handed to deepspeed.initialize. The Hugging Face "
                "Trainer discards Trainer(optimizers=(MOGA(...), None)) under DeepSpeed: pass "
                "optimizer_cls_and_kwargs=(MOGA, {...}) or override create_optimizer() instead (docs/deepspeed.md). "
                "If the other optimizer is intended, delete the MOGA first")


def skip_shm_comm_build() -> None:
    """Stop DeepSpeed's CPU accelerator from JIT-building its shared-memory comm op at start-up
    (45-60 s on first use); gloo collectives do not need it. Call before deepspeed.initialize."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


# Importing the DeepSpeed adapter is a first use (the config-name path builds no MOGA before initialize).
install()
