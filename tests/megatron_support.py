"""CPU shims that let megatron-core 0.16 run on gloo (test support only, never production code).

Megatron's RNG tracker, RoPE buffer and memory buffer call CUDA, and its DDP and optimizer wrappers
allocate with device='cuda' literals; these shims route them to the CPU so the CPU machines can
test the real wrappers."""
import contextlib
import operator
from functools import reduce

import torch
from torch.overrides import TorchFunctionMode


def _is_cuda(d):
    return (isinstance(d, int) and not isinstance(d, bool)) or (isinstance(d, str) and d.startswith("cuda")) \
        or (isinstance(d, torch.device) and d.type == "cuda")


class CudaToCpu(TorchFunctionMode):
    """Redirects device='cuda' allocations and .cuda()/.to('cuda') to the CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if "device" in kwargs and _is_cuda(kwargs["device"]):
            kwargs["device"] = "cpu"
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda(args[1]):
            args = (args[0], "cpu") + tuple(args[2:])
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:      # clip_grads asserts cuda types
            t = func(*args)
            return t if t.startswith("torch.cuda.") else t.replace("torch.", "torch.cuda.", 1)
        return func(*args, **kwargs)


class _Stream:
    def __init__(self, *a, **k):
        pass

    def wait_event(self, *a, **k):
        pass

    def wait_stream(self, *a, **k):
        pass

    def synchronize(self):
        pass


_ENABLED = []


def enable_cuda_to_cpu():
    """Once per process (a group spawn runs many cases in one process: a second CudaToCpu mode
    would only stack on the first)."""
    if _ENABLED:
        return
    _ENABLED.append(True)
    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.synchronize = torch.cuda.empty_cache = lambda *a, **k: None
    torch.cuda.current_stream = torch.cuda.default_stream = lambda *a, **k: _Stream()
    CudaToCpu().__enter__()


def apply_model_shims(seed=1234):
    """CPU RNG tracker, RoPE without .to(cuda), CPU GlobalMemoryBuffer (after initialize_model_parallel)."""
    import megatron.core.tensor_parallel.random as mr
    from megatron.core import utils as mu
    from megatron.core.models.common.embeddings import rotary_pos_embedding as rpe

    class CPURNGStatesTracker(mr.CudaRNGStatesTracker):
        def add(self, name, seed):
            self._is_initialized = True
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            self.seeds_.add(seed)
            g = torch.Generator()
            g.manual_seed(seed)
            self.states_[name] = g.get_state()

        @contextlib.contextmanager
        def fork(self, name=mr._MODEL_PARALLEL_RNG_TRACKER_NAME):
            orig = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(orig)

    mr._CUDA_RNG_STATE_TRACKER = CPURNGStatesTracker()
    mr._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    mr.model_parallel_cuda_manual_seed(seed)

    def get_emb(self, max_seq_len, offset=0):
        f = self.get_freqs_non_repeated(max_seq_len, offset)
        emb = torch.cat((f, f), -1) if not self.rotary_interleaved else \
            torch.stack((f.view(-1, 1), f.view(-1, 1)), -1).view(f.shape[0], -1)
        return emb[:, None, None, :]

    rpe.RotaryEmbedding.get_emb = get_emb

    def get_tensor(self, shape, dtype, name, mem_alloc_context=None):
        n = reduce(operator.mul, shape, 1)
        buf = self.buffer.get((name, dtype))
        if buf is None or buf.numel() < n:
            self.buffer[(name, dtype)] = buf = torch.empty(n, dtype=dtype)
        return buf[:n].view(*shape)

    mu.GlobalMemoryBuffer.get_tensor = get_tensor


def allow_python_3_12_typing():
    """megatron-core >= 0.18 (Requires-Python >= 3.12) imports typing.override, new in 3.12; the
    side environment runs it on 3.11 (installed with --ignore-requires-python)."""
    import typing

    if not hasattr(typing, "override"):
        import typing_extensions

        typing.override = typing_extensions.override


def tiny_config(**overrides):
    """The tests' small LLaMA-like TransformerConfig (2 layers, width 64, GQA 4/2, SwiGLU, RMSNorm,
    fp32, no dropout or fusions); `overrides` replace or add fields (tp, pp, bf16, biases...)."""
    import torch.nn.functional as nnf
    from megatron.core.transformer import TransformerConfig

    fields = dict(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=96,
                  use_cpu_initialization=True, params_dtype=torch.float32, pipeline_dtype=torch.float32,
                  normalization="RMSNorm", gated_linear_unit=True, activation_func=nnf.silu, add_bias_linear=False,
                  hidden_dropout=0.0, attention_dropout=0.0, bias_dropout_fusion=False, apply_rope_fusion=False,
                  masked_softmax_fusion=False, persist_layer_norm=False, gradient_accumulation_fusion=False)
    return TransformerConfig(**{**fields, **overrides})


def tiny_gpt_ddp(cfg, *, vocab_size, seq_len, distributed_optimizer, seed):
    """A GPTModel (local RMSNorm spec, RoPE, untied head) of `cfg` seeded with `seed`, wrapped in
    megatron-core's DDP with fp32 gradient reduction: (model, ddp)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    torch.manual_seed(seed)
    model = GPTModel(config=cfg, transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm"),
                     vocab_size=vocab_size, max_sequence_length=seq_len, position_embedding_type="rope",
                     share_embeddings_and_output_weights=False)
    ddp = DistributedDataParallel(cfg, DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=False, use_distributed_optimizer=distributed_optimizer), model)
    return model, ddp
