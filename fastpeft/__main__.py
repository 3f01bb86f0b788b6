"""Command line: ``python -m fastpeft {info,bench,demo}``."""
from __future__ import annotations

import argparse
import importlib
import os
import sys

#: --op name -> module exposing ``cases(device, dtype, quick) -> list[Case]``
BENCH_OPS = {
    "lora": "fastpeft.bench.lora",
    "multi_lora": "fastpeft.bench.multi_lora",
    "dora": "fastpeft.bench.dora",
    "adapter": "fastpeft.bench.adapter",
    "prefix": "fastpeft.bench.prefix",
    "vpt": "fastpeft.bench.vpt",
    "encoder": "fastpeft.bench.encoder",
}


#: Environment the CPU benchmark runs under unless ``--allocator default``: torch's CPU allocator
#: gives tensors of 2 MiB and more their own 2 MiB-aligned, MADV_HUGEPAGE-advised memory. With
#: glibc's default heap, whether a provider's output lands on recycled pages or on fresh ones
#: (a page fault per 4 KiB, plus TLB misses) depends on what the provider before it freed: on
#: this 2-core VM that swings one forward call by 2x (6 vs 12 ms) from repetition to
#: repetition, for every provider. Every provider runs under the same setting.
THP_ENV = {"THP_MEM_ALLOC_ENABLE": "1"}


def _thp_on() -> bool:
    return all(os.environ.get(k) == v for k, v in THP_ENV.items())


def _allocator_reexec(args, argv) -> None:
    """Re-run this command with :data:`THP_ENV` set (torch reads it once, at its first
    allocation, so it must be in the environment before torch is imported)."""
    if args.allocator != "thp" or args.device.split(":")[0] != "cpu":
        return
    if _thp_on():
        return
    os.execve(sys.executable, [sys.executable, "-m", "fastpeft", *argv], {**os.environ, **THP_ENV})


def _bench(args) -> int:
    import torch

    from fastpeft import bench

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench: --device cuda requested but no CUDA device is available", file=sys.stderr)
        return 2
    if device.type == "cpu" and not args.allow_reference:
        from fastpeft._backend import FAMILIES, select_backend, why_not

        try:
            ref = [f for f in FAMILIES if select_backend(f, device) == "reference"]
        except RuntimeError as exc:
            print(f"bench: {exc}", file=sys.stderr)
            return 2
        if ref:
            why = ("FASTPEFT_BACKEND=reference" if os.environ.get("FASTPEFT_BACKEND") == "reference"
                   else why_not("cpu", ref[0], device))
            print(f"bench: fastpeft's {', '.join(ref)} would run on the reference backend here ({why}); "
                  "refusing to publish those numbers as fastpeft's. Fix the C++ backend (`python -m fastpeft "
                  "info`), or pass --allow-reference to time the reference on purpose.", file=sys.stderr)
            return 2
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, None: None}[args.dtype]
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    ops = list(BENCH_OPS) if args.op == "all" else args.op.split(",")
    all_rows = []
    md = []
    for op in ops:
        if op not in BENCH_OPS:
            print(f"bench: unknown --op {op!r}; expected one of {sorted(BENCH_OPS)} or 'all'", file=sys.stderr)
            return 2
        try:
            mod = importlib.import_module(BENCH_OPS[op])
        except ModuleNotFoundError as exc:
            print(f"bench: skipping {op}: {exc}")
            continue
        cases = mod.cases(device=device, dtype=dtype, quick=args.quick)
        for c in cases:
            c.budget_s *= args.budget_scale
        rows = bench.run_cases(cases, csv_path=args.csv, memory=not args.no_memory)
        all_rows += rows
        alloc = ""
        where = bench.device_name(device)
        if device.type == "cpu":
            from fastpeft import _cpuinfo

            alloc = ", THP_MEM_ALLOC_ENABLE=1" if _thp_on() else ", default allocator"
            where += f" ({_cpuinfo.cpu_model()}; {_cpuinfo.isa()})"
        title = f"### `--op {op}` on {where}, {str(dtype)[6:]}{alloc}, commit {bench.commit()}"
        md += [title, "", bench.format_table(rows), ""] + [f"{n}\n" for n in getattr(mod, "NOTES", [])]
        print()
        print(title)
        print(bench.format_table(rows), flush=True)
        if args.plot:
            path = bench.plot(rows, args.plot.replace(".png", f"_{op}.png"))
            if path:
                print(f"plot: {path}")
    if device.type == "cpu":
        # Which configuration each C++ op timed fastest and ran, per shape class (csrc/tune.h): a
        # figure depends on it, and another process may choose differently where two are close.
        from fastpeft import _cpuinfo

        tuned = [line for line in _cpuinfo.gemm_report() if line.startswith("tuned: ") and "->" in line]
        if tuned:
            print("\nconfigurations the C++ ops chose in this run (csrc/tune.h):")
            print("\n".join(f"  {line[7:]}" for line in tuned))
            md += ["<details><summary>configurations the C++ ops chose in this run (csrc/tune.h)</summary>", ""]
            md += [f"- `{line[7:]}`" for line in tuned] + ["", "</details>", ""]
    if args.csv:
        print(f"\nCSV rows appended to {args.csv}")
    if args.markdown:
        os.makedirs(os.path.dirname(os.path.abspath(args.markdown)), exist_ok=True)
        with open(args.markdown, "w") as f:
            f.write("\n".join(md))
        print(f"markdown tables written to {args.markdown} (scripts/update_readme.py pastes them in)")
    return 0


