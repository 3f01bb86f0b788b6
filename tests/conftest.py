"""Test setup: Triton kernels run on CPU tensors through the interpreter when no GPU.

TRITON_INTERPRET must be set before any ``fastpeft.triton`` module is imported, because
``triton.jit`` reads it at decoration time.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

#: marks the GPU acceptance subset (``pytest -m gpu``, run by scripts/gpu_check.sh): every test
#: that runs a Triton kernel. On a machine with CUDA they run on the GPU (bf16 included); without
#: one, under TRITON_INTERPRET=1 on CPU tensors (tiny shapes, no bf16 dots).
GPU = pytest.mark.gpu


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: runs Triton kernels (CUDA when present, else the interpreter); "
                                       "the subset scripts/gpu_check.sh runs on a GPU")


def _triton_ok() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # noqa: BLE001
        return False
    return True


def _cpp_ok() -> bool:
    from fastpeft._backend import _cpp_status

    return _cpp_status() is None


#: backends runnable on this machine, for parametrising op tests
TEST_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def backend_params(family=None):
    """pytest params for every backend, each skipped (saying why) where it cannot run ``family``."""
    from fastpeft._backend import why_not

    def reason(backend):
        if family is None:
            ok = _cpp_ok() if backend == "cpu" else _triton_ok() if backend == "triton" else True
            return None if ok else f"{backend} backend unavailable"
        return why_not(backend, family, torch.device(device_for(backend)))

    params = []
    for backend in ("reference", "cpu", "triton"):
        why = reason(backend)
        marks = [pytest.mark.skipif(why is not None, reason=str(why))] + ([GPU] if backend == "triton" else [])
        params.append(pytest.param(backend, id=backend, marks=marks))
    return params


def device_for(backend: str) -> str:
    """Device a backend's tests run on: the C++ backend is CPU-only; triton uses CUDA if any."""
    return "cpu" if backend == "cpu" else TEST_DEVICE


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
