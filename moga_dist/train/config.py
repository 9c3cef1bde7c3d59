"""Run configuration: one TOML preset per file, frozen dataclasses, unknown keys refused.

The optimizer's hyper-parameters live only in [optimizer.moga] / [optimizer.adamw]; the DeepSpeed
JSON is generated from the preset (engine_config.py), never written by hand.
"""
from __future__ import annotations

import dataclasses
import math
import tomllib
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path

from ..core.hparams import check_hparams, hparam_fields


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """A LLaMA architecture (Hugging Face LlamaConfig field names where they exist)."""
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 352
    vocab_size: int = 256            # byte-level tokenizer
    max_seq_len: int = 128
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    tie_embeddings: bool = False     # untied: MOGA row-normalizes the head, sign-updates the embedding (README)


# [optimizer.moga]: MOGA's keyword arguments, derived from the one table of its hyper-parameters
# (moga_dist.core.hparams.HPARAMS: names, defaults, types), then where `lr` comes from (not MOGA
# arguments; `python -m moga_dist.train.engine_config --explain`): the width, horizon and
# tokens/parameter it was tuned at (and the best lr there), and the rule that moved it here.
MOGAConfig = dataclasses.make_dataclass("MOGAConfig", [
    *hparam_fields(),
    ("tuned_lr", float | None, field(default=None)),
    ("tuned_width", int | None, field(default=None)),
    ("tuned_steps", int | None, field(default=None)),
    ("tuned_tokens_per_param", float | None, field(default=None)),
    ("lr_rule", str, field(default="none")),
], frozen=True, kw_only=True, namespace={"__doc__": "MOGA's settings (moga_dist.MOGA keyword arguments, "
                                          "moga_dist.core.hparams.HPARAMS) and lr's provenance."})
MOGAConfig.__module__ = __name__


LR_PROVENANCE = ("tuned_lr", "tuned_width", "tuned_steps", "tuned_tokens_per_param", "lr_rule")
LR_RULES = ("none", "horizon-tpp-1")     # moga_dist.train.lr_provenance.RULES says what each does


def moga_kwargs(moga: MOGAConfig) -> dict:
    """[optimizer.moga] as moga_dist.MOGA keyword arguments (the LR-provenance fields left out)."""
    return {k: v for k, v in dataclasses.asdict(moga).items() if k not in LR_PROVENANCE}


@dataclass(frozen=True, kw_only=True)
class AdamWConfig:
    """DeepSpeed's own AdamW, for the side-by-side baseline."""
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.1
    eps: float = 1e-8


@dataclass(frozen=True, kw_only=True)
class OptimizerConfig:
    name: str = "moga"               # "moga" or "adamw"
    moga: MOGAConfig = field(default_factory=MOGAConfig)
    adamw: AdamWConfig = field(default_factory=AdamWConfig)


