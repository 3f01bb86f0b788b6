"""get_peft_model / PeftModel on every supported model family: injection, trainable parameters,
forward, disable, merge / unmerge, multiple adapters, save / load round trips."""
import copy

import pytest
import torch
from torch import nn

import fastpeft
from fastpeft.modules.lora import LoRALinear
from fastpeft.peft_model import AdapterLayer, _head_paths
from fastpeft.testing import assert_close

from ._models import FAMILIES, build, run

ALL = list(FAMILIES)
TRANSFORMERS = ["hf_llama", "hf_bert", "hf_vit", "fp_vit", "fp_bert"]


def _lora(**kw):
    kw.setdefault("init_lora_weights", False)  # random B: the adapter changes the output
    kw.setdefault("r", 4)
    kw.setdefault("lora_alpha", 8)
    return fastpeft.LoraConfig(**kw)


@pytest.mark.parametrize("family", ALL)
def test_lora_default_targets_forward_and_grads(family):
    base = build(family)
    ref = run(family, base)
    tm = ["0", "2"] if family == "mlp" else None
    pm = fastpeft.get_peft_model(copy.deepcopy(base), _lora(target_modules=tm))
    layers = [m for m in pm.modules() if isinstance(m, LoRALinear)]
    assert layers, "no LoRALinear injected"
    trainable = {n for n, p in pm.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert all(n.startswith("base_model.model.") for n in trainable)
    out = run(family, pm)
    assert not torch.allclose(out, ref)
    out.float().pow(2).sum().backward()
    for n, p in pm.named_parameters():
        assert (p.grad is not None) == p.requires_grad, n
    with pm.disable_adapter():
        assert torch.equal(run(family, pm), ref)
    # merge / unmerge / merge_and_unload
    pm.merge_adapter()
    assert_close(run(family, pm), out.detach(), torch.float32, "merged")
    pm.unmerge()
    sd0 = base.state_dict()
    merged_model = pm.merge_and_unload()
    assert not any(isinstance(m, LoRALinear) for m in merged_model.modules())
    assert merged_model.state_dict().keys() == sd0.keys()
    assert_close(run(family, merged_model), out.detach(), torch.float32, "merge_and_unload")


def test_lora_unmerge_restores_base_exactly():
    base = build("hf_llama")
    pm = fastpeft.get_peft_model(copy.deepcopy(base), _lora(target_modules="all-linear"))
    before = {k: v.clone() for k, v in pm.state_dict().items()}
    for _ in range(3):
        pm.merge_adapter()
        pm.unmerge()
    for k, v in pm.state_dict().items():
        assert torch.equal(v, before[k]), k
    with pytest.raises(RuntimeError, match="unmerge"):
        pm.merge_adapter()
        with pm.disable_adapter():
            pass


@pytest.mark.parametrize("target,expect", [
    (["q_proj", "v_proj"], {"q_proj", "v_proj"}),
    (r".*layers\.1\.self_attn\.(q|k)_proj", {"q_proj", "k_proj"}),
    ("all-linear", {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}),
], ids=["suffix-list", "regex", "all-linear"])
def test_target_modules_forms(target, expect):
    pm = fastpeft.get_peft_model(build("hf_llama"), fastpeft.LoraConfig(target_modules=target))
    names = [n for n, m in pm.model.named_modules() if isinstance(m, LoRALinear)]
    assert {n.rpartition(".")[2] for n in names} == expect
    if isinstance(target, str) and target != "all-linear":
        assert all(".layers.1." in n for n in names) and len(names) == 2
    assert not any("lm_head" in n for n in names)


@pytest.mark.parametrize("family,head", [("hf_llama", "lm_head"), ("hf_bert", "classifier"),
                                         ("hf_vit", "classifier"), ("fp_vit", "head"),
                                         ("fp_bert", "classifier"), ("mlp", "4")])
def test_all_linear_skips_output_head(family, head):
    model = build(family)
    assert _head_paths(model) == [head]
    pm = fastpeft.get_peft_model(model, fastpeft.LoraConfig(target_modules="all-linear"))
    head_mod = pm.model.get_submodule(head)
    assert type(head_mod) is nn.Linear
    n_lin = sum(isinstance(m, LoRALinear) for m in pm.modules())
    assert n_lin == sum(type(m) is nn.Linear for m in build(family).modules()) - 1


def test_bad_targets_raise():
    with pytest.raises(ValueError, match="matched no module"):
        fastpeft.get_peft_model(build("mlp"), fastpeft.LoraConfig(target_modules=["nope"]))
    with pytest.raises(ValueError, match="adapts nn.Linear"):
        fastpeft.get_peft_model(build("hf_bert"), fastpeft.LoraConfig(target_modules=["LayerNorm"]))
    with pytest.raises(ValueError, match="target_modules"):
        fastpeft.get_peft_model(build("mlp"), fastpeft.LoraConfig())  # no default for a plain MLP


def test_lora_bias_and_modules_to_save():
    base = build("hf_bert")
    pm = fastpeft.get_peft_model(base, fastpeft.LoraConfig(target_modules=["query", "value"], bias="lora_only",
                                                          modules_to_save=["classifier"]))
    trainable = {n for n, p in pm.named_parameters() if p.requires_grad}
    assert "base_model.model.bert.encoder.layer.0.attention.self.query.base_layer.bias" in trainable
    assert "base_model.model.bert.encoder.layer.0.attention.self.key.bias" not in trainable
    # PEFT's layout: the adapter trains its own copy, the original head stays as it was
    assert {"base_model.model.classifier.modules_to_save.default.weight",
            "base_model.model.classifier.modules_to_save.default.bias"} <= trainable
    assert "base_model.model.classifier.original_module.weight" not in trainable
    pm2 = fastpeft.get_peft_model(build("hf_bert"), fastpeft.LoraConfig(target_modules=["query"], bias="all"))
    t2 = {n for n, p in pm2.named_parameters() if p.requires_grad}
    assert "base_model.model.bert.embeddings.LayerNorm.bias" in t2


def test_rslora_and_gaussian_scaling():
    pm = fastpeft.get_peft_model(build("hf_llama"), fastpeft.LoraConfig(r=16, lora_alpha=8, use_rslora=True,
                                                                        init_lora_weights="gaussian"))
    layer = pm.model.model.layers[0].self_attn.q_proj
    assert layer.scaling["default"] == pytest.approx(8 / 4)
    assert torch.count_nonzero(layer.lora_B["default"].weight) == 0


def test_multiple_adapters_add_set_delete():
    base = build("hf_llama")
    ref = run("hf_llama", base)
    pm = fastpeft.get_peft_model(copy.deepcopy(base), _lora())
    out_a = run("hf_llama", pm)
    pm.add_adapter("b", _lora(r=2, target_modules=["q_proj", "k_proj"]))
    assert pm.active_adapter == "default"
    assert torch.equal(run("hf_llama", pm), out_a)  # adding does not activate
    pm.set_adapter("b")
    out_b = run("hf_llama", pm)
    assert not torch.allclose(out_b, out_a)
    trainable = {n for n, p in pm.named_parameters() if p.requires_grad}
    assert trainable and all(".b." in n for n in trainable)
    # v_proj has no adapter "b": it runs the base layer
    v = pm.model.model.layers[0].self_attn.v_proj
    assert "b" not in v.lora_A
    with pytest.raises(ValueError, match="already exists"):
        pm.add_adapter("b", _lora())
    with pytest.raises(ValueError, match="not in"):
        pm.set_adapter("zzz")
    pm.delete_adapter("b")
    assert pm.active_adapter == "default"
    assert torch.equal(run("hf_llama", pm), out_a)
    with pm.disable_adapter():
        assert torch.equal(run("hf_llama", pm), ref)


def test_failed_add_adapter_changes_nothing():
    pm = fastpeft.get_peft_model(build("hf_llama"), _lora())
    types = [(n, type(m)) for n, m in pm.named_modules()]
    with pytest.raises(ValueError):
        pm.add_adapter("x", fastpeft.LoraConfig(target_modules=["q_proj", "input_layernorm"]))
    assert [(n, type(m)) for n, m in pm.named_modules()] == types
    assert "x" not in pm.peft_config
    assert not any("x" in m.lora_A for m in pm.modules() if isinstance(m, LoRALinear))


@pytest.mark.parametrize("family", TRANSFORMERS)
@pytest.mark.parametrize("kind", ["houlsby", "pfeiffer", "parallel"])
def test_adapters_every_family(family, kind):
    base = build(family)
    ref = run(family, base)
    if family == "hf_llama" and kind == "parallel":
        pass  # pre-norm blocks: the adapter reads the residual captured from post_attention_layernorm
    pm = fastpeft.get_peft_model(copy.deepcopy(base), fastpeft.AdapterConfig(kind=kind, bottleneck=8))
    n_blocks = 2
    per = 8 * 32 + 8 + 8 * 32 + 32
    sites = {"houlsby": 2, "pfeiffer": 1, "parallel": 1}[kind]
    assert pm.get_nb_trainable_parameters()[0] == n_blocks * sites * per
    # "lora" init: up = 0, a fresh adapter is an exact identity
    assert_close(run(family, pm), ref, torch.float32, "identity at init")
    for m in pm.modules():
        if isinstance(m, fastpeft.Adapter) or isinstance(m, fastpeft.ParallelAdapter):
            with torch.no_grad():
                m.up.weight.normal_(0, 0.5)
    out = run(family, pm)
    assert (out - ref).abs().max() > 1e-6
    out.float().pow(2).sum().backward()
    grads = [p.grad for p in pm.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
    with pm.disable_adapter():
        assert torch.equal(run(family, pm), ref)
    with pytest.raises(ValueError, match="cannot be folded"):
        pm.merge_and_unload()


def test_adapter_placement_houlsby_after_attention_and_ffn():
    pm = fastpeft.get_peft_model(build("hf_bert"), fastpeft.AdapterConfig(kind="houlsby", reduction_factor=4))
    wrapped = sorted(n for n, m in pm.model.named_modules() if isinstance(m, AdapterLayer))
    assert wrapped == [f"bert.encoder.layer.{i}.{s}" for i in range(2)
                       for s in ("attention.output.dense", "output.dense")]
    assert pm.model.bert.encoder.layer[0].output.dense.adapters["default"].bottleneck == 8
    pv = fastpeft.get_peft_model(build("fp_vit"), fastpeft.AdapterConfig(kind="pfeiffer"))
    assert [n for n, m in pv.model.named_modules() if isinstance(m, AdapterLayer)] == \
        ["blocks.0.mlp.fc2", "blocks.1.mlp.fc2"]
    pa = fastpeft.get_peft_model(build("fp_vit"), fastpeft.AdapterConfig(kind="adaptformer"))
    slot = pa.model.blocks[0].parallel_adapter
    assert isinstance(slot.adapters["default"], fastpeft.ParallelAdapter)
    assert slot.adapters["default"].scaling == 0.1


def test_adaptformer_matches_formula_on_fastpeft_vit():
    base = build("fp_vit")
    pm = fastpeft.get_peft_model(copy.deepcopy(base), fastpeft.AdapterConfig(kind="parallel", bottleneck=4,
                                                                            init="bert", scaling=0.5))
    x = torch.randn(2, 5, 32)
    blk, ref_blk = pm.model.blocks[0], base.blocks[0]
    ad = blk.parallel_adapter.adapters["default"]
    h = x + ref_blk.attn(ref_blk.norm1(x))
    expect = h + ref_blk.mlp(ref_blk.norm2(h)) + 0.5 * ad.up(torch.relu(ad.down(h)))
    assert_close(blk(x), expect, torch.float32, "adaptformer block")


def test_adapters_on_plain_module_raise():
    with pytest.raises(ValueError, match="no transformer blocks"):
        fastpeft.get_peft_model(build("mlp"), fastpeft.AdapterConfig())


def test_paper_parameter_counts_vit_b16():
    """AdaptFormer (bottleneck 64) and BitFit on a ViT-B/16 shape (built on the meta device: only
    shapes matter for counting)."""
    from fastpeft.models import ViT, ViTConfig
    with torch.device("meta"):
        vit = ViT(ViTConfig.base())
    pm = fastpeft.get_peft_model(vit, fastpeft.AdapterConfig(kind="adaptformer", bottleneck=64))
    assert pm.get_nb_trainable_parameters()[0] == 1_189_632  # 12 x (768*64 + 64 + 64*768 + 768)
    with torch.device("meta"):
        vit = ViT(ViTConfig.base())
    pb = fastpeft.get_peft_model(vit, fastpeft.BitFitConfig())
    assert pb.get_nb_trainable_parameters()[0] == 102_912  # every bias + LayerNorm beta, head excluded


@pytest.mark.parametrize("family", ["hf_bert", "hf_vit", "fp_vit", "fp_bert", "mlp"])
def test_bitfit(family):
    base = build(family)
    ref = run(family, base)
    pm = fastpeft.get_peft_model(copy.deepcopy(base), fastpeft.BitFitConfig())
    heads = _head_paths(base)
    trainable = [n.removeprefix("base_model.model.") for n, p in pm.named_parameters() if p.requires_grad]
    expect = [n for n, _ in base.named_parameters() if n.endswith(".bias") and
              not any(n.startswith(h + ".") for h in heads)]
    assert trainable == expect
    out = run(family, pm)
    out.float().pow(2).sum().backward()
    opt = torch.optim.SGD([p for p in pm.parameters() if p.requires_grad], lr=0.5)
    opt.step()
    assert not torch.allclose(run(family, pm), ref)
    with pm.disable_adapter():
        assert torch.equal(run(family, pm), ref)
    assert not torch.allclose(run(family, pm), ref)  # trained biases come back after the block


def test_bitfit_without_biases_raises():
    with pytest.raises(ValueError, match="no bias"):
        fastpeft.get_peft_model(build("hf_llama"), fastpeft.BitFitConfig())


@pytest.mark.parametrize("deep", [False, True], ids=["shallow", "deep"])
def test_vpt_on_fastpeft_vit(deep):
    base = build("fp_vit")
    ref = run("fp_vit", base)
    pm = fastpeft.get_peft_model(copy.deepcopy(base), fastpeft.VPTConfig(num_prompts=3, deep=deep,
                                                                        modules_to_save=["head"]))
    assert pm.get_nb_trainable_parameters()[0] == (2 if deep else 1) * 3 * 32 + 32 * 3 + 3
    assert pm.model.num_prefix_tokens == 1
    out = run("fp_vit", pm)
    assert out.shape == ref.shape and not torch.allclose(out, ref)
    assert pm.model.num_prefix_tokens == 1  # raised only while prompts are in the sequence
    out.sum().backward()
    assert pm.prompt_encoder["default"].prompt_embeddings.grad is not None
    with pm.disable_adapter():
        assert torch.equal(run("fp_vit", pm), ref)
    # the ViT is registered once (not again under the VPT module)
    assert not any(n.startswith("prompt_encoder.default.vit") for n, _ in pm.named_parameters())


def test_prefix_tuning_fastpeft_vit_matches_concatenated_attention():
    """Prefix tuning through the fused prefix attention equals attention over [prefix ; tokens],
    with PEFT's prefix layout (P, layers·2·dim): layer i's keys are slot 2i, values 2i+1."""
    import torch.nn.functional as F
    base = build("fp_vit")
    pm = fastpeft.get_peft_model(copy.deepcopy(base), fastpeft.PrefixTuningConfig(num_virtual_tokens=3))
    assert pm.get_nb_trainable_parameters()[0] == 3 * 2 * 2 * 32
    images = FAMILIES["fp_vit"][1]()["images"]
    out = pm(images)
    P, H, hd = 3, 4, 8
    pre = pm.prompt_encoder["default"].embedding.weight.view(P, 4, H, hd).permute(1, 2, 0, 3)  # (2L, H, P, hd)
    x = base.embed(images)
    for i, blk in enumerate(base.blocks):
        h = blk.norm1(x)
        B, T, D = h.shape
        q, k, v = blk.attn.qkv(h).reshape(B, T, 3, H, hd).permute(2, 0, 3, 1, 4).unbind(0)
        k = torch.cat([pre[2 * i].expand(B, -1, -1, -1), k], 2)
        v = torch.cat([pre[2 * i + 1].expand(B, -1, -1, -1), v], 2)
        x = x + blk.attn.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, T, D))
        x = x + blk.mlp(blk.norm2(x))
    expect = base.forward_head(base.norm(x))
    assert_close(out, expect, torch.float32, "prefix vit")
    out.sum().backward()
    assert pm.prompt_encoder["default"].embedding.weight.grad is not None
    with pm.disable_adapter():
        assert torch.equal(pm(images), base(images))


