"""Megatron-core backend of the training loop: a LLaMA on GPTModel (RMSNorm, SwiGLU, RoPE, GQA,
untied head) with tensor, pipeline (megatron-core's own schedules) and data parallelism from the preset, MOGA through moga_dist.engines.megatron,
Megatron's cosine schedule, and dist_checkpointing checkpoints (reshardable across TP and DP).

Megatron-core needs CUDA; on CPU only the tests drive it, after applying their own shims
(tests/megatron_support.py) and passing allow_cpu=True."""
from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as nnf

from .config import RunConfig, moga_kwargs


def check_config(cfg: RunConfig) -> None:
    """Refuse, by name, a preset this backend cannot run with MOGA (before any process group)."""
    p = cfg.parallel
    if cfg.optimizer.name != "moga":
        raise ValueError(f"optimizer.name={cfg.optimizer.name!r} with parallel.engine='megatron': allowed 'moga' "
                         "(the AdamW baseline runs on parallel.engine='deepspeed')")
    if cfg.model.num_layers % p.pipeline_parallel:
        raise ValueError(f"model.num_layers={cfg.model.num_layers} is not divisible by "
                         f"parallel.pipeline_parallel={p.pipeline_parallel} (each stage holds as many layers)")


class MegatronBackend:
    """Megatron's replicated optimizer wrappers, or with parallel.distributed_optimizer its distributed
    optimizer (fp32 main weights and momentum sharded over DP, gradients reduce-scattered, checkpointed by
    moga_dist.engines.megatron_distopt in a format that reshards across TP and DP)."""

    def __init__(self, cfg: RunConfig, allow_cpu: bool = False):
        import torch.distributed as dist
        from megatron.core import parallel_state as ps
        from megatron.core import tensor_parallel

        p = cfg.parallel
        check_config(cfg)
        self.on_cpu = not torch.cuda.is_available()
        if self.on_cpu and not allow_cpu:
            raise ValueError("the Megatron backend needs CUDA GPUs (Megatron-core allocates on CUDA); on CPU use "
                             "parallel.engine='deepspeed'")
        if not dist.is_initialized():
            dist.init_process_group("gloo" if self.on_cpu else "nccl")
        if not self.on_cpu:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        self.cfg = cfg
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        if not ps.model_parallel_is_initialized():
            ps.initialize_model_parallel(tensor_model_parallel_size=p.tensor_parallel,
                                         pipeline_model_parallel_size=p.pipeline_parallel)
        if not self.on_cpu:
            tensor_parallel.model_parallel_cuda_manual_seed(cfg.training.seed)
        self.tp, self.pp = ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size()
        self.first_stage, self.last_stage = ps.is_pipeline_first_stage(), ps.is_pipeline_last_stage()
        self.dp_rank, self.dp_world = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
        self.model, self.ddp, self.optimizer, self.scheduler = self._build()
        self.skipped = 0
        seq = cfg.model.max_seq_len - 1          # windows of max_seq_len tokens: inputs and shifted labels
        self.mask = torch.triu(torch.ones(1, 1, seq, seq, dtype=torch.bool), diagonal=1)
        self.positions = torch.arange(seq).unsqueeze(0)

    def _build(self):
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from megatron.core.models.gpt import GPTModel
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
        from megatron.core.optimizer import OptimizerConfig
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
        from megatron.core.transformer import TransformerConfig

        from ..engines.megatron import get_megatron_optimizer

        cfg, m, t = self.cfg, self.cfg.model, self.cfg.training
        bf16 = cfg.engine.bf16
        distributed_optimizer = cfg.parallel.distributed_optimizer
        tcfg = TransformerConfig(
            num_layers=m.num_layers, hidden_size=m.hidden_size, num_attention_heads=m.num_heads,
            num_query_groups=m.num_kv_heads, ffn_hidden_size=m.intermediate_size, layernorm_epsilon=m.rms_norm_eps,
            tensor_model_parallel_size=self.tp, pipeline_model_parallel_size=self.pp,
            use_cpu_initialization=self.on_cpu, bf16=bf16,
            params_dtype=torch.bfloat16 if bf16 else torch.float32, pipeline_dtype=torch.float32,
            normalization="RMSNorm", gated_linear_unit=True, activation_func=nnf.silu, add_bias_linear=False,
            hidden_dropout=0.0, attention_dropout=0.0, bias_dropout_fusion=False, apply_rope_fusion=False,
            masked_softmax_fusion=False, persist_layer_norm=False, gradient_accumulation_fusion=False,
            recompute_granularity="full" if cfg.parallel.activation_checkpointing else None,
            recompute_method="uniform" if cfg.parallel.activation_checkpointing else None,
            recompute_num_layers=1 if cfg.parallel.activation_checkpointing else None)
        torch.manual_seed(t.seed)
        model = GPTModel(config=tcfg, transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm"),
                         vocab_size=m.vocab_size, max_sequence_length=m.max_seq_len,
                         position_embedding_type="rope", rotary_base=int(m.rope_theta),
                         share_embeddings_and_output_weights=m.tie_embeddings,
                         pre_process=self.first_stage, post_process=self.last_stage)
        if not self.on_cpu:
            model.cuda(torch.cuda.current_device())
        ddp = DistributedDataParallel(tcfg, DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, overlap_grad_reduce=False,
            use_distributed_optimizer=distributed_optimizer), model)
        moga = moga_kwargs(cfg.optimizer.moga)
        lr, wd = moga.pop("lr"), moga.pop("weight_decay")
        optimizer = get_megatron_optimizer(
            OptimizerConfig(optimizer="moga", lr=lr, min_lr=lr * t.min_lr_ratio, weight_decay=wd,
                            clip_grad=t.gradient_clipping, bf16=bf16,
                            params_dtype=torch.bfloat16 if bf16 else torch.float32,
                            use_distributed_optimizer=distributed_optimizer), [ddp], moga=moga)
        scheduler = OptimizerParamScheduler(optimizer, init_lr=0.0, max_lr=lr, min_lr=lr * t.min_lr_ratio,
                                            lr_warmup_steps=t.warmup_steps, lr_decay_steps=t.steps,
                                            lr_decay_style="cosine", start_wd=wd, end_wd=wd, wd_incr_steps=t.steps,
                                            wd_incr_style="constant")
        return model, ddp, optimizer, scheduler

    def layout_meta(self) -> dict:
        """dist_checkpointing reshards across TP, PP and DP; the engine and the optimizer's sharding (its
        two checkpoint formats differ) must match."""
        return {"engine": "megatron", "distributed_optimizer": self.cfg.parallel.distributed_optimizer}

    def describe(self) -> str:
        kind = "distributed optimizer" if self.cfg.parallel.distributed_optimizer else "replicated optimizer"
        pipeline = f" x PP{self.pp}" if self.pp > 1 else ""
        return f"Megatron TP{self.tp}{pipeline} x DP{self.dp_world}, {kind}"

    def _forward_step(self, data_iterator, model):
        """Megatron's forward_step_func: this stage's output and, on the last stage, the loss."""
        x = next(data_iterator)
        if not self.on_cpu:
            x = x.cuda()
        pos = self.positions.to(x.device).expand(x.shape[0], -1)
        out = model(x[:, :-1], pos, self.mask.to(x.device), labels=x[:, 1:])

        def loss_func(per_token):
            loss = per_token.float().mean()
            return loss, {"loss": loss.detach()}
        return out, loss_func

    def _run_schedule(self, batches: list[torch.Tensor], forward_only: bool) -> list[float]:
        """Every micro batch through megatron-core's schedule for this layout (1F1B across pipeline
        stages; the schedule scales each loss by 1 / len(batches)); the per-micro-batch losses,
        which the last stage computes, reach every stage."""
        import torch.distributed as dist
        from megatron.core import parallel_state as ps
        from megatron.core.pipeline_parallel import get_forward_backward_func

        out = get_forward_backward_func()(
            forward_step_func=self._forward_step, data_iterator=iter(batches), model=[self.ddp],
            num_microbatches=len(batches), seq_length=self.cfg.model.max_seq_len - 1,
            micro_batch_size=self.cfg.training.micro_batch_size, forward_only=forward_only)
        losses = torch.tensor([float(o["loss"]) for o in out] if self.last_stage else [0.0] * len(batches),
                              dtype=torch.float64)
        if self.pp > 1:
            dist.broadcast(losses, src=ps.get_pipeline_model_parallel_last_rank(),
                           group=ps.get_pipeline_model_parallel_group())
        return losses.tolist()

    def train_step(self, step: int, accum: int, data) -> list[float]:
        from megatron.core.distributed import finalize_model_grads

        self.ddp.zero_grad_buffer()
        self.optimizer.zero_grad()
        mbs = self.cfg.training.micro_batch_size
        # Global samples [step * B, (step + 1) * B), sliced by DP rank (data.py); TP/PP ranks of one
        # DP group read the same ones.
        losses = self._run_schedule([data.train_batch(step, micro, self.dp_rank, self.dp_world, mbs)
                                     for micro in range(accum)], forward_only=False)
        finalize_model_grads([self.ddp])
        ok, _, _ = self.optimizer.step()
        if ok:
            self.scheduler.step(increment=1)
        else:                   # non-finite gradients: counted against training.max_skipped_steps
            self.skipped += 1
        return losses

    def eval_losses(self, data) -> list[float]:
        mbs = self.cfg.training.micro_batch_size
        batches = [data.val_batch(i, self.dp_rank, self.dp_world, mbs) for i in range(self.cfg.training.eval_batches)]
        if any(x is None for x in batches):      # no validation documents in the split
            return []
        self.ddp.eval()
        with torch.no_grad():
            losses = self._run_schedule(batches, forward_only=True)
        self.ddp.train()
        return losses

    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def _sharded(self, loading: bool) -> dict:
        msd = self.model.sharded_state_dict()
        return {"model": msd, "optimizer": self.optimizer.sharded_state_dict(msd, is_loading=loading)}

    def skipped_steps(self) -> int:
        """Steps the optimizer skipped in this process (non-finite gradients)."""
        return self.skipped

    def state_finite(self) -> bool:
        """This rank's weights and optimizer state hold no NaN/Inf."""
        tensors = [p.detach() for p in self.model.parameters()]
        for opt in getattr(self.optimizer, "chained_optimizers", [self.optimizer]):
            inner = getattr(opt, "optimizer", opt)
            tensors += [v for st in inner.state.values() for v in st.values() if torch.is_tensor(v)]
        return all(bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point())

    def save(self, directory: Path) -> list[str]:
        """Write the distributed checkpoint; raises on a failed write (no per-rank error list)."""
        from megatron.core import dist_checkpointing

        from ..engines.megatron_distopt import without_copies

        # without_copies: megatron-core's writer would otherwise copy every CPU view it writes.
        dist_checkpointing.save(without_copies({**self._sharded(False), "scheduler": self.scheduler.state_dict()}),
                                str(directory))
        return []

    def load(self, directory: Path) -> None:
        from megatron.core import dist_checkpointing

        state = dist_checkpointing.load({**self._sharded(True), "scheduler": self.scheduler.state_dict()},
                                        str(directory))
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
