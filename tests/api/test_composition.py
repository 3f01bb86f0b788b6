"""What used to raise where PEFT (or the method) works: VPT and prefix tuning on an HF ViT, LoRA on
Q and V of the reference ViT's fused qkv, LoRA together with a prompt method, several active
adapters (``set_adapter([...])``) and prompt tuning's TEXT init."""
import copy

import peft
import pytest
import torch
import torch.nn.functional as F

import fastpeft
from fastpeft.modules.lora import LoRALinear
from fastpeft.testing import assert_close

from ._models import FAMILIES, build, run


def _images():
    return FAMILIES["hf_vit"][1]()["pixel_values"]


@pytest.mark.parametrize("deep", [False, True], ids=["shallow", "deep"])
def test_vpt_on_hf_vit_equals_token_concatenation(deep, tmp_path):
    base = build("hf_vit")
    pm = fastpeft.get_peft_model(copy.deepcopy(base), fastpeft.VPTConfig(num_prompts=3, deep=deep,
                                                                        modules_to_save=["classifier"]))
    prompts = pm.prompt_encoder["default"].prompt_embeddings
    assert prompts.shape == ((2 if deep else 1), 3, 32)
    assert pm.get_nb_trainable_parameters()[0] == prompts.numel() + 32 * 3 + 3
    out = run("hf_vit", pm)
    vit, px = base.vit, _images()
    x = vit.embeddings(px)
    for i, layer in enumerate(vit.layers):
        if i == 0 or deep:
            rest = x[:, 1:] if i == 0 else x[:, 4:]
            x = torch.cat([x[:, :1], prompts[i if deep else 0].expand(2, -1, -1), rest], 1)
        x = layer(x)
    expect = base.classifier(vit.layernorm(x)[:, 0])
    assert_close(out, expect, torch.float32, "vpt hf vit")
    out.pow(2).sum().backward()
    assert prompts.grad is not None and prompts.grad.abs().sum() > 0
    with pm.disable_adapter():
        assert torch.equal(run("hf_vit", pm), run("hf_vit", base))
    pm.save_pretrained(str(tmp_path))
    back = fastpeft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path))
    assert torch.equal(run("hf_vit", back), out.detach())


def test_prefix_tuning_on_hf_vit_equals_concatenated_attention(tmp_path):
    base = build("hf_vit")
    pm = fastpeft.get_peft_model(copy.deepcopy(base), fastpeft.PrefixTuningConfig(num_virtual_tokens=3))
    with torch.no_grad():
        pm.prompt_encoder["default"].embedding.weight.normal_(0, 1)
    out = run("hf_vit", pm)
    P, H, hd = 3, 4, 8
    pre = pm.prompt_encoder["default"].embedding.weight.view(P, 4, H, hd).permute(1, 2, 0, 3)  # (2L, H, P, hd)
    vit = base.vit
    x = vit.embeddings(_images())
    for i, layer in enumerate(vit.layers):
        a = layer.attention
        h = layer.layernorm_before(x)
        B, T, _ = h.shape
        q, k, v = (f(h).view(B, T, H, hd).transpose(1, 2) for f in (a.q_proj, a.k_proj, a.v_proj))
        k = torch.cat([pre[2 * i].expand(B, -1, -1, -1), k], 2)
        v = torch.cat([pre[2 * i + 1].expand(B, -1, -1, -1), v], 2)
        x = x + a.o_proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, T, -1))
        x = x + layer.mlp(layer.layernorm_after(x))
    assert_close(out, base.classifier(vit.layernorm(x)[:, 0]), torch.float32, "prefix hf vit")
    out.sum().backward()
    assert pm.prompt_encoder["default"].embedding.weight.grad.abs().sum() > 0
    with pm.disable_adapter():
        assert torch.equal(run("hf_vit", pm), run("hf_vit", base))
    pm.save_pretrained(str(tmp_path))
    back = fastpeft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path))
    assert_close(run("hf_vit", back), out.detach(), torch.float32, "reloaded")
    pm.delete_adapter("default")  # the attention modules run their own forward again
    assert not any("forward" in m.__dict__ for m in pm.get_base_model().modules())  # (PeftModel.forward: its signature)


@pytest.mark.parametrize("parts", [["q", "v"], ["v"], ["attn.qkv.k"], ["q_proj", "value"], r".*\.attn\.(q|v)"],
                         ids=["qv", "v", "k-by-path", "hf-names", "regex-siblings"])
