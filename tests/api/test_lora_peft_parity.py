"""LoRA features as HF PEFT has them, checked against PEFT both ways: checkpoints PEFT writes (on
Conv2d, Embedding, GPT-2 Conv1D; with rank_pattern / alpha_pattern / exclude_modules /
layers_to_transform / layers_pattern; modules_to_save) load into fastpeft with equal outputs and
gradients, and fastpeft's save loads back into PEFT; add_weighted_adapter, PiSSA / OLoRA init,
modules_to_save keeping its original, strict config keys."""
import copy
import json

import peft
import pytest
import torch

import fastpeft
from fastpeft.config import config_from_dict
from fastpeft.modules.lora_layers import LoRAConv2d, LoRAEmbedding
from fastpeft.testing import assert_close

from ._models import build, run


def _llama3():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                                        num_attention_heads=4, num_key_value_heads=2)).eval()


CASES = {
    "gpt2-default-targets": ("hf_gpt2", dict()),
    "gpt2-all-linear": ("hf_gpt2", dict(target_modules="all-linear", r=3)),
    "gpt2-wte-and-c_attn": ("hf_gpt2", dict(target_modules=["wte", "c_attn"])),
    "llama-patterns-layers-exclude": ("llama3", dict(
        target_modules=["embed_tokens", "q_proj", "v_proj", "k_proj", "down_proj"], exclude_modules=["k_proj"],
        rank_pattern={"v_proj": 3, "layers.0.self_attn.q_proj": 5}, alpha_pattern={"q_proj": 7, "down_proj": 2},
        layers_to_transform=[0, 2])),
    "llama-layers_pattern": ("llama3", dict(target_modules=["q_proj", "o_proj"], layers_to_transform=1,
                                            layers_pattern="layers")),
    "llama-embedding-rslora": ("llama3", dict(target_modules=["embed_tokens", "o_proj"], use_rslora=True,
                                              rank_pattern={"o_proj": 4})),
    "bert-embeddings-exclude-regex": ("hf_bert", dict(target_modules=["word_embeddings", "query", "value"],
                                                      exclude_modules=r".*layer\.1\.attention\.self\.value",
                                                      modules_to_save=["classifier"])),
    "cnn-conv2d-modules_to_save": ("cnn", dict(target_modules=["conv1", "conv2", "conv3"], modules_to_save=["fc"])),
}


def _base(family):
    return _llama3() if family == "llama3" else build(family)


def _run(family, model):
    if family != "llama3":
        return run(family, model)
    ids = torch.randint(1, 64, (2, 7), generator=torch.Generator().manual_seed(1))
    return model(input_ids=ids).logits


def _grads(m):
    return {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad and p.grad is not None}


@pytest.mark.parametrize("case", list(CASES))
def test_peft_checkpoint_loads_with_equal_outputs_and_gradients_and_back(case, tmp_path):
    family, kw = CASES[case]
    base = _base(family)
    torch.manual_seed(4)
    hp = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(init_lora_weights=False, **kw))
    with torch.no_grad():
        for n, p in hp.named_parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))  # embeddings' A starts at 0, heads as copied
    hp.save_pretrained(str(tmp_path / "hp"))
    fp = fastpeft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "hp"), is_trainable=True)
    if ("embed" in str(kw.get("target_modules")) or "wte" in str(kw.get("target_modules"))) \
            and "layers_to_transform" not in kw:  # (an index filter leaves un-numbered modules out, as PEFT)
        assert any(isinstance(m, LoRAEmbedding) for m in fp.modules())
    if family == "cnn":
        assert sum(isinstance(m, LoRAConv2d) for m in fp.modules()) == 3
    t_h = {n for n, p in hp.named_parameters() if p.requires_grad}
    t_f = {n for n, p in fp.named_parameters() if p.requires_grad}
    assert t_h == t_f  # same parameter names and the same ranks (shapes below)
    shapes = {n: p.shape for n, p in hp.named_parameters()}
    assert all(p.shape == shapes[n] for n, p in fp.named_parameters() if n in t_f)
    o_h, o_f = _run(family, hp), _run(family, fp)
    assert_close(o_f, o_h, torch.float32, "output")
    o_h.pow(2).sum().backward()
    o_f.pow(2).sum().backward()
    g_h, g_f = _grads(hp), _grads(fp)
    assert g_h.keys() == g_f.keys() and g_h
    for k in g_h:
        assert_close(g_f[k], g_h[k], torch.float32, k)
    # fastpeft's save -> PEFT
    fp.save_pretrained(str(tmp_path / "fp"))
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "fp"))
    assert_close(_run(family, back), o_h.detach(), torch.float32, "peft loads fastpeft")
    # and the live fastpeft model built from the same config injects the same layers
    fcfg = fastpeft.LoraConfig(**kw)
    live = fastpeft.get_peft_model(copy.deepcopy(base), fcfg)
    assert {n for n, p in live.named_parameters() if p.requires_grad} == t_f
    with live.disable_adapter():
        assert torch.equal(_run(family, live), _run(family, base))


