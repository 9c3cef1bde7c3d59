"""The training job (a recipe, not the core): LLaMA pretraining with MOGA under DeepSpeed (HF LLaMA,
ZeRO 0-3) or Megatron-core (GPTModel, TP x PP x DP): `python -m moga_dist.train --config configs/X.toml`."""
