"""fastpeft.prefix_attention on every backend vs the autograd oracle (cat + SDPA, float64).

Every case checks the output and all five gradients (q, k, v, prefix_k, prefix_v). Triton runs
through the interpreter on CPU, so it gets the tiny shapes only (its kernels have their own
tests in test_prefix_attention_triton.py); the big lengths (50, 197) run on cpu/reference.
"""
import math

import pytest
import torch

import fastpeft
from fastpeft.reference.prefix_attention import prefix_attention_reference
from fastpeft.testing import DTYPE_IDS, assert_close, upcast
from tests.conftest import backend_params, device_for

BACKENDS = backend_params("prefix_attention")
NAMES = ["q", "k", "v", "prefix_k", "prefix_v"]


def make(B, H, Hkv, L, S, P, D, Bp, dtype, device, noncontig=False):
    g = torch.Generator().manual_seed(B * 1009 + H * 101 + Hkv * 31 + L * 17 + S * 7 + P * 3 + D + Bp)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    shapes = [(B, H, L, D), (B, Hkv, S, D), (B, Hkv, S, D), (Bp, Hkv, P, D), (Bp, Hkv, P, D)]
    out = []
    for i, s in enumerate(shapes):
        t = rnd(*s)
        if noncontig and i < 3:  # q/k/v as (B, T, heads, D) buffers viewed (B, heads, T, D): a fused qkv split
            t = t.transpose(1, 2).contiguous().to(device=device, dtype=dtype).transpose(1, 2)
            assert not t.is_contiguous()
        else:
            t = t.to(device=device, dtype=dtype)
        out.append(t.requires_grad_(True))
    return out


def make_mask(kind, B, H, L, S, dtype, device):
    """Masks of several broadcast shapes; every bool mask leaves some rows with all main keys hidden."""
    g = torch.Generator().manual_seed(L * 31 + S)
    if kind is None:
        return None
    if kind == "bool_LS":
        return (torch.rand(L, S, generator=g) > 0.4).to(device)
    if kind == "bool_B11S":  # key padding mask
        m = torch.rand(B, 1, 1, S, generator=g) > 0.3
        m[0, ..., 0] = True
        return m.to(device)
    if kind == "bool_B1LS":
        return (torch.rand(B, 1, L, S, generator=g) > 0.5).to(device)
    if kind == "add_BHLS":
        return torch.randn(B, H, L, S, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    if kind == "add_1H1S":
        m = torch.randn(1, H, 1, S, generator=g, dtype=torch.float64)
        m[..., ::3] = -math.inf
        return m.to(device=device, dtype=dtype)
    raise AssertionError(kind)


def check(backend, B, H, Hkv, L, S, P, D, Bp, dtype, causal=False, mask=None, noncontig=False, scale=None,
          tol_scale=1.0):
    device = device_for(backend)
    ts = make(B, H, Hkv, L, S, P, D, Bp, dtype, device, noncontig)
    m = make_mask(mask, B, H, L, S, dtype, device)
    out = fastpeft.prefix_attention(*ts, attn_mask=m, is_causal=causal, scale=scale, backend=backend)
    ref_in = upcast(ts)
    m_ref = m if m is None or m.dtype == torch.bool else m.to(torch.float64)
    ref = prefix_attention_reference(*ref_in, attn_mask=m_ref, is_causal=causal, scale=scale)
    assert out.dtype == dtype and out.shape == (B, H, L, D) and out.device.type == torch.device(device).type
    assert torch.isfinite(out).all()
    assert_close(out, ref, dtype, "out", scale=tol_scale)
    dout = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    out.backward(dout.to(device=device, dtype=dtype))
    ref.backward(dout.to(device))
    for name, t, t_ref in zip(NAMES, ts, ref_in):
        assert t.grad is not None, f"{name} got no gradient"
        assert t.grad.shape == t.shape, f"d{name}: shape {tuple(t.grad.shape)} != {tuple(t.shape)}"
        assert_close(t.grad, t_ref.grad, dtype, f"d{name}", scale=tol_scale)


# --- the grid: Bp, causal, masks, GQA, odd lengths ------------------------------------------------
#: (B, H, Hkv, L, S, P, D); all tiny enough for the triton interpreter
SMALL = [(2, 4, 4, 7, 7, 1, 16), (2, 4, 2, 1, 7, 7, 16), (2, 4, 1, 7, 1, 7, 16), (3, 4, 2, 7, 9, 1, 16)]
#: (B, H, Hkv, L, S, P, D) with lengths 50 and 197; cpu/reference only
BIG = [(2, 4, 2, 197, 197, 50, 64), (2, 4, 4, 50, 197, 7, 32), (2, 4, 1, 197, 50, 1, 64)]
MASKS = [None, "bool_LS", "bool_B11S", "bool_B1LS", "add_BHLS", "add_1H1S"]


def _sid(s):
    return "B{}-H{}-Hkv{}-L{}-S{}-P{}-D{}".format(*s)


def _grid():
    params = []
    for bp in BACKENDS:
        backend = bp.values[0]
        for s in SMALL:
            for shared in (True, False):
                for causal in (False, True):
                    # triton: each shape once per (shared, causal), masks spread over the shapes
                    # (cpu/reference: three masks each, rotating so every mask meets every shape)
                    r = SMALL.index(s) + 2 * causal + shared
                    masks = [MASKS[(r + j) % 6] for j in ((0, 2, 4) if backend != "triton" else (0,))]
                    for mk in masks:
                        params.append(pytest.param(
                            backend, s, shared, causal, mk, marks=bp.marks,
                            id=f"{backend}-{_sid(s)}-{'shared' if shared else 'perSample'}-"
                               f"{'causal' if causal else 'full'}-{mk or 'nomask'}"))
    return params


@pytest.mark.parametrize("backend,shape,shared,causal,mask", _grid())
def test_grid_fp32(backend, shape, shared, causal, mask):
    B = shape[0]
    check(backend, *shape, 1 if shared else B, torch.float32, causal=causal, mask=mask)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b.id != "triton"])
