"""One benchmark harness and one CSV format for every op.

Every benchmark builds :class:`Case` objects (one op, mode, shape and dtype, and a set of
providers) and hands them to :func:`run_cases`, which

* times providers **interleaved** in one process (the order rotates every repetition),
  many repetitions, and reports p20/p50/p80 in milliseconds;
* measures the peak memory of one call per provider (CUDA: the caching allocator's peak;
  CPU: the running sum of allocations recorded by the profiler);
* appends one CSV row per (case, provider) with :data:`COLUMNS`;
* prints a table with each provider's ratio to the floor and fastpeft's speedup over
  every peer.

A provider is a *prep* callable returning the thunk to time: prep runs untimed before
every repetition (e.g. a forward pass, for mode ``bwd``).
"""
from __future__ import annotations

import contextlib
import csv
import functools
import gc
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import torch

from fastpeft import _cpuinfo

COLUMNS = ["op", "provider", "mode", "shape", "dtype", "device", "p20_ms", "p50_ms", "p80_ms",
           "peak_mb", "reps", "commit", "cpu", "isa"]  # cpu, isa: a figure is a claim about the CPU it ran on

Prep = Callable[[], Callable[[], object]]


@dataclass
class Case:
    op: str
    mode: str                   # "fwd", "bwd" or "full" (fwd+bwd)
    shape: str                  # human-readable, e.g. "M=4096 K=768 N=768 r=16"
    dtype: torch.dtype
    device: torch.device
    providers: Dict[str, Prep]  # name -> prep; prep() returns the thunk to time
    floor: Optional[str] = None  # provider the others are divided by
    ours: str = "fastpeft"
    min_reps: int = 10
    budget_s: float = 6.0       # stop repeating once past this (and min_reps)
    max_reps: int = 200
    extra: Dict[str, object] = field(default_factory=dict)


@functools.lru_cache(maxsize=None)
def compiled(fn: Callable, dynamic: Optional[bool] = None) -> Callable:
    """``torch.compile(fn)``, built once per (fn, dynamic) and shared by every case, so the
    compilation happens in a case's untimed warm-up rather than once per provider."""
    return torch.compile(fn, dynamic=dynamic)


def autograd_preps(fns: Dict[str, Callable[[], torch.Tensor]], mode: str, grad_out: torch.Tensor,
                   params: Sequence[torch.Tensor], no_grad: Sequence[str] = ()) -> Dict[str, Prep]:
    """Preps timing each ``fn`` in ``mode``: "fwd" (the call), "bwd" (the backward of an untimed
    call, with ``grad_out``) or "full" (call + backward). ``params``' grads are reset before every
    repetition; providers named in ``no_grad`` (e.g. a copy floor) time the bare call in every mode.
    """
    if mode not in ("fwd", "bwd", "full"):
        raise ValueError(f"mode: expected 'fwd', 'bwd' or 'full', got {mode!r}")

    def zero_grads():
        for q in params:
            q.grad = None

    def prep_for(name, fn):
        if name in no_grad or mode == "fwd":
            def prep():
                zero_grads()
                return fn
        elif mode == "bwd":
            def prep():
                zero_grads()
                y = fn()  # untimed forward
                return lambda: y.backward(grad_out)
        else:
            def prep():
                zero_grads()
                return lambda: fn().backward(grad_out)
        return prep

    return {name: prep_for(name, fn) for name, fn in fns.items()}


class _OneDNNLinear(torch.autograd.Function):
    """``F.linear`` computed by oneDNN (``torch.ops.mkldnn._linear_pointwise``) in forward and
    backward: the frozen-layer floor on the GEMM library fastpeft's C++ backend uses for fp32,
    where ``F.linear`` itself goes to MKL. x (M, K), W (N, K), b (N,) or None."""

    @staticmethod
    def forward(ctx, x, W, b):
        ctx.save_for_backward(x, W)
        ctx.has_b = b is not None
        return torch.ops.mkldnn._linear_pointwise(x, W, b, "none", [], "")

    @staticmethod
    def backward(ctx, dy):
        x, W = ctx.saved_tensors
        lin = torch.ops.mkldnn._linear_pointwise
        dx = lin(dy, W.t(), None, "none", [], "") if ctx.needs_input_grad[0] else None
        dW = lin(dy.t(), x.t(), None, "none", [], "") if ctx.needs_input_grad[1] else None
        db = dy.sum(0) if ctx.has_b and ctx.needs_input_grad[2] else None
        return dx, dW, db


