"""bf16 / fp16 on the C++ backend for adapter and prefix_attention (issue 10).

The acceptance bar: the fused op's error against the float64 oracle, for the output and every
gradient, is within 2x the error of PyTorch's own computation in the same dtype (the reference
backend run in bf16 / fp16: eager nn.functional / cat + SDPA) against the same oracle. Errors are
max-abs, relative to the oracle's max-abs; a one-ulp floor (of that max) keeps a lucky eager
result (error ~0 on a tiny tensor) from demanding the impossible.

Every configuration the C++ op has for the dtype is forced by name (FASTPEFT_CPU_CONFIG): "gemm"
and "gemm+blocked" (adapter) / "native" (prefix_attention) everywhere, "upcast" only where the CPU has no native
GEMMs for the dtype (``torch.ops.fastpeft_cpu.native_lowp_gemm``); forcing "upcast" elsewhere is
an error that names what exists.
"""
import pytest
import torch

import fastpeft
from fastpeft.testing import DTYPE_IDS
from tests.conftest import _cpp_ok
from tests.ops.test_adapter import make as make_adapter
from tests.ops.test_prefix_attention import make as make_prefix, make_mask

pytestmark = pytest.mark.skipif(not _cpp_ok(), reason="C++ backend not built")

LOWP = [torch.bfloat16, torch.float16]
ULP = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}


def configs(dtype, native_names):
    """The configurations the C++ op offers for dtype on this CPU, and the ones it does not."""
    native = torch.ops.fastpeft_cpu.native_lowp_gemm(dtype)
    return (native_names if native else native_names + ["upcast"]), (["upcast"] if native else [])


ADAPTER_CONFIGS = ["gemm", "gemm+blocked"]
PREFIX_CONFIGS = ["native"]