@pytest.mark.parametrize("shape", BIG, ids=_sid)
@pytest.mark.parametrize("shared,causal,mask", [(True, False, None), (False, True, "bool_B11S"),
                                                (True, True, "add_1H1S")], ids=["shared", "perSample-causal-pad",
                                                                                  "shared-causal-add"])
def test_big_fp32(backend, shape, shared, causal, mask):
    check(backend, *shape, 1 if shared else shape[0], torch.float32, causal=causal, mask=mask)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b.id != "triton"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16], ids=lambda d: DTYPE_IDS[d])
@pytest.mark.parametrize("shared,causal,mask", [(True, True, "bool_B1LS"), (False, False, "add_BHLS")],
                         ids=["shared-causal-bool", "perSample-add"])
def test_dtypes(backend, dtype, shared, causal, mask):
    check(backend, 2, 4, 2, 50, 197, 50, 64, 1 if shared else 2, dtype, causal=causal, mask=mask)
    check(backend, 2, 4, 1, 7, 7, 1, 16, 1 if shared else 2, dtype, causal=causal, mask=mask)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp16_tiny(backend):
    # the one half-precision case the triton interpreter runs (no bf16 there: its tl.dot is broken)
    check(backend, 2, 4, 2, 7, 9, 7, 16, 1, torch.float16, causal=True, mask="bool_LS")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "perSample"])
