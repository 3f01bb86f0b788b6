"""Triton adapter kernels (fastpeft/triton/adapter.py) vs the autograd oracle.

Runs through TRITON_INTERPRET=1 on CPU when there is no GPU (tests/conftest.py), so shapes
are small and dtypes are fp32 (tight) and fp16 (tolerance table): the interpreter's bf16
``tl.dot`` is unusable. On a GPU the same tests run on CUDA tensors.
"""
import math

import pytest
import torch

import fastpeft
from fastpeft import _dropout
from fastpeft._backend import why_not
from fastpeft.reference.adapter import ACTIVATIONS, adapter_bwd_reference, adapter_fwd_reference, adapter_reference
from fastpeft.testing import assert_close, upcast
from tests.conftest import GPU, device_for

DEVICE = device_for("triton")
_why = why_not("triton", "adapter", torch.device(DEVICE))
pytestmark = [pytest.mark.skipif(_why is not None, reason=str(_why)), GPU]

NAMES = ["x", "down_weight", "down_bias", "up_weight", "up_bias", "scaling", "residual"]
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16")]


def make(M, d, m, dtype, *, lead=(), bias=True, residual=False, scale="float", noncontig=False, amp=1.0):
    """Adapter inputs (all requiring grad) on DEVICE; scale: "float", "0d" or "vec"."""
    g = torch.Generator().manual_seed(M * 7919 + d * 31 + m)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731

    def dev(t, wide=False):
        if t is None:
            return None
        if wide:  # a strided view: every other column of a wider buffer
            buf = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=dtype, device=DEVICE)
            t = buf[..., ::2].copy_(t.to(dtype))
        else:
            t = t.to(device=DEVICE, dtype=dtype)
        return t.requires_grad_(True)

    x = dev(amp * rnd(*lead, M, d), wide=noncontig)
    Wd, Wu = dev(rnd(m, d) / math.sqrt(d)), dev(rnd(d, m) / math.sqrt(m))
    bd, bu = (dev(rnd(m)), dev(0.5 * rnd(d))) if bias else (None, None)
    R = dev(rnd(*lead, M, d), wide=noncontig) if residual else None
    s = {"float": 0.7, "0d": dev(torch.tensor(0.6, dtype=torch.float64)), "vec": dev(0.5 + rnd(d))}[scale]
    return [x, Wd, bd, Wu, bu, s, R]


