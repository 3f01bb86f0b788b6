"""Triton LoRA kernels (fastpeft/triton/lora.py) vs the autograd oracle.

Runs through TRITON_INTERPRET=1 on CPU when there is no GPU (tests/conftest.py), so shapes are
small and dtypes are fp32 (tight) and fp16 (tolerance table): the interpreter's bf16 ``tl.dot``
is unusable. On a GPU the same tests run on CUDA tensors.
"""
import functools

import pytest
import torch

import fastpeft
from fastpeft import _dropout
from fastpeft._backend import why_not
from fastpeft.reference.lora import lora_bwd_reference
from fastpeft.testing import assert_close, upcast
from tests.conftest import GPU, device_for
from tests.ops import test_lora as lora_tests

DEVICE = device_for("triton")
_why = why_not("triton", "lora", torch.device(DEVICE))
pytestmark = [pytest.mark.skipif(_why is not None, reason=str(_why)), GPU]

NAMES = ["x", "weight", "bias", "lora_A", "lora_B"]
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16")]


# one input builder and one output/gradient check for every backend (tests/ops/test_lora.py)
make = functools.partial(lora_tests.make, device=DEVICE)
check = functools.partial(lora_tests.check, "triton")


# --- shapes, ranks, dtypes ------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p", [0.0, 0.2], ids=["nodrop", "p0.2"])
@pytest.mark.parametrize("M,r", [(1, 1), (7, 7), (33, 16)], ids=lambda v: str(v))
def test_shapes(M, r, p, dtype):
    check(M, 129, 65, r, dtype, p)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("train_weight", [True, False], ids=["need_weight", "frozen"])
def test_bias_and_weight_grads(bias, train_weight):
    check(33, 129, 65, 7, torch.float32, 0.1, bias=bias, train_weight=train_weight)


def test_leading_dims():
    check(7, 129, 65, 16, torch.float32, 0.0, lead=(2, 3))


@pytest.mark.parametrize("dtype", DTYPES)
def test_noncontiguous_x(dtype):
    check(7, 129, 65, 7, dtype, 0.3, lead=(3,), noncontig=True)


def test_no_dx():
    """x not requiring grad: the dx GEMM is compiled out, dA / dB must still be right."""
    check(33, 129, 65, 7, torch.float32, 0.25, x_grad=False)


def test_rank_chunks():
    """r = 100: padded to 128, the GEMM kernels take the rank in two 64-wide chunks."""
    check(9, 40, 33, 100, torch.float32, 0.1, scaling=0.3)


def test_empty_rows():
    from fastpeft.triton.lora import lora_bwd_triton, lora_fwd_triton

    x, W, b, A, B = [t.detach() for t in make(0, 16, 8, 3, torch.float32)]
    y, t = lora_fwd_triton(x, W, b, A, B, 1.0, 0.0, None)
    assert y.shape == (0, 8) and t.shape == (0, 3)
    dx, dW, db, dA, dB = lora_bwd_triton(y, x, W, A, B, t, 1.0, 0.0, None, True, True, True)
    assert dx.shape == (0, 16) and dW.shape == (8, 16) and db.shape == (8,)
    assert dA.abs().sum() == 0 and dB.abs().sum() == 0 and dW.abs().sum() == 0


# --- dropout masks are the reference's, bit for bit ------------------------------------------
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_masks_exact(p):
    """Forward (t) and backward (dx, dA) masks equal fastpeft._dropout.keep_mask exactly.

    With x = 1, A = I (r = K): t = keep/(1-p). With W = 0, A = B = I: dx = s·dy⊙keep/(1-p),
    so every element of t and dx exposes one mask bit.
    """
    from fastpeft.triton.lora import lora_bwd_triton, lora_fwd_triton

    M, K = 21, 48
    seed = torch.tensor(987654321, dtype=torch.int64)
    keep = _dropout.keep_mask(seed, p, M, K).to(DEVICE)
    x = torch.ones(M, K, device=DEVICE)
    eye = torch.eye(K, device=DEVICE)
    W = torch.zeros(K, K, device=DEVICE)
    y, t = lora_fwd_triton(x, W, None, eye, eye, 1.0, p, seed)
    assert torch.equal(t != 0, keep)
    torch.testing.assert_close(t[keep], torch.full_like(t[keep], 1 / (1 - p)))
    torch.testing.assert_close(y, t)

    dy = torch.rand(M, K, device=DEVICE) + 0.5
    s = 0.75
    dx, _, _, dA, dB = lora_bwd_triton(dy, x, W, eye, eye, t, s, p, seed, True, False, False)
    assert torch.equal(dx != 0, keep)
    torch.testing.assert_close(dx, s * dy * keep / (1 - p))
    ref = lora_bwd_reference(*upcast([dy, x, W, eye, eye, t]), s, p, seed, False, False, False)
    assert_close(dA, ref[3], torch.float32, "dA")
    assert_close(dB, ref[4], torch.float32, "dB")


def test_mask_hash_past_2pow32():
    """The kernels' hash uses the high word of int64 element indices like the reference."""
    from fastpeft.triton._common import dropout_keep_triton

    cols = 1000
    row_start = 2**32 // cols - 3  # the block straddles index 2**32
    for seed, p in [(0, 0.3), (2**31 - 2, 0.7), (12345, 0.05)]:
        got = dropout_keep_triton(seed, p, 7, cols, DEVICE, row_start=row_start)
        exp = _dropout.keep_mask(seed, p, 7, cols, row_start=row_start).to(DEVICE)
        assert torch.equal(got, exp), (seed, p)


def test_dropout_determinism_and_rate():
    """Same torch seed -> same output; fresh draw -> different mask; keep rate ~ 1-p."""
    M, K = 48, 64
    x = torch.ones(M, K, device=DEVICE)
    W = torch.zeros(K, K, device=DEVICE)
    eye = torch.eye(K, device=DEVICE)
    p = 0.3
    torch.manual_seed(7)
    y1 = fastpeft.lora_linear(x, W, None, eye, eye, 1.0, dropout_p=p, training=True, backend="triton")
    torch.manual_seed(7)
    y2 = fastpeft.lora_linear(x, W, None, eye, eye, 1.0, dropout_p=p, training=True, backend="triton")
    y3 = fastpeft.lora_linear(x, W, None, eye, eye, 1.0, dropout_p=p, training=True, backend="triton")
    assert torch.equal(y1, y2)
    assert not torch.equal(y1, y3)
    assert abs((y1 != 0).float().mean().item() - (1 - p)) < 0.03
