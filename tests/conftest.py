"""Shared test set-up: CPU-only, deterministic, DeepSpeed on its CPU accelerator."""
import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("OMP_NUM_THREADS", "1")

# The Triton kernels run on CPU tensors through Triton's interpreter (CI has no GPU). Set before
# anything imports triton: the interpreter is chosen when a kernel is defined.
try:
    import torch

    _cuda = torch.cuda.is_available()
except ImportError:
    _cuda = False
if not _cuda:
    os.environ.setdefault("TRITON_INTERPRET", "1")
