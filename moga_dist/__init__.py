"""moga_dist: the MOGA optimizer, exact at any tensor-/data-parallel layout."""
from .layout import FlatPartition, RowBlocks, ShardLayout, TensorParallelSplit
from .optimizer import MOGA, NonFiniteGradientError
from .param_groups import assign_roles, param_groups

__version__ = "0.1.0"
__all__ = ["MOGA", "NonFiniteGradientError", "param_groups", "assign_roles", "ShardLayout",
           "TensorParallelSplit", "FlatPartition", "RowBlocks", "__version__"]
