"""moga_dist: the MOGA optimizer, exact at any tensor-/data-parallel layout.

core/     the math, shard layouts, reduction plans, collectives and the optimizer (imports no engine)
kernels/  fused backends of the step (CPU C++, Triton for CUDA)
engines/  thin adapters for DeepSpeed and Megatron-core, using only the core's public interface
train/, bench/, sweep/  recipes: the training job, benchmarks and width-transfer sweeps
"""
from .core.adopters import on_construct
from .core.layout import FlatPartition, RowBlocks, ShardLayout, TensorParallelSplit
from .core.optimizer import MOGA, NonFiniteGradientError
from .core.param_groups import assign_roles, param_groups
from .core.roles import MissingRolesWarning, take_roles
from .engines.fsdp1 import install as _install_fsdp1


def _deepspeed_on_first_moga() -> None:
    """deepspeed.initialize (own script, HF Trainer, Accelerate) puts MOGA exactly inside its ZeRO
    wrappers once engines/deepspeed.py's patch is in: installed when the first MOGA is constructed
    (or when moga_dist.engines.deepspeed is imported), not by `import moga_dist`, which leaves
    sys.meta_path and DeepSpeed alone. DeepSpeed itself is not imported: if it is not yet, the
    patch waits for it (engines/deepspeed.py `install`)."""
    from .engines.deepspeed import install

    install()


on_construct(_deepspeed_on_first_moga)
# torch FSDP1's flat shards are mapped to their parameters at a MOGA's first step (engines/fsdp1.py);
# this only registers a function with the core.
_install_fsdp1()

__version__ = "0.1.0"
__all__ = ["MOGA", "NonFiniteGradientError", "param_groups", "assign_roles", "take_roles", "MissingRolesWarning", "ShardLayout",
           "TensorParallelSplit", "FlatPartition", "RowBlocks", "__version__"]
