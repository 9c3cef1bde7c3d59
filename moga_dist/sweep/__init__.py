"""Width-transfer sweeps: `python -m moga_dist.sweep {lr,mults,coord-check}`."""
