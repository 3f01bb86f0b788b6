"""The scripts in examples/ run and say what they claim."""
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_lora_hf_bert_roundtrip_through_hf_peft():
    pytest.importorskip("peft")
    out = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "lora_hf_bert.py")],
                         capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    diffs = [float(x) for x in re.findall(r"max (?:\|fastpeft - HF PEFT\| logits:|diff) ([0-9.e+-]+)", out.stdout)]
    assert len(diffs) == 2 and all(d < 1e-5 for d in diffs), out.stdout