def test_lora_on_parts_of_the_reference_vit_qkv(parts, tmp_path):
    base = build("fp_vit")
    pm = fastpeft.get_peft_model(copy.deepcopy(base), fastpeft.LoraConfig(r=2, target_modules=parts,
                                                                         init_lora_weights=False))
    layer = pm.model.blocks[0].attn.qkv
    assert isinstance(layer, LoRALinear)
    names = ["q", "v"] if isinstance(parts, str) else \
        [{"q_proj": "q", "value": "v"}.get(p, p).rpartition(".")[2] for p in parts]
    D, r = 32, 2
    assert layer.out_slices["default"] == [("qkv".index(n) * D, ("qkv".index(n) + 1) * D) for n in names]
    assert pm.get_nb_trainable_parameters()[0] == 2 * len(names) * (r * D + D * r)
    x = torch.randn(2, 5, D)
    A, Bw, s = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.scaling["default"]
    W = base.blocks[0].attn.qkv.weight.clone()
    for i, n in enumerate(names):  # each part has its own rank-r factors
        a = "qkv".index(n) * D
        W[a:a + D] += s * Bw[i * D:(i + 1) * D] @ A[i * r:(i + 1) * r]
    y = layer(x)
    assert_close(y, F.linear(x, W, base.blocks[0].attn.qkv.bias), torch.float32, "sliced lora")
    untouched = [i for i, n in enumerate("qkv") if n not in names]
    for i in untouched:
        assert torch.equal(y[..., i * D:(i + 1) * D], base.blocks[0].attn.qkv(x)[..., i * D:(i + 1) * D])
    out = run("fp_vit", pm)
    out.sum().backward()
    assert A.grad is not None and Bw.grad is not None
    pm.merge_adapter()
    assert_close(run("fp_vit", pm), out.detach(), torch.float32, "merged")
    pm.unmerge()
    pm.save_pretrained(str(tmp_path))
    back = fastpeft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path))
    assert torch.equal(run("fp_vit", back), out.detach())
    both = fastpeft.get_peft_model(copy.deepcopy(base), fastpeft.LoraConfig(target_modules=["qkv", "q"]))
    assert both.model.blocks[0].attn.qkv.out_slices["default"] is None  # the whole projection wins


def test_lora_together_with_prompt_tuning():
    base = build("hf_llama")
    pm = fastpeft.get_peft_model(copy.deepcopy(base), fastpeft.PromptTuningConfig(num_virtual_tokens=3),
                                 adapter_name="prompt")
    pm.add_adapter("lora", fastpeft.LoraConfig(r=2, init_lora_weights=False))
    pm.set_adapter(["prompt", "lora"])
    assert pm.active_adapters == ["prompt", "lora"]
    trainable = {n for n, p in pm.named_parameters() if p.requires_grad}
    assert "prompt_encoder.prompt.embedding.weight" in trainable and any(".lora_A.lora." in n for n in trainable)
    kw = FAMILIES["hf_llama"][1]()
    out = pm(**kw).logits
    # reference: the LoRA model alone, fed the prompts by hand
    lora_only = fastpeft.get_peft_model(copy.deepcopy(base), fastpeft.LoraConfig(r=2), adapter_name="lora")
    lora_only.load_state_dict({k: v for k, v in pm.state_dict().items() if "lora_" in k}, strict=False)
    emb = base.get_input_embeddings()(kw["input_ids"])
    prompts = pm.prompt_encoder["prompt"].embedding.weight.expand(2, -1, -1)
    mask = torch.cat([torch.ones(2, 3, dtype=torch.long), kw["attention_mask"]], 1)
    expect = lora_only(inputs_embeds=torch.cat([prompts, emb], 1), attention_mask=mask).logits
    assert_close(out, expect, torch.float32, "lora + prompt")
    out.pow(2).sum().backward()
    assert pm.prompt_encoder["prompt"].embedding.weight.grad is not None
    assert pm.model.model.layers[0].self_attn.q_proj.lora_A["lora"].weight.grad is not None
    pm.set_adapter("lora")
    assert_close(pm(**kw).logits, lora_only(**kw).logits, torch.float32, "lora alone")
    gen = pm.generate(input_ids=kw["input_ids"], max_new_tokens=3)  # LoRA only: the base generate
    assert torch.equal(gen, lora_only.generate(input_ids=kw["input_ids"], max_new_tokens=3))


