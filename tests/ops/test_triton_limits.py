"""The Triton kernels' limits: dtypes they refuse, CUDA grid limits and 64-bit address arithmetic.

* float64: the kernels accumulate in float32, so ``fastpeft._backend.why_not`` refuses it (an
  explicit ``backend="triton"`` raises, saying why and what to use instead; the automatic choice
  on CUDA falls to the reference backend) and the kernel entry points raise too.
* Grids: every launch keeps grid axes 1 and 2 within CUDA's 65535, whatever B·H is (checked by
  recording the grids the host code asks for, with stride-0 inputs so nothing big is allocated).
* Addresses: ``tests/ops/triton_ir.py`` compiles every kernel to Triton IR (front end only, no
  GPU) and finds 32-bit multiplications feeding a pointer offset; there must be none. A canary
  kernel with an ``index * stride`` in int32 shows the check finds them.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

import fastpeft
from fastpeft import _backend
from tests.conftest import device_for

DEVICE = device_for("triton")
_why = _backend.why_not("triton", "lora", torch.device(DEVICE))
needs_triton = pytest.mark.skipif(_why is not None, reason=str(_why))
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# --- float64 --------------------------------------------------------------------------------
@pytest.mark.parametrize("family", _backend.FAMILIES)
def test_why_not_refuses_float64_for_triton(family):
    reason = _backend.why_not("triton", family, torch.device(DEVICE), torch.float64)
    if _why is not None:  # triton unavailable here: refused anyway
        assert reason
        return
    assert reason and "float64" in reason and "float32" in reason
    assert "backend='reference'" in reason and "backend='cpu'" in reason
    for dt in (torch.float32, torch.float16, torch.bfloat16, None):
        assert _backend.why_not("triton", family, torch.device(DEVICE), dt) is None
    # the other backends compute float64 in float64
    assert _backend.why_not("reference", family, torch.device("cpu"), torch.float64) is None


@pytest.fixture
def pretend_cuda_triton(monkeypatch):
    """Make triton look usable for CUDA tensors (no GPU needed: selection never touches one)."""
    monkeypatch.setattr(_backend, "_interpret", lambda: False)
    monkeypatch.setattr(_backend, "_triton_status", lambda: None)
    monkeypatch.setattr(_backend, "_warned_cuda", False)
    monkeypatch.delenv("FASTPEFT_BACKEND", raising=False)


@pytest.mark.parametrize("family", _backend.FAMILIES)
def test_automatic_choice_on_cuda_never_picks_triton_for_float64(family, pretend_cuda_triton):
    cuda = torch.device("cuda")
    for dt in (torch.float32, torch.float16, torch.bfloat16):
        assert _backend.select_backend(family, cuda, None, dt) == "triton"
    with pytest.warns(UserWarning, match="reference backend"):
        assert _backend.select_backend(family, cuda, None, torch.float64) == "reference"
    # no C++ backend on CUDA: the reference is the only backend left, and it is available
    assert _backend.why_not("cpu", family, cuda) is not None
    assert _backend.why_not("reference", family, cuda, torch.float64) is None


def test_explicit_triton_float64_raises_with_reason(pretend_cuda_triton):
    with pytest.raises(RuntimeError, match=r"backend='triton' cannot run lora on cuda in float64: .*float32.*"
                                           r"backend='reference'"):
        _backend.select_backend("lora", torch.device("cuda"), "triton", torch.float64)


def _f64(*shapes):
    return [torch.randn(*s, dtype=torch.float64, device=DEVICE) for s in shapes]


@needs_triton
def test_ops_refuse_float64_on_triton():
    x, W, b, A, B = _f64((4, 8), (6, 8), (6,), (2, 8), (6, 2))
    with pytest.raises(RuntimeError, match="float64"):
        fastpeft.lora_linear(x, W, b, A, B, 1.0, backend="triton")
    with pytest.raises(RuntimeError, match="float64"):
        fastpeft.adapter(x, A, None, A.t().contiguous(), None, backend="triton")
    q = _f64((1, 2, 3, 16))[0]
    with pytest.raises(RuntimeError, match="float64"):
        fastpeft.prefix_attention(q, q, q, q[:, :, :1], q[:, :, :1], backend="triton")
    # the reference backend computes the same call in float64
    y = fastpeft.lora_linear(x, W, b, A, B, 1.0, backend="reference")
    assert y.dtype == torch.float64


@needs_triton
def test_kernel_entry_points_refuse_float64():
    """Calls that bypass backend selection (the custom op with backend "triton", or the kernels
    directly) raise too, instead of computing in float32."""
    from fastpeft.triton.adapter import adapter_fwd_triton
    from fastpeft.triton.lora import lora_fwd_triton
    from fastpeft.triton.prefix_attention import prefix_attention_fwd_triton

    x, W, b, A, B = _f64((4, 8), (6, 8), (6,), (2, 8), (6, 2))
    with pytest.raises(TypeError, match="triton lora: .*float64"):
        lora_fwd_triton(x, W, b, A, B, 1.0, 0.0, None)
    with pytest.raises(TypeError, match="triton lora: .*float64"):
        torch.ops.fastpeft.lora_fwd(x, W, b, A, B, 1.0, 0.0, None, "triton")
    with pytest.raises(TypeError, match="triton adapter: .*float64"):
        adapter_fwd_triton(x, A, None, A.t().contiguous(), None, torch.ones(8, dtype=x.dtype), None, "relu", 0.0,
                           None)
    q = _f64((1, 2, 3, 16))[0]
    with pytest.raises(TypeError, match="triton prefix_attention: .*float64"):
        prefix_attention_fwd_triton(q, q, q, q[:, :, :1], q[:, :, :1], None, False, 0.25)


# --- grids ----------------------------------------------------------------------------------
class _Recorder:
    """Stands in for a jitted kernel: records the grid of every launch, runs nothing."""

    def __init__(self, name, grids):
        self.name, self.grids = name, grids

    def __getitem__(self, grid):
        def launch(*args, **meta):
            # an autotuned launch (CUDA) gets its tiles from the config: take the smallest, 16
            g = grid({**meta, "BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16}) if callable(grid) else grid
            self.grids.append((self.name, tuple(g)))
        return launch


def _record(monkeypatch, module, grids):
    for name in [n for n in vars(module) if n.endswith("_kernel")]:
        monkeypatch.setattr(module, name, _Recorder(name, grids))


CUDA_AXIS_MAX = (2**31 - 1, 65535, 65535)


def _assert_launchable(grids, min_programs=0):
    assert grids
    for name, g in grids:
        assert 1 <= len(g) <= 3 and all(0 < n <= cap for n, cap in zip(g, CUDA_AXIS_MAX)), (name, g)
    assert max(g[0] for _, g in grids) >= min_programs


@needs_triton
def test_prefix_attention_grids_fit_cuda_limits_for_large_batch_times_heads(monkeypatch):
    """B·H = 70000 > 65535 programs per query block: all of them go on axis 0."""
    import fastpeft.triton.prefix_attention as kern

    grids = []
    _record(monkeypatch, kern, grids)
    B, H, L, S, P, D = 35000, 2, 3, 3, 2, 16
    t = lambda *s: torch.zeros(1, 1, 1, D, device=DEVICE).expand(*s, D)  # noqa: E731 - stride-0, no memory
    q, k, v, pk, pv = t(B, H, L), t(B, H, S), t(B, H, S), t(1, H, P), t(1, H, P)
    out, lse = kern.prefix_attention_fwd_triton(q, k, v, pk, pv, None, True, 0.25)
    kern.prefix_attention_bwd_triton(out, q, k, v, pk, pv, None, out, lse, True, 0.25)
    assert {n for n, _ in grids} == {"_pa_fwd_kernel", "_pa_bwd_preprocess_kernel", "_pa_bwd_dq_kernel",
                                     "_pa_bwd_dkdv_kernel"}
    _assert_launchable(grids, min_programs=B * H)


@needs_triton
def test_lora_and_adapter_grids_fit_cuda_limits(monkeypatch):
    import fastpeft.triton.adapter as adapter_kern
    import fastpeft.triton.lora as lora_kern

    grids = []
    _record(monkeypatch, lora_kern, grids)
    _record(monkeypatch, adapter_kern, grids)
    M, K, N, r = 1 << 20, 32, 16, 4  # ~65536 row blocks of 16
    x = torch.zeros(1, K, device=DEVICE).expand(M, K)
    W, A, B = torch.zeros(N, K, device=DEVICE), torch.zeros(r, K, device=DEVICE), torch.zeros(N, r, device=DEVICE)
    y, t = lora_kern.lora_fwd_triton(x, W, None, A, B, 1.0, 0.0, None)
    lora_kern.lora_bwd_triton(y, x, W, A, B, t, 1.0, 0.0, None, True, False, False)
    Wd, Wu, s = torch.zeros(8, K, device=DEVICE), torch.zeros(K, 8, device=DEVICE), torch.ones(K, device=DEVICE)
    y, z = adapter_kern.adapter_fwd_triton(x, Wd, None, Wu, None, s, None, "relu", 0.0, None)
    adapter_kern.adapter_bwd_triton(y, x, Wd, Wu, None, z, s, "relu", 0.0, None, True, True, True)
    _assert_launchable(grids, min_programs=M // 16)


@needs_triton
def test_multi_lora_grids_fit_cuda_limits(monkeypatch):
    """Adapters x row blocks go on axis 0 (32 adapters x 65536 row blocks here)."""
    import fastpeft.triton.multi_lora as kern

    grids = []
    _record(monkeypatch, kern, grids)
    M, K, N, r, n = 1 << 20, 32, 16, 4, 32
    x = torch.zeros(1, K, device=DEVICE).expand(M, K)
    W, A, B = torch.zeros(N, K, device=DEVICE), torch.zeros(n, r, K, device=DEVICE), torch.zeros(n, N, r, device=DEVICE)
    ids = torch.zeros(1, dtype=torch.long, device=DEVICE).expand(M)
    y, t = kern.multi_lora_fwd_triton(x, W, None, A, B, [1.0] * n, ids, 0.0, None)
    kern.multi_lora_bwd_triton(y, x, W, A, B, t, [1.0] * n, ids, 0.0, None, True, False, False)
    assert {g for g, _ in grids} == {"_seg_matmul_kernel", "_seg_outer_kernel"}
    _assert_launchable(grids, min_programs=n * M // 16)


# --- 64-bit address arithmetic ----------------------------------------------------------------
@pytest.fixture(scope="module")
def ir_report():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    try:
        import triton.compiler  # noqa: F401
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"triton's compiler is not importable: {exc}")
    out = subprocess.run([sys.executable, "-m", "tests.ops.triton_ir"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=600)
    if out.returncode == 3:  # tests.ops.triton_ir.UNSUPPORTED: this triton's compiler internals differ
        pytest.skip(out.stderr.strip()[-500:])
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout)


def test_ir_check_finds_a_32bit_index_times_stride(ir_report):
    src = open(os.path.join(ROOT, "tests", "ops", "triton_ir.py")).read().splitlines()
    line = {text: i + 1 for i, l in enumerate(src) for text in ("x_ptr + i * stride", "y_ptr + i.to(tl.int64)")
            if text in l}
    found = ir_report["canary"]["narrow_products"]
    assert f"triton_ir.py:{line['x_ptr + i * stride']}" in found
    assert f"triton_ir.py:{line['y_ptr + i.to(tl.int64)']}" not in found


def test_every_kernel_address_is_computed_in_64_bits(ir_report):
    kernels = {k: v for k, v in ir_report.items() if k != "canary"}
    assert len(kernels) >= 12, sorted(kernels)  # lora 4, adapter 3, prefix 4, the mask kernel
    bad = {k: v["narrow_products"] for k, v in kernels.items() if v["narrow_products"]}
    assert not bad, f"32-bit products in pointer offsets (file:line): {bad}"


def test_only_bounded_launches_use_grid_axis_1(ir_report):
    """Axis 1 (CUDA max 65535) only for the adapter's weight-gradient row slices (at most
    2·SMs of them, see fastpeft/triton/adapter.py); everything else is on axis 0."""
    for k, v in ir_report.items():
        expected = ["x", "y"] if k.endswith("_adapter_bwd_dw_kernel") else ["x"]
        assert v["grid_axes"] == expected, (k, v["grid_axes"])