def test_prefix_tuning_fastpeft_bert_runs_and_trains():
    base = build("fp_bert")
    pm = fastpeft.get_peft_model(copy.deepcopy(base), fastpeft.PrefixTuningConfig(num_virtual_tokens=3))
    out = run("fp_bert", pm)
    assert out.shape == (2, 3) and (out - run("fp_bert", base)).abs().max() > 0
    out.sum().backward()
    assert pm.prompt_encoder["default"].embedding.weight.grad.abs().sum() > 0


def test_prompt_tuning_fastpeft_bert():
    base = build("fp_bert")
    pm = fastpeft.get_peft_model(copy.deepcopy(base), fastpeft.PromptTuningConfig(num_virtual_tokens=4,
                                                                                 modules_to_save=["classifier"]))
    assert pm.get_nb_trainable_parameters()[0] == 4 * 32 + 32 * 3 + 3
    out = run("fp_bert", pm)
    emb = base.bert.embeddings.word_embeddings(FAMILIES["fp_bert"][1]()["input_ids"])
    prompts = pm.prompt_encoder["default"].embedding.weight
    mask = torch.cat([torch.ones(2, 4, dtype=torch.long), FAMILIES["fp_bert"][1]()["attention_mask"]], 1)
    expect = base(inputs_embeds=torch.cat([prompts.expand(2, -1, -1), emb], 1), attention_mask=mask)
    assert_close(out, expect, torch.float32, "prompt tuning")


