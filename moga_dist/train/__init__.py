"""LLaMA pretraining with MOGA under DeepSpeed: `python -m moga_dist.train --config configs/X.toml`."""
