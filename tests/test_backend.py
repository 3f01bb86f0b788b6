"""Backend selection: one place, overridable, and able to say why a backend is not used."""
import subprocess
import sys

import pytest
import torch

from fastpeft import _backend


def test_backends_report_has_reasons():
    rep = _backend.backends()
    assert set(rep) == {"triton", "cpu", "reference"}
    assert rep["reference"]["available"]
    for name, st in rep.items():
        assert isinstance(st["reason"], str) and st["reason"]
        for fam, why in st["ops"].items():
            assert why == "ok" or len(why) > 10, (name, fam, why)


def test_automatic_choice_on_cpu_prefers_cpp_then_reference():
    for fam in _backend.FAMILIES:
        chosen = _backend.select_backend(fam, torch.device("cpu"))
        expected = "cpu" if _backend.why_not("cpu", fam, torch.device("cpu")) is None else "reference"
        assert chosen == expected


def test_triton_never_chosen_automatically_for_cpu_tensors():
    assert _backend.select_backend("lora", torch.device("cpu")) != "triton"


def test_explicit_and_env_override(monkeypatch):
    monkeypatch.delenv("FASTPEFT_BACKEND", raising=False)
    assert _backend.select_backend("lora", torch.device("cpu"), "reference") == "reference"
    monkeypatch.setenv("FASTPEFT_BACKEND", "reference")
    assert _backend.select_backend("lora", torch.device("cpu")) == "reference"
    with pytest.raises(RuntimeError, match=r"C\+\+ backend runs CPU tensors only"):
        _backend.select_backend("lora", torch.device("meta"), "cpu")
    with pytest.raises(RuntimeError, match="unknown backend 'cuda'"):
        _backend.select_backend("lora", torch.device("cpu"), "cuda")


def test_triton_on_cpu_needs_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    why = _backend.why_not("triton", "lora", torch.device("cpu"))
    assert why is not None and ("TRITON_INTERPRET" in why or "triton not importable" in why)


def test_info_cli_runs():
    out = subprocess.run([sys.executable, "-m", "fastpeft", "info"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for word in ("triton", "cpu", "reference", "automatic choice on cpu"):
        assert word in out.stdout


def test_import_is_lazy_and_never_fails():
    code = "import fastpeft, sys; print('fastpeft.ops.lora' in sys.modules); print(fastpeft.lora_linear.__name__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "lora_linear"]
