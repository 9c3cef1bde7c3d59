"""Adapters that put MOGA inside the engines users already run (DeepSpeed, Megatron-core). Each is
thin and uses only the core's public interface (MOGA.declare*, MOGA.invalidate, layouts)."""
