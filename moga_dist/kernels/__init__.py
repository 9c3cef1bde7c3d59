"""Fused backends of the MOGA step: `cpu` (C++/OpenMP, JIT-built) and `triton` (CUDA; runs on CPU
under TRITON_INTERPRET=1 for the tests)."""
