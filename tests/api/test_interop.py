"""Interoperability with Hugging Face PEFT (the installed ``peft``), tested both ways: same
outputs and gradients as PEFT's LoRA, checkpoints that PEFT loads and that load from PEFT, and
``patch_peft`` on an existing PEFT model."""
import copy
import json
import os

import peft
import pytest
import torch

import fastpeft
from fastpeft.interop import FusedPeftLoraLinear, unpatch_peft
from fastpeft.testing import assert_close

from ._models import FAMILIES, build, run

HF = ["hf_llama", "hf_bert", "hf_vit"]
TARGETS = {"hf_llama": ["q_proj", "v_proj", "down_proj"], "hf_bert": ["query", "value", "dense"],
           "hf_vit": ["q_proj", "v_proj", "fc1"]}


def _pair(family, **kw):
    """The same LoRA on the same base model, built by PEFT and copied into fastpeft."""
    base = build(family)
    torch.manual_seed(5)
    hp = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(init_lora_weights=False, **kw))
    fp = fastpeft.get_peft_model(copy.deepcopy(base), fastpeft.LoraConfig(**kw))
    sd = {k: v for k, v in hp.state_dict().items() if "lora_" in k}
    missing, unexpected = fp.load_state_dict(sd, strict=False)
    assert not unexpected
    assert {n for n, p in fp.named_parameters() if p.requires_grad} == \
        {n for n, p in hp.named_parameters() if p.requires_grad}
    return base, hp, fp


def _grads(m):
    return {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("family,extra", [
    ("hf_llama", dict()), ("hf_bert", dict()), ("hf_vit", dict()),
    ("hf_llama", dict(use_rslora=True, lora_alpha=16)), ("hf_bert", dict(bias="lora_only")),
], ids=["llama", "bert", "vit", "llama-rslora", "bert-lora_only_bias"])
def test_lora_outputs_and_gradients_equal_peft(family, extra):
    base, hp, fp = _pair(family, r=4, target_modules=TARGETS[family], **extra)
    hp.train(), fp.train()  # dropout 0: train mode must agree too
    o_h, o_f = run(family, hp), run(family, fp)
    assert_close(o_f, o_h, torch.float32, "output")
    (o_h.pow(2).sum()).backward()
    (o_f.pow(2).sum()).backward()
    g_h, g_f = _grads(hp), _grads(fp)
    assert g_h.keys() == g_f.keys() and g_h
    for k in g_h:
        assert_close(g_f[k], g_h[k], torch.float32, k)


@pytest.mark.parametrize("family", HF)
def test_lora_fastpeft_to_peft_and_back(family, tmp_path):
    base = build(family)
    fp = fastpeft.get_peft_model(copy.deepcopy(base), fastpeft.LoraConfig(
        r=4, lora_alpha=16, target_modules="all-linear", init_lora_weights=False, modules_to_save=None))
    out = run(family, fp)
    fp.save_pretrained(str(tmp_path / "fp"))
    files = sorted(os.listdir(tmp_path / "fp"))
    assert files == ["adapter_config.json", "adapter_model.safetensors"]
    cfg = json.loads((tmp_path / "fp" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 16
    from safetensors.torch import load_file
    keys = load_file(str(tmp_path / "fp" / "adapter_model.safetensors"))
    assert all(k.startswith("base_model.model.") and k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys)

    hp = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "fp"))
    assert_close(run(family, hp), out, torch.float32, "peft loads")
    hp.save_pretrained(str(tmp_path / "hp"))
    fp2 = fastpeft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "hp"))
    assert_close(run(family, fp2), out, torch.float32, "fastpeft loads")
    assert not any(p.requires_grad for p in fp2.parameters())  # is_trainable=False, as PEFT
    fp3 = fastpeft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "hp"), is_trainable=True)
    assert fp3.get_nb_trainable_parameters()[0] == fp.get_nb_trainable_parameters()[0]


def test_lora_peft_saved_with_head_and_bias_loads(tmp_path):
    base = build("hf_bert")
    torch.manual_seed(3)
    hp = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=2, target_modules=["query", "value"], bias="lora_only", modules_to_save=["classifier"],
        init_lora_weights=False))
    with torch.no_grad():
        for n, p in hp.named_parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))  # "trained" biases and head
    ref = run("hf_bert", hp)
    hp.save_pretrained(str(tmp_path))
    fp = fastpeft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path))
    assert_close(run("hf_bert", fp), ref, torch.float32, "bert lora_only + classifier")
    fp.save_pretrained(str(tmp_path / "again"))
    hp2 = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "again"))
    assert_close(run("hf_bert", hp2), ref, torch.float32, "back to peft")


