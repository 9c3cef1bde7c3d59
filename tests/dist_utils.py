"""Spawning gloo process groups inside pytest (no torchrun needed): moga_dist.testing's helper."""
from moga_dist.testing import free_port, spawn  # noqa: F401