def test_prompt_methods_run_one_at_a_time():
    pm = fastpeft.get_peft_model(build("hf_llama"), fastpeft.PromptTuningConfig(num_virtual_tokens=2))
    pm.add_adapter("l", fastpeft.LoraConfig())  # LoRA together with a prompt method (tests/api/test_composition.py)
    pm.add_adapter("p2", fastpeft.PromptTuningConfig(num_virtual_tokens=3))
    with pytest.raises(ValueError, match="one prompt-learning adapter"):
        pm.set_adapter(["default", "p2"])
    with pytest.raises(ValueError, match="VPTConfig"):
        fastpeft.get_peft_model(build("mlp"), fastpeft.VPTConfig())


def test_trainable_parameter_report(capsys):
    pm = fastpeft.get_peft_model(build("hf_llama"), fastpeft.LoraConfig(r=4, target_modules=["q_proj"]))
    t, a = pm.get_nb_trainable_parameters()
    assert t == 2 * (4 * 32 + 32 * 4)
    assert a == sum(p.numel() for p in build("hf_llama").parameters()) + t
    pm.print_trainable_parameters()
    assert f"trainable params: {t:,d} || all params: {a:,d}" in capsys.readouterr().out


def test_attribute_delegation_and_call():
    pm = fastpeft.get_peft_model(build("fp_vit"), fastpeft.LoraConfig())
    assert pm.config is pm.get_base_model().config
    assert pm.forward_features(FAMILIES["fp_vit"][1]()["images"]).shape == (2, 5, 32)


