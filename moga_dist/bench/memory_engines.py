"""The memory rehearsal's per-engine workers (python -m moga_dist.bench memory): each runs on one
rank, trains, saves or loads, and records per phase the RSS peak (moga_dist.bench.rss) plus a
census of the tensors alive after the steps, by term (weights, optimizer state, other resident).

Which code each engine runs (PATHS, printed by the bench):
- zero2, zero2_bf16: the training job (moga_dist.train: DeepSpeed backend, loop, checkpoint).
- zero3, zero3_bf16: the training job at engine.zero_stage = 3 (DeepSpeed backend, loop, checkpoint).
- megatron_distopt: the job's Megatron backend, loop and checkpoint (distributed optimizer), on CPU
  through the CUDA-to-CPU shims of tests/megatron_support.py (so it needs a source checkout). The
  job runs MOGA only on Megatron; its AdamW row swaps in megatron-core's own Adam (get_megatron_optimizer
  with optimizer='adam', the same DistributedOptimizer wrapper) and otherwise runs the same code.
- fsdp2: torch's public API with the job's model and data (the job has no FSDP2 backend):
  fully_shard per decoder layer and at the root, MOGA(param_groups(model)) or torch.optim.AdamW,
  torch.distributed.checkpoint save/load of get_state_dict(model, optimizer).
"""
from __future__ import annotations

import dataclasses
import gc
import json
import os
import sys
import warnings
from pathlib import Path

PATHS = {"zero2": "job", "zero2_bf16": "job", "zero3": "job", "zero3_bf16": "job",
         "megatron_distopt": "job on CPU shims (AdamW: megatron-core's Adam in the job's backend)",
         "fsdp2": "torch FSDP2 public API, the job's model and data"}
OVERRIDES = {"zero2": ["engine.zero_stage=2", "engine.bf16=false"],
             "zero2_bf16": ["engine.zero_stage=2", "engine.bf16=true"],
             "zero3": ["engine.zero_stage=3", "engine.bf16=false"],
             "zero3_bf16": ["engine.zero_stage=3", "engine.bf16=true"],
             "megatron_distopt": ["parallel.engine='megatron'", "parallel.distributed_optimizer=true", "engine.bf16=false"],
             "fsdp2": ["engine.zero_stage=2", "engine.bf16=false"]}


def resident(ptr: int, nbytes: int) -> int:
    """Bytes of [ptr, ptr + nbytes) in RAM (mincore): an allocation never written, such as
    DeepSpeed's torch.empty(reduce_bucket_size) bucket of 500M elements, holds no pages."""
    import ctypes

    page = os.sysconf("SC_PAGE_SIZE")
    start = ptr - ptr % page
    pages = (ptr + nbytes - start + page - 1) // page
    vec = (ctypes.c_ubyte * pages)()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mincore(ctypes.c_void_p(start), ctypes.c_size_t(pages * page), vec) != 0:
        return nbytes                    # not a mapping mincore can read: count it whole
    return min(nbytes, sum(v & 1 for v in vec) * page)


def _storage_bytes(tensors, seen: set) -> int:
    """Resident bytes of the distinct storages behind `tensors` not already in `seen` (which it extends)."""
    import torch

    from torch.distributed.tensor import DTensor

    total = 0
    for t in tensors:
        if isinstance(t, DTensor):           # FSDP2's sharded parameters and MOGA's state
            t = t.to_local()
        if not torch.is_tensor(t) or t.device.type != "cpu":
            continue
        try:
            s = t.untyped_storage()
            key = s.data_ptr()
        except (RuntimeError, NotImplementedError):   # freed (FSDP2's unsharded parameters) or no storage
            continue
        if key and key not in seen:
            seen.add(key)
            total += resident(key, s.nbytes())
    return total


def inner_states(opt) -> list:
    """The tensors of the optimizer state (momentum, Adam's moments) inside engine wrappers."""
    import torch

    out, stack, visited = [], [opt], set()
    while stack:
        o = stack.pop()
        if o is None or id(o) in visited:
            continue
        visited.add(id(o))
        if isinstance(o, torch.optim.Optimizer):
            out += [v for st in o.state.values() for v in st.values() if torch.is_tensor(v)]
        stack += [getattr(o, a, None) for a in ("optimizer", "basic_optimizer")]
        stack += list(getattr(o, "chained_optimizers", []) or [])
    return out


