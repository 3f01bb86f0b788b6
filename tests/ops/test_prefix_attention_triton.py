"""Triton prefix-attention kernels (fastpeft/triton/prefix_attention.py) vs oracles.

Runs through TRITON_INTERPRET=1 on CPU when there is no GPU (tests/conftest.py), so shapes are
tiny and dtypes are fp32 (tight) and fp16 (tolerance table): the interpreter's bf16 ``tl.dot``
is unusable. On a GPU the same tests run on CUDA tensors.

Two oracles, both in float64 from the same inputs: this file's own ``cat`` + explicit softmax
(``oracle``, which also gives lse), and ``fastpeft.reference.prefix_attention`` (cat + SDPA).
Every output (out, lse) and all five gradients are checked.
"""
import math

import pytest
import torch

import fastpeft
from fastpeft._backend import why_not
from fastpeft.reference.prefix_attention import prefix_attention_reference
from fastpeft.testing import assert_close, upcast
from tests.conftest import GPU, device_for

DEVICE = device_for("triton")
_why = why_not("triton", "prefix_attention", torch.device(DEVICE))
pytestmark = [pytest.mark.skipif(_why is not None, reason=str(_why)), GPU]

NAMES = ["q", "k", "v", "prefix_k", "prefix_v"]


def oracle(q, k, v, pk, pv, mask, is_causal, scale):
    """Explicit softmax over cat([prefix ; main]) -> (out, lse). mask: additive (B,H,L,S)-broadcastable."""
    B, H, L, D = q.shape
    Hkv, S, P = k.shape[1], k.shape[2], pk.shape[2]
    kk = torch.cat([pk.expand(B, -1, -1, -1), k], 2).repeat_interleave(H // Hkv, 1)
    vv = torch.cat([pv.expand(B, -1, -1, -1), v], 2).repeat_interleave(H // Hkv, 1)
    s = torch.matmul(q, kk.transpose(-1, -2)) * scale
    main = s[..., P:]
    if mask is not None:
        main = main + mask
    if is_causal:
        main = main.masked_fill(~torch.ones(L, S, dtype=torch.bool, device=q.device).tril(), -math.inf)
    s = torch.cat([s[..., :P], main], -1)
    lse = torch.logsumexp(s, -1)
    return torch.matmul(torch.exp(s - lse[..., None]), vv), lse


def make(B, H, Hkv, L, S, P, D, Bp, dtype, noncontig=False):
    g = torch.Generator().manual_seed(B * 1000 + H * 100 + L * 10 + S + 7 * P + D + Bp)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    ts = [rnd(B, H, L, D), rnd(B, Hkv, S, D), rnd(B, Hkv, S, D), rnd(Bp, Hkv, P, D), rnd(Bp, Hkv, P, D)]
    out = []
    for i, t in enumerate(ts):
        if noncontig and i == 0:  # q as a (B, L, H, D) buffer viewed (B, H, L, D), like a fused qkv projection
            t = t.transpose(1, 2).contiguous().to(device=DEVICE, dtype=dtype).transpose(1, 2)
        else:
            t = t.to(device=DEVICE, dtype=dtype)
        out.append(t.requires_grad_(True))
    return out


def check(B, H, Hkv, L, S, P, D, Bp, dtype, *, is_causal=False, mask=None, scale=None, noncontig=False):
    """mask: None, "add" (B,H,L,S) float with -inf holes, "bool2d" (L,S) bool, "b1" (B,1,L,S) float."""
    ts = make(B, H, Hkv, L, S, P, D, Bp, dtype, noncontig)
    if noncontig:
        assert not ts[0].is_contiguous()
    g = torch.Generator().manual_seed(11)
    m_user, m_add = None, None
    if mask == "add":
        m_add = torch.randn(B, H, L, S, generator=g, dtype=torch.float64)
        m_add[torch.rand(B, H, L, S, generator=g) < 0.3] = -math.inf
        m_user = m_add.to(device=DEVICE, dtype=dtype)
    elif mask == "b1":
        m_add = torch.randn(B, 1, L, S, generator=g, dtype=torch.float64)
        m_user = m_add.to(device=DEVICE, dtype=dtype)
    elif mask == "bool2d":
        keep = torch.rand(L, S, generator=g) < 0.6
        m_add = torch.zeros(L, S, dtype=torch.float64).masked_fill(~keep, -math.inf)
        m_user = keep.to(DEVICE)
    if m_add is not None:
        m_add = m_add.to(device=DEVICE, dtype=dtype).to(torch.float64)  # the values the kernel sees
    sc = 1.0 / math.sqrt(D) if scale is None else scale

    out = fastpeft.prefix_attention(*ts, attn_mask=m_user, is_causal=is_causal, scale=scale, backend="triton")
    ref = upcast(ts)
    o_ref, lse_ref = oracle(*ref, m_add, is_causal, sc)
    assert out.shape == (B, H, L, D) and out.dtype == dtype
    assert_close(out, o_ref, dtype, "out")
    # the library reference (cat + SDPA) agrees with this file's oracle
    o_lib = prefix_attention_reference(*[t.detach() for t in ref], attn_mask=None if m_add is None else m_add,
                                       is_causal=is_causal, scale=scale)
    torch.testing.assert_close(o_lib, o_ref.detach(), atol=1e-9, rtol=1e-9)

    # lse straight from the kernel
    from fastpeft.triton.prefix_attention import prefix_attention_fwd_triton
    m_kernel = None if m_add is None else m_add.to(dtype).expand(B, H, L, S)
    o2, lse = prefix_attention_fwd_triton(*[t.detach() for t in ts], m_kernel, is_causal, sc)
    assert lse.shape == (B, H, L) and lse.dtype == torch.float32
    assert_close(lse, lse_ref, dtype, "lse")
    assert torch.equal(o2, out.detach())

    dout = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    out.backward(dout.to(device=DEVICE, dtype=dtype))
    o_ref.backward(dout.to(DEVICE))
    for name, t, t_ref in zip(NAMES, ts, ref):
        assert t.grad is not None and t.grad.shape == t.shape and t.grad.dtype == dtype, name
        assert_close(t.grad, t_ref.grad, dtype, f"d{name}")


SHAPES = [pytest.param(*s, id="B{}-H{}-Hkv{}-L{}-S{}-P{}-D{}".format(*s)) for s in [
    (1, 2, 2, 1, 1, 1, 16),
    (2, 2, 1, 7, 20, 7, 32),
    (2, 2, 2, 20, 7, 20, 16),
    (2, 2, 1, 20, 20, 1, 32),
]]


@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16")])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shared", [True, False], ids=["Bp1", "BpB"])
@pytest.mark.parametrize("B,H,Hkv,L,S,P,D", SHAPES)
def test_shapes(B, H, Hkv, L, S, P, D, shared, causal, dtype):
    check(B, H, Hkv, L, S, P, D, 1 if shared else B, dtype, is_causal=causal)


@pytest.mark.parametrize("mask", ["add", "bool2d", "b1"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_masks(mask, causal):
    check(2, 2, 1, 7, 20, 7, 16, 1, torch.float32, is_causal=causal, mask=mask)


def test_mask_fp16_gqa_per_sample_prefix():
    check(2, 2, 1, 20, 7, 7, 32, 2, torch.float16, is_causal=True, mask="add")


def test_fully_masked_rows_see_only_the_prefix():
    """Rows whose main keys are all masked attend to the prefix alone (no NaN)."""
    check(1, 2, 2, 7, 7, 7, 16, 1, torch.float32, mask="bool2d")  # random holes
    B, H, L, S, P, D = 1, 2, 5, 6, 3, 16
    q, k, v, pk, pv = make(B, H, H, L, S, P, D, 1, torch.float32)
    keep = torch.ones(L, S, dtype=torch.bool, device=DEVICE)
    keep[2] = False
    out = fastpeft.prefix_attention(q, k, v, pk, pv, attn_mask=keep, backend="triton")
    o_ref, _ = oracle(*upcast([q, k, v, pk, pv]), None, False, 1 / math.sqrt(D))
    p_only, _ = oracle(*upcast([q, k[:, :, :0], v[:, :, :0], pk, pv]), None, False, 1 / math.sqrt(D))
    assert torch.isfinite(out).all()
    assert_close(out[:, :, 2], p_only[:, :, 2], torch.float32, "row 2")
    assert_close(out[:, :, 3], o_ref[:, :, 3], torch.float32, "row 3")
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v, pk, pv))


def test_noncontiguous_q_and_scale():
    check(2, 2, 2, 7, 7, 7, 16, 1, torch.float32, noncontig=True, scale=0.3, is_causal=True)


def test_odd_head_dim():
    """D = 24 pads to 32 with masked loads."""
    check(2, 2, 1, 7, 7, 7, 24, 1, torch.float32, is_causal=True)


def test_shared_prefix_is_not_expanded_and_grad_sums_over_batch():
    """Bp = 1: dprefix equals the sum of the per-sample gradients of a Bp = B copy."""
    B, H, L, S, P, D = 2, 2, 7, 7, 7, 16
    q, k, v, pk, pv = make(B, H, H, L, S, P, D, 1, torch.float32)
    out = fastpeft.prefix_attention(q, k, v, pk, pv, backend="triton")
    out.sum().backward()
    pk2 = pk.detach().expand(B, -1, -1, -1).clone().requires_grad_(True)
    pv2 = pv.detach().expand(B, -1, -1, -1).clone().requires_grad_(True)
    out2 = fastpeft.prefix_attention(q.detach(), k.detach(), v.detach(), pk2, pv2, backend="triton")
    assert_close(out2, out, torch.float32, "out")
    out2.sum().backward()
    assert_close(pk.grad, pk2.grad.sum(0, keepdim=True), torch.float32, "dprefix_k")
    assert_close(pv.grad, pv2.grad.sum(0, keepdim=True), torch.float32, "dprefix_v")


@pytest.mark.parametrize("tiles", [(32, 16), (16, 32)], ids=["BM32-BN16", "BM16-BN32"])
def test_unequal_tiles(tiles, monkeypatch):
    """Query/key tiles of different sizes: the causal split (unmasked blocks left of the diagonal,
    masked ones on it) and the dk/dv query-block start must not depend on BLOCK_M == BLOCK_N."""
    import fastpeft.triton.prefix_attention as kern

    monkeypatch.setattr(kern, "_INTERP", dict(BLOCK_M=tiles[0], BLOCK_N=tiles[1]))
    check(1, 2, 1, 40, 37, 20, 16, 1, torch.float32, is_causal=True, mask="b1")
