"""Small helpers shared by the op wrappers."""
from __future__ import annotations

import torch


def autocast_dtype(device: torch.device):
    """The autocast dtype active for ``device``, or None when autocast is off."""
    dev = torch.device(device).type
    if dev in ("cpu", "cuda") and torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return None


def cast_all(dtype, *tensors):
    """Cast every floating tensor (None passes through) to ``dtype``."""
    return tuple(t if (t is None or not isinstance(t, torch.Tensor) or not t.is_floating_point())
                 else t.to(dtype) for t in tensors)


def none_if_empty(t: torch.Tensor, needed: bool):
    return t if needed else None
