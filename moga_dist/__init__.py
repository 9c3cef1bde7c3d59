"""moga_dist: the MOGA optimizer, exact at any tensor-/data-parallel layout.

core/     the math, shard layouts, reduction plans, collectives and the optimizer (imports no engine)
kernels/  fused backends of the step (CPU C++, Triton for CUDA)
engines/  thin adapters for DeepSpeed and Megatron-core, using only the core's public interface
train/, bench/, sweep/  recipes: the training job, benchmarks and width-transfer sweeps
"""
from .core.layout import FlatPartition, RowBlocks, ShardLayout, TensorParallelSplit
from .core.optimizer import MOGA, NonFiniteGradientError
from .core.param_groups import assign_roles, param_groups
from .core.roles import MissingRolesWarning, take_roles
from .engines.deepspeed import install as _install_deepspeed
from .engines.fsdp1 import install as _install_fsdp1

# deepspeed.initialize (own script, HF Trainer, Accelerate) puts MOGA exactly inside its ZeRO wrappers;
# DeepSpeed is not imported here, the patch waits for it.
_install_deepspeed()
# torch FSDP1's flat shards are mapped to their parameters at a MOGA's first step (engines/fsdp1.py).
_install_fsdp1()

__version__ = "0.1.0"
__all__ = ["MOGA", "NonFiniteGradientError", "param_groups", "assign_roles", "take_roles", "MissingRolesWarning", "ShardLayout",
           "TensorParallelSplit", "FlatPartition", "RowBlocks", "__version__"]