@dataclass(frozen=True, kw_only=True)
class TrainingConfig:
    steps: int = 600
    stop_at_step: int | None = None  # leave early (with a checkpoint) at this step; a relaunch resumes
    global_batch_size: int = 16      # sequences per optimizer step, over all data-parallel ranks
    micro_batch_size: int = 8        # sequences per rank per forward/backward
    warmup_steps: int = 60
    min_lr_ratio: float = 0.1        # cosine decays to this fraction of the peak lr
    gradient_clipping: float = 1.0
    seed: int = 1234
    log_every: int = 10
    eval_every: int = 200
    eval_batches: int = 8
    max_skipped_steps: int = 0       # steps the engine may skip (non-finite gradients) before the job stops


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Prepared datasets (python -m moga_dist.data prepare; docs/data.md), read through megatron-core's
    GPTDataset / BlendedMegatronDatasetBuilder."""
    paths: tuple[str, ...] = ("kjv",)  # PREFIXes of PREFIX.bin/.idx; "kjv": the shipped corpus, prepared on first use
    weights: tuple[float, ...] = ()  # blend weights, one per path (empty: in proportion to their sizes)
    split: str = "98,1,1"            # train, validation, test shares of each dataset's documents
    tokenizer: str = "bytes"         # "bytes", "kjv-bpe", a tokenizer.json / HF directory / SentencePiece .model
    cache_dir: str = ""              # document/sample/shuffle index cache ("": <output_dir>/data_cache)
    # true: model.vocab_size may exceed the tokenizer's padded vocabulary (rows no id reaches). Only for
    # rehearsals that need a real-size embedding on the shipped data (configs/llama_350m_cpu.toml).
    oversized_vocab: bool = False


@dataclass(frozen=True, kw_only=True)
class CheckpointConfig:
    every: int = 200
    keep: int = 2
    resume: bool = True              # continue from <output_dir>/checkpoints/latest when present
    # DeepSpeed's own checkpoint files (per-rank ZeRO files; for its tools: zero_to_fp32,
    # engine.load_checkpoint). Unset (the default): written only where they are the only copy of the
    # state (optimizer.name='adamw'); DeepSpeed + MOGA writes MOGA's model-space state alone (fp32
    # weights + momentum, resumable at any world size; model_space_weights replaces zero_to_fp32).
    # true: also with MOGA (a duplicate: +8 B/param of fp32 weights + momentum, plus the bf16/fp16
    # model copy; deepspeed_files_written). false: never; allowed only with DeepSpeed + MOGA.
    deepspeed_files: bool | None = None


@dataclass(frozen=True, kw_only=True)
class EngineConfig:
    zero_stage: int = 2              # DeepSpeed's ZeRO stage 0-3 (Megatron: parallel.distributed_optimizer)
    bf16: bool = False


@dataclass(frozen=True, kw_only=True)
class ParallelConfig:
    """Where the preset runs: engine, layout and hardware (for launch scripts and the memory check)."""
    engine: str = "deepspeed"        # "deepspeed" (moga_dist.train) or "megatron" (generated flags)
    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    nodes: int = 1
    gpus_per_node: int = 2           # processes per node (CPU processes for the tiny preset)
    gpu: str = "cpu"                 # a key of presets.GPU_MEMORY_GIB
    activation_checkpointing: bool = False
    # Megatron's distributed optimizer (fp32 main weights and momentum sharded over DP; gradients
    # reduce-scattered). Megatron only: DeepSpeed's sharding is engine.zero_stage.
    distributed_optimizer: bool = False


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    name: str = "run"
    output_dir: str = "outputs/run"
    model: ModelConfig = field(default_factory=ModelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)


def _typed(value, hint, key: str):
    """`value` checked against a field's type (TOML ints are accepted for floats); ValueError
    naming the key, the value and the expected type otherwise."""
    options = typing.get_args(hint) if typing.get_origin(hint) in (types.UnionType, typing.Union) else (hint,)
    for option in options:
        if option is type(None) and value is None:
            return None
        if option is bool and isinstance(value, bool):
            return value
        if option is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if option is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if option is str and isinstance(value, str):
            return value
        if typing.get_origin(option) is tuple and isinstance(value, (list, tuple)):
            args = typing.get_args(option)
            if len(args) == 2 and args[1] is Ellipsis:        # tuple[X, ...]: any length
                args = (args[0],) * len(value)
            if len(value) == len(args):
                return tuple(_typed(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    allowed = " or ".join(_TYPE_NAMES.get(o, str(o)) for o in options)
    raise ValueError(f"{key}={value!r}: expected {allowed}, got {type(value).__name__}"
                     + (" (write numbers and booleans without quotes)" if isinstance(value, str) else ""))


_TYPE_NAMES = {int: "an integer", float: "a number", bool: "true/false", str: "a string", type(None): "nothing"}


def _build(cls, data: dict, where: str):
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} in [{where or 'top level'}]; allowed: {sorted(known)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in data.items():
        f = known[name]
        key = f"{where}.{name}".strip(".")
        sub = f.default_factory if dataclasses.is_dataclass(f.default_factory) else None  # type: ignore[arg-type]
        if sub is not None:
            if not isinstance(value, dict):
                raise ValueError(f"[{key}] must be a table, got {value!r}")
            kwargs[name] = _build(sub, value, key)
        else:
            kwargs[name] = _typed(value, hints[name], key)
    return cls(**kwargs)


def parse_override(text: str) -> tuple[list[str], object]:
    """'training.steps=20' -> (['training', 'steps'], 20); the value is parsed as TOML, never eval'd."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"override {text!r}: expected section.key=value")
    try:
        parsed = tomllib.loads(f"v = {value.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value.strip()            # bare words are strings: optimizer.name=adamw
    return key.strip().split("."), parsed


def load(path: str | Path | None, overrides: list[str] = ()) -> RunConfig:
    """Read a preset and apply `section.key=value` overrides; unknown keys raise ValueError."""
    data: dict = {}
    if path is not None:
        try:
            with open(path, "rb") as fh:
                data = tomllib.load(fh)
        except OSError as exc:
            raise ValueError(f"--config {path}: {exc.strerror or exc}") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"--config {path}: not valid TOML ({exc})") from None
    for text in overrides:
        keys, value = parse_override(text)
        node = data
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {text!r}: {k!r} is not a section")
        node[keys[-1]] = value
    cfg = _build(RunConfig, data, "")
    validate(cfg)
    return cfg