def test_multiple_adapters_saved_in_subfolders_like_peft(tmp_path):
    base = build("hf_llama")
    fp = fastpeft.get_peft_model(copy.deepcopy(base), fastpeft.LoraConfig(r=2, init_lora_weights=False))
    fp.add_adapter("other", fastpeft.LoraConfig(r=3, target_modules=["k_proj"], init_lora_weights=False))
    fp.set_adapter("other")
    out_other = run("hf_llama", fp)
    fp.save_pretrained(str(tmp_path))
    assert os.path.isfile(tmp_path / "other" / "adapter_model.safetensors")
    hp = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path))
    hp.load_adapter(str(tmp_path / "other"), adapter_name="other")
    hp.set_adapter("other")
    assert_close(run("hf_llama", hp), out_other, torch.float32, "peft other")
    fp2 = fastpeft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path))
    fp2.load_adapter(str(tmp_path / "other"), adapter_name="other")
    fp2.set_adapter("other")
    assert torch.equal(run("hf_llama", fp2), out_other)


PROMPT_CASES = {
    "prompt-llama": ("hf_llama", lambda: fastpeft.PromptTuningConfig(num_virtual_tokens=4),
                     lambda: peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)),
    "prompt-bert-seqcls": ("hf_bert", lambda: fastpeft.PromptTuningConfig(num_virtual_tokens=4),
                           lambda: peft.PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=4)),
    "prefix-bert-seqcls": ("hf_bert", lambda: fastpeft.PrefixTuningConfig(num_virtual_tokens=3),
                           lambda: peft.PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=3)),
    "prefix-llama": ("hf_llama", lambda: fastpeft.PrefixTuningConfig(num_virtual_tokens=4),
                     lambda: peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)),
    "prefix-llama-projection": (
        "hf_llama", lambda: fastpeft.PrefixTuningConfig(num_virtual_tokens=4, prefix_projection=True,
                                                        encoder_hidden_size=16),
        lambda: peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, prefix_projection=True,
                                        encoder_hidden_size=16)),
}


def _peft_run(family, hp):
    """PEFT's forward. peft 0.21.2 refuses prefix tuning for SEQ_CLS under transformers 5.24 (it
    looks for a ``past_key_values`` argument the models now call ``cache``): then the computation
    its forward would do, with PEFT's own prefixes (``get_prompt``)."""
    try:
        return run(family, hp)
    except ValueError as e:
        if "past key values" not in str(e):
            raise
    kw = FAMILIES[family][1]()
    B, P = kw["input_ids"].shape[0], hp.peft_config["default"].num_virtual_tokens
    mask = torch.cat([torch.ones(B, P, dtype=kw["attention_mask"].dtype), kw["attention_mask"]], 1)
    return hp.base_model(input_ids=kw["input_ids"], attention_mask=mask, cache=hp.get_prompt(batch_size=B)).logits


@pytest.mark.parametrize("case", list(PROMPT_CASES))
def test_prompt_and_prefix_tuning_both_ways(case, tmp_path):
    family, fcfg, pcfg = PROMPT_CASES[case]
    base = build(family)
    # fastpeft -> PEFT
    torch.manual_seed(0)
    fp = fastpeft.get_peft_model(copy.deepcopy(base), fcfg()).eval()
    out = run(family, fp)
    out.float().pow(2).sum().backward()
    assert all(p.grad is not None for p in fp.prompt_encoder.parameters())
    fp.save_pretrained(str(tmp_path / "fp"))
    hp = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "fp")).eval()
    assert_close(_peft_run(family, hp), out, torch.float32, "peft loads fastpeft")
    # PEFT -> fastpeft
    torch.manual_seed(1)
    hp2 = peft.get_peft_model(copy.deepcopy(base), pcfg()).eval()
    ref = _peft_run(family, hp2)
    hp2.save_pretrained(str(tmp_path / "hp"))
    fp2 = fastpeft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "hp"))
    assert_close(run(family, fp2), ref, torch.float32, "fastpeft loads peft")
    # and the same live model, trainable, matches PEFT's forward before saving
    torch.manual_seed(1)
    fp3 = fastpeft.get_peft_model(copy.deepcopy(base), fcfg()).eval()
    if case == "prefix-llama-projection":
        sd = {"prompt_encoder.default." + k.removeprefix("prompt_encoder.default."): v
              for k, v in hp2.state_dict().items() if k.startswith("prompt_encoder.default.")}
        fp3.load_state_dict(sd, strict=False)
    else:
        fp3.prompt_encoder["default"].embedding.weight.data.copy_(
            hp2.prompt_encoder["default"].embedding.weight)
    assert_close(run(family, fp3), ref, torch.float32, "same live prompts")


