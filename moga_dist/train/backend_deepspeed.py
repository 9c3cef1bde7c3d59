"""DeepSpeed backend of the training loop: HF LlamaForCausalLM (built from a config, no weights
downloaded), MOGA through moga_dist.engines.deepspeed (or DeepSpeed's AdamW as the baseline), ZeRO 0-3.
At ZeRO-3 the model is built under deepspeed.zero.Init (build_partitioned), never whole on a rank.

With MOGA a checkpoint also holds MOGA's state in model space (engines/deepspeed_checkpoint.py),
which is what a resume loads: it may then run at another data-parallel world size."""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch

from .checkpoint import META, CheckpointError
from .config import RunConfig, deepspeed_files_written, moga_kwargs
from .engine_config import deepspeed_config
from .dist_env import cpu_threads
from .safe_load import safe_checkpoint_engine
from ..engines.model_space import DIRECTORY as MODEL_SPACE     # MOGA's model-space state's subdirectory


def llama_config(m):
    """[model] as a Hugging Face LlamaConfig."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=m.vocab_size, hidden_size=m.hidden_size, intermediate_size=m.intermediate_size,
                       num_hidden_layers=m.num_layers, num_attention_heads=m.num_heads,
                       num_key_value_heads=m.num_kv_heads, max_position_embeddings=m.max_seq_len,
                       rms_norm_eps=m.rms_norm_eps, rope_theta=m.rope_theta, tie_word_embeddings=m.tie_embeddings)


def build_model(m) -> torch.nn.Module:
    """A randomly initialized LLaMA (RMSNorm, SwiGLU, RoPE, grouped-query attention), whole."""
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM(llama_config(m))


def build_partitioned(m, ds_cfg: dict) -> torch.nn.Module:
    """ZeRO-3: the same LLaMA built under deepspeed.zero.Init, so no rank ever holds it whole: each
    module's parameters are created whole, broadcast from rank 0 and partitioned as soon as that
    module is built (the peak is the largest module, e.g. the embedding). Same weights, bit for bit,
    as build_model under the same seed (tests/test_train_zero3.py): Hugging Face initializes the
    weights in post_init, which would see empty partitions, so post_init's initialize_weights runs
    here on each module's gathered parameters, in its own order and at its own point in the
    construction, on every rank (the random stream stays the same everywhere); rank 0's copy is kept.
    (Hugging Face's own ZeRO-3 path initializes after construction: other random draws.)"""
    from unittest import mock

    import deepspeed
    from transformers import LlamaForCausalLM
    from transformers.modeling_utils import PreTrainedModel

    def initialize_weights(self):     # PreTrainedModel.initialize_weights, on gathered parameters
        custom = self.is_custom_code()

        def apply(module, fn):
            for child in module.children():
                apply(child, child._initialize_weights if isinstance(child, PreTrainedModel) else fn)
            # _init_weights may write its direct children's parameters too
            params = [p for owner in (module, *(c for c in module.children() if not isinstance(c, PreTrainedModel)))
                      for p in owner.parameters(recurse=False)]
            todo = bool(params) and not getattr(module, "_is_hf_initialized", False)
            with deepspeed.zero.GatheredParameters(params, modifier_rank=0, enabled=todo):
                fn(module, custom)
        with torch.no_grad():
            apply(self, self._initialize_weights)

    with deepspeed.zero.Init(config_dict_or_path=ds_cfg), \
            mock.patch.object(PreTrainedModel, "initialize_weights", initialize_weights):
        return LlamaForCausalLM(llama_config(m))


def moga_groups(model: torch.nn.Module, m) -> list[dict]:
    """moga_dist.param_groups(model) for a model whose parameters may be ZeRO-3 placeholders (0
    elements, no shape): the roles are read off a twin built on the meta device (no memory), whose
    parameters have their true shapes, and the groups then hold the model's own parameters."""
    from transformers import LlamaForCausalLM

    from .. import param_groups

    if not any(hasattr(p, "ds_shape") for p in model.parameters()):
        return param_groups(model)
    with torch.device("meta"):
        twin = LlamaForCausalLM(llama_config(m))
    own = dict(model.named_parameters())
    groups = param_groups(twin)
    for group in groups:
        group["params"] = [own[name] for name in group["param_names"]]
    return groups


class DeepSpeedBackend:
    """One data-parallel group over all ranks; checkpoints are, with MOGA, MOGA's state in model
    space (resumable at any world size), and DeepSpeed's own per-rank ZeRO files where
    config.deepspeed_files_written says (AdamW; MOGA only with checkpoint.deepspeed_files=true)."""

    def __init__(self, cfg: RunConfig):
        if not torch.cuda.is_available():
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        import deepspeed
        from deepspeed.utils import logger as ds_logger

        ds_logger.setLevel(logging.WARNING)
        self.cfg = cfg
        self.on_cpu = os.environ.get("DS_ACCELERATOR") == "cpu"
        if self.on_cpu:
            from ..engines.deepspeed import skip_shm_comm_build

            skip_shm_comm_build()
            cpu_threads(int(os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"])))
        deepspeed.init_distributed(dist_backend="gloo" if self.on_cpu else "nccl", auto_mpi_discovery=False)
        self.rank, self.world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        self.dp_rank, self.dp_world = self.rank, self.world
        torch.manual_seed(cfg.training.seed)
        ds_cfg = deepspeed_config(cfg, self.world)
        # ZeRO-3 never builds the model whole on a rank (a 70B model would not fit); 0-2 keep it whole anyway.
        model = build_partitioned(cfg.model, ds_cfg) if cfg.engine.zero_stage == 3 else build_model(cfg.model)
        if cfg.optimizer.name == "moga":
            from .. import MOGA
            from ..engines.deepspeed import initialize

            optimizer = MOGA(moga_groups(model, cfg.model), **moga_kwargs(cfg.optimizer.moga))
            self.engine = initialize(model=model, optimizer=optimizer, config=ds_cfg)[0]
        else:
            self.engine = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_cfg)[0]
        # DeepSpeed's own engine unpickles with weights_only=False: a checkpoint file could run code.
        self.engine.checkpoint_engine = safe_checkpoint_engine(self.engine.checkpoint_engine)

    @property
    def model_space(self) -> bool:
        """Whether checkpoints carry MOGA's state in model space (resumable at another world size)."""
        return self.cfg.optimizer.name == "moga"

    def layout_meta(self) -> dict:
        """Fields a resume must match. DeepSpeed's ZeRO files are per rank, so AdamW's world size
        must not change; MOGA's model-space state loads at any world size (recorded, not compared)."""
        world = {"dp_world_size" if self.model_space else "world_size": self.world}
        return {"engine": "deepspeed", "zero_stage": self.cfg.engine.zero_stage, **world}

    def describe(self) -> str:
        return f"ZeRO-{self.cfg.engine.zero_stage}"

    def train_step(self, step: int, accum: int, data) -> list[float]:
        """One optimizer step on global samples [step * B, (step + 1) * B) (data.py): the same
        samples at any world size, so a resume at another one continues the run."""
        losses = []
        for micro in range(accum):
            x = data.train_batch(step, micro, self.dp_rank, self.dp_world, self.cfg.training.micro_batch_size)
            loss = self.engine(input_ids=x, labels=x).loss
            self.engine.backward(loss)
            self.engine.step()
            losses.append(loss.detach().item())
        return losses

    def eval_losses(self, data) -> list[float]:
        """Validation losses of this rank's batches (empty: the split has no validation documents)."""
        batches = [data.val_batch(i, self.dp_rank, self.dp_world, self.cfg.training.micro_batch_size)
                   for i in range(self.cfg.training.eval_batches)]
        self.engine.eval()
        with torch.no_grad():
            losses = [self.engine(input_ids=x, labels=x).loss.item() for x in batches if x is not None]
        self.engine.train()
        if self.cfg.engine.zero_stage == 3:
            # An eval forward has no backward to release what it gathered: ZeRO-3's coordinator keeps
            # each parameter whose next use in the recorded (forward + backward) trace is within
            # stage3_max_reuse_distance (1e9 elements): the whole model at 56M and 349M parameters,
            # gathered on every rank until the next step's backward. Release them all now (DeepSpeed's
            # public call; its save_checkpoint does the same, so AdamW's runs hid it, MOGA's did not).
            self.engine.empty_partition_cache()
        return losses

    def lr(self) -> float:
        return float(self.engine.get_lr()[0])

    def skipped_steps(self) -> int:
        """Steps DeepSpeed skipped (its overflow check found non-finite gradients); restored on resume."""
        return int(self.engine.skipped_steps)

    def state_finite(self) -> bool:
        """This rank's weights and optimizer state (momentum) hold no NaN/Inf."""
        opt = getattr(self.engine.optimizer, "optimizer", self.engine.optimizer)
        params = list(self.engine.module.parameters())
        tensors = [p.detach() for p in params]
        # ZeRO-3: the module's parameters are empty placeholders; this rank's weights are their partitions.
        tensors += [p.ds_tensor.detach() for p in params if hasattr(p, "ds_tensor")]
        tensors += [v for st in opt.state.values() for v in st.values() if torch.is_tensor(v)]
        return all(bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point())

    def save(self, directory: Path) -> list[str]:
        """Write this rank's files; returns its write errors (collected, not raised mid-save, so
        every rank reaches DeepSpeed's closing barrier)."""
        self.engine.checkpoint_engine.write_errors.clear()
        if deepspeed_files_written(self.cfg):
            self.engine.save_checkpoint(str(directory.parent), tag=directory.name, save_latest=False)
        else:
            directory.mkdir(parents=True, exist_ok=True)
        if self.model_space:
            from ..engines.deepspeed_checkpoint import save_model_space

            save_model_space(self.engine, directory / MODEL_SPACE, save=self.engine.checkpoint_engine.save)
        return list(self.engine.checkpoint_engine.write_errors)

    def load(self, directory: Path) -> None:
        """MOGA's model-space state when the checkpoint has it (any world size), else DeepSpeed's
        own files, which load only at the world size that wrote them."""
        if self.model_space and (directory / MODEL_SPACE).is_dir():
            from ..engines.deepspeed_checkpoint import load_model_space

            try:
                load_model_space(self.engine, directory / MODEL_SPACE)
            except ValueError as exc:
                raise CheckpointError(f"checkpoint {directory}: {exc}") from None
            return
        saved = json.loads((directory / META).read_text()).get("world_size", self.world)
        if saved != self.world:
            raise CheckpointError(f"checkpoint {directory} was written at world_size {saved} without MOGA's "
                                  f"model-space state (written by an older moga_dist, or by AdamW), and DeepSpeed's "
                                  f"ZeRO files load only at that size; this run has {self.world}. Resume at "
                                  f"{saved} ranks")
        self.engine.load_checkpoint(str(directory.parent), tag=directory.name)