def validate(cfg: RunConfig) -> None:
    """Cross-field checks that do not need the world size."""
    m, t = cfg.model, cfg.training
    if m.hidden_size % m.num_heads:
        raise ValueError(f"model.hidden_size={m.hidden_size} is not divisible by model.num_heads={m.num_heads}")
    if m.num_heads % m.num_kv_heads:
        raise ValueError(f"model.num_heads={m.num_heads} is not divisible by model.num_kv_heads={m.num_kv_heads}")
    if cfg.optimizer.name not in ("moga", "adamw"):
        raise ValueError(f"optimizer.name={cfg.optimizer.name!r}; allowed: 'moga', 'adamw'")
    if cfg.engine.zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"engine.zero_stage={cfg.engine.zero_stage}; allowed: 0, 1, 2, 3")
    if t.steps < 1 or t.micro_batch_size < 1 or t.global_batch_size < 1:
        raise ValueError("training.steps, micro_batch_size and global_batch_size must be >= 1")
    for name, value in (("optimizer.moga.lr", cfg.optimizer.moga.lr), ("optimizer.adamw.lr", cfg.optimizer.adamw.lr)):
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"{name}={value}: allowed a finite number >= 0")
    if cfg.optimizer.name == "moga":     # the rest of MOGA's checks (hparams.py), before any engine starts
        check_hparams(moga_kwargs(cfg.optimizer.moga), "[optimizer.moga]")
    if cfg.optimizer.moga.lr_rule not in LR_RULES:
        raise ValueError(f"optimizer.moga.lr_rule={cfg.optimizer.moga.lr_rule!r}; allowed: {list(LR_RULES)}")
    if t.max_skipped_steps < 0:
        raise ValueError(f"training.max_skipped_steps={t.max_skipped_steps}; allowed: >= 0")
    validate_data(cfg)
    p = cfg.parallel
    files = cfg.checkpoint.deepspeed_files          # None: where needed (deepspeed_files_written)
    if files is False and (p.engine, cfg.optimizer.name) != ("deepspeed", "moga"):
        raise ValueError(f"checkpoint.deepspeed_files=false with parallel.engine={p.engine!r}, optimizer.name="
                         f"{cfg.optimizer.name!r}: allowed only with 'deepspeed' and 'moga' (elsewhere the engine's "
                         "own files are the only copy of the state; leave the key unset)")
    if files is True and p.engine != "deepspeed":
        raise ValueError(f"checkpoint.deepspeed_files=true with parallel.engine={p.engine!r}: allowed only with "
                         "'deepspeed' (Megatron writes its own checkpoints); leave the key unset")
    if p.engine not in ("deepspeed", "megatron"):
        raise ValueError(f"parallel.engine={p.engine!r}; allowed: 'deepspeed', 'megatron'")
    if p.engine == "deepspeed" and p.distributed_optimizer:
        raise ValueError("parallel.distributed_optimizer=true with parallel.engine='deepspeed': allowed only with "
                         "'megatron' (DeepSpeed shards optimizer state with engine.zero_stage >= 1)")
    if p.engine == "megatron" and cfg.engine.zero_stage == 1 and not p.distributed_optimizer:
        raise ValueError("engine.zero_stage=1 with parallel.engine='megatron': Megatron's distributed optimizer is "
                         "parallel.distributed_optimizer=true (engine.zero_stage is DeepSpeed's ZeRO stage; remove it)")
    if p.engine == "megatron" and cfg.engine.zero_stage == 3:    # else silently ignored: weights stay whole
        raise ValueError("engine.zero_stage=3 with parallel.engine='megatron': ZeRO-3 (partitioned weights) is "
                         "DeepSpeed's; Megatron shards optimizer state with parallel.distributed_optimizer=true "
                         "and weights with parallel.tensor_parallel / pipeline_parallel")
    if p.engine == "deepspeed" and (p.tensor_parallel, p.pipeline_parallel) != (1, 1):  # HF model: DP only
        raise ValueError("parallel.engine='deepspeed' runs data parallel only (tensor_parallel = "
                         "pipeline_parallel = 1); use engine='megatron' for tensor/pipeline parallelism")
    tp = p.tensor_parallel
    for name, value in (("model.hidden_size", m.hidden_size), ("model.num_heads", m.num_heads),
                        ("model.intermediate_size", m.intermediate_size), ("model.vocab_size", m.vocab_size)):
        if value % tp:
            raise ValueError(f"{name}={value} is not divisible by parallel.tensor_parallel={tp}")
    if m.num_kv_heads % tp and tp % m.num_kv_heads:
        raise ValueError(f"model.num_kv_heads={m.num_kv_heads} and parallel.tensor_parallel={tp}: one must divide the other")
    if m.num_layers % p.pipeline_parallel:
        raise ValueError(f"model.num_layers={m.num_layers} is not divisible by parallel.pipeline_parallel={p.pipeline_parallel}")


