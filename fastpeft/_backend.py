"""The one place where fastpeft chooses a backend for an op.

Backends, in order of preference:

* ``triton``    - fused Triton kernels, for CUDA tensors (CPU tensors too under
                  ``TRITON_INTERPRET=1``, used by the tests, only when asked for).
* ``cpu``       - the C++ extension ``fastpeft._C`` for CPU tensors (prebuilt by pip, else compiled
                  on first use: ``fastpeft/_build.py``).
* ``reference`` - plain PyTorch (``fastpeft.reference``): the oracle and the fallback.

Kernels are found by name, so adding one needs no edit here:

* reference: ``fastpeft.reference.<family>.<kernel>_reference``
* triton:    ``fastpeft.triton.<family>.<kernel>_triton``
* cpu:       ``torch.ops.fastpeft_cpu.<kernel>`` (registered by ``csrc/<family>_cpu.cpp``)

``FASTPEFT_BACKEND=triton|cpu|reference`` overrides the automatic choice; an explicit
``backend=`` argument overrides both. A backend that cannot run raises a RuntimeError
that says why. The choice can depend on the dtype too: the triton kernels refuse float64
(they accumulate in fp32), so float64 CUDA tensors go to the reference backend.
"""
from __future__ import annotations

import importlib
import os
import warnings
from functools import lru_cache
from typing import Callable, Dict, Optional

import torch

BACKENDS = ("triton", "cpu", "reference")
FAMILIES = ("lora", "dora", "adapter", "prefix_attention", "multi_lora")


@lru_cache(maxsize=None)
def _cpp_status() -> Optional[str]:
    """None when the C++ ops are registered, else the reason they are not.

    The prebuilt ``fastpeft._C`` first (pip builds it when the build can import torch); else the
    same sources compiled on first use and cached (``fastpeft/_build.py``). Where the backend came
    from is in ``fastpeft._build.ORIGIN``.
    """
    from fastpeft import _build

    try:
        mod = importlib.import_module("fastpeft._C")
    except Exception as exc:  # noqa: BLE001 - not built, or not loadable (e.g. built for another torch)
        if isinstance(exc, ModuleNotFoundError) and exc.name == "fastpeft._C":
            return _build.jit_load("no prebuilt fastpeft._C in this install")
        return _build.jit_load(f"the prebuilt fastpeft._C does not load ({type(exc).__name__}: {exc})")
    _build.ORIGIN = f"prebuilt ({mod.__file__})"
    return None


@lru_cache(maxsize=None)
def _triton_status() -> Optional[str]:
    try:
        import triton  # noqa: F401
    except Exception as exc:  # noqa: BLE001
        return f"triton not importable ({type(exc).__name__}: {exc})"
    return None


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def why_not(backend: str, family: str, device: torch.device,
            dtype: Optional[torch.dtype] = None) -> Optional[str]:
    """None if ``backend`` can run op ``family`` on ``device`` (for inputs of ``dtype``, when
    given), else the reason it cannot."""
    device = torch.device(device)
    if backend == "reference":
        try:
            importlib.import_module(f"fastpeft.reference.{family}")
        except ModuleNotFoundError:
            return f"no reference implementation of {family} yet"
        return None
    if backend == "triton":
        reason = _triton_status()
        if reason:
            return reason
        if device.type == "cpu" and not _interpret():
            return "triton runs CPU tensors only under TRITON_INTERPRET=1"
        if device.type not in ("cpu", "cuda"):
            return f"triton does not support device {device}"
        if device.type == "cuda" and _interpret():
            return "TRITON_INTERPRET=1 is set: the interpreter runs CPU tensors only"
        try:
            importlib.import_module(f"fastpeft.triton.{family}")
        except ModuleNotFoundError:
            return f"no triton kernel for {family}"
        from fastpeft.triton._common import unsupported_dtype

        return unsupported_dtype(dtype)
    if backend == "cpu":
        if device.type != "cpu":
            return f"the C++ backend runs CPU tensors only, got {device}"
        reason = _cpp_status()
        if reason:
            return reason
        if not hasattr(torch.ops.fastpeft_cpu, f"{family}_fwd"):
            return f"no C++ kernel for {family} in this build"
        return None
    return f"unknown backend {backend!r}; expected one of {BACKENDS}"


_warned = False
_warned_cuda = False


