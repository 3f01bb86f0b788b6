"""scripts/acceptance.py's issue-13 rows (DoRA), from bench CSV rows, and the README's Intel fp32
acceptance table being exactly what the script prints for the committed CSV (regenerated, not typed)."""
import csv
import importlib.util
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("acceptance", ROOT / "scripts" / "acceptance.py")
acceptance = importlib.util.module_from_spec(spec)
spec.loader.exec_module(acceptance)

FIELDS = "op,provider,mode,shape,dtype,device,p20_ms,p50_ms,p80_ms,peak_mb,reps,commit,cpu,isa".split(",")


def _dora_rows(capsys, path):
    assert acceptance.main(str(path)) == 0
    return [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("| DoRA")]


def test_dora_rows_from_a_csv(tmp_path, capsys):
    # (provider, N, p) -> (ms, MB); "two frozen steps" takes the faster frozen provider
    t = {("frozen", 768, "0.1"): (50.0, 24), ("frozen_onednn", 768, "0.1"): (40.0, 24),
         ("fastpeft", 768, "0.1"): (100.0, 30), ("peft_dora", 768, "0.1"): (200.0, 90),
         ("fastpeft_lora", 768, "0.1"): (60.0, 25),
         ("frozen", 3072, "0.1"): (100.0, 60), ("fastpeft", 3072, "0.1"): (230.0, 70),
         ("peft_dora", 3072, "0.1"): (368.0, 300), ("fastpeft_lora", 3072, "0.1"): (120.0, 61),
         ("fastpeft", 768, "0.0"): (66.0, 27), ("fastpeft_lora", 768, "0.0"): (60.0, 25),
         ("peft_dora", 768, "0.0"): (132.0, 77),
         ("fastpeft", 3072, "0.0"): (130.0, 70), ("fastpeft_lora", 3072, "0.0"): (100.0, 61),
         ("peft_dora", 3072, "0.0"): (260.0, 300)}
    path = tmp_path / "r.csv"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, FIELDS)
        w.writeheader()
        for (prov, n, p), (ms, mb) in t.items():
            w.writerow(dict(op="dora", provider=prov, mode="full", shape=f"M=4096 K=768 N={n} r=16 p={p}",
                            dtype="float32", device="cpu-2threads", p20_ms=ms, p50_ms=ms, p80_ms=ms, peak_mb=mb,
                            reps=5))
    vs_lora, vs_frozen, vs_peft, mem = _dora_rows(capsys, path)
    assert vs_lora.endswith("| ≤ 1.25× | 1.10× / 1.30× |")
    assert vs_frozen.endswith("| ≤ 1.15× | 1.25× / 1.15× |")
    assert vs_peft.endswith("| ≥ 1.6× | 2.00× / 2.00× / 2.00× / 1.60× |")
    assert mem.endswith("| 27.0 / 25.0 / 77.0; 70.0 / 61.0 / 300.0; 30.0 / 25.0 / 90.0; 70.0 / 61.0 / 300.0 |")


def test_dora_rows_without_those_rows_say_na(tmp_path, capsys):
    path = tmp_path / "empty.csv"
    path.write_text(",".join(FIELDS) + "\n")
    rows = _dora_rows(capsys, path)
    assert len(rows) == 4 and all("n/a" in r for r in rows)


def test_readme_intel_fp32_acceptance_table_is_generated(capsys):
    assert acceptance.main(str(ROOT / "benchmarks" / "results" / "cpu-intel-amx-2threads-fp32.csv")) == 0
    table = capsys.readouterr().out.strip()
    readme = (ROOT / "README.md").read_text()
    block = readme[readme.index("<!-- BENCH-TABLES-INTEL:BEGIN -->"):readme.index("<!-- BENCH-TABLES-INTEL:END -->")]
    assert table in block
