"""DoRA (``use_dora=True``) against the installed HF PEFT, both ways: a PEFT DoRA checkpoint loads
into fastpeft with equal outputs and gradients (tiny BERT, and all-MiniLM-L6-v2's real weights
when its package is installed), fastpeft's DoRA save loads into PEFT with equal outputs,
``patch_peft`` fuses PEFT's DoRA layers, merge / unmerge / merge_and_unload match PEFT."""
import copy

import peft
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import fastpeft
from fastpeft.testing import assert_close

from ._models import build, run

TARGETS = ["query", "value", "dense"]
FAMILY_TARGETS = {"hf_bert": TARGETS, "minilm": TARGETS, "hf_gpt2": ["c_attn", "c_fc"]}  # GPT-2: Conv1D


def _minilm():
    from fastpeft.bench.encoder import load_minilm

    model, _ = load_minilm()
    return model.eval()


def _run(family, model):
    if family == "minilm":
        ids = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(1))
        return model(input_ids=ids).last_hidden_state
    return run(family, model)


def _base(family):
    return _minilm() if family == "minilm" else build(family)


def _perturb_magnitudes(model, seed=7):
    """A "trained" DoRA adapter: g = m / ‖W + s·B·A‖ away from 1 (at init it is exactly 1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_magnitude_vector" in n:
                p.mul_(1 + 0.2 * torch.randn(p.shape, generator=g))


def _grads(m):
    return {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad and p.grad is not None}


@pytest.mark.parametrize("family", ["hf_bert", "minilm", "hf_gpt2"])
def test_peft_dora_checkpoint_loads_with_equal_outputs_and_grads(family, tmp_path):
    base = _base(family)
    torch.manual_seed(5)
    hp = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=FAMILY_TARGETS[family], use_dora=True, init_lora_weights=False))
    _perturb_magnitudes(hp)
    hp.save_pretrained(str(tmp_path))
    keys = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert any(k.endswith(".lora_magnitude_vector") for k in keys)
    fp = fastpeft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path), is_trainable=True)
    assert {n for n, p in fp.named_parameters() if p.requires_grad} == \
        {n for n, p in hp.named_parameters() if p.requires_grad}
    hp.train(), fp.train()  # lora_dropout 0: train mode must agree too
    o_h, o_f = _run(family, hp), _run(family, fp)
    assert_close(o_f, o_h, torch.float32, "output")
    o_h.pow(2).sum().backward()
    o_f.pow(2).sum().backward()
    g_h, g_f = _grads(hp), _grads(fp)
    assert g_h.keys() == g_f.keys() and any("lora_magnitude_vector" in k for k in g_h)
    for k in g_h:
        assert_close(g_f[k], g_h[k], torch.float32, k, scale=4.0)


@pytest.mark.parametrize("family", ["hf_bert", "minilm", "hf_gpt2"])
def test_fastpeft_dora_save_loads_into_peft(family, tmp_path):
    base = _base(family)
    torch.manual_seed(3)
    fp = fastpeft.get_peft_model(copy.deepcopy(base), fastpeft.LoraConfig(
        r=4, lora_alpha=8, target_modules=FAMILY_TARGETS[family], use_dora=True, init_lora_weights=False))
    _perturb_magnitudes(fp)
    fp.eval()
    out = _run(family, fp)
    fp.save_pretrained(str(tmp_path))
    keys = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert all(k.endswith((".lora_A.weight", ".lora_B.weight", ".lora_magnitude_vector")) for k in keys)
    assert sum(k.endswith(".lora_magnitude_vector") for k in keys) == \
        sum(k.endswith(".lora_A.weight") for k in keys) > 0
    hp = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path))
    assert hp.peft_config["default"].use_dora
    assert_close(_run(family, hp), out, torch.float32, "peft loads fastpeft's DoRA")
    fp2 = fastpeft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path))
    assert torch.equal(_run(family, fp2), out)


def test_magnitude_initialised_like_peft():
    base = build("hf_bert")
    torch.manual_seed(0)
    hp = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, target_modules=TARGETS, use_dora=True,
                                                                  init_lora_weights=False))
    fp = fastpeft.get_peft_model(copy.deepcopy(base), fastpeft.LoraConfig(r=4, target_modules=TARGETS,
                                                                          use_dora=True))
    # copy A/B from PEFT, re-derive the magnitude the way each library initialises it
    for (n, m) in fp.named_modules():
        if isinstance(m, fastpeft.LoRALinear):
            h = hp.get_submodule(n)
            with torch.no_grad():
                m.lora_A["default"].weight.copy_(h.lora_A["default"].weight)
                m.lora_B["default"].weight.copy_(h.lora_B["default"].weight)
                m.lora_magnitude_vector["default"].weight.copy_(m._weight_norm("default"))
            assert_close(m.lora_magnitude_vector["default"].weight, h.lora_magnitude_vector["default"].weight,
                         torch.float32, n)
    # at PEFT's default init (B = 0) the DoRA model is the base model
    fp0 = fastpeft.get_peft_model(copy.deepcopy(base), fastpeft.LoraConfig(r=4, target_modules=TARGETS,
                                                                           use_dora=True))
    assert_close(run("hf_bert", fp0), run("hf_bert", base), torch.float32, "identity at init")


def test_patch_peft_fuses_dora_layers(monkeypatch):
    base = build("hf_bert")
    torch.manual_seed(5)
    hp = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, target_modules=TARGETS, use_dora=True,
                                                                  init_lora_weights=False))
    _perturb_magnitudes(hp)
    hp.train()
    ref = run("hf_bert", hp)
    ref.pow(2).sum().backward()
    g_ref = _grads(hp)
    hp.zero_grad(set_to_none=True)
    calls = []
    import fastpeft.interop as interop

    real = interop.dora_linear
    monkeypatch.setattr(interop, "dora_linear", lambda *a, **k: calls.append(1) or real(*a, **k))
    fastpeft.patch_peft(hp)
    n_layers = sum(isinstance(m, peft.tuners.lora.Linear) for m in hp.modules())
    assert hp.fastpeft_patch_summary.fused == n_layers and not hp.fastpeft_patch_summary.not_fused
    out = run("hf_bert", hp)
    assert len(calls) == n_layers
    assert_close(out, ref, torch.float32, "patched output")
    out.pow(2).sum().backward()
    g = _grads(hp)
    assert g.keys() == g_ref.keys()
    for k in g:
        assert_close(g[k], g_ref[k], torch.float32, k, scale=4.0)


def test_merge_unmerge_and_merge_and_unload_match_peft():
    base = build("hf_bert")
    torch.manual_seed(5)
    hp = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, target_modules=TARGETS, use_dora=True,
                                                                  init_lora_weights=False))
    _perturb_magnitudes(hp)
    fp = fastpeft.get_peft_model(copy.deepcopy(base), fastpeft.LoraConfig(r=4, target_modules=TARGETS,
                                                                          use_dora=True))
    fp.load_state_dict({k: v for k, v in hp.state_dict().items() if "lora_" in k}, strict=False)
    hp.eval(), fp.eval()
    ref = run("hf_bert", hp)
    assert_close(run("hf_bert", fp), ref, torch.float32, "unmerged")
    weights = {n: p.clone() for n, p in fp.named_parameters() if "base_layer.weight" in n}
    for _ in range(3):  # merge cycles restore the base weights bit for bit
        fp.merge_adapter()
        assert_close(run("hf_bert", fp), ref, torch.float32, "merged")
        fp.unmerge_adapter()
        for n, p in fp.named_parameters():
            if n in weights:
                assert torch.equal(p, weights[n]), n
    assert_close(run("hf_bert", fp), ref, torch.float32, "after cycles")
    merged_f = fp.merge_and_unload()
    merged_h = hp.merge_and_unload()
    assert not any(isinstance(m, fastpeft.LoRALinear) for m in merged_f.modules())
    assert_close(run("hf_bert", merged_f), run("hf_bert", merged_h), torch.float32, "merge_and_unload")
    for (n, a), (_, b) in zip(merged_f.state_dict().items(), merged_h.state_dict().items()):
        assert_close(a, b, torch.float32, n)


def _layer_pair(use_dora_second=True, p=0.0):
    """One nn.Linear with a LoRA adapter and a DoRA adapter, in PEFT and in fastpeft."""
    torch.manual_seed(0)
    lin = nn.Linear(24, 20)
    from peft.tuners.lora import Linear as PeftLinear

    hl = PeftLinear(copy.deepcopy(lin), "a", config=peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=p,
                                                                    init_lora_weights=False), r=4, lora_alpha=8)
    hl.update_layer("d", 3, 6, config=peft.LoraConfig(r=3, lora_alpha=6, lora_dropout=p, init_lora_weights=False,
                                                      use_dora=True))
    fl = fastpeft.LoRALinear(copy.deepcopy(lin), r=4, lora_alpha=8, lora_dropout=p, adapter_name="a",
                             init_lora_weights=False)
    fl.update_layer("d", 3, 6, p, use_dora=True, init_lora_weights=False)
    with torch.no_grad():
        for n in ("a", "d"):
            fl.lora_A[n].weight.copy_(hl.lora_A[n].weight)
            fl.lora_B[n].weight.copy_(hl.lora_B[n].weight)
        hl.lora_magnitude_vector["d"].weight.mul_(1.3)
        fl.lora_magnitude_vector["d"].weight.copy_(hl.lora_magnitude_vector["d"].weight)
    return hl, fl


@pytest.mark.parametrize("order", [["a", "d"], ["d", "a"], ["d"]])
def test_layer_dora_with_other_adapters_matches_peft(order):
    """Several active adapters: PEFT's DoRA reuses the running result (its own forward, unfused here)."""
    hl, fl = _layer_pair()
    hl.set_adapter(order)
    fl.set_adapter(order)
    x = torch.randn(5, 7, 24)
    assert_close(fl(x), hl(x), torch.float32, f"{order}")
    hl.eval(), fl.eval()
    assert_close(fl(x), hl(x), torch.float32, f"{order} eval")


def test_dora_is_refused_where_it_cannot_apply():
    with pytest.raises(ValueError, match="use_dora"):
        fastpeft.LoRALinear(nn.Linear(8, 8), r=2, use_dora=True, out_slices=[(0, 4)])
    with pytest.raises(ValueError, match="use_dora: 'model.embed_tokens' is a Embedding"):
        fastpeft.get_peft_model(build("hf_llama"), fastpeft.LoraConfig(target_modules=["embed_tokens"],
                                                                        use_dora=True))
    hl, fl = _layer_pair()
    fl.set_adapter("d")
    fl.batch_adapters = ["d", "a"]
    with pytest.raises(ValueError, match="mixed batches"):
        fl(torch.randn(2, 24))