@torch.compiler.assume_constant_result  # a trace-time constant for torch.compile
def select_backend(family: str, device: torch.device, backend: Optional[str] = None,
                   dtype: Optional[torch.dtype] = None) -> str:
    """Return the backend to run ``family`` on ``device`` for inputs of ``dtype`` (explicit >
    env > automatic)."""
    requested = backend or os.environ.get("FASTPEFT_BACKEND") or None
    if requested:
        reason = why_not(requested, family, device, dtype)
        if reason:
            src = "backend=" if backend else "FASTPEFT_BACKEND="
            what = f"{family} on {device}" + ("" if dtype is None else f" in {str(dtype)[6:]}")
            raise RuntimeError(f"fastpeft: {src}{requested!r} cannot run {what}: {reason}")
        return requested
    device = torch.device(device)
    if device.type == "cuda":
        reason = why_not("triton", family, device, dtype)
        if reason is None:
            return "triton"
        global _warned_cuda
        if not _warned_cuda and dtype is not None and why_not("triton", family, device) is None:
            _warned_cuda = True  # only the dtype stands in the way: say once where the op goes
            warnings.warn(f"fastpeft: {family} in {str(dtype)[6:]} on CUDA runs on the (slow) reference "
                          f"backend: {reason}", stacklevel=3)
    if device.type == "cpu":
        reason = why_not("cpu", family, device)
        if reason is None:
            return "cpu"
        global _warned
        if not _warned and _cpp_status():
            _warned = True
            warnings.warn(f"fastpeft: using the (slow) reference backend on CPU: {_cpp_status()}",
                          stacklevel=3)
    return "reference"


@lru_cache(maxsize=None)
def get_kernel(family: str, kernel: str, backend: str) -> Callable:
    """Look a kernel up by the naming convention in this module's docstring."""
    if backend == "cpu":
        reason = _cpp_status()
        if reason:
            raise RuntimeError(f"fastpeft: the C++ backend cannot run {family}: {reason}")
        return getattr(torch.ops.fastpeft_cpu, kernel)
    module = importlib.import_module(f"fastpeft.{backend}.{family}")
    return getattr(module, f"{kernel}_{backend}")


def backends() -> Dict[str, Dict[str, object]]:
    """Which backends work here, for which ops, and why the others don't.

    Returns ``{backend: {"available": bool, "reason": str, "ops": {family: reason-or-"ok"}}}``
    judged for the device each backend targets (CUDA for triton unless TRITON_INTERPRET=1).
    """
    out = {}
    for name in BACKENDS:
        if name == "triton":
            dev = torch.device("cpu") if _interpret() else torch.device("cuda")
            if dev.type == "cuda" and not torch.cuda.is_available():
                ops = {f: "no CUDA device (set TRITON_INTERPRET=1 to run kernels on CPU)" for f in FAMILIES}
            else:
                ops = {f: why_not(name, f, dev) or "ok" for f in FAMILIES}
        else:
            ops = {f: why_not(name, f, torch.device("cpu")) or "ok" for f in FAMILIES}
        ok = [f for f, r in ops.items() if r == "ok"]
        reason = "ok" if ok else next(iter(ops.values()))
        out[name] = {"available": bool(ok), "reason": reason, "ops": ops}
    return out


def info() -> str:
    """Human-readable report for ``python -m fastpeft info``."""
    import platform

    lines = [f"fastpeft on Python {platform.python_version()}, torch {torch.__version__}, "
             f"{torch.get_num_threads()} CPU threads, CUDA available: {torch.cuda.is_available()}"]
    if torch.cuda.is_available():
        lines.append(f"CUDA device: {torch.cuda.get_device_name()}")
    from fastpeft import _build

    _cpp_status()
    lines.append(f"C++ backend: {_build.ORIGIN}")
    env = os.environ.get("FASTPEFT_BACKEND")
    lines.append(f"FASTPEFT_BACKEND={env!r}" if env else "FASTPEFT_BACKEND not set (automatic choice)")
    for name, st in backends().items():
        lines.append(f"  {name:<10} {'available' if st['available'] else 'NOT available'}")
        for fam, r in st["ops"].items():
            lines.append(f"      {fam:<18} {r}")
    from fastpeft import _cpuinfo

    lines.append(f"CPU: {_cpuinfo.cpu_model()} ({_cpuinfo.isa()})")
    lines += [f"  {line}" for line in _cpuinfo.gemm_report()]
    for dev in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
        chosen = {}
        for f in FAMILIES:
            try:
                chosen[f] = select_backend(f, torch.device(dev))
            except RuntimeError as exc:
                chosen[f] = f"error: {exc}"
        lines.append(f"  automatic choice on {dev}: {chosen}")
    return "\n".join(lines)
