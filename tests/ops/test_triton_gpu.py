"""GPU acceptance of the Triton kernels: every kernel, forward and backward, in fp32, fp16 and bf16.

Each case runs one op on the triton backend and checks the output and every gradient against
the float64 oracle (the op's own test module's ``check``), so every kernel runs: LoRA's down,
fused-GEMM, dt/dB and dx/dA kernels (the dx GEMM with and without x needing a gradient);
the adapter's forward, dz and weight-gradient kernels; prefix attention's forward, delta, dq
and dk/dv kernels.

On a GPU the shapes are a few hundred to a thousand wide with ragged edges, so the autotuned
tiles and the edge masks both run, and bf16 is included. Without one the same cases run under
TRITON_INTERPRET=1 on tiny shapes, without bf16 (the interpreter's bf16 ``tl.dot`` is wrong):
that is the part ``scripts/gpu_check.sh --dry-run`` runs on CPU.
"""
import pytest
import torch

from fastpeft._backend import why_not
from fastpeft.testing import DTYPE_IDS
from tests.conftest import GPU, device_for
from tests.ops import test_adapter, test_lora, test_prefix_attention

ON_GPU = device_for("triton") == "cuda"
_why = why_not("triton", "lora", torch.device(device_for("triton")))
pytestmark = [pytest.mark.skipif(_why is not None, reason=str(_why)), GPU]

DTYPES = [pytest.param(dt, id=DTYPE_IDS[dt], marks=pytest.mark.skipif(
    dt == torch.bfloat16 and not ON_GPU, reason="the triton interpreter's bf16 tl.dot is wrong; GPU only"))
    for dt in (torch.float32, torch.float16, torch.bfloat16)]


@pytest.mark.parametrize("variant", ["dropout", "no-dx-full-finetune"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_lora_kernels(dtype, variant):
    M, K, N, r = (1031, 1000, 777, 16) if ON_GPU else (19, 40, 33, 5)
    if variant == "dropout":
        test_lora.check("triton", M, K, N, r, dtype, 0.1, lead=(1,))
    else:  # x without grad: the dx GEMM compiled out; W and b trainable (torch's dW, db)
        test_lora.check("triton", M, K, N, r, dtype, 0.0, x_grad=False, train_weight=True)


@pytest.mark.parametrize("variant", ["gelu-dropout-vector-scale", "relu-parallel-scalar-scale"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_adapter_kernels(dtype, variant):
    M, d, m = (1031, 1000, 64) if ON_GPU else (19, 40, 12)
    if variant == "gelu-dropout-vector-scale":
        test_adapter.check("triton", M, d, m, dtype, activation="gelu", scale="vector", p=0.1)
    else:
        test_adapter.check("triton", M, d, m, dtype, activation="relu", scale="scalar", residual=True)


@pytest.mark.parametrize("variant", ["causal-shared-prefix", "mask-per-sample-prefix"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_prefix_attention_kernels(dtype, variant):
    B, H, Hkv, L, S, P, D = (2, 8, 2, 300, 257, 33, 128) if ON_GPU else (2, 2, 1, 9, 11, 5, 16)
    if variant == "causal-shared-prefix":
        test_prefix_attention.check("triton", B, H, Hkv, L, S, P, D, 1, dtype, causal=True)
    else:
        test_prefix_attention.check("triton", B, H, Hkv, L, S, P, D // 2, B, dtype, mask="add_1H1S")
