#!/usr/bin/env python3
"""The issues' CPU acceptance figures, computed from a `python -m fastpeft bench` CSV.

    python scripts/acceptance.py bench_out/results.csv > bench_out/acceptance.md

Uses the newest row of each (op, provider, mode, shape) in the file, so a CSV that several runs
appended to gives the latest run's figures. Prints a markdown table (figure, target, measured).
"""
import csv
import sys
from typing import Dict, Optional, Tuple

Key = Tuple[str, str, str, str]  # op, provider, mode, shape


def load(path: str) -> Dict[Key, dict]:
    rows: Dict[Key, dict] = {}
    with open(path) as f:
        for r in csv.DictReader(f):
            rows[(r["op"], r["provider"], r["mode"], r["shape"])] = r
    return rows


def main(path: str) -> int:
    rows = load(path)

    def get(op: str, prov: str, mode: str, shape_prefix: str) -> Optional[dict]:
        for (o, p, m, s), r in rows.items():
            if o == op and p == prov and m == mode and s.startswith(shape_prefix):
                return r
        return None

    def ms(op, prov, mode, shape):
        r = get(op, prov, mode, shape)
        return float(r["p50_ms"]) if r else None

    def mb(op, prov, mode, shape):
        r = get(op, prov, mode, shape)
        return float(r["peak_mb"]) if r else None

    def ratio(a, b, fmt="{:.2f}×"):
        return fmt.format(a / b) if a and b else "n/a"

    def prefix_rows() -> str:  # fastpeft vs cat + SDPA per prefix shape: time ratio, peak memory
        pre = []
        for shape in sorted({s for (o, _p, m, s) in rows if o == "prefix" and m == "full"}):
            bp = next((w for w in shape.split() if w.startswith("Bp=")), shape)
            f, c = ms("prefix", "fastpeft", "full", shape), ms("prefix", "cat_sdpa", "full", shape)
            fm, cm = mb("prefix", "fastpeft", "full", shape), mb("prefix", "cat_sdpa", "full", shape)
            pre.append(f"{bp}: {ratio(f, c)}, {fm:.1f} vs {cm:.1f} MB" if None not in (f, c, fm, cm) else f"{bp}: n/a")
        return "; ".join(pre) or "n/a"

    lines = ["| figure | target | measured |", "|---|---|---|"]
    dtypes = {r["dtype"] for r in rows.values()}
    if dtypes and dtypes <= {"bfloat16", "float16"}:  # issue 10's figures, floors in the same dtype
        dt = "/".join(sorted(dtypes))
        lora = ["M=4096 K=768 N=768 ", "M=4096 K=768 N=3072 ", "M=512 K=4096 N=4096 "]
        lines.append(f"| LoRA {dt} step vs frozen {dt} `nn.Linear` step, (4096,768,768) / (4096,768,3072) / "
                     "(512,4096,4096) | ≤ 1.25× | "
                     + " / ".join(ratio(ms("lora", "fastpeft", "full", s), ms("lora", "frozen", "full", s))
                                  for s in lora) + " |")
        lines.append(f"| LoRA {dt} step, HF PEFT time / fastpeft time, (4096,768,768) | ≥ 3× | "
                     f"{ratio(ms('lora', 'peft', 'full', lora[0]), ms('lora', 'fastpeft', 'full', lora[0]))} |")
        f, z = mb("lora", "fastpeft", "full", lora[0]), mb("lora", "frozen", "full", lora[0])
        lines.append(f"| LoRA {dt} step peak memory, fastpeft vs frozen, (4096,768,768) | frozen + O(M·r) | "
                     + (f"{f:.1f} vs {z:.1f} MB" if None not in (f, z) else "n/a") + " |")
        a = "M=8192 d=768 m=64"
        lines.append(f"| adapter {dt} step, eager time over fastpeft's | ≥ 1.6× | "
                     f"{ratio(ms('adapter', 'eager', 'full', a), ms('adapter', 'fastpeft', 'full', a))} |")
        lines.append(f"| prefix_attention {dt} step vs cat + SDPA | ≤ 1.0×, less memory | {prefix_rows()} |")
        print("\n".join(lines))
        return 0

    def floor(shape):  # issue 9: the frozen linear on the faster GEMM library on this machine
        fs = [v for v in (ms("lora", "frozen", "full", shape), ms("lora", "frozen_onednn", "full", shape)) if v]
        return min(fs) if fs else None

    lora = ["M=4096 K=768 N=768 ", "M=4096 K=768 N=3072 ", "M=512 K=4096 N=4096 "]
    small = ["M=512 K=768 N=768 ", "M=2048 K=384 N=384 "]
    lines.append("| LoRA step vs floor = min(frozen `nn.Linear`, frozen linear on oneDNN), (4096,768,768) / "
                 "(4096,768,3072) / (512,4096,4096) | ≤ 1.10× | "
                 + " / ".join(ratio(ms("lora", "fastpeft", "full", s), floor(s)) for s in lora) + " |")
    lines.append("| LoRA step vs the same floor, (512,768,768) / (2048,384,384) | ≤ 1.20× | "
                 + " / ".join(ratio(ms("lora", "fastpeft", "full", s), floor(s)) for s in small) + " |")
    lines.append("| LoRA step, HF PEFT time / fastpeft time, first two shapes | ≥ 1.35× | " + " / ".join(
        ratio(ms("lora", "peft", "full", s), ms("lora", "fastpeft", "full", s)) for s in lora[:2]) + " |")
    mem = []
    for s in lora[:2]:
        f, z, p = (mb("lora", q, "full", s) for q in ("fastpeft", "frozen", "peft"))
        mem.append(f"{f:.1f} vs {z:.1f} MB (PEFT {p:.1f})" if None not in (f, z, p) else "n/a")
    lines.append("| LoRA step peak memory, fastpeft vs frozen (PEFT), first two shapes | frozen + O(M·r) | "
                 + "; ".join(mem) + " |")
    a = "M=8192 d=768 m=64"
    a_small = "M=4096 d=1024 m=16"
    fp_full, fp_fwd = ms("adapter", "fastpeft", "full", a), ms("adapter", "fastpeft", "fwd", a)
    lines.append("| adapter step, eager / torch.compile time over fastpeft's | ≥ 1.6× / ≥ 1.4× | "
                 f"{ratio(ms('adapter', 'eager', 'full', a), fp_full)} / "
                 f"{ratio(ms('adapter', 'compile', 'full', a), fp_full)} |")
    lines.append(f"| adapter forward, eager time over fastpeft's | ≥ 1.8× | "
                 f"{ratio(ms('adapter', 'eager', 'fwd', a), fp_fwd)} |")
    lines.append(f"| adapter (4096,1024,m=16), eager time over fastpeft's, step / forward | ≥ 1.0× (never slower) | "
                 f"{ratio(ms('adapter', 'eager', 'full', a_small), ms('adapter', 'fastpeft', 'full', a_small))} / "
                 f"{ratio(ms('adapter', 'eager', 'fwd', a_small), ms('adapter', 'fastpeft', 'fwd', a_small))} |")
    lines.append("| adapter step / forward, eager-on-oneDNN time over fastpeft's | (what fusion buys) | "
                 f"{ratio(ms('adapter', 'eager_onednn', 'full', a), fp_full)} / "
                 f"{ratio(ms('adapter', 'eager_onednn', 'fwd', a), fp_fwd)} |")
    lines.append(f"| prefix_attention step vs cat + SDPA | ≤ 1.0×, less memory | {prefix_rows()} |")
    v = "B="
    lines.append("| VPT-deep step, concat time over fastpeft's | ≥ 1.2× | "
                 f"{ratio(ms('vpt_deep_train_step', 'concat', 'full', v), ms('vpt_deep_train_step', 'fastpeft', 'full', v))} |")
    enc = ["minilm-l6 ", "bert-base-w "]  # fastpeft/bench/encoder.py's shapes start with the model name
    weights = []
    for s in enc:
        r = get("encoder", "frozen", "full", s)
        w = next((t for t in r["shape"].split() if t.startswith("weights=")), "") if r else ""
        weights.append(w.replace("weights=", "") or "n/a")
    lines.append(f"| encoder LoRA step (r=16 p=0.1 q/k/v/dense) vs the frozen model's fwd+bwd, MiniLM-L6 "
                 f"({weights[0]} weights, B16×T128) / BERT-base-width 4 layers (B8×T128) | ≤ 1.15× | "
                 + " / ".join(ratio(ms("encoder", "fastpeft", "full", s), ms("encoder", "frozen", "full", s))
                              for s in enc) + " |")
    lines.append("| encoder LoRA step, HF PEFT time / fastpeft time, BERT-base-width | ≥ 1.3× | "
                 f"{ratio(ms('encoder', 'peft', 'full', enc[1]), ms('encoder', 'fastpeft', 'full', enc[1]))} |")
    # issue 14: 8 adapters in one batch (fastpeft/bench/multi_lora.py's CPU plan); `single` is
    # fastpeft.lora_linear with one adapter for the whole batch, `peft` PEFT's adapter_names= forward
    ml = ["T=4096 (16x256) K=768 N=768 r=16 n=8 " + kind for kind in ("uniform", "zipf")]
    lines.append("| multi_lora, 8 adapters in one batch (4096 tokens in 16 samples, 768×768, r=16), training step "
                 "vs fastpeft's single-adapter step, uniform / Zipf | ≤ 1.25× | "
                 + " / ".join(ratio(ms("multi_lora", "fastpeft", "full", s), ms("multi_lora", "single", "full", s))
                              for s in ml) + " |")
    lines.append("| multi_lora, 8 adapters, HF PEFT `adapter_names=` forward time / fastpeft forward time, "
                 "uniform / Zipf | ≥ 3× | "
                 + " / ".join(ratio(ms("multi_lora", "peft", "fwd", s), ms("multi_lora", "fastpeft", "fwd", s))
                              for s in ml) + " |")
    # issue 13: DoRA (fastpeft/bench/dora.py); "two frozen steps" = twice the faster frozen provider's step
    def dora(prov, s):
        return ms("dora", prov, "full", s)

    d_shapes = [f"M=4096 K=768 N={n} r=16 p={p}" for p in ("0.0", "0.1") for n in (768, 3072)]
    lines.append("| DoRA step / fastpeft LoRA step, no dropout, (4096,768,768) / (4096,768,3072) | ≤ 1.25× | "
                 + " / ".join(ratio(dora("fastpeft", s), dora("fastpeft_lora", s)) for s in d_shapes[:2]) + " |")

    def two_frozen(s):
        fs = [v for v in (dora("frozen", s), dora("frozen_onednn", s)) if v]
        return 2 * min(fs) if fs else None

    lines.append("| DoRA step / two frozen steps, p=0.1, (4096,768,768) / (4096,768,3072) | ≤ 1.15× | "
                 + " / ".join(ratio(dora("fastpeft", s), two_frozen(s)) for s in d_shapes[2:]) + " |")
    lines.append("| DoRA step, PEFT DoRA time / fastpeft time, p=0: 768 / 3072, p=0.1: 768 / 3072 | ≥ 1.6× | "
                 + " / ".join(ratio(dora("peft_dora", s), dora("fastpeft", s)) for s in d_shapes) + " |")
    dmem = []
    for s in d_shapes:
        f, lo, pe = (mb("dora", q, "full", s) for q in ("fastpeft", "fastpeft_lora", "peft_dora"))
        dmem.append(f"{f:.1f} / {lo:.1f} / {pe:.1f}" if None not in (f, lo, pe) else "n/a")
    lines.append("| DoRA step peak MB, DoRA / LoRA / PEFT DoRA, same four cases | LoRA + O(N + M·r) | "
                 + "; ".join(dmem) + " |")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
