#!/usr/bin/env python3
"""The GPU acceptance figures (issue 11), computed from a `python -m fastpeft bench --device cuda` CSV.

    python scripts/gpu_acceptance.py benchmarks/results/gpu-nvidia-h200-bf16.csv

Prints a markdown table (figure, target, measured, met) for every shape found in the file, using
the newest row of each (op, provider, mode, shape). scripts/gpu_check.sh runs it last; on the
CPU (`--dry-run`) it reads the quick CPU run's CSV, where the figures mean nothing but the
script and the file layout get exercised.

Targets: LoRA step (fwd+bwd) <= 1.15x the frozen linear and >= 1.3x faster than HF PEFT; adapter
>= 75 % of copy bandwidth and >= 2.5x faster than eager. "Fraction of copy bandwidth" counts the
bytes each mode must move at least, in units of x (M·d elements): the forward reads x and writes
y (2, the copy's own traffic); the backward reads dy and x and writes dx (3); the step both (5).
So fraction = (units / 2) · copy time / fastpeft time.
"""
import os
import sys
from typing import Dict, List, Optional, Tuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from acceptance import Key, load  # noqa: E402 - the CPU script's CSV loader, one copy

ADAPTER_UNITS = {"fwd": 2, "bwd": 3, "full": 5}


def figures(rows: Dict[Key, dict]) -> List[Tuple[str, str, str, Optional[bool]]]:
    """(figure, target, measured, met or None) lines."""
    def ms(op, prov, mode, shape) -> Optional[float]:
        r = rows.get((op, prov, mode, shape))
        return float(r["p50_ms"]) if r else None

    def shapes(op):
        return sorted({s for (o, _p, _m, s) in rows if o == op})

    out = []

    def add(fig, target, value, ok_fn, fmt="{:.2f}×"):
        if value is None:
            out.append((fig, target, "n/a", None))
        else:
            out.append((fig, target, fmt.format(value), ok_fn(value)))

    def ratio(a, b):
        return a / b if a and b else None

    for s in shapes("lora"):
        for mode in ("full", "fwd", "bwd"):
            f = ms("lora", "fastpeft", mode, s)
            tgt = mode == "full"
            add(f"LoRA {mode} vs frozen linear, {s}", "≤ 1.15×" if tgt else "(info)",
                ratio(f, ms("lora", "frozen", mode, s)), (lambda v: v <= 1.15) if tgt else (lambda v: None))
            add(f"LoRA {mode}, HF PEFT time / fastpeft time, {s}", "≥ 1.3×" if tgt else "(info)",
                ratio(ms("lora", "peft", mode, s), f), (lambda v: v >= 1.3) if tgt else (lambda v: None))
            add(f"LoRA {mode}, torch.compile time / fastpeft time, {s}", "(info)",
                ratio(ms("lora", "compile", mode, s), f), lambda v: None)
    for s in shapes("adapter"):
        for mode, units in ADAPTER_UNITS.items():
            f, c = ms("adapter", "fastpeft", mode, s), ms("adapter", "copy", mode, s)
            frac = units / 2 * c / f if f and c else None
            add(f"adapter {mode}, fraction of copy bandwidth ({units}·|x| bytes), {s}", "≥ 75 %", frac,
                lambda v: v >= 0.75, fmt="{:.0%}")
            add(f"adapter {mode}, eager time / fastpeft time, {s}", "≥ 2.5×",
                ratio(ms("adapter", "eager", mode, s), f), lambda v: v >= 2.5)
            add(f"adapter {mode}, torch.compile time / fastpeft time, {s}", "(info)",
                ratio(ms("adapter", "compile", mode, s), f), lambda v: None)
    for s in shapes("prefix"):
        add(f"prefix attention step vs cat + SDPA, {s}", "(info: ≤ 1.0× on CPU)",
            ratio(ms("prefix", "fastpeft", "full", s), ms("prefix", "cat_sdpa", "full", s)), lambda v: None)
    for s in shapes("vpt_deep_train_step"):
        add(f"VPT-deep step, concat time / fastpeft time, {s}", "(info: ≥ 1.2× on CPU)",
            ratio(ms("vpt_deep_train_step", "concat", "full", s), ms("vpt_deep_train_step", "fastpeft", "full", s)),
            lambda v: None)
    return out


def main(path: str) -> int:
    lines = ["| figure | target | measured | met |", "|---|---|---|---|"]
    for fig, target, measured, ok in figures(load(path)):
        lines.append(f"| {fig} | {target} | {measured} | {'' if ok is None else ('yes' if ok else 'NO')} |")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    sys.exit(main(sys.argv[1]))
