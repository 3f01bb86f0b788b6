"""``run_op``: eager calls reach the backend kernel directly, anything that must see the
``torch.library`` op (a dispatch mode, FakeTensorMode, a tensor subclass) still gets it, with the
same results."""
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fastpeft
from fastpeft.testing import assert_close


class _Record(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def _lora_args(requires_grad=True):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 12, generator=g, requires_grad=requires_grad)
    W, b = torch.randn(10, 12, generator=g), torch.randn(10, generator=g)
    A = torch.randn(4, 12, generator=g, requires_grad=requires_grad)
    B = torch.randn(10, 4, generator=g, requires_grad=requires_grad)
    return x, W, b, A, B


def test_dispatch_mode_sees_the_library_op_and_results_match():
    x, W, b, A, B = _lora_args()
    y = fastpeft.lora_linear(x, W, b, A, B, 2.0)
    y.sum().backward()
    grads = [t.grad.clone() for t in (x, A, B)]
    for t in (x, A, B):
        t.grad = None
    rec = _Record()
    with rec:
        y2 = fastpeft.lora_linear(x, W, b, A, B, 2.0)
        y2.sum().backward()
    assert any("fastpeft.lora_fwd" in o for o in rec.ops), rec.ops
    assert any("fastpeft.lora_bwd" in o for o in rec.ops), rec.ops
    assert_close(y2.detach(), y.detach(), torch.float32, "y")
    for t, g in zip((x, A, B), grads):
        assert_close(t.grad, g, torch.float32, "grad")


def test_fake_tensor_mode_runs_the_fake_implementation():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x, W, b, A, B = _lora_args(requires_grad=False)
        y = fastpeft.lora_linear(x, W, b, A, B, 2.0)
        z = fastpeft.adapter(x, torch.randn(3, 12), None, torch.randn(12, 3), None, "gelu", 0.5)
    assert y.shape == (5, 10) and z.shape == (5, 12)


def test_meta_device_context():
    with torch.device("meta"):
        x, W, b, A, B = _lora_args(requires_grad=False)
        y = fastpeft.lora_linear(x, W, b, A, B, 2.0, backend="reference")
    assert y.device.type == "meta" and y.shape == (5, 10)


def test_double_backward_is_refused_not_silently_detached():
    """The fused ops have no double backward: with create_graph=True the backward's inputs require
    grad under grad mode, so run_op goes through the library op, which says so."""
    import pytest

    x, W, b, A, B = _lora_args()
    y = fastpeft.lora_linear(x, W, b, A, B, 2.0)
    (g,) = torch.autograd.grad(y.sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="no autograd formula"):
        g.sum().backward()
