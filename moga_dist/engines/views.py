"""Tensors that checkpoint writers take without copying."""
from __future__ import annotations

import torch


def exact_storage(t: torch.Tensor) -> torch.Tensor:
    """`t` (contiguous), or for a CPU view of a larger storage, an alias of the same memory whose
    storage is exactly `t`'s bytes; the alias keeps `t` alive. Why: `torch.save` writes a tensor's
    whole storage (so a view of a flat buffer must otherwise be cloned first), and megatron-core's
    checkpoint writer (FileSystemWriterAsync) clones every CPU tensor whose storage is larger than
    itself: for views of a rank's weights and momentum either is a full copy of its state at each
    save. GPU tensors are returned as they are (those writers copy them to the host anyway)."""
    if t.numel() == 0:       # an empty view still carries the whole buffer's storage: torch.save wrote it all
        return t.new_empty(t.shape)
    if t.device.type != "cpu" or t.untyped_storage().nbytes() == t.numel() * t.element_size():
        return t
    if not t.is_contiguous():
        raise ValueError(f"exact_storage needs a contiguous tensor, got strides {t.stride()}")
    import ctypes

    buf = (ctypes.c_char * (t.numel() * t.element_size())).from_address(t.data_ptr())
    buf.owner = t                      # the memory belongs to t's storage: keep it alive
    return torch.frombuffer(buf, dtype=t.dtype).view(t.shape)