def main(argv=None, allow_reexec: bool = False) -> int:
    """CLI entry. ``allow_reexec`` (only from ``python -m fastpeft``) lets ``bench`` re-run itself
    with the allocator environment it needs; called in-process it never replaces the caller."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["demo"]:  # the demo owns its own flags
        from fastpeft import demo

        return demo.main(argv[1:])
    p = argparse.ArgumentParser(prog="python -m fastpeft")
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("info", help="which backends work here and why others don't")
    b = sub.add_parser("bench", help="benchmark fused ops against their peers")
    b.add_argument("--op", default="all", help=f"comma list of {sorted(BENCH_OPS)} or 'all'")
    b.add_argument("--device", default="cpu")
    b.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default=None,
                   help="default: fp32 on CPU, bf16 on CUDA")
    b.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's)")
    b.add_argument("--quick", action="store_true", help="small shapes, for smoke tests")
    b.add_argument("--budget-scale", type=float, default=1.0, help="scale every case's time budget")
    b.add_argument("--csv", default="bench_out/results.csv", help="CSV to append rows to ('' for none)")
    b.add_argument("--plot", default="bench_out/ratio.png", help="plot path ('' for none)")
    b.add_argument("--no-memory", action="store_true", help="skip peak-memory measurement")
    b.add_argument("--markdown", default="bench_out/tables.md", help="markdown tables file ('' for none)")
    b.add_argument("--allocator", choices=["thp", "default"], default="thp",
                   help="CPU: 'thp' (default) re-runs the command with THP_MEM_ALLOC_ENABLE=1 so every "
                        "provider's large outputs get fresh huge-page-advised memory instead of whatever "
                        "the heap recycled (see THP_ENV in fastpeft/__main__.py); 'default' keeps glibc's heap")
    b.add_argument("--allow-reference", action="store_true",
                   help="CPU: run even when fastpeft's ops would use the reference backend (refused by default)")
    sub.add_parser("demo", help="fine-tune a tiny ViT on real digits with every method (see demo --help)")
    args = p.parse_args(argv)
    if args.cmd == "info":
        from fastpeft._backend import info

        print(info())
        return 0
    if args.cmd == "bench":
        if allow_reexec:
            _allocator_reexec(args, argv)
        return _bench(args)
    return 1


if __name__ == "__main__":
    sys.exit(main(allow_reexec=True))