def test_several_active_lora_adapters_equal_peft():
    base = build("hf_llama")
    torch.manual_seed(2)
    hp = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, init_lora_weights=False))
    hp.add_adapter("b", peft.LoraConfig(r=4, target_modules=["q_proj", "o_proj"], init_lora_weights=False))
    hp.base_model.set_adapter(["default", "b"])
    fp = fastpeft.get_peft_model(copy.deepcopy(base), fastpeft.LoraConfig(r=2))
    fp.add_adapter("b", fastpeft.LoraConfig(r=4, target_modules=["q_proj", "o_proj"]))
    fp.load_state_dict({k: v for k, v in hp.state_dict().items() if "lora_" in k}, strict=False)
    fp.set_adapter(["default", "b"])
    assert fp.active_adapter == ["default", "b"]
    o_h, o_f = run("hf_llama", hp), run("hf_llama", fp)
    assert_close(o_f, o_h, torch.float32, "two active adapters")
    o_h.pow(2).sum().backward()
    o_f.pow(2).sum().backward()
    g_h = {n: p.grad for n, p in hp.named_parameters() if p.grad is not None}
    g_f = {n: p.grad for n, p in fp.named_parameters() if p.grad is not None}
    assert g_h.keys() == g_f.keys() and len(g_h) == 2 * 2 * 2 + 2 * 2 * 2
    for k in g_h:
        assert_close(g_f[k], g_h[k], torch.float32, k)
    fp.merge_adapter()
    assert_close(run("hf_llama", fp), o_f.detach(), torch.float32, "both merged")


def _tokenizer(path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {f"w{i}": i for i in range(63)}
    vocab["[UNK]"] = 63
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(str(path))
    return str(path)


@pytest.mark.parametrize("text", ["w5 w9 w11", "w1 w2 w3 w4 w5 w6 w7"], ids=["repeat", "truncate"])
def test_prompt_tuning_text_init_equals_peft(text, tmp_path):
    tok = _tokenizer(tmp_path / "tok")
    base = build("hf_llama")
    kw = dict(num_virtual_tokens=5, prompt_tuning_init="TEXT", prompt_tuning_init_text=text, tokenizer_name_or_path=tok)
    hp = peft.get_peft_model(copy.deepcopy(base), peft.PromptTuningConfig(task_type="CAUSAL_LM", **kw))
    fp = fastpeft.get_peft_model(copy.deepcopy(base), fastpeft.PromptTuningConfig(**kw))
    assert torch.equal(fp.prompt_encoder["default"].embedding.weight, hp.prompt_encoder["default"].embedding.weight)
    fp.save_pretrained(str(tmp_path / "ck"))
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ck"))
    assert torch.equal(back.prompt_encoder["default"].embedding.weight, fp.prompt_encoder["default"].embedding.weight)
    with pytest.raises(ValueError, match="prompt_tuning_init_text"):
        fastpeft.PromptTuningConfig(prompt_tuning_init="TEXT")


def test_methods_stack_on_each_other_and_keep_their_own_tensors(tmp_path):
    """BitFit, Houlsby adapters and LoRA (on the adapter-wrapped projections, bias="all") in one
    GPT-2: each method keeps exactly its own tensors; two prefix adapters share an HF ViT."""
    base = build("hf_gpt2")
    pm = fastpeft.get_peft_model(copy.deepcopy(base), fastpeft.BitFitConfig())
    n_bitfit = len(pm._methods["default"].tensors())
    pm.add_adapter("ad", fastpeft.AdapterConfig(kind="houlsby", bottleneck=4))
    pm.add_adapter("l", fastpeft.LoraConfig(r=2, target_modules=["c_proj"], bias="all", init_lora_weights=False))
    assert len(pm._methods["default"].tensors()) == n_bitfit  # the adapters' biases are not BitFit's
    assert not any(".adapters." in k for k in pm._methods["l"].tensors())
    pm.set_adapter(["default", "ad", "l"])
    out = run("hf_gpt2", pm)
    out.pow(2).sum().backward()
    assert all(p.grad is not None for n in ("default", "ad", "l") for p in pm._methods[n].parameters())
    with pm.disable_adapter():
        assert torch.equal(run("hf_gpt2", pm), run("hf_gpt2", base))
    vit = build("hf_vit")
    pv = fastpeft.get_peft_model(copy.deepcopy(vit), fastpeft.PrefixTuningConfig(num_virtual_tokens=2))
    pv.add_adapter("p2", fastpeft.PrefixTuningConfig(num_virtual_tokens=3))
    with torch.no_grad():
        pv.prompt_encoder["p2"].embedding.weight.normal_()
    o1 = run("hf_vit", pv)
    pv.set_adapter("p2")
    o2 = run("hf_vit", pv)
    assert not torch.allclose(o1, o2)
    pv.delete_adapter("default")
    assert torch.equal(run("hf_vit", pv), o2)  # the shared attention routing stays for p2
    pv.delete_adapter("p2")
    assert pv.active_adapters == [] and torch.equal(run("hf_vit", pv), run("hf_vit", vit))