def census(model, opt) -> dict:
    """Bytes alive now (distinct CPU storages): the model's weights, the optimizer state, and every
    other tensor Python can reach (fp32 masters, gradient partitions and buffers, buckets, caches)."""
    import torch

    gc.collect()
    seen: set = set()
    params = list(model.parameters())
    weights = _storage_bytes(params + [p.ds_tensor for p in params if hasattr(p, "ds_tensor")], seen)  # ZeRO-3
    states = _storage_bytes(inner_states(opt), seen)
    with warnings.catch_warnings():      # gc finds deprecated tensor subclasses too
        warnings.simplefilter("ignore")
        found = [o for o in gc.get_objects() if isinstance(o, torch.Tensor)]
    other = _storage_bytes(found, seen)
    return {"weights": weights, "optimizer_state": states, "other": other}


def _phases(obj, names, record: dict) -> None:
    """Wrap obj's methods so each call's RSS peak is recorded (max over calls)."""
    from .rss import measure

    for name in names:
        fn = getattr(obj, name)

        def wrapped(*a, _fn=fn, _name=name, **k):
            with measure() as phase:
                out = _fn(*a, **k)
            r = record.setdefault(_name, {"peak": 0, "rise": 0})
            r["peak"], r["rise"] = max(r["peak"], phase.peak), max(r["rise"], phase.rise)
            return out
        setattr(obj, name, wrapped)


def _gather(rank, world, record, out_json) -> None:
    import torch.distributed as dist

    rows = [None] * world
    dist.all_gather_object(rows, {"rank": rank, **record})
    if rank == 0:
        Path(out_json).write_text(json.dumps(rows))


def load_cfg(preset, engine: str, overrides: list[str]):
    """The preset with the engine's overrides, checked by the job's own config loader."""
    from ..train.config import load

    return load(preset, OVERRIDES[engine] + overrides)


def _baseline() -> int:
    """RSS once every library a worker uses is imported: imports are not the model's memory
    (megatron-core alone is ~170 MiB, and the job's data loader imports it on every engine)."""
    import importlib

    from .rss import rss

    for name in ("deepspeed", "transformers", "torch.utils.tensorboard", "torch.distributed.checkpoint",
                 "torch.distributed.fsdp", "megatron.core", "megatron.core.datasets.indexed_dataset",
                 "megatron.core.models.gpt", "megatron.core.optimizer", "megatron.core.dist_checkpointing",
                 "megatron.core.distributed"):
        try:
            importlib.import_module(name)
        except ImportError:              # megatron-core is optional outside the Megatron row
            pass
    os.nice(5)
    gc.collect()
    return rss()


def job_worker(rank, world, preset, engine, overrides, out_json):
    """DeepSpeed ZeRO-2/3 through the job: make_backend + run (steps, save or load + steps)."""
    from ..train.loop import make_backend, run

    base = _baseline()
    cfg = load_cfg(preset, engine, overrides)
    backend = make_backend(cfg)
    record: dict = {"baseline": base}
    _phases(backend, ("train_step", "save", "load"), record)
    run(cfg, backend)
    record["census"] = census(backend.engine.module, backend.engine.optimizer)
    _gather(rank, world, record, out_json)


def _megatron_shims():
    """tests/megatron_support.py's CUDA-to-CPU shims (a source checkout's tests/ directory)."""
    tests = Path(__file__).resolve().parents[2] / "tests"
    if not (tests / "megatron_support.py").is_file():
        raise SystemExit(f"megatron_distopt on CPU needs tests/megatron_support.py (a source checkout); not at {tests}")
    sys.path.insert(0, str(tests))
    import megatron_support

    return megatron_support


