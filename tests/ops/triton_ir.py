"""Static checks of fastpeft's Triton kernels on their Triton IR (TTIR), no GPU needed.

``python -m tests.ops.triton_ir`` compiles every ``@triton.jit`` kernel in ``fastpeft.triton``
to TTIR for an H100-class CUDA target (front end only: no driver, no ptxas) with every integer
argument typed ``i32``, which is how Triton passes any int below 2**31, then follows each
pointer offset (``tt.addptr``) back through the ops it is computed from. Any multiplication
on that path done in 32 bits (``arith.muli`` of ``i32``) is reported with its source line: an
``index * stride`` or ``index * size`` there overflows once the product passes 2**31 (a rank
index times K past 8.4M, a program id times a tile past 2**31, ...), although every size alone
fits in 32 bits. Prints a JSON report; ``tests/ops/test_triton_limits.py`` runs it.

Must run with TRITON_INTERPRET unset (the interpreter's kernels have no IR), hence a separate
process in the tests.
"""
from __future__ import annotations

import importlib
import inspect
import itertools
import json
import os
import re
import sys
from typing import Dict, List

import triton
import triton.language as tl

#: kernel modules to check
MODULES = ["fastpeft.triton._common", "fastpeft.triton.lora", "fastpeft.triton.adapter",
           "fastpeft.triton.prefix_attention", "fastpeft.triton.multi_lora"]

#: pointer arguments that are fp32 buffers (accumulators, lse); i8 for the mask kernel's output
FP32_PTRS = {"db_ptr", "da_ptr", "lse_ptr", "delta_ptr", "dbd_ptr", "g_ptr", "dwd_ptr", "cs_ptr", "s_ptr"}
I8_PTRS = {"out_ptr"}
#: int64 index buffers (multi_lora's row order and segment offsets)
I64_PTRS = {"order_ptr", "seg_ptr"}
FLOAT_ARGS = {"scaling", "inv_keep", "qk_scale", "scale"}
#: tile sizes (any valid powers of two) and the values of non-flag constexprs
TILES = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, BLOCK_R=32, BLOCK_B=32, BLOCK_D=64, GROUP_M=8, BLOCK=256,
             BLOCK_I=32, BLOCK_O=64, BLOCK_P=64, BLOCK_Q=64)
OTHER = dict(ACT=1, PREC="ieee")


@triton.jit
def _canary_kernel(x_ptr, y_ptr, n, stride, BLOCK: tl.constexpr):
    """What the check must catch: the load's address takes two int32 products (the program id
    times the tile, the index times the stride); the store's is computed in int64."""
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    v = tl.load(x_ptr + i * stride, mask=i < n)
    tl.store(y_ptr + i.to(tl.int64) * stride, v, mask=i < n)


def jit_functions(module) -> Dict[str, object]:
    """name -> JITFunction of every kernel (autotuned ones unwrapped) launched from the host."""
    from triton.runtime.jit import JITFunction

    out = {}
    for name, obj in vars(module).items():
        fn = obj
        while not isinstance(fn, JITFunction) and hasattr(fn, "fn"):
            fn = fn.fn
        if isinstance(fn, JITFunction) and fn.__module__ == module.__name__ and name.endswith("_kernel"):
            out[name] = fn
    return out


def signature(fn, dtype: str, flags: bool):
    sig, consts = {}, {}
    for p in fn.params:
        n = p.name
        if p.is_constexpr:
            sig[n] = "constexpr"
            if n in TILES:
                consts[n] = TILES[n]
            elif n in OTHER:
                consts[n] = OTHER[n]
            elif n == "IEEE":
                consts[n] = flags and dtype == "fp32"
            else:  # a feature flag: all on, or all off
                consts[n] = flags
        elif n.endswith("_ptr"):
            sig[n] = "*fp32" if n in FP32_PTRS else "*i8" if n in I8_PTRS else "*i64" if n in I64_PTRS \
                else f"*{dtype}"
        elif n in FLOAT_ARGS:
            sig[n] = "fp32"
        else:
            sig[n] = "i32"
    return sig, consts


def ttir(fn, sig, consts) -> str:
    import triton._C.libtriton as lt
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.compiler.compiler import ASTSource

    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    opts = backend.parse_options({})
    ctx = lt.ir.context()
    lt.ir.load_dialects(ctx)
    backend.load_dialects(ctx)
    src = ASTSource(fn, sig, consts)
    args = (opts, backend.get_codegen_implementation(opts), backend.get_module_map(), ctx)
    if "target" in inspect.signature(src.make_ir).parameters:  # triton >= 3.7 (older: no target)
        args = (target,) + args
    mod = src.make_ir(*args)
    stages: dict = {}
    backend.add_stages(stages, opts, src.language)
    mod = stages["ttir"](mod, {})
    return mod.str() if hasattr(mod, "str") else str(mod)


