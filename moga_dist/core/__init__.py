"""The core: MOGA's math as functions over local tensors and shard descriptions, the optimizer,
and the one module that talks to torch.distributed (collectives). Imports no engine."""