def _adamw_megatron():
    """The job's Megatron backend with megatron-core's own Adam (DistributedOptimizer) in MOGA's place,
    checkpointed with Megatron's 'dp_reshardable' sharding (its default, fully_sharded_model_space,
    fails in megatron-core 0.16.1: "ShardedTensor.flattened_range is not supported")."""
    from unittest import mock

    import torch

    from ..engines import megatron as moga_megatron
    from ..train.backend_megatron import MegatronBackend

    class AdamWMegatron(MegatronBackend):
        def _build(self):
            own, a = moga_megatron.get_megatron_optimizer, self.cfg.optimizer.adamw

            def adam(config, chunks, *args, moga=None, **kw):
                config = dataclasses.replace(config, optimizer="adam", adam_beta1=a.betas[0],
                                             adam_beta2=a.betas[1], adam_eps=a.eps)
                return own(config, chunks, *args, **kw)
            with mock.patch.object(moga_megatron, "get_megatron_optimizer", adam):
                return super()._build()

        def load(self, directory):
            with torch.no_grad():    # Megatron's fp32 Adam load copies into views of the leaf params
                super().load(directory)

        def _sharded(self, loading: bool) -> dict:
            if loading:              # Megatron-LM's step before a load: Adam's state must exist
                for opt in getattr(self.optimizer, "chained_optimizers", [self.optimizer]):
                    if not opt.optimizer.state and opt.init_state_fn is not None:
                        opt.init_state_fn(opt.optimizer, opt.config)
                        for st in opt.optimizer.state.values():      # torch Adam's step (no Apex/TE)
                            st.setdefault("step", torch.tensor(0.0))
            msd = self.model.sharded_state_dict()
            return {"model": msd, "optimizer": self.optimizer.sharded_state_dict(
                msd, is_loading=loading, metadata={"distrib_optim_sharding_type": "dp_reshardable"})}
    return AdamWMegatron


def megatron_worker(rank, world, preset, engine, overrides, out_json, optimizer):
    """Megatron distributed optimizer through the job's backend and loop on CPU shims; AdamW swaps
    megatron-core's own Adam into the same backend (the job refuses AdamW on Megatron)."""
    from ..train.backend_megatron import MegatronBackend
    from ..train.loop import run

    base = _baseline()
    support = _megatron_shims()
    from megatron.core import parallel_state as ps

    support.enable_cuda_to_cpu()
    ps.destroy_model_parallel()
    ps.initialize_model_parallel(tensor_model_parallel_size=1)
    support.apply_model_shims()
    cfg = load_cfg(preset, engine, [x for x in overrides if not x.startswith("optimizer.name")]
                   + ["optimizer.name='moga'"])
    backend = (MegatronBackend if optimizer == "moga" else _adamw_megatron())(cfg, allow_cpu=True)
    record: dict = {"baseline": base}
    _phases(backend, ("train_step", "save", "load"), record)
    run(cfg, backend)
    record["census"] = census(backend.model, backend.optimizer)
    _gather(rank, world, record, out_json)


def fsdp2_worker(rank, world, preset, engine, overrides, out_json, optimizer, ckpt, steps, resume):
    """FSDP2 through torch's public API: `steps` steps then a DCP save, or (resume) a DCP load then
    one step. The job's LLaMA (train/backend_deepspeed.build_model) and data (train/data.py)."""
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    from torch.distributed.fsdp import fully_shard

    from .. import MOGA, param_groups
    from ..train.backend_deepspeed import build_model
    from ..train.config import moga_kwargs
    from ..train.data import PretrainData, plan_data
    from ..train.dist_env import cpu_threads

    base = _baseline()
    cpu_threads(world)
    cfg = load_cfg(preset, engine, overrides)
    data = PretrainData(plan_data(cfg), cfg, world)
    torch.manual_seed(cfg.training.seed)
    model = build_model(cfg.model)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    if optimizer == "moga":
        opt = MOGA(param_groups(model), **moga_kwargs(cfg.optimizer.moga))
    else:
        a = cfg.optimizer.adamw
        opt = torch.optim.AdamW(model.parameters(), lr=a.lr, betas=tuple(a.betas), eps=a.eps,
                                weight_decay=a.weight_decay)
    mbs = cfg.training.micro_batch_size
    accum = cfg.training.global_batch_size // (mbs * world)

    class Job:
        def train_step(self, step):
            for micro in range(accum):
                x = data.train_batch(step, micro, rank, world, mbs)
                (model(input_ids=x, labels=x).loss / accum).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        def save(self):
            msd, osd = get_state_dict(model, opt)
            dcp.save({"model": msd, "optim": osd}, checkpoint_id=ckpt)

        def load(self):
            msd, osd = get_state_dict(model, opt)
            state = {"model": msd, "optim": osd}
            dcp.load(state, checkpoint_id=ckpt)
            set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])

    job = Job()
    record: dict = {"baseline": base}
    _phases(job, ("train_step", "save", "load"), record)
    if resume:
        job.load()
        job.train_step(steps)
        record["census"] = census(model, opt)
    else:
        for step in range(steps):
            job.train_step(step)
        record["census"] = census(model, opt)
        job.save()
    _gather(rank, world, record, out_json)