def test_noncontiguous_and_scale(backend, shared):
    check(backend, 2, 4, 2, 7, 9, 7, 16, 1 if shared else 2, torch.float32, causal=True, mask="add_1H1S",
          noncontig=True, scale=0.3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fully_masked_main_rows_see_only_the_prefix(backend):
    device = device_for(backend)
    B, H, L, S, P, D = 2, 4, 5, 6, 3, 16
    q, k, v, pk, pv = make(B, H, 2, L, S, P, D, 1, torch.float32, device)
    mask = torch.zeros(B, 1, L, S, dtype=torch.bool, device=device)  # every main key hidden
    out = fastpeft.prefix_attention(q, k, v, pk, pv, attn_mask=mask, backend=backend)
    ref = torch.nn.functional.scaled_dot_product_attention(
        q, pk.expand(B, -1, -1, -1).repeat_interleave(2, 1), pv.expand(B, -1, -1, -1).repeat_interleave(2, 1))
    assert_close(out, ref, torch.float32, "out")
    out.sum().backward()
    assert torch.count_nonzero(k.grad) == 0 and torch.count_nonzero(v.grad) == 0
    check(backend, B, H, 2, L, S, P, D, 1, torch.float32, causal=True, mask="bool_B1LS")


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b.id != "triton"])
def test_autocast_bf16(backend):
    q, k, v, pk, pv = make(2, 4, 2, 7, 9, 3, 16, 1, torch.float32, "cpu")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fastpeft.prefix_attention(q, k, v, pk, pv, attn_mask=torch.randn(7, 9), backend=backend)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert all(t.grad is not None and t.grad.dtype == torch.float32 for t in (q, k, v, pk, pv))


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b.id != "triton"])
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "perSample"])
def test_saves_nothing_of_concatenated_size(backend, shared):
    B, H, Hkv, L, S, P, D = 2, 4, 2, 7, 9, 5, 16
    ts = make(B, H, Hkv, L, S, P, D, 1 if shared else B, torch.float32, "cpu")
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fastpeft.prefix_attention(*ts, attn_mask=torch.ones(L, S, dtype=torch.bool), backend=backend)
    assert all(P + S not in t.shape for t in saved), [tuple(t.shape) for t in saved]
    # q, k, v, the prefixes (the caller's tensors), the mask view, out and lse: nothing else
    assert len(saved) == 8
    for t, orig in zip(saved[:5], ts):
        assert t.data_ptr() == orig.data_ptr()
    assert saved[5].stride()[:2] == (0, 0)  # (L, S) bool mask -> additive, broadcast as a view
    out.sum().backward()


# --- gradcheck and opcheck --------------------------------------------------------------------------
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b.id != "triton"])
@pytest.mark.parametrize("shared,causal", [(True, True), (False, False)], ids=["shared-causal", "perSample"])
def test_gradcheck(backend, shared, causal):
    g = torch.Generator().manual_seed(0)
    mk = lambda *s: torch.randn(*s, dtype=torch.float64, generator=g).requires_grad_()  # noqa: E731
    B, H, Hkv, L, S, P, D = 2, 2, 1, 4, 5, 2, 3
    args = (mk(B, H, L, D), mk(B, Hkv, S, D), mk(B, Hkv, S, D), mk(1 if shared else B, Hkv, P, D),
            mk(1 if shared else B, Hkv, P, D))
    mask = torch.rand(B, 1, L, S, generator=g) > 0.3

    def f(*a):
        return fastpeft.prefix_attention(*a, attn_mask=mask, is_causal=causal, backend=backend)

    assert torch.autograd.gradcheck(f, args)


@pytest.mark.parametrize("backend,dtype", [pytest.param(b.values[0], d, marks=b.marks, id=f"{b.id}-{DTYPE_IDS[d]}")
                                           for b in BACKENDS if b.id != "triton"
                                           for d in ((torch.float32, torch.float64) if b.id == "cpu"
                                                     else (torch.float32,))])
def test_opcheck(backend, dtype):
    B, H, Hkv, L, S, P, D = 2, 4, 2, 5, 6, 3, 8
    q, k, v = torch.randn(B, H, L, D, dtype=dtype), torch.randn(B, Hkv, S, D, dtype=dtype), \
        torch.randn(B, Hkv, S, D, dtype=dtype)
    for Bp in (1, B):
        pk, pv = torch.randn(Bp, Hkv, P, D, dtype=dtype), torch.randn(Bp, Hkv, P, D, dtype=dtype)
        for mask, causal in ((None, False), (torch.randn(1, H, 1, S, dtype=dtype).expand(B, H, L, S), True)):
            fwd_args = (q, k, v, pk, pv, mask, causal, 0.35, backend)
            torch.library.opcheck(torch.ops.fastpeft.prefix_attention_fwd.default, fwd_args)
            out, lse = torch.ops.fastpeft.prefix_attention_fwd(*fwd_args)
            dout = torch.randn_like(out)
            torch.library.opcheck(torch.ops.fastpeft.prefix_attention_bwd.default,
                                  (dout, q, k, v, pk, pv, mask, out, lse, causal, 0.35, backend))


