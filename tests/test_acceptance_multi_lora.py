"""scripts/acceptance.py's issue-14 rows (8 adapters in one batch): training step over the
single-adapter step, PEFT ``adapter_names=`` forward over fastpeft's, from bench CSV rows."""
import csv
import importlib.util
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("acceptance", ROOT / "scripts" / "acceptance.py")
acceptance = importlib.util.module_from_spec(spec)
spec.loader.exec_module(acceptance)

SHAPE = "T=4096 (16x256) K=768 N=768 r=16 n=8 "
FIELDS = "op,provider,mode,shape,dtype,device,p20_ms,p50_ms,p80_ms,peak_mb,reps,commit,cpu,isa".split(",")


def _rows(capsys, path):
    assert acceptance.main(str(path)) == 0
    return [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("| multi_lora")]


def test_multi_lora_rows_from_a_csv(tmp_path, capsys):
    times = {("single", "full", "uniform"): 50.0, ("fastpeft", "full", "uniform"): 55.0,
             ("single", "full", "zipf"): 40.0, ("fastpeft", "full", "zipf"): 60.0,
             ("peft", "fwd", "uniform"): 90.0, ("fastpeft", "fwd", "uniform"): 30.0,
             ("peft", "fwd", "zipf"): 50.0, ("fastpeft", "fwd", "zipf"): 20.0,
             ("fastpeft", "full", "stale"): 1.0}
    path = tmp_path / "r.csv"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, FIELDS)
        w.writeheader()
        for (prov, mode, kind), t in times.items():
            shape = SHAPE + kind + (" p=0.1" if mode == "full" else "")
            w.writerow(dict(op="multi_lora", provider=prov, mode=mode, shape=shape, dtype="float32",
                            device="cpu-2threads", p20_ms=t, p50_ms=t, p80_ms=t, peak_mb="nan", reps=5))
    train, fwd = _rows(capsys, path)
    assert "training step vs fastpeft's single-adapter step" in train and train.endswith("| 1.10× / 1.50× |")
    assert "PEFT `adapter_names=` forward time / fastpeft forward time" in fwd and fwd.endswith("| 3.00× / 2.50× |")


def test_multi_lora_rows_without_those_rows_say_na(tmp_path, capsys):
    path = tmp_path / "empty.csv"
    path.write_text(",".join(FIELDS) + "\n")
    train, fwd = _rows(capsys, path)
    assert train.endswith("| n/a / n/a |") and fwd.endswith("| n/a / n/a |")


def test_multi_lora_rows_from_the_committed_csv(capsys):
    path = ROOT / "benchmarks" / "results" / "cpu-intel-amx-multi-lora-2threads-fp32.csv"
    train, fwd = _rows(capsys, path)
    assert "n/a" not in train and "n/a" not in fwd


def test_readme_many_adapters_table_is_generated(capsys):
    """The README's many-adapters table is exactly what scripts/multi_lora_table.py prints for the
    committed CSV (regenerated, not typed)."""
    spec_t = importlib.util.spec_from_file_location("multi_lora_table", ROOT / "scripts" / "multi_lora_table.py")
    table = importlib.util.module_from_spec(spec_t)
    spec_t.loader.exec_module(table)
    csv_path = "benchmarks/results/cpu-intel-amx-multi-lora-2threads-fp32.csv"
    import os
    cwd = os.getcwd()
    try:
        os.chdir(ROOT)  # the table names the CSV by its path relative to the repository
        assert table.main(csv_path) == 0
    finally:
        os.chdir(cwd)
    out = capsys.readouterr().out.strip()
    readme = (ROOT / "README.md").read_text()
    block = readme.split("<!-- MULTI-LORA-TABLE:BEGIN -->\n", 1)[1].split("<!-- MULTI-LORA-TABLE:END -->", 1)[0]
    assert block.strip() == out
    assert "| 8 | uniform |" in out