def onednn_linear(x: torch.Tensor, W: torch.Tensor, b: Optional[torch.Tensor]) -> torch.Tensor:
    return _OneDNNLinear.apply(x, W, b)


def onednn_ok(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether :func:`onednn_linear` runs here (fp32 CPU tensors and a torch built with oneDNN)."""
    return (torch.device(device).type == "cpu" and dtype == torch.float32
            and torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


def commit() -> str:
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except Exception:  # noqa: BLE001
        return "unknown"


def device_name(device: torch.device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu-{torch.get_num_threads()}threads"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _quantiles(xs: List[float]) -> tuple:
    qs = statistics.quantiles(xs, n=10, method="inclusive") if len(xs) > 1 else [xs[0]] * 9
    return qs[1], statistics.median(xs), qs[7]


#: the profiler's own log lines (libkineto writes them to fd 2 from C++ on every start/stop:
#: "USDT:<date> <pid>:<tid> SyncActivityProfilerHandler.cpp:52] profiler_start", also STAGE lines)
_KINETO_LOG = re.compile(r"^(?:USDT|STAGE):\d{4}-\d\d-\d\d [\d:.]+ \d+:\d+ \S+:\d+\] ")


@contextlib.contextmanager
def _without_kineto_log():
    """Run the block with fd 2 captured, then pass on everything but kineto's log lines.

    The profiler's start/stop messages come from C++ (not through ``sys.stderr``), two per
    profiled call, i.e. hundreds per bench run; anything else written meanwhile (a warning, an
    error message) is printed after the block, not lost.
    """
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no usable fd 2: nothing to filter
        yield
        return
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            try:
                sys.stderr.flush()
            finally:
                os.dup2(saved, 2)
                os.close(saved)
            tmp.seek(0)
            text = tmp.read().decode(errors="replace")
            rest = "".join(line for line in text.splitlines(keepends=True) if not _KINETO_LOG.match(line))
            if rest:
                sys.stderr.write(rest)
                sys.stderr.flush()


def _cpu_peak_bytes(fn: Callable[[], object]) -> int:
    """Peak of the running sum of CPU allocations made while ``fn`` runs (torch.profiler's
    memory events, with its log lines kept off the terminal)."""
    from torch.profiler import ProfilerActivity, profile

    with _without_kineto_log(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    cur = peak = 0
    for _, n in events:
        cur += n
        peak = max(peak, cur)
    return peak


def peak_memory_mb(prep: Prep, device: torch.device) -> float:
    run = prep()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        run()
        _sync(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    return _cpu_peak_bytes(run) / 2**20


def _time_once(run: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        import triton.testing

        # do_bench flushes L2 and times on CUDA events; a short rep keeps providers interleaved.
        return float(triton.testing.do_bench(run, warmup=5, rep=20, return_mode="median"))
    t0 = time.perf_counter()
    run()
    return (time.perf_counter() - t0) * 1e3


def measure(case: Case, warmup: int = 2) -> Dict[str, List[float]]:
    """Interleaved repetitions of every provider; returns each provider's times in ms.

    Python's cyclic garbage collector is off while timing (as ``timeit`` does) and runs untimed
    between rounds: otherwise a collection of the whole process heap (large once torch.compile,
    peft and transformers are imported) lands inside whichever call happens to allocate the
    triggering object, adding milliseconds to random providers.
    """
    names = list(case.providers)
    for _ in range(warmup):
        for n in names:
            r = case.providers[n]()
            r()
    _sync(case.device)
    times: Dict[str, List[float]] = {n: [] for n in names}
    gc_on = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        start = time.perf_counter()
        rep = 0
        while rep < case.max_reps and (rep < case.min_reps or time.perf_counter() - start < case.budget_s):
            order = names[rep % len(names):] + names[:rep % len(names)]
            for n in order:
                run = case.providers[n]()
                _sync(case.device)
                times[n].append(_time_once(run, case.device))
            gc.collect(1)  # untimed: the young generations, where the per-call garbage is
            rep += 1
    finally:
        if gc_on:
            gc.enable()
    return times


def run_cases(cases: List[Case], csv_path: Optional[str] = None, memory: bool = True,
              progress: bool = True) -> List[dict]:
    rows: List[dict] = []
    sha = commit()
    for i, case in enumerate(cases):
        if progress:
            print(f"[{i + 1}/{len(cases)}] {case.op} {case.mode} {case.shape} {str(case.dtype)[6:]}",
                  flush=True)
        times = measure(case)
        for name, ts in times.items():
            p20, p50, p80 = _quantiles(ts)
            peak = peak_memory_mb(case.providers[name], case.device) if memory else float("nan")
            rows.append(dict(op=case.op, provider=name, mode=case.mode, shape=case.shape,
                             dtype=str(case.dtype).replace("torch.", ""),
                             device=device_name(case.device), p20_ms=round(p20, 4),
                             p50_ms=round(p50, 4), p80_ms=round(p80, 4), peak_mb=round(peak, 2),
                             reps=len(ts), commit=sha, cpu=_cpuinfo.cpu_model(), isa=_cpuinfo.isa(),
                             _floor=case.floor, _ours=case.ours))
        if csv_path:  # case by case: a run stopped at a time limit keeps the cases it finished
            write_csv(rows[-len(times):], csv_path)
    return rows


def write_csv(rows: List[dict], path: str) -> None:
    """Append rows; a file written with other columns (an older format) is an error, not a silent
    mix of layouts."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    new = not os.path.exists(path) or os.path.getsize(path) == 0
    if not new:
        with open(path, newline="") as f:
            header = next(csv.reader(f), [])
        if header != COLUMNS:
            raise ValueError(f"{path}: its columns {header} are not this bench's {COLUMNS}; "
                             "write to a new file (--csv)")
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        if new:
            w.writeheader()
        w.writerows(rows)


def format_table(rows: List[dict]) -> str:
    """Markdown table: p50 (p20-p80), peak memory, ratio to floor, fastpeft's speedup."""
    out = ["| op | mode | shape | dtype | provider | p50 ms (p20-p80) | peak MB | × floor | fastpeft speedup |",
           "|---|---|---|---|---|---|---|---|---|"]
    groups: Dict[tuple, List[dict]] = {}
    for r in rows:
        groups.setdefault((r["op"], r["mode"], r["shape"], r["dtype"], r["device"]), []).append(r)
    for (op, mode, shape, dtype, _dev), rs in groups.items():
        by = {r["provider"]: r for r in rs}
        floor = by.get(rs[0].get("_floor"))
        ours = by.get(rs[0].get("_ours", "fastpeft"))
        for r in rs:
            ratio = f"{r['p50_ms'] / floor['p50_ms']:.2f}" if floor else "-"
            speed = (f"{r['p50_ms'] / ours['p50_ms']:.2f}×" if ours and r is not ours and r is not floor
                     else "")
            out.append(f"| {op} | {mode} | {shape} | {dtype} | {r['provider']} | {r['p50_ms']:.3f} "
                       f"({r['p20_ms']:.3f}-{r['p80_ms']:.3f}) | {r['peak_mb']:.1f} | {ratio} | {speed} |")
    return "\n".join(out)


def plot(rows: List[dict], path: str, x_key: str = "tokens") -> Optional[str]:
    """Plot each provider's ratio to the floor against the token count (``M=`` or ``x_key=`` in
    the shape string). One line per (op, mode, provider, rest of the shape), so only shapes that
    differ in their token count share a line; lines of one point are left out when any line has
    more (the sweep is what the plot is for)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    import re

    series: Dict[tuple, list] = {}
    groups: Dict[tuple, List[dict]] = {}
    for r in rows:
        groups.setdefault((r["op"], r["mode"], r["shape"], r["dtype"]), []).append(r)
    tok = re.compile(rf"\b(?:M|{x_key})=(\d+)\s*")
    for (op, mode, shape, _), rs in groups.items():
        by = {r["provider"]: r for r in rs}
        floor = by.get(rs[0].get("_floor"))
        m = tok.search(shape)
        if not floor or not m:
            continue
        rest = tok.sub("", shape).strip()
        for r in rs:
            series.setdefault((op, mode, rest, r["provider"]), []).append(
                (int(m.group(1)), r["p50_ms"] / floor["p50_ms"]))
    if any(len(p) > 1 for p in series.values()):
        series = {k: p for k, p in series.items() if len(p) > 1}
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    for (op, mode, rest, prov), pts in series.items():
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{prov} ({op} {mode}, {rest})")
    ax.set_xscale("log")
    ax.set_xlabel("tokens (M)")
    ax.set_ylabel("time / floor (p50)")
    ax.axhline(1.0, color="gray", lw=0.5)
    ax.legend(fontsize=6)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
