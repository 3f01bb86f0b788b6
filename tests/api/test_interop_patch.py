"""``patch_peft`` gaps: patched models pickle / ``torch.save`` (also into a fresh process), GPT-2
Conv1D, LoRA bias and several active adapters take the fused path with PEFT's outputs and
gradients, and what is not fused (DoRA stacked with other adapters, Embedding LoRA) is reported in a summary."""
import copy
import io
import logging
import pickle
import subprocess
import sys

import peft
import pytest
import torch

import fastpeft
from fastpeft.interop import FusedPeftLoraLinear, patch_summary
from fastpeft.testing import assert_close

from ._models import build, run


def _grads(m):
    return {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad and p.grad is not None}


def _count_fused(monkeypatch):
    import fastpeft.interop as interop
    calls = []
    real = interop.lora_linear
    monkeypatch.setattr(interop, "lora_linear", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def _check_same_as_peft(family, make, monkeypatch, expect_calls):
    base = build(family)
    torch.manual_seed(5)
    hp = make(copy.deepcopy(base))
    with torch.no_grad():
        for p in hp.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    patched = copy.deepcopy(hp)
    ref = run(family, hp)
    ref.pow(2).sum().backward()
    fastpeft.patch_peft(patched)
    calls = _count_fused(monkeypatch)
    out = run(family, patched)
    assert len(calls) == expect_calls
    assert_close(out, ref, torch.float32, "output")
    out.pow(2).sum().backward()
    g_ref, g = _grads(hp), _grads(patched)
    assert g.keys() == g_ref.keys() and g
    for k in g:
        assert_close(g[k], g_ref[k], torch.float32, k)
    return patched


def test_gpt2_conv1d_takes_the_fused_path(monkeypatch):
    p = _check_same_as_peft("hf_gpt2", lambda m: peft.get_peft_model(m, peft.LoraConfig(r=4, init_lora_weights=False)),
                            monkeypatch, expect_calls=2)  # c_attn in both blocks (GPT-2's default targets)
    assert p.fastpeft_patch_summary.fused == 2 and not p.fastpeft_patch_summary.not_fused


def test_lora_bias_and_two_active_adapters_are_fused(monkeypatch):
    def make(m):
        hp = peft.get_peft_model(m, peft.LoraConfig(r=2, target_modules=["query", "value"], lora_bias=True,
                                                    init_lora_weights=False))
        hp.add_adapter("b", peft.LoraConfig(r=3, target_modules=["query"], init_lora_weights=False))
        hp.base_model.set_adapter(["default", "b"])
        return hp
    _check_same_as_peft("hf_bert", make, monkeypatch, expect_calls=4)


def test_what_is_not_fused_is_reported(caplog):
    hp = peft.get_peft_model(build("hf_llama"), peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj",
                                                                                      "embed_tokens"]))
    hp.add_adapter("dora", peft.LoraConfig(r=2, target_modules=["q_proj"], use_dora=True))
    hp.base_model.set_adapter(["default", "dora"])
    ref = run("hf_llama", hp)
    with caplog.at_level(logging.INFO, logger="fastpeft"):
        fastpeft.patch_peft(hp)
    s = hp.fastpeft_patch_summary
    assert s.fused == 2  # the two v_proj layers
    assert s.not_fused == {"DoRA active together with other adapters": 2,
                           "PEFT Embedding layer (no fused op for it)": 1}
    assert s.layers["base_model.model.model.layers.0.self_attn.q_proj"] == "DoRA active together with other adapters"
    assert "2 LoRA layer(s) on fastpeft's fused op, 3 on PEFT's forward" in caplog.text
    assert any(r.levelno == logging.WARNING for r in caplog.records)
    assert_close(run("hf_llama", hp), ref, torch.float32, "dora falls back")
    hp.base_model.set_adapter("default")
    assert patch_summary(hp).fused == 4


def test_patched_model_pickles_and_torch_saves(tmp_path):
    base = build("hf_llama")
    torch.manual_seed(5)
    hp = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, init_lora_weights=False))
    fastpeft.patch_peft(hp)
    out = run("hf_llama", hp)
    back = pickle.loads(pickle.dumps(hp))
    assert all(isinstance(m, FusedPeftLoraLinear) for m in back.modules() if isinstance(m, peft.tuners.lora.Linear))
    assert torch.equal(run("hf_llama", back), out)
    buf = io.BytesIO()
    torch.save(hp, buf)
    buf.seek(0)
    assert torch.equal(run("hf_llama", torch.load(buf, weights_only=False)), out)
    # a fresh interpreter that never called patch_peft
    path = tmp_path / "patched.pt"
    torch.save(hp, path)
    code = ("import torch, fastpeft.interop as i; m = torch.load(%r, weights_only=False); "
            "print(sum(isinstance(x, i.FusedPeftLoraLinear) for x in m.modules()))" % str(path))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip().splitlines()[-1] == "4"


def test_fastpeft_peft_model_pickles():
    pm = fastpeft.get_peft_model(build("hf_vit"), fastpeft.PrefixTuningConfig(num_virtual_tokens=2))
    pm.add_adapter("l", fastpeft.LoraConfig(r=2, modules_to_save=["classifier"]))
    out = run("hf_vit", pm)
    back = pickle.loads(pickle.dumps(pm))
    assert torch.equal(run("hf_vit", back), out)
    cp = copy.deepcopy(pm)
    cp.delete_adapter("default")  # the copy's hooks go, the original's stay
    assert torch.equal(run("hf_vit", pm), out)


@pytest.mark.parametrize("family", ["hf_gpt2"])
def test_patch_and_unpatch_keep_peft_behaviour(family):
    hp = peft.get_peft_model(build(family), peft.LoraConfig(r=2, init_lora_weights=False))
    ref = run(family, hp)
    fastpeft.patch_peft(hp)
    fastpeft.interop.unpatch_peft(hp)
    assert not hasattr(hp, "fastpeft_patch_summary") or "fastpeft_patch_summary" not in hp.__dict__
    assert torch.equal(run(family, hp), ref)