def test_backends_agree_on_lse():
    """lse is part of the kernel contract (the triton/cpu backward consumes it): compare to the reference."""
    q, k, v, pk, pv = [t.detach() for t in make(2, 4, 2, 7, 9, 3, 16, 1, torch.float32, "cpu")]
    m = torch.randn(7, 9).expand(2, 4, 7, 9)
    _, lse_ref = torch.ops.fastpeft.prefix_attention_fwd(q, k, v, pk, pv, m, True, 0.25, "reference")
    assert lse_ref.dtype == torch.float32 and lse_ref.shape == (2, 4, 7)
    for bp in BACKENDS:
        backend = bp.values[0]
        if bp.marks or backend == "reference":
            continue
        dev = device_for(backend)
        _, lse = torch.ops.fastpeft.prefix_attention_fwd(*(t.to(dev) for t in (q, k, v, pk, pv, m)), True, 0.25,
                                                         backend)
        assert lse.dtype == torch.float32
        assert_close(lse, lse_ref, torch.float32, f"lse ({backend})")


# --- bad inputs -------------------------------------------------------------------------------------
def _good():
    B, H, Hkv, L, S, P, D = 2, 4, 2, 5, 6, 3, 8
    return dict(q=torch.randn(B, H, L, D), k=torch.randn(B, Hkv, S, D), v=torch.randn(B, Hkv, S, D),
                prefix_k=torch.randn(1, Hkv, P, D), prefix_v=torch.randn(1, Hkv, P, D))


BAD = [
    ("q_3d", dict(q=torch.randn(4, 5, 8)), "q: expected 4 dims"),
    ("k_batch", dict(k=torch.randn(3, 2, 6, 8)), "k: expected shape (2, Hkv, S, 8)"),
    ("k_headdim", dict(k=torch.randn(2, 2, 6, 7)), "k: expected shape"),
    ("heads_not_divisible", dict(k=torch.randn(2, 3, 6, 8), v=torch.randn(2, 3, 6, 8)), "dividing q's 4 heads"),
    ("v_shape", dict(v=torch.randn(2, 2, 5, 8)), "v: expected shape (2, 2, 6, 8)"),
    ("prefix_batch", dict(prefix_k=torch.randn(3, 2, 3, 8), prefix_v=torch.randn(3, 2, 3, 8)), "prefix_k: expected shape (1 or 2"),
    ("prefix_heads", dict(prefix_k=torch.randn(1, 4, 3, 8), prefix_v=torch.randn(1, 4, 3, 8)), "prefix_k: expected shape"),
    ("prefix_empty", dict(prefix_k=torch.randn(1, 2, 0, 8), prefix_v=torch.randn(1, 2, 0, 8)), "P >= 1"),
    ("prefix_v_shape", dict(prefix_v=torch.randn(1, 2, 4, 8)), "prefix_v: expected shape (1, 2, 3, 8)"),
    ("dtype", dict(k=torch.randn(2, 2, 6, 8, dtype=torch.float64)), "k: expected dtype torch.float32"),
    ("int_q", dict(q=torch.ones(2, 4, 5, 8, dtype=torch.int64)), "q: expected a floating dtype"),
    ("prefix_dtype", dict(prefix_v=torch.randn(1, 2, 3, 8).half()), "prefix_v: expected dtype"),
    ("mask_shape", dict(attn_mask=torch.ones(5, 9, dtype=torch.bool)), "attn_mask: expected a shape broadcastable"),
    ("mask_prefix_cols", dict(attn_mask=torch.ones(5, 9)), "covers the main keys only"),
    ("mask_5d", dict(attn_mask=torch.ones(1, 2, 4, 5, 6)), "attn_mask: expected a shape broadcastable"),
    ("mask_dtype", dict(attn_mask=torch.zeros(5, 6, dtype=torch.float64)), "attn_mask: expected dtype"),
    ("mask_int", dict(attn_mask=torch.zeros(5, 6, dtype=torch.int32)), "attn_mask: expected a floating dtype"),
    ("mask_list", dict(attn_mask=[[1.0]]), "attn_mask: expected a bool or float tensor"),
    ("causal_int", dict(is_causal=1), "is_causal: expected a bool"),
    ("scale_str", dict(scale="0.1"), "scale: expected a finite float"),
    ("scale_nan", dict(scale=float("nan")), "scale: expected a finite float"),
    ("q_list", dict(q=[1.0]), "q: expected a torch.Tensor"),
]