def test_causal_lm_labels_are_shifted_past_prompts():
    base = build("hf_llama")
    torch.manual_seed(0)
    hp = peft.get_peft_model(copy.deepcopy(base), peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    fp = fastpeft.get_peft_model(copy.deepcopy(base), fastpeft.PromptTuningConfig(num_virtual_tokens=3))
    fp.prompt_encoder["default"].embedding.weight.data.copy_(hp.prompt_encoder["default"].embedding.weight)
    ids = torch.randint(1, 64, (2, 6))
    l_h = hp(input_ids=ids, labels=ids).loss
    l_f = fp(input_ids=ids, labels=ids).loss
    assert_close(l_f, l_h, torch.float32, "loss")


@pytest.mark.parametrize("family", HF)
def test_patch_peft_in_place(family):
    base = build(family)
    torch.manual_seed(5)
    hp = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, target_modules=TARGETS[family],
                                                                  init_lora_weights=False))
    hp.add_adapter("second", peft.LoraConfig(r=2, target_modules=TARGETS[family][:1], init_lora_weights=False))
    ref = run(family, hp)
    ref.pow(2).sum().backward()
    g_ref = _grads(hp)
    hp.zero_grad()
    params_before = {n: p for n, p in hp.named_parameters()}
    fastpeft.patch_peft(hp)
    lora_layers = [m for m in hp.modules() if isinstance(m, peft.tuners.lora.layer.Linear)]
    assert lora_layers and all(isinstance(m, FusedPeftLoraLinear) for m in lora_layers)
    assert {n: p for n, p in hp.named_parameters()} == params_before  # same Parameter objects
    assert all(set(m.lora_A) <= {"default", "second"} for m in lora_layers)
    out = run(family, hp)
    assert_close(out, ref, torch.float32, "patched output")
    out.pow(2).sum().backward()
    g = _grads(hp)
    assert g.keys() == g_ref.keys()
    for k in g:
        assert_close(g[k], g_ref[k], torch.float32, k)
    # adapter switching, disabling and merging are still PEFT's
    hp.set_adapter("second")
    o2 = run(family, hp)
    unpatch_peft(hp)
    assert_close(run(family, hp), o2, torch.float32, "second adapter")
    fastpeft.patch_peft(hp)
    with hp.disable_adapter():
        assert torch.equal(run(family, hp), run(family, base))
    hp.set_adapter("default")
    merged = hp.merge_and_unload()
    assert not any(isinstance(m, FusedPeftLoraLinear) for m in merged.modules())
    assert_close(run(family, merged), ref, torch.float32, "merge_and_unload after patch")


def test_patch_peft_forward_is_fastpeft_op(monkeypatch):
    calls = []
    import fastpeft.interop as interop
    real = interop.lora_linear
    monkeypatch.setattr(interop, "lora_linear", lambda *a, **k: calls.append(1) or real(*a, **k))
    hp = peft.get_peft_model(build("hf_llama"), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    fastpeft.patch_peft(hp)
    run("hf_llama", hp)
    assert len(calls) == 2  # one per layer's q_proj


def test_patch_peft_bf16_base_with_fp32_adapters():
    """PEFT keeps LoRA weights in fp32 on a bf16 model; the patched layers still fuse."""
    base = build("hf_llama").to(torch.bfloat16)
    torch.manual_seed(5)
    hp = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    assert {p.dtype for n, p in hp.named_parameters() if "lora_" in n} == {torch.float32}
    ref = run("hf_llama", hp)
    ref.float().pow(2).sum().backward()
    g_ref = _grads(hp)
    hp.zero_grad()
    fastpeft.patch_peft(hp)
    layer = hp.base_model.model.model.layers[0].self_attn.q_proj
    x = torch.randn(2, 3, 32, dtype=torch.bfloat16)
    assert layer._fastpeft_plan(x, (), {}) is not None  # fused, not the fallback
    out = run("hf_llama", hp)
    assert out.dtype == torch.bfloat16
    assert_close(out, ref, torch.bfloat16, "bf16 output")
    out.float().pow(2).sum().backward()
    for k, g in _grads(hp).items():
        assert g.dtype == torch.float32
        assert_close(g, g_ref[k], torch.bfloat16, k, scale=4.0)


def test_patch_peft_without_lora_raises():
    with pytest.raises(ValueError, match="no peft.tuners.lora.Linear"):
        fastpeft.patch_peft(build("mlp"))


def test_lora_seq_cls_trains_and_saves_the_classifier_both_ways(tmp_path):
    base = build("hf_bert")
    fp = fastpeft.get_peft_model(copy.deepcopy(base), fastpeft.LoraConfig(task_type="SEQ_CLS", r=2,
                                                                         init_lora_weights=False))
    assert fp.model.classifier.weight.requires_grad  # as PEFT: the head is trained for SEQ_CLS
    with torch.no_grad():
        fp.model.classifier.weight.add_(0.5)
    out = run("hf_bert", fp)
    fp.save_pretrained(str(tmp_path / "fp"))
    hp = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "fp"))
    assert_close(run("hf_bert", hp), out, torch.float32, "peft loads SEQ_CLS")
    hp.save_pretrained(str(tmp_path / "hp"))
    fp2 = fastpeft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "hp"))
    assert_close(run("hf_bert", fp2), out, torch.float32, "fastpeft loads SEQ_CLS")
