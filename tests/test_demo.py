"""`python -m fastpeft demo` runs every method end to end (a few steps each)."""
import pytest

pytest.importorskip("sklearn")


def test_demo_quick_runs_every_method(tmp_path):
    from fastpeft import demo

    results = demo.run(quick=True, plot_path=str(tmp_path / "demo.png"), reps=1)
    names = [r["method"] for r in results]
    assert names[0].startswith("linear probe") and len(names) == 14
    assert any("LoRA" in n for n in names) and any("VPT deep" in n for n in names)
    assert "multi-task LoRA (digit + parity heads)" in names and "ProtoNet LoRA (5-way 5-shot)" in names
    for r in results:
        assert r["trainable"] > 0 and 0.0 <= r["accuracy"] <= 1.0
        assert r["step_ms"] > 0 and r["ref_step_ms"] > 0 and r["peak_mb"] > 0
    by = {r["method"]: r["trainable"] for r in results}
    assert by["BitFit"] < by["LoRA r=8 (qkv, attn.proj)"] < by["full fine-tuning"]
    assert (tmp_path / "demo.png").exists()
