"""The pretraining loop: HF LlamaForCausalLM from a config (no weights downloaded), MOGA through
moga_dist.deepspeed (or DeepSpeed's AdamW as a baseline), progress bar, TensorBoard, checkpoints."""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
import warnings
from pathlib import Path

import torch

from . import checkpoint
from .config import RunConfig, accumulation_steps, as_dict
from .data import ByteCorpus
from .dist_env import discover
from .engine_config import deepspeed_config


def build_model(m) -> torch.nn.Module:
    """A randomly initialized LLaMA (RMSNorm, SwiGLU, RoPE, grouped-query attention)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=m.vocab_size, hidden_size=m.hidden_size, intermediate_size=m.intermediate_size,
                         num_hidden_layers=m.num_layers, num_attention_heads=m.num_heads,
                         num_key_value_heads=m.num_kv_heads, max_position_embeddings=m.max_seq_len,
                         rms_norm_eps=m.rms_norm_eps, rope_theta=m.rope_theta,
                         tie_word_embeddings=m.tie_embeddings)
    return LlamaForCausalLM(config)


def _setup_distributed():
    env = discover()
    # torch 2.13 deprecates collective names DeepSpeed 0.19 still calls; say it once, not per step.
    warnings.filterwarnings("ignore", category=FutureWarning, message=r".*(all_gather_into_tensor|reduce_scatter_tensor)")
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel(logging.WARNING)
    on_cpu = os.environ.get("DS_ACCELERATOR") == "cpu"
    if on_cpu:
        from ..deepspeed import skip_shm_comm_build

        skip_shm_comm_build()
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"]))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(local_world, 1)))
    deepspeed.init_distributed(dist_backend="gloo" if on_cpu else "nccl", auto_mpi_discovery=False)
    return int(env["RANK"]), int(env["WORLD_SIZE"]), on_cpu


def _engine(cfg: RunConfig, model, world: int):
    import deepspeed

    ds_cfg = deepspeed_config(cfg, world)
    if cfg.optimizer.name == "moga":
        from .. import MOGA, param_groups
        from ..deepspeed import initialize

        optimizer = MOGA(param_groups(model), **dataclasses.asdict(cfg.optimizer.moga))
        return initialize(model=model, optimizer=optimizer, config=ds_cfg)[0]
    return deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_cfg)[0]


def _mean(values: list[float], world: int) -> float:
    import torch.distributed as dist

    t = torch.tensor([sum(values), len(values)], dtype=torch.float64)
    if world > 1:
        dist.all_reduce(t)
    return float(t[0] / t[1])


def evaluate(engine, corpus: ByteCorpus, cfg: RunConfig, rank: int, world: int) -> float:
    """Mean validation loss over eval_batches micro batches per rank."""
    engine.eval()
    losses = []
    with torch.no_grad():
        for i in range(cfg.training.eval_batches):
            x = corpus.batch(0, i, rank, cfg.training.micro_batch_size, split="val")
            losses.append(engine(input_ids=x, labels=x).loss.item())
    engine.train()
    return _mean(losses, world)


def run(cfg: RunConfig) -> dict:
    """Train per `cfg`; returns (and rank 0 prints and saves) a summary."""
    import torch.distributed as dist

    if cfg.parallel.engine != "deepspeed":
        raise ValueError(f"preset {cfg.name!r} is laid out for parallel.engine={cfg.parallel.engine!r}: print its "
                         "Megatron-LM flags with `python -m moga_dist.train.engine_config --config <preset> --megatron`")
    rank, world, on_cpu = _setup_distributed()
    accum = accumulation_steps(cfg, world)
    t = cfg.training
    out = Path(cfg.output_dir)
    ckpt_dir, log_dir = out / "checkpoints", out / "tensorboard"
    meta = {"model": as_dict(cfg.model), "optimizer_name": cfg.optimizer.name, "world_size": world,
            "zero_stage": cfg.engine.zero_stage, "config": as_dict(cfg)}
    tag = checkpoint.latest_tag(ckpt_dir)
    if tag and not cfg.checkpoint.resume:
        raise ValueError(f"{ckpt_dir} already holds checkpoint {tag!r} and checkpoint.resume=false: refusing to "
                         "overwrite it. Resume it, or set output_dir to a new directory")
    if tag:
        checkpoint.check_compatible(ckpt_dir, tag, meta)

    torch.manual_seed(t.seed)
    engine = _engine(cfg, build_model(cfg.model), world)
    start, last_loss = 0, float("nan")
    if tag:
        _, client = engine.load_checkpoint(str(ckpt_dir), tag=tag)
        start, last_loss = int(client["step"]), float(client.get("train_loss", float("nan")))
    corpus = ByteCorpus(cfg.data.corpus, cfg.model.max_seq_len, cfg.data.val_fraction, t.seed)
    barrier = dist.barrier if world > 1 else (lambda: None)

    writer = bar = None
    if rank == 0:
        from torch.utils.tensorboard import SummaryWriter
        from tqdm.auto import tqdm

        writer = SummaryWriter(str(log_dir))
        bar = tqdm(total=t.steps, initial=start, desc=cfg.name, unit="step", dynamic_ncols=True)
    tokens_per_step = t.global_batch_size * cfg.model.max_seq_len
    timed_steps, timed_seconds, val_loss, last_tag = 0, 0.0, float("nan"), tag
    end = t.steps if t.stop_at_step is None else min(t.steps, t.stop_at_step)
    if start >= end:            # already finished (e.g. the same command run twice): just report
        val_loss = evaluate(engine, corpus, cfg, rank, world)
    for step in range(start, end):
        t0 = time.perf_counter()
        losses = []
        for micro in range(accum):
            x = corpus.batch(step, micro, rank, t.micro_batch_size)
            loss = engine(input_ids=x, labels=x).loss
            engine.backward(loss)
            engine.step()
            losses.append(loss.detach().item())
        elapsed = time.perf_counter() - t0
        if step > start:                       # the first step pays for kernel builds and caches
            timed_steps, timed_seconds = timed_steps + 1, timed_seconds + elapsed
        loss_now = _mean(losses, world) if (step + 1) % t.log_every == 0 or step + 1 == t.steps else None
        if loss_now is not None:
            last_loss = loss_now
        done = step + 1
        if done % t.eval_every == 0 or done == t.steps:
            val_loss = evaluate(engine, corpus, cfg, rank, world)
        if done % cfg.checkpoint.every == 0 or done == end:
            last_tag = checkpoint.save(engine, ckpt_dir, done, meta, cfg.checkpoint.keep, rank == 0, barrier,
                                       client={"train_loss": last_loss})
        if rank == 0:
            tps = tokens_per_step * timed_steps / timed_seconds if timed_seconds else 0.0
            if loss_now is not None:
                writer.add_scalar("train/loss", loss_now, done)
                writer.add_scalar("train/lr", engine.get_lr()[0], done)
                writer.add_scalar("train/tokens_per_s", tps, done)
                bar.set_postfix(loss=f"{loss_now:.3f}", tok_s=f"{tps:,.0f}")
            if done % t.eval_every == 0 or done == t.steps:
                writer.add_scalar("val/loss", val_loss, done)
            bar.update(1)

    summary = {"name": cfg.name, "steps": end, "resumed_from": start, "world_size": world,
               "optimizer": cfg.optimizer.name, "zero_stage": cfg.engine.zero_stage,
               "final_train_loss": last_loss,
               "val_loss": val_loss,
               "tokens_per_s": tokens_per_step * timed_steps / timed_seconds if timed_seconds else float("nan"),
               "checkpoint": str(ckpt_dir / last_tag) if last_tag else None, "tensorboard": str(log_dir)}
    if rank == 0:
        bar.close()
        writer.close()
        checkpoint._atomic_write(out / "summary.json", json.dumps(summary, indent=2))
        print(format_summary(summary, on_cpu), flush=True)
    return summary


def format_summary(s: dict, on_cpu: bool) -> str:
    device = "CPU" if on_cpu else "GPU"
    return "\n".join([
        f"== moga_dist.train '{s['name']}': {s['steps']} steps done"
        + (f" (resumed at step {s['resumed_from']})" if s["resumed_from"] else "") + " ==",
        f"  optimizer {s['optimizer']} | {s['world_size']} {device} ranks | ZeRO-{s['zero_stage']}",
        f"  final train loss {s['final_train_loss']:.4f} (last step, all ranks) | "
        f"validation loss {s['val_loss']:.4f}",
        f"  throughput {s['tokens_per_s']:,.0f} tokens/s" if s["tokens_per_s"] == s["tokens_per_s"]
        else "  nothing left to train: the checkpoint is already at the last step (evaluated it)",
        f"  checkpoint  {s['checkpoint']}",
        f"  tensorboard {s['tensorboard']}   (view: tensorboard --logdir {s['tensorboard']})",
    ])
