"""Small helpers shared by the op wrappers."""
from __future__ import annotations

import torch

from fastpeft._backend import get_kernel


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


_PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter)


def run_op(op, *args):
    """Call the ``torch.library`` op ``op`` (its last argument is the backend name).

    In plain eager mode its backend kernel is called directly: the op's body would call the same
    kernel with the same arguments, and its Python dispatch layers (custom_op's autograd wrapper,
    redispatch, alias checks) cost ~40 µs a call, a few % of a LoRA step at 512 tokens x 768 on 2
    CPU cores. The op itself runs whenever something may need to see it: ``torch.compile``
    tracing, a dispatch or torch-function mode (FakeTensorMode, FlopCounterMode, ``with
    torch.device(...)``), a functorch transform, a tensor subclass (DTensor, ...) among the
    arguments, or an argument that requires grad with grad mode on (the ops have no double
    backward: the op says so instead of returning a result detached from the graph).
    """
    if not (torch.compiler.is_compiling() or torch._C._is_torch_function_mode_enabled()
            or torch._C._len_torch_dispatch_stack() > 0 or torch._C._functorch.peek_interpreter_stack() is not None):
        grad = torch.is_grad_enabled()  # e.g. a backward with create_graph=True: the op's own error
        for a in args:
            if isinstance(a, torch.Tensor) and (type(a) not in _PLAIN_TYPES or (grad and a.requires_grad)):
                break
        else:
            name = op._name  # "<family>_fwd" / "<family>_bwd"
            return get_kernel(name.rsplit("_", 1)[0], name, args[-1])(*args[:-1])
    return op(*args)
