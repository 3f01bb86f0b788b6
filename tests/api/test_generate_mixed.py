"""No silent wrong results: ``generate()`` with prompt / prefix tuning uses the prompts (greedy
generate with the KV cache equals greedy decoding through PEFT's forward on the same
checkpoint), mixed-adapter batches (``adapter_names``) equal PEFT row by row or raise, and
``get_peft_model`` leaves the caller's config alone."""
import copy

import peft
import pytest
import torch

import fastpeft

from ._models import FAMILIES, assert_rows_match_peft, build
from ._models import hf_gpt2 as gpt2


def _decode_through_forward(model, ids, mask, steps):
    """Greedy decoding by running the full forward on the whole sequence at every step."""
    cur, m = ids, mask
    with torch.no_grad():
        for _ in range(steps):
            nxt = model(input_ids=cur, attention_mask=m).logits[:, -1].argmax(-1, keepdim=True)
            cur, m = torch.cat([cur, nxt], 1), torch.cat([m, torch.ones_like(nxt)], 1)
    return cur


def _peft_prompt(family, kind, tmp_path):
    base = build(family) if family != "gpt2" else gpt2()
    cfg = dict(task_type="CAUSAL_LM", num_virtual_tokens=4)
    pc = peft.PromptTuningConfig(**cfg) if kind == "prompt" else \
        peft.PrefixTuningConfig(**cfg, prefix_projection=kind == "prefix-projection", encoder_hidden_size=16)
    torch.manual_seed(3)
    hp = peft.get_peft_model(copy.deepcopy(base), pc).eval()
    with torch.no_grad():
        for p in hp.prompt_encoder.parameters():
            p.normal_(0, 1.0)  # prompts strong enough to change what is generated
    hp.save_pretrained(str(tmp_path))
    return base, hp, fastpeft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path))


@pytest.mark.parametrize("family", ["hf_llama", "gpt2"])
@pytest.mark.parametrize("kind", ["prompt", "prefix", "prefix-projection"])
def test_generate_with_prompts_equals_greedy_forward(family, kind, tmp_path):
    base, hp, fp = _peft_prompt(family, kind, tmp_path)
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(1, 60, (3, 5), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # a left-padded row
    ref = _decode_through_forward(hp, ids, mask, 6)  # PEFT's forward, recomputed every step
    assert torch.equal(_decode_through_forward(fp, ids, mask, 6), ref)
    out = fp.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    assert torch.equal(out, ref)
    plain = base.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    assert not torch.equal(out, plain)  # the prompts are used
    # the model's own default length rule keeps counting real tokens only
    dict_out = fp.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, return_dict_in_generate=True)
    assert torch.equal(dict_out.sequences, ref)


def test_generate_with_lora_and_disabled_prompts():
    base = build("hf_llama")
    fp = fastpeft.get_peft_model(copy.deepcopy(base), fastpeft.PromptTuningConfig(num_virtual_tokens=3))
    ids = torch.randint(1, 60, (2, 4), generator=torch.Generator().manual_seed(1))
    with fp.disable_adapter():
        assert torch.equal(fp.generate(input_ids=ids, max_new_tokens=4), base.generate(input_ids=ids, max_new_tokens=4))


def _two_lora(family, **extra):
    base = build(family)
    t = {"hf_llama": ["q_proj", "v_proj"], "hf_bert": ["query", "value"], "fp_vit": ["qkv"],
         "hf_vit": ["q_proj", "v_proj"]}[family]
    torch.manual_seed(0)
    hp = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, target_modules=t, init_lora_weights=False,
                                                                  **extra), adapter_name="a")
    hp.add_adapter("b", peft.LoraConfig(r=3, target_modules=t[:1], init_lora_weights=False, **extra))
    fp = fastpeft.get_peft_model(copy.deepcopy(base), fastpeft.LoraConfig(r=2, target_modules=t, **extra),
                                 adapter_name="a")
    fp.add_adapter("b", fastpeft.LoraConfig(r=3, target_modules=t[:1], **extra))
    with torch.no_grad():
        for n, p in hp.named_parameters():
            if p.requires_grad or ".b." in n or "lora_" in n:
                p.add_(0.3 * torch.randn_like(p))
    fsd = fp.state_dict()
    fp.load_state_dict({k: v for k, v in hp.state_dict().items() if k in fsd}, strict=False)
    return base, hp.eval(), fp.eval()  # PEFT refuses adapter_names in training mode


