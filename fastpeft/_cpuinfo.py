"""What CPU this is, and which GEMM paths the C++ backend can take on it.

A speed figure is a claim about the CPU it was measured on, so ``python -m fastpeft info``
and every benchmark row record :func:`cpu_model` and :func:`isa`. The GEMM library each op
uses is chosen at run time by measurement (``csrc/tune.h``); :func:`gemm_report` lists which
libraries can run each dtype here and what was chosen so far in this process.
"""
from __future__ import annotations

import functools
import platform
from typing import List

import torch

# /proc/cpuinfo flag -> the name users know it by, in the order they build on each other.
_ISA_FLAGS = [("avx2", "AVX2"), ("avx512f", "AVX-512"), ("avx512_bf16", "AVX512-BF16"),
              ("avx512_fp16", "AVX512-FP16"), ("amx_bf16", "AMX-BF16")]


@functools.lru_cache(maxsize=None)
def _cpuinfo_fields() -> dict:
    out = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if ":" in line:
                    k, v = line.split(":", 1)
                    out.setdefault(k.strip(), v.strip())
    except OSError:
        pass
    return out


@functools.lru_cache(maxsize=None)
def cpu_model() -> str:
    """lscpu's "Model name" (from /proc/cpuinfo), else what the platform module knows."""
    f = _cpuinfo_fields()
    return f.get("model name") or f.get("Model name") or platform.processor() or platform.machine() or "unknown"


@functools.lru_cache(maxsize=None)
def isa() -> str:
    """Vector ISA levels this CPU has, e.g. "AVX2 AVX-512 AVX512-BF16 AMX-BF16"; on non-x86
    CPUs, torch's own name for its CPU capability."""
    flags = set(_cpuinfo_fields().get("flags", "").split())
    names = [name for flag, name in _ISA_FLAGS if flag in flags]
    if names:
        return " ".join(names)
    try:
        return torch.backends.cpu.get_cpu_capability()
    except Exception:  # noqa: BLE001 - older torch
        return platform.machine()


def cpu_kind() -> str:
    """Short label for file names and README headings: vendor + widest ISA, e.g. "intel-amx"."""
    model = cpu_model().lower()
    vendor = "amd" if "amd" in model else "intel" if "intel" in model else platform.machine()
    top = isa().split()[-1].lower().replace("-bf16", "").replace("avx-512", "avx512") if isa() else "unknown"
    return f"{vendor}-{top}"


def lowp_report() -> List[str]:
    """One line per low-precision dtype: which path lora / adapter / prefix_attention take for it
    on this CPU (C++ backend, ``native_lowp_gemm`` in csrc/gemm.h)."""
    lines = []
    for dt in (torch.bfloat16, torch.float16):
        name = str(dt).replace("torch.", "")
        blas = "MKL mixed-precision GEMMs" if torch.ops.fastpeft_cpu.lowp_blas(dt) else \
            "tiles widened to fp32 for sgemm (no MKL mixed-precision GEMM in this torch)"
        try:
            why = torch.ops.fastpeft_cpu.brgemm_why_not(dt)
        except (AttributeError, RuntimeError) as exc:  # an extension built before this op existed
            why = f"this build of the C++ extension predates it ({type(exc).__name__})"
        brg = (f"; lora may also run its rank-r products on oneDNN's {name} brgemm micro-kernels" if not why
               else f"; no brgemm rank-r products for lora ({why})")
        if torch.ops.fastpeft_cpu.native_lowp_gemm(dt):
            lines.append(f"GEMM {name}: native on this CPU - lora, adapter, prefix_attention run their "
                         f"{name} GEMMs in {name} (fp32 accumulation; prefix_attention: {blas}); "
                         f"no fp32 upcast{brg}")
        else:
            lines.append(f"GEMM {name}: no native {name} GEMMs on this CPU - lora, adapter, prefix_attention "
                         f"time their native {name} path against 'upcast' (fp32 copies) per shape class "
                         f"and keep the faster (prefix_attention native: {blas}){brg}")
    return lines


def gemm_report() -> List[str]:
    """One line per dtype saying which GEMM libraries the C++ backend may use for it here (and
    why oneDNN is out where it is), then the configuration each op chose per shape class so far."""
    try:
        import fastpeft._C  # noqa: F401
        libs = list(torch.ops.fastpeft_cpu.gemm_libs())
        table = list(torch.ops.fastpeft_cpu.tune_table())
    except Exception as exc:  # noqa: BLE001 - no C++ backend: say so, never fail `info`
        return [f"C++ backend not loaded ({type(exc).__name__}: {exc})"]
    lines = [f"GEMM {line}" for line in libs]
    lines += lowp_report()
    lines.append("choice: each op times its configurations on the first call of a shape class and keeps "
                 "the fastest (FASTPEFT_CPU_GEMM=aten|onednn restricts it, FASTPEFT_CPU_TUNE=0 keeps the default)")
    lines += [f"tuned: {line}" for line in table] or ["tuned: nothing yet in this process"]
    return lines