@pytest.mark.parametrize("what,bad,msg", BAD, ids=[b[0] for b in BAD])
def test_bad_inputs(what, bad, msg):
    kw = _good()
    kw.update(bad)
    with pytest.raises(ValueError, match=None) as e:
        fastpeft.prefix_attention(**kw, backend="reference")
    assert msg in str(e.value), str(e.value)


def test_mask_requiring_grad_is_refused():
    kw = _good()
    with pytest.raises(ValueError, match="attn_mask: gradients"):
        fastpeft.prefix_attention(**kw, attn_mask=torch.zeros(5, 6, requires_grad=True), backend="reference")


def test_torch_compile_fullgraph():
    """The op traces into one graph (backend choice is a trace-time constant, fakes match)."""
    q, k, v, pk, pv = make(2, 4, 2, 7, 9, 3, 16, 1, torch.float32, "cpu")
    m = torch.rand(7, 9, generator=torch.Generator().manual_seed(1)) > 0.3
    f = torch.compile(lambda *a: fastpeft.prefix_attention(*a, attn_mask=m, is_causal=True), fullgraph=True)
    out = f(q, k, v, pk, pv)
    out.sum().backward()
    got = [t.grad.clone() for t in (q, k, v, pk, pv)]
    for t in (q, k, v, pk, pv):
        t.grad = None
    ref = fastpeft.prefix_attention(q, k, v, pk, pv, attn_mask=m, is_causal=True)
    ref.sum().backward()
    assert_close(out, ref, torch.float32, "out")
    for name, a, t in zip(NAMES, got, (q, k, v, pk, pv)):
        assert_close(a, t.grad, torch.float32, f"d{name}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_broadcast_views_as_inputs(backend):
    """q repeated along L and k/v/dout with stride-0 axes (broadcast views) are read correctly."""
    device = device_for(backend)
    g = torch.Generator().manual_seed(11)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(device=device, dtype=torch.float32)  # noqa: E731
    q0, k0, v0 = rnd(2, 4, 1, 16), rnd(1, 2, 9, 16), rnd(2, 2, 9, 16)
    pk, pv = rnd(1, 2, 3, 16), rnd(2, 2, 3, 16)
    leaves = [t.requires_grad_() for t in (q0, k0, v0, pk, pv)]
    args = (q0.expand(2, 4, 7, 16), k0.expand(2, 2, 9, 16), v0, pk.expand(2, 2, 3, 16), pv)
    out = fastpeft.prefix_attention(*args, is_causal=True, backend=backend)
    out.sum().backward()  # dout is a fully stride-0 view of ones
    ref_leaves = upcast(leaves)
    ref = prefix_attention_reference(ref_leaves[0].expand(2, 4, 7, 16), ref_leaves[1].expand(2, 2, 9, 16),
                                     ref_leaves[2], ref_leaves[3].expand(2, 2, 3, 16), ref_leaves[4], is_causal=True)
    ref.sum().backward()
    assert_close(out, ref, torch.float32, "out")
    for name, t, r in zip(NAMES, leaves, ref_leaves):
        assert_close(t.grad, r.grad, torch.float32, f"d{name}")