@pytest.mark.parametrize("family,extra", [("hf_llama", {}), ("hf_bert", dict(modules_to_save=["classifier"]))],
                         ids=["llama", "bert-modules_to_save"])
def test_mixed_adapter_batch_equals_peft_row_by_row(family, extra):
    base, hp, fp = _two_lora(family, **extra)
    names = ["a", "b", "__base__"] if family == "hf_llama" else ["b", "a"]
    kw = FAMILIES[family][1]()
    kw = {k: torch.cat([v, v[:1]])[:len(names)] for k, v in kw.items()}
    ours = fp(**kw, adapter_names=names).logits
    theirs = hp(**kw, adapter_names=names).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    assert_rows_match_peft(fp, ours, kw, names)  # row by row: the row's own adapter alone
    fp.set_adapter("a")
    greedy = fp.generate(input_ids=kw["input_ids"], adapter_names=names, max_new_tokens=3) \
        if family == "hf_llama" else None
    if greedy is not None:
        assert torch.equal(greedy, hp.generate(input_ids=kw["input_ids"], adapter_names=names, max_new_tokens=3))


def test_mixed_batch_on_reference_vit_and_adapters():
    base = build("fp_vit")
    fp = fastpeft.get_peft_model(copy.deepcopy(base), fastpeft.LoraConfig(r=2, target_modules=["qkv"],
                                                                         init_lora_weights=False), adapter_name="a")
    fp.add_adapter("b", fastpeft.AdapterConfig(kind="parallel", bottleneck=4, init="bert"))
    images = FAMILIES["fp_vit"][1]()["images"]
    mixed = fp(images, adapter_names=["b", "a"])
    for i, n in enumerate(["b", "a"]):
        fp.set_adapter(n)
        torch.testing.assert_close(mixed[i:i + 1], fp(images[i:i + 1]), rtol=1e-5, atol=1e-5)


def test_mixed_batch_refused_where_it_cannot_run():
    pm = fastpeft.get_peft_model(build("hf_bert"), fastpeft.PromptTuningConfig(num_virtual_tokens=2))
    kw = FAMILIES["hf_llama"][1]()
    with pytest.raises(ValueError, match="adapter_names: '__base__' rows with prompt tuning need a causal LM"):
        pm(**FAMILIES["hf_bert"][1](), adapter_names=["default", "__base__"])  # causal LMs: test_per_sample_prompts
    pb = fastpeft.get_peft_model(build("hf_bert"), fastpeft.BitFitConfig())
    with pytest.raises(ValueError, match="BitFitConfig"):
        pb(**FAMILIES["hf_bert"][1](), adapter_names=["default", "__base__"])
    pl = fastpeft.get_peft_model(build("hf_llama"), fastpeft.LoraConfig(r=2))
    with pytest.raises(ValueError, match="unknown adapters"):
        pl(**kw, adapter_names=["default", "nope"])
    with pytest.raises(ValueError, match="one name per row"):
        pl(**kw, adapter_names=["default"])
    pl.merge_adapter()
    with pytest.raises(ValueError, match="merged"):
        pl(**kw, adapter_names=["default", "default"])


def test_get_peft_model_leaves_the_callers_config_alone(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = fastpeft.LoraConfig(r=2, target_modules="all-linear", task_type="SEQ_CLS")
    before = copy.deepcopy(cfg)
    small = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2))
    big = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                                       num_attention_heads=4, num_key_value_heads=2))
    p1 = fastpeft.get_peft_model(small, cfg)
    fastpeft.get_peft_model(big, cfg)
    assert cfg == before and vars(cfg) == vars(before)
    p1.save_pretrained(str(tmp_path))
    import json
    saved = json.loads((tmp_path / "adapter_config.json").read_text())["target_modules"]
    assert saved and all(t.startswith("model.layers.0.") for t in saved)  # only the layers it has
    for c in (fastpeft.PromptTuningConfig(num_virtual_tokens=2), fastpeft.PrefixTuningConfig(num_virtual_tokens=2)):
        before = copy.deepcopy(c)
        pm = fastpeft.get_peft_model(build("hf_llama"), c)
        assert c == before and pm.peft_config["default"].num_layers == 2