def check(M, d, m, dtype, activation="relu", p=0.0, *, lead=(), bias=True, residual=False, scale="float",
          noncontig=False, amp=1.0):
    ts = make(M, d, m, dtype, lead=lead, bias=bias, residual=residual, scale=scale, noncontig=noncontig,
              amp=amp)
    x, Wd, bd, Wu, bu, s, R = ts
    if noncontig:
        assert not x.is_contiguous()
    torch.manual_seed(123)
    y = fastpeft.adapter(x, Wd, bd, Wu, bu, activation, s, R, dropout_p=p, training=p > 0, backend="triton")
    torch.manual_seed(123)  # the same seed the op drew
    seed = _dropout.new_seed(p > 0)
    ref = upcast(ts)
    y_ref = adapter_reference(*ref[:5], activation, ref[5], ref[6], p, seed)
    assert y.dtype == dtype and y.shape == (*lead, M, d) and y.device == x.device
    assert_close(y, y_ref, dtype, "y")
    dy = torch.randn(y.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    y.backward(dy.to(device=DEVICE, dtype=dtype))
    y_ref.backward(dy.to(DEVICE))
    for name, t, t_ref in zip(NAMES, ts, ref):
        if not isinstance(t, torch.Tensor):
            continue
        assert t.grad is not None, f"{name} got no gradient"
        assert t.grad.shape == t.shape and t.grad.dtype == dtype
        assert_close(t.grad, t_ref.grad, dtype, f"d{name}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(7, 32, 8), (33, 129, 20)], ids=lambda s: "M{}-d{}-m{}".format(*s))
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_activations(activation, shape, dtype):
    check(*shape, dtype, activation, p=0.0, residual=False, scale="float")


@pytest.mark.parametrize("m", [1, 8, 20])
@pytest.mark.parametrize("d", [32, 129])
@pytest.mark.parametrize("M", [1, 7, 33])
def test_shapes(M, d, m):
    # dropout and a learned (d,) scale on every shape: masks and the d_scale reduction see every tiling
    check(M, d, m, torch.float32, "gelu", p=0.25, residual=(M + m) % 2 == 0, scale="vec")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scale", ["float", "0d", "vec"])
@pytest.mark.parametrize("residual", [False, True], ids=["sequential", "parallel"])
@pytest.mark.parametrize("p", [0.0, 0.3], ids=["nodrop", "drop0.3"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_options(bias, p, residual, scale, dtype):
    check(33, 129, 8, dtype, "silu", p=p, bias=bias, residual=residual, scale=scale)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("residual", [False, True], ids=["sequential", "parallel"])
def test_leading_dims_noncontiguous(residual, dtype):
    check(5, 40, 12, dtype, "gelu_tanh", p=0.2, lead=(2, 3), residual=residual, scale="0d", noncontig=True)


@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh", "silu"])
def test_large_preactivations(activation):
    # |z| up to ~40: the exp-based tanh / sigmoid must saturate, not overflow to nan
    check(7, 32, 8, torch.float32, activation, amp=8.0)


def test_stride0_grad_output():
    # y.sum().backward() hands the kernels an expanded dy with stride 0 in both dims
    ts = make(7, 32, 8, torch.float32, lead=(2,), scale="vec")
    ref = upcast(ts)
    fastpeft.adapter(*ts[:5], "relu", ts[5], backend="triton").sum().backward()
    adapter_reference(*ref[:5], "relu", ref[5]).sum().backward()
    for name, t, t_ref in zip(NAMES, ts, ref):
        if isinstance(t, torch.Tensor):
            assert_close(t.grad, t_ref.grad, torch.float32, f"d{name}")


def test_max_bottleneck():
    check(9, 24, 256, torch.float32, "relu", p=0.1, scale="vec")


def test_bottleneck_too_large():
    x = torch.randn(4, 16, device=DEVICE)
    with pytest.raises(ValueError, match="down_weight"):
        fastpeft.adapter(x, torch.randn(300, 16, device=DEVICE), None, torch.randn(16, 300, device=DEVICE), None,
                         backend="triton")


def test_fresh_adapter_is_identity():
    # init="lora": the up projection and biases are zero, so y must be x bit for bit
    x = torch.randn(7, 129, device=DEVICE)
    Wd = torch.randn(8, 129, device=DEVICE)
    y = fastpeft.adapter(x, Wd, torch.zeros(8, device=DEVICE), torch.zeros(129, 8, device=DEVICE),
                         torch.zeros(129, device=DEVICE), "gelu", 0.1, backend="triton")
    assert torch.equal(y, x)


@pytest.mark.parametrize("row_start", [0, (2**32) // 13 - 3], ids=["low", "index>=2^32"])
@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dropout_mask_bit_identical(p, row_start):
    from fastpeft.triton._common import dropout_keep_triton

    for seed in (0, 1, 987654321, _dropout.SEED_BOUND - 1):
        got = dropout_keep_triton(seed, p, 7, 13, DEVICE, row_start=row_start).cpu()
        assert torch.equal(got, _dropout.keep_mask(seed, p, 7, 13, row_start=row_start)), (seed, p)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("need", ["all", "no_x", "no_scale"])
def test_kernels_vs_reference_kernels(need, dtype):
    """The raw contract: stride-0 scale, empty unneeded outputs, residual_is_x False."""
    from fastpeft.triton.adapter import adapter_bwd_triton, adapter_fwd_triton

    M, d, m = 19, 48, 20
    x, Wd, bd, Wu, bu, _, R = [t.detach() if isinstance(t, torch.Tensor) else t
                               for t in make(M, d, m, dtype, residual=True)]
    scale = torch.tensor(0.3, dtype=dtype, device=DEVICE).expand(d)
    seed = torch.tensor(4242, dtype=torch.int64)
    y, z = adapter_fwd_triton(x, Wd, bd, Wu, bu, scale, R, "gelu", 0.2, seed)
    args64 = upcast([x, Wd, bd, Wu, bu, scale, R])
    y_ref, z_ref = adapter_fwd_reference(*args64, "gelu", 0.2, seed)
    assert_close(y, y_ref, dtype, "y")
    assert_close(z, z_ref, dtype, "z")
    dy = torch.randn(M, d, dtype=dtype, device=DEVICE)
    need_x, need_scale = need != "no_x", need != "no_scale"
    out = adapter_bwd_triton(dy, x, Wd, Wu, bu, z, scale, "gelu", 0.2, seed, False, need_x, need_scale)
    ref = adapter_bwd_reference(dy.double(), args64[0], args64[1], args64[3], args64[4], z.double(),
                                args64[5], "gelu", 0.2, seed, False, need_x, need_scale)
    for name, a, b in zip(["dx", "dWd", "dbd", "dWu", "dbu", "dscale"], out, ref):
        if b.numel() == 0:
            assert a.numel() == 0, f"{name} should be empty"
        else:
            assert a.dtype == dtype
            assert_close(a, b, dtype, name)


def test_empty_rows():
    from fastpeft.triton.adapter import adapter_bwd_triton, adapter_fwd_triton

    x = torch.randn(0, 32, device=DEVICE)
    Wd, Wu, s = torch.randn(8, 32, device=DEVICE), torch.randn(32, 8, device=DEVICE), torch.ones(32, device=DEVICE)
    y, z = adapter_fwd_triton(x, Wd, None, Wu, None, s, None, "relu", 0.0, None)
    assert y.shape == (0, 32) and z.shape == (0, 8)
    dx, dWd, dbd, dWu, dbu, ds = adapter_bwd_triton(x, x, Wd, Wu, None, z, s, "relu", 0.0, None, True, True, True)
    assert dx.shape == (0, 32) and dWd.abs().sum() == 0 and dWu.abs().sum() == 0 and ds.shape == (32,)


def test_opcheck():
    ts = [t.detach() if isinstance(t, torch.Tensor) else t for t in make(7, 32, 8, torch.float32, residual=True)]
    x, Wd, bd, Wu, bu, _, R = ts
    scale = torch.full((32,), 0.5, device=DEVICE)
    seed = torch.tensor(7, dtype=torch.int64)
    torch.library.opcheck(torch.ops.fastpeft.adapter_fwd.default,
                          (x, Wd, bd, Wu, bu, scale, R, "silu", 0.1, seed, "triton"),
                          test_utils=("test_schema", "test_faketensor"))
    y, z = torch.ops.fastpeft.adapter_fwd(x, Wd, bd, Wu, bu, scale, R, "silu", 0.1, seed, "triton")
    torch.library.opcheck(torch.ops.fastpeft.adapter_bwd.default,
                          (torch.randn_like(y), x, Wd, Wu, bu, z, scale, "silu", 0.1, seed, False, True, True,
                           "triton"),
                          test_utils=("test_schema", "test_faketensor"))

