"""Shared test set-up: CPU-only, deterministic, DeepSpeed on its CPU accelerator."""
import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("OMP_NUM_THREADS", "1")