@pytest.mark.parametrize("family", ["hf_vit", "hf_llama", "hf_bert"])
def test_parallel_adapter_reads_residual_stream_hf(family):
    """AdaptFormer on HF layers: the adapter's input is the residual stream entering the FFN
    (pre-norm: the input of the norm before the MLP; BERT: the FFN output's residual input) and
    its output is added beside the MLP."""
    base = build(family)
    pm = fastpeft.get_peft_model(copy.deepcopy(base), fastpeft.AdapterConfig(kind="parallel", bottleneck=4,
                                                                            init="bert", scaling=0.7))
    layers = {"hf_vit": lambda m: m.vit.layers, "hf_llama": lambda m: m.model.layers,
              "hf_bert": lambda m: m.bert.encoder.layer}[family]
    seen = {}
    if family == "hf_bert":
        site = layers(pm.model)[0].output
        site.register_forward_hook(lambda mod, args, out: seen.update(x=args[1], h=args[0], y=out))
    else:
        site = layers(pm.model)[0].mlp
        norm = layers(pm.model)[0].layernorm_after if family == "hf_vit" else \
            layers(pm.model)[0].post_attention_layernorm
        norm.register_forward_hook(lambda mod, args, out: seen.update(x=args[0]))
        site.register_forward_hook(lambda mod, args, out: seen.update(h=args[0], y=out))
    run(family, pm)
    ad = site.adapters["default"]
    branch = 0.7 * ad.up(torch.relu(ad.down(seen["x"])))
    if family == "hf_bert":
        b = site.base_layer
        expect = b.LayerNorm(b.dense(seen["h"]) + seen["x"] + branch)
    else:
        expect = site.base_layer(seen["h"]) + branch
    assert_close(seen["y"], expect, torch.float32, "parallel site")


def test_unload_drops_lora_without_merging():
    base = build("hf_llama")
    ref = run("hf_llama", base)
    pm = fastpeft.get_peft_model(copy.deepcopy(base), _lora())
    pm.merge_adapter()
    plain = pm.unload()
    assert not any(isinstance(m, LoRALinear) for m in plain.modules())
    assert torch.equal(run("hf_llama", plain), ref)