_OP = re.compile(r"^\s*(?P<res>%[\w.$#-]+(?::\d+)?)\s*=\s*(?P<op>[\w.]+)\b(?P<rest>.*)$")
_VAL = re.compile(r"%[\w.$-]+(?:#\d+)?")
_LOCREF = re.compile(r"loc\((#loc\d+)\)\s*$")
_LOCDEF = re.compile(r"^(#loc\d+) = loc\((.*)\)$")


def _locations(text: str) -> Dict[str, str]:
    raw = {}
    for line in text.splitlines():
        m = _LOCDEF.match(line.strip())
        if m:
            raw[m.group(1)] = m.group(2)

    def resolve(ref, depth=0):
        v = raw.get(ref, "")
        m = re.match(r'^"([^"]+)":(\d+):\d+', v)
        if m:
            return f"{os.path.basename(m.group(1))}:{m.group(2)}"
        inner = re.search(r"(#loc\d+)", v)
        return resolve(inner.group(1), depth + 1) if inner and depth < 20 else "?"
    return {k: resolve(k) for k in raw}


def narrow_address_products(text: str) -> List[str]:
    """Source locations of 32-bit multiplications that feed a pointer offset."""
    defs: Dict[str, tuple] = {}  # value -> (op, operands, result type text, loc ref)
    addptr_offsets = []
    for line in text.splitlines():
        m = _OP.match(line)
        if not m:
            continue
        res, op, rest = m.group("res"), m.group("op"), m.group("rest")
        loc = _LOCREF.search(line)
        body = rest.split(" loc(")[0]
        operands_txt, _, types = body.partition(" : ")
        operands = _VAL.findall(operands_txt)
        entry = (op, operands, types, loc.group(1) if loc else None)
        name, _, count = res.partition(":")
        defs[name] = entry
        if count:
            for i in range(int(count)):
                defs[f"{name}#{i}"] = entry
        if op == "tt.addptr" and len(operands) >= 2:
            addptr_offsets.append(operands[1])
    locs = _locations(text)
    bad, seen = set(), set()
    stack = list(addptr_offsets)
    while stack:
        v = stack.pop()
        if v in seen or v not in defs:
            continue
        seen.add(v)
        op, operands, types, loc = defs[v]
        if op == "arith.muli" and re.search(r"(?:^|[x\s])i32\b", types.strip()):
            bad.add(locs.get(loc, "?"))
        if op.startswith("scf."):  # loop / branch results: not followed (the kernels keep offsets out of them)
            continue
        stack.extend(operands)
    return sorted(bad)


def grid_axes(text: str) -> List[str]:
    """The grid axes the kernel reads (``tt.get_program_id x|y|z``)."""
    return sorted(set(re.findall(r"tt\.get_program_id (x|y|z)", text)))


def _check(fn) -> dict:
    problems, axes, compiled = set(), set(), 0
    for dtype, flags in itertools.product(("fp16", "fp32"), (True, False)):
        sig, consts = signature(fn, dtype, flags)
        text = ttir(fn, sig, consts)
        problems.update(narrow_address_products(text))
        axes.update(grid_axes(text))
        compiled += 1
    return {"variants": compiled, "narrow_products": sorted(problems), "grid_axes": sorted(axes)}


def audit() -> dict:
    report = {"canary": _check(_canary_kernel)}
    for modname in MODULES:
        mod = importlib.import_module(modname)
        for name, fn in jit_functions(mod).items():
            report[f"{modname}.{name}"] = _check(fn)
    return report


#: exit status when this triton's compiler front end cannot be driven this way (the test skips)
UNSUPPORTED = 3

if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        sys.exit("run with TRITON_INTERPRET unset: the interpreter's kernels have no IR")
    try:
        _check(_canary_kernel)  # fails fast where the front end differs
    except Exception as exc:  # noqa: BLE001 - another triton's internal compiler API
        print(f"cannot build Triton IR with triton {triton.__version__}: {type(exc).__name__}: {exc}", file=sys.stderr)
        sys.exit(UNSUPPORTED)
    print(json.dumps(audit(), indent=1))