@pytest.mark.parametrize("kind", ["linear", "cat", "svd"])
def test_add_weighted_adapter_equals_peft(kind):
    base = build("hf_llama")
    torch.manual_seed(1)
    hp = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj",
                                                                                       "embed_tokens"],
                                                                  init_lora_weights=False))
    hp.add_adapter("b", peft.LoraConfig(r=2 if kind == "linear" else 3, target_modules=["q_proj", "o_proj"],
                                        init_lora_weights=False, lora_alpha=4))
    fp = fastpeft.get_peft_model(copy.deepcopy(base), fastpeft.LoraConfig(r=2, target_modules=["q_proj", "v_proj",
                                                                                               "embed_tokens"]))
    fp.add_adapter("b", fastpeft.LoraConfig(r=2 if kind == "linear" else 3, target_modules=["q_proj", "o_proj"],
                                            lora_alpha=4))
    with torch.no_grad():
        for n, p in hp.named_parameters():
            if "lora_" in n:
                p.add_(0.1 * torch.randn_like(p))
    fp.load_state_dict({k: v for k, v in hp.state_dict().items() if "lora_" in k}, strict=False)
    hp.add_weighted_adapter(["default", "b"], [0.7, -0.4], "mix", combination_type=kind)
    fp.add_weighted_adapter(["default", "b"], [0.7, -0.4], "mix", combination_type=kind)
    hp.set_adapter("mix")
    fp.set_adapter("mix")
    assert fp.peft_config["mix"].r == hp.peft_config["mix"].r
    assert_close(run("hf_llama", fp), run("hf_llama", hp), torch.float32, kind)


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_4", "olora"])
def test_pissa_olora_init_equal_peft(init, tmp_path):
    base = build("hf_llama")
    torch.manual_seed(0)
    hp = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, init_lora_weights=init))
    torch.manual_seed(0)
    fp = fastpeft.get_peft_model(copy.deepcopy(base), fastpeft.LoraConfig(r=4, init_lora_weights=init))
    tol = torch.float32 if init != "pissa_niter_4" else None
    if tol is not None:  # randomised SVD: same seed, but compare the product below only
        for n, p in hp.named_parameters():
            if "lora_" in n or "base_layer.weight" in n:
                assert_close(fp.get_parameter(n), p, torch.float32, n, scale=16.0)
    assert_close(run("hf_llama", fp), run("hf_llama", base), torch.float32, "residual + BA = W", scale=16.0)
    assert_close(run("hf_llama", fp), run("hf_llama", hp), torch.float32, "vs peft", scale=16.0)
    with fp.disable_adapter():  # the residual model, as PEFT
        assert not torch.allclose(run("hf_llama", fp), run("hf_llama", base))
    # a failed injection puts the base weights back
    model = copy.deepcopy(base)
    w0 = model.model.layers[0].self_attn.q_proj.weight.clone()
    with pytest.raises(ValueError):
        fastpeft.get_peft_model(model, fastpeft.LoraConfig(r=4, init_lora_weights=init,
                                                           target_modules=["q_proj", "input_layernorm"]))
    assert torch.equal(model.model.layers[0].self_attn.q_proj.weight, w0)


def test_modules_to_save_keeps_an_untouched_original():
    base = build("hf_bert")
    pm = fastpeft.get_peft_model(copy.deepcopy(base), fastpeft.LoraConfig(r=2, modules_to_save=["classifier"]))
    pm.add_adapter("other", fastpeft.LoraConfig(r=2, modules_to_save=["classifier"]))
    head = pm.model.classifier
    assert set(head.modules_to_save) == {"default", "other"}
    with torch.no_grad():
        head.modules_to_save["default"].weight.add_(1.0)  # "trained"
    assert pm.model.classifier.weight is head.modules_to_save["default"].weight  # attributes read through
    assert torch.equal(head.original_module.weight, base.classifier.weight)
    with pm.disable_adapter():
        assert torch.equal(run("hf_bert", pm), run("hf_bert", base))
    trained = run("hf_bert", pm)
    pm.set_adapter("other")  # its own, untrained copy
    assert torch.equal(run("hf_bert", pm), run("hf_bert", base))
    pm.set_adapter("default")
    merged = copy.deepcopy(pm).merge_and_unload()
    assert type(merged.classifier) is torch.nn.Linear
    assert_close(run("hf_bert", merged), trained, torch.float32, "merged keeps the trained head")
    plain = pm.unload()
    assert torch.equal(run("hf_bert", plain), run("hf_bert", base))


def test_config_keys_are_checked_and_named(tmp_path):
    with pytest.raises(ValueError, match="unknown key 'lora_scale_x'"):
        config_from_dict({"peft_type": "LORA", "lora_scale_x": 2})
    with pytest.raises(ValueError, match="unknown keys 'a', 'b' for PromptTuningConfig"):
        config_from_dict({"peft_type": "PROMPT_TUNING", "a": 1, "b": 2})
    with pytest.raises(ValueError, match="unknown peft_type 'LOHA'"):
        config_from_dict({"peft_type": "LOHA"}, "x.json")
    with pytest.raises(ValueError, match="lora_bias"):
        config_from_dict({"peft_type": "LORA", "lora_bias": True})
    assert config_from_dict({"peft_type": "LORA", "use_dora": True}).use_dora  # DoRA is supported
    # a PEFT config with every key PEFT writes (defaults) loads
    d = peft.LoraConfig(r=2, rank_pattern={"q": 3}, layers_to_transform=[1], exclude_modules=["k"]).to_dict()
    d = json.loads(json.dumps(d, default=lambda o: sorted(o) if isinstance(o, set) else getattr(o, "value", str(o))))
    c = config_from_dict(d)
    assert c.rank_pattern == {"q": 3} and c.layers_to_transform == [1] and c.exclude_modules == ["k"]
    with pytest.raises(TypeError, match="lora_scale_x"):
        fastpeft.LoraConfig(lora_scale_x=2)