def deepspeed_files_written(cfg: RunConfig) -> bool:
    """Whether a DeepSpeed job's checkpoints hold DeepSpeed's own files: asked for
    (checkpoint.deepspeed_files=true), or the only copy of the state (an optimizer other than MOGA,
    which has no model-space state). DeepSpeed + MOGA otherwise writes the model-space state alone."""
    return cfg.checkpoint.deepspeed_files is True or cfg.optimizer.name != "moga"


def padded_vocab(vocab: int, tensor_parallel: int = 1) -> int:
    """The largest model.vocab_size a tokenizer of `vocab` tokens may have: rounded up to a multiple
    of 128 * tensor_parallel, as Megatron-LM pads it (--make-vocab-size-divisible-by 128)."""
    step = 128 * tensor_parallel
    return -(-vocab // step) * step


def validate_data(cfg: RunConfig) -> None:
    """[data] checks that need no file: blend weights, split, and the byte tokenizer's vocabulary
    (a file tokenizer's is checked when the job loads it)."""
    d, m = cfg.data, cfg.model
    if not d.paths:
        raise ValueError("data.paths is empty: name at least one prepared dataset prefix (or 'kjv')")
    if d.weights and len(d.weights) != len(d.paths):
        raise ValueError(f"data.weights has {len(d.weights)} entries but data.paths has {len(d.paths)}: give one "
                         "weight per path, or none")
    if any(not math.isfinite(w) or w < 0 for w in d.weights) or (d.weights and not sum(d.weights) > 0):
        raise ValueError(f"data.weights={list(d.weights)}: allowed finite numbers >= 0 with a positive sum")
    parts = d.split.replace("/", ",").split(",")
    try:
        shares = [float(x) for x in parts]
    except ValueError:
        shares = []
    if not 1 <= len(shares) <= 3 or any(not math.isfinite(x) or x < 0 for x in shares) or not sum(shares[:1]) > 0:
        raise ValueError(f"data.split={d.split!r}: allowed up to three numbers >= 0, train first and > 0, e.g. '98,1,1'")
    top = m.vocab_size if d.oversized_vocab else padded_vocab(256, cfg.parallel.tensor_parallel)
    if d.tokenizer == "bytes" and not 256 <= m.vocab_size <= top:
        raise ValueError(f"model.vocab_size={m.vocab_size} with data.tokenizer='bytes' (vocabulary 256): set "
                         "data.tokenizer to the tokenizer your data was prepared with (a tokenizer.json, a Hugging "
                         "Face tokenizer directory or a SentencePiece .model), or model.vocab_size = 256")


def data_parallel_size(cfg: RunConfig) -> int:
    """Data-parallel ranks of the preset's full layout."""
    p = cfg.parallel
    world = p.nodes * p.gpus_per_node
    if world % (p.tensor_parallel * p.pipeline_parallel):
        raise ValueError(f"{world} ranks are not divisible by tensor_parallel*pipeline_parallel = "
                         f"{p.tensor_parallel}*{p.pipeline_parallel}")
    return world // (p.tensor_parallel * p.pipeline_parallel)


def accumulation_steps(cfg: RunConfig, world_size: int) -> int:
    """Gradient accumulation steps so that micro * accum * world == global batch, else a clear error."""
    t = cfg.training
    per_step = t.micro_batch_size * world_size
    if t.global_batch_size % per_step:
        raise ValueError(f"training.global_batch_size={t.global_batch_size} is not divisible by "
                         f"micro_batch_size*world_size = {t.micro_batch_size}*{world_size}; choose a global "
                         f"batch that is a multiple of {per_step}")
    return t.global_batch_size // per_step


def as_dict(cfg) -> dict:
    """Plain-data form (for checkpoint metadata and logs)."""
    return dataclasses.asdict(cfg)