def rel_err(t, ref):
    return ((t.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def assert_within_2x(name, fused, eager, oracle, dtype):
    ef, ee = rel_err(fused, oracle), rel_err(eager, oracle)
    assert ef <= max(2.0 * ee, ULP[dtype]), f"{name}: fused error {ef:.3g} > 2 x eager {dtype} error {ee:.3g}"


# --- adapter ---------------------------------------------------------------------------------
def _adapter_run(ts, backend, activation, p, lead_shape, dy):
    x, Wd, bd, Wu, bu, s, R = ts
    torch.manual_seed(123)
    y = fastpeft.adapter(x, Wd, bd, Wu, bu, activation, s, R, dropout_p=p, training=p > 0, backend=backend)
    y.backward(dy.to(y.dtype))
    return [y.detach()] + [t.grad for t in ts if isinstance(t, torch.Tensor) and t.requires_grad]


def _adapter_case(dtype, M, d, m, activation="gelu", lead=(), scale="vector", residual=False, noncontig=False,
                  p=0.0, bias=True):
    def fresh(dt):
        return make_adapter(M, d, m, dt, "cpu", lead, bias, scale, residual, noncontig)
    dy = torch.randn(*lead, M, d, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    oracle = _adapter_run(fresh(torch.float64), "reference", activation, p, lead, dy)
    eager = _adapter_run(fresh(dtype), "reference", activation, p, lead, dy)
    ts = fresh(dtype)
    fused = _adapter_run(ts, "cpu", activation, p, lead, dy)
    all_names = ["x", "down_weight", "down_bias", "up_weight", "up_bias", "scaling", "residual"]
    names = ["y"] + [n for n, t in zip(all_names, ts) if isinstance(t, torch.Tensor) and t.requires_grad]
    assert len(names) == len(fused) == len(eager) == len(oracle)
    for name, f, e, o in zip(names, fused, eager, oracle):
        assert f.dtype == dtype, f"{name}: dtype {f.dtype}"
        assert_within_2x(name, f, e, o, dtype)
    return fused


ADAPTER_CASES = [  # (M, d, m, activation, lead, scale, residual, noncontig, p, bias)
    (97, 129, 16, "gelu", (), "vector", False, False, 0.0, True),
    (1, 64, 7, "relu", (), "float", True, False, 0.0, True),
    (7, 129, 1, "silu", (3,), "scalar", False, True, 0.0, False),
    (97, 96, 64, "gelu_tanh", (), "vector", True, True, 0.2, True),
    (300, 256, 64, "gelu", (2,), "float", False, False, 0.1, True),
]


@pytest.mark.parametrize("dtype", LOWP, ids=lambda t: DTYPE_IDS[t])
@pytest.mark.parametrize("case", ADAPTER_CASES, ids=lambda c: f"M{c[0]}-d{c[1]}-m{c[2]}-{c[3]}")
def test_adapter_lowp_within_2x_of_eager(monkeypatch, dtype, case):
    have, _ = configs(dtype, ADAPTER_CONFIGS)
    for cfg in have:
        monkeypatch.setenv("FASTPEFT_CPU_CONFIG", cfg)
        _adapter_case(dtype, *case)


@pytest.mark.parametrize("dtype", LOWP, ids=lambda t: DTYPE_IDS[t])
def test_adapter_lowp_missing_config_is_an_error(monkeypatch, dtype):
    _, missing = configs(dtype, ADAPTER_CONFIGS)
    for cfg in missing + ["micro"]:  # fp32 configurations are not bf16 / fp16 ones
        monkeypatch.setenv("FASTPEFT_CPU_CONFIG", cfg)
        with pytest.raises(RuntimeError, match=f"FASTPEFT_CPU_CONFIG='{cfg}' is not a configuration"):
            _adapter_case(dtype, 9, 32, 16)


@pytest.mark.parametrize("dtype", LOWP, ids=lambda t: DTYPE_IDS[t])
def test_adapter_lowp_nonfinite_scale(dtype):
    """An inf scale entry takes the unfolded order (u = h·Wuᵀ + bu, then scale ⊙ u), as the reference."""
    x, Wd, bd, Wu, bu, _, _ = make_adapter(9, 16, 4, dtype, "cpu")
    s = torch.ones(16, dtype=dtype)
    s[3] = float("inf")
    with torch.no_grad():
        y = fastpeft.adapter(x, Wd, bd, Wu, bu, "relu", s, backend="cpu")
        ref = fastpeft.adapter(x, Wd, bd, Wu, bu, "relu", s, backend="reference")
    assert torch.equal(torch.isinf(y), torch.isinf(ref)) and torch.equal(torch.isnan(y), torch.isnan(ref))
    fin = torch.isfinite(ref)
    assert (y[fin].double() - ref[fin].double()).abs().max() < 0.1


@pytest.mark.parametrize("dtype", LOWP, ids=lambda t: DTYPE_IDS[t])
def test_adapter_lowp_tuned_deterministic(dtype):
    """Big enough to be tuned: chosen once per shape class, listed in tune_table, and later calls
    bit-identical."""
    torch.ops.fastpeft_cpu.tune_reset()
    outs = [_adapter_run(make_adapter(2048, 256, 64, dtype, "cpu"), "cpu", "gelu", 0.1, (),
                         torch.ones(2048, 256, dtype=torch.float64)) for _ in range(3)]
    for o in outs[1:]:
        for a, b in zip(outs[0], o):
            assert torch.equal(a, b)
    name = {torch.bfloat16: "BFloat16", torch.float16: "Half"}[dtype]
    table = torch.ops.fastpeft_cpu.tune_table()
    assert any(e.startswith(f"adapter_fwd {name} M~2048 d=256 m=64 gelu drop") for e in table), table
    assert any(e.startswith(f"adapter_bwd {name} M~2048 d=256 m=64 gelu drop") for e in table), table


def test_adapter_autocast_master_weights():
    """Under autocast the op runs in bf16 (x and fp32 master weights cast, as torch.autocast
    does for nn.Linear); the gradients reach the fp32 parameters in fp32."""
    x, Wd, bd, Wu, bu, s, _ = make_adapter(64, 96, 16, torch.float32, "cpu", scale="vector")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = fastpeft.adapter(x, Wd, bd, Wu, bu, "gelu", s, backend="cpu")
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    for t in (x, Wd, bd, Wu, bu, s):
        assert t.grad.dtype == torch.float32 and torch.isfinite(t.grad).all()
    # same values as the op called on the bf16 casts directly
    ts = [t.detach().bfloat16().requires_grad_() for t in (x, Wd, bd, Wu, bu, s)]
    y2 = fastpeft.adapter(*ts[:5], "gelu", ts[5], backend="cpu")
    y2.float().sum().backward()
    assert torch.equal(y, y2)
    assert torch.equal(Wd.grad, ts[1].grad.float())


# --- prefix_attention ------------------------------------------------------------------------
def _prefix_run(ts, backend, mask, causal, dout):
    out = fastpeft.prefix_attention(*ts, attn_mask=mask, is_causal=causal, backend=backend)
    out.backward(dout.to(out.dtype))
    return [out.detach()] + [t.grad for t in ts]


PREFIX_CASES = [  # (B, H, Hkv, L, S, P, D, Bp, causal, mask, noncontig)
    (2, 4, 2, 50, 197, 50, 64, 1, True, "bool_B1LS", False),
    (2, 4, 4, 197, 197, 7, 32, 2, False, "add_BHLS", True),
    (3, 4, 1, 7, 9, 1, 16, 3, True, None, False),
    (1, 2, 2, 1, 7, 7, 24, 1, False, "bool_LS", False),
    (2, 3, 3, 97, 33, 20, 8, 1, False, None, True),
]


@pytest.mark.parametrize("dtype", LOWP, ids=lambda t: DTYPE_IDS[t])
@pytest.mark.parametrize("case", PREFIX_CASES, ids=lambda c: "B{}-H{}-Hkv{}-L{}-S{}-P{}-D{}-Bp{}".format(*c[:8]))
def test_prefix_lowp_within_2x_of_eager(monkeypatch, dtype, case):
    B, H, Hkv, L, S, P, D, Bp, causal, mk, noncontig = case
    have, _ = configs(dtype, PREFIX_CONFIGS)
    dout = torch.randn(B, H, L, D, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    m64 = make_mask(mk, B, H, L, S, torch.float64, "cpu")
    oracle = _prefix_run(make_prefix(B, H, Hkv, L, S, P, D, Bp, torch.float64, "cpu", noncontig), "reference",
                         m64, causal, dout)
    m = m64 if m64 is None or m64.dtype == torch.bool else m64.to(dtype)
    eager = _prefix_run(make_prefix(B, H, Hkv, L, S, P, D, Bp, dtype, "cpu", noncontig), "reference", m, causal,
                        dout)
    for cfg in have:
        monkeypatch.setenv("FASTPEFT_CPU_CONFIG", cfg)
        fused = _prefix_run(make_prefix(B, H, Hkv, L, S, P, D, Bp, dtype, "cpu", noncontig), "cpu", m, causal,
                            dout)
        for name, f, e, o in zip(["out", "dq", "dk", "dv", "dprefix_k", "dprefix_v"], fused, eager, oracle):
            assert f.dtype == dtype and f.shape == o.shape, name
            assert_within_2x(f"{cfg} {name}", f, e, o, dtype)


@pytest.mark.parametrize("dtype", LOWP, ids=lambda t: DTYPE_IDS[t])
def test_prefix_lowp_without_mkl_mixed_gemm(monkeypatch, dtype):
    """FASTPEFT_LOWP_BLAS=0: the path a torch without MKL's mixed-precision GEMMs takes (tiles
    widened to fp32 for sgemm) meets the same bar."""
    monkeypatch.setenv("FASTPEFT_LOWP_BLAS", "0")
    assert not torch.ops.fastpeft_cpu.lowp_blas(dtype)
    test_prefix_lowp_within_2x_of_eager(monkeypatch, dtype, PREFIX_CASES[0])
    test_prefix_lowp_within_2x_of_eager(monkeypatch, dtype, PREFIX_CASES[1])


@pytest.mark.parametrize("dtype", LOWP, ids=lambda t: DTYPE_IDS[t])
def test_prefix_lowp_configs_and_determinism(monkeypatch, dtype):
    have, missing = configs(dtype, PREFIX_CONFIGS)
    args = (2, 4, 2, 64, 128, 16, 64, 1, dtype, "cpu")
    dout = torch.randn(2, 4, 64, 64, generator=torch.Generator().manual_seed(1)).to(dtype)
    for cfg in have:
        monkeypatch.setenv("FASTPEFT_CPU_CONFIG", cfg)
        runs = [_prefix_run(make_prefix(*args), "cpu", None, True, dout) for _ in range(2)]
        for a, b in zip(*runs):
            assert torch.equal(a, b), cfg
    for cfg in missing:
        monkeypatch.setenv("FASTPEFT_CPU_CONFIG", cfg)
        with pytest.raises(RuntimeError, match=f"FASTPEFT_CPU_CONFIG='{cfg}' is not a configuration"):
            _prefix_run(make_prefix(*args), "cpu", None, True, dout)


def test_prefix_lowp_keeps_lse_fp32():
    q, k, v, pk, pv = [t.detach() for t in make_prefix(1, 2, 2, 5, 6, 3, 16, 1, torch.bfloat16, "cpu")]
    out, lse = torch.ops.fastpeft_cpu.prefix_attention_fwd(q, k, v, pk, pv, None, False, 0.25)
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32


def test_lowp_info_lines():
    from fastpeft._cpuinfo import lowp_report
    lines = lowp_report()
    assert len(lines) == 2 and lines[0].startswith("GEMM bfloat16:") and lines[1].startswith("GEMM float16:")
    for dt, line in zip(LOWP, lines):
        assert ("native on this CPU" in line) == torch.ops.fastpeft_cpu.native_lowp_gemm(dt)


# --- torch.library contract in bf16 / fp16 ----------------------------------------------------
@pytest.mark.parametrize("dtype", LOWP, ids=lambda t: DTYPE_IDS[t])
def test_opcheck_lowp(dtype):
    x, Wd, bd, Wu, bu, _, R = [t.detach() if isinstance(t, torch.Tensor) else t
                               for t in make_adapter(9, 24, 8, dtype, "cpu", residual=True)]
    scale = torch.full((), 0.5, dtype=dtype).expand(24)
    seed = torch.tensor(7, dtype=torch.int64)
    for res in (None, R):
        torch.library.opcheck(torch.ops.fastpeft.adapter_fwd.default,
                              (x, Wd, bd, Wu, bu, scale, res, "gelu", 0.1, seed, "cpu"))
        y, z = torch.ops.fastpeft.adapter_fwd(x, Wd, bd, Wu, bu, scale, res, "gelu", 0.1, seed, "cpu")
        torch.library.opcheck(torch.ops.fastpeft.adapter_bwd.default,
                              (torch.randn_like(y), x, Wd, Wu, bu, z, scale, "gelu", 0.1, seed, res is None, True,
                               True, "cpu"))
    q, k, v, pk, pv = [t.detach() for t in make_prefix(2, 4, 2, 5, 6, 3, 8, 1, dtype, "cpu")]
    fwd_args = (q, k, v, pk, pv, None, True, 0.35, "cpu")
    torch.library.opcheck(torch.ops.fastpeft.prefix_attention_fwd.default, fwd_args)
    out, lse = torch.ops.fastpeft.prefix_attention_fwd(*fwd_args)
    assert lse.dtype == torch.float32
    torch.library.opcheck(torch.ops.fastpeft.prefix_attention_bwd.default,
                          (torch.randn_like(out), q, k, v, pk, pv, None, out, lse, True, 0.35, "cpu"))


# --- fp16 training with GradScaler ------------------------------------------------------------
def test_fp16_autocast_gradscaler_skips_inf_steps():
    """fp32 master parameters, fp16 autocast, GradScaler: a step whose fp16 gradients overflow is
    skipped (parameters untouched, scale halved); a finite step updates the parameters."""
    g = torch.Generator().manual_seed(0)
    d, m, H, D, P = 32, 8, 2, 16, 3
    params = dict(Wd=torch.randn(m, d, generator=g) * d ** -0.5, bd=torch.zeros(m),
                  Wu=torch.randn(d, m, generator=g) * m ** -0.5, bu=torch.zeros(d),
                  pk=torch.randn(1, H, P, D, generator=g), pv=torch.randn(1, H, P, D, generator=g))
    params = {k: torch.nn.Parameter(v) for k, v in params.items()}
    opt = torch.optim.SGD(params.values(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    x = torch.randn(2, 5, d, generator=g)

    def loss_fn(mult):
        with torch.autocast("cpu", dtype=torch.float16):
            h = fastpeft.adapter(x, params["Wd"], params["bd"], params["Wu"], params["bu"], "gelu", 0.5,
                                 backend="cpu")
            assert h.dtype == torch.float16
            q = h.view(2, 5, H, D).transpose(1, 2)
            out = fastpeft.prefix_attention(q, q, q, params["pk"], params["pv"], backend="cpu")
            return out.float().sum() * mult

    before = {k: p.detach().clone() for k, p in params.items()}
    opt.zero_grad()
    scaler.scale(loss_fn(1e30)).backward()  # fp16 gradients overflow
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() == 2.0 ** 9
    for k, p in params.items():
        assert torch.equal(p.detach(), before[k]), k
    opt.zero_grad()
    scaler.scale(loss_fn(1.0)).backward()
    for k, p in params.items():
        assert p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all(), k
    scaler.step(opt)
    scaler.update()
    assert any(not torch.equal(p.detach(), before[k]) for k, p in params.items())
