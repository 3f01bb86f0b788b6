"""Per-user prefixes / prompts through ``PeftModel``: ``adapter_names=[...]`` naming prefix- or
prompt-tuning adapters gives each sample its own adapter's prefixes / prompts over one shared
frozen model (prefix attention with Bp = B for fastpeft's ViT / BERT and HF ViT; a per-sample
KV cache for HF text models), in forward and generate, and trains each adapter from its own
samples only."""
import copy

import pytest
import torch

import fastpeft

from ._models import FAMILIES, build

P = 3


def _model(family, kind, names=("u0", "u1", "u2")):
    cfg = (lambda: fastpeft.PrefixTuningConfig(num_virtual_tokens=P)) if kind == "prefix" else \
        (lambda: fastpeft.PromptTuningConfig(num_virtual_tokens=P))
    base = build(family)
    torch.manual_seed(0)
    fp = fastpeft.get_peft_model(copy.deepcopy(base), cfg(), adapter_name=names[0])
    for n in names[1:]:
        fp.add_adapter(n, cfg())
    with torch.no_grad():
        for p in fp.prompt_encoder.parameters():
            p.normal_(0, 1.0)  # prompts strong enough to change the outputs
    return fp.eval()


def _inputs(family, batch):
    kw = FAMILIES[family][1]()
    return {k: torch.cat([v] * batch)[:batch] for k, v in kw.items()}


def _out(family, o):
    return FAMILIES[family][2](o)


CASES = [("hf_llama", "prefix"), ("hf_llama", "prompt"), ("hf_gpt2", "prefix"), ("hf_gpt2", "prompt"),
         ("hf_bert", "prefix"), ("hf_vit", "prefix"), ("fp_vit", "prefix"), ("fp_bert", "prefix")]


@pytest.mark.parametrize("family,kind", CASES, ids=[f"{f}-{k}" for f, k in CASES])
def test_each_sample_gets_its_own_prompts(family, kind):
    fp = _model(family, kind)
    names = ["u2", "u0", "u2", "u1"]
    kw = _inputs(family, len(names))
    with torch.no_grad():
        mixed = _out(family, fp(**kw, adapter_names=names))
        for i, n in enumerate(names):
            fp.set_adapter(n)
            alone = _out(family, fp(**{k: v[i:i + 1] for k, v in kw.items()}))
            torch.testing.assert_close(mixed[i:i + 1], alone, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(mixed[0], mixed[1], atol=1e-3)  # different users: different outputs


@pytest.mark.parametrize("family", ["hf_llama", "hf_gpt2"])
@pytest.mark.parametrize("kind", ["prefix", "prompt"])
def test_generate_per_sample_prompts(family, kind):
    fp = _model(family, kind)
    names = ["u1", "u0", "u2", "u1"]
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(1, 60, (len(names), 5), generator=g)
    mask = torch.ones_like(ids)
    mask[2, :2] = 0  # a left-padded row
    kw = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False)
    mixed = fp.generate(input_ids=ids, attention_mask=mask, adapter_names=names, **kw)
    for i, n in enumerate(names):
        fp.set_adapter(n)
        alone = fp.generate(input_ids=ids[i:i + 1], attention_mask=mask[i:i + 1], **kw)
        assert torch.equal(mixed[i:i + 1], alone), (i, n)
    if kind == "prefix":  # beams: each sample's prefixes follow its beams
        beams = fp.generate(input_ids=ids, attention_mask=mask, adapter_names=names, num_beams=2, **kw)
        fp.set_adapter("u0")
        alone = fp.generate(input_ids=ids[1:2], attention_mask=mask[1:2], num_beams=2, **kw)
        assert torch.equal(beams[1:2], alone)


@pytest.mark.parametrize("family,kind", [("hf_llama", "prefix"), ("hf_llama", "prompt"), ("fp_vit", "prefix")])
def test_training_updates_only_each_samples_adapter(family, kind):
    fp = _model(family, kind)
    fp.train()
    for p in fp.prompt_encoder.parameters():
        p.requires_grad_(True)  # set_adapter trains one prompt adapter; here all three at once
    names = ["u1", "u1", "u2", "u1"]  # u0: no sample
    kw = _inputs(family, len(names))
    out = _out(family, fp(**kw, adapter_names=names))
    out[2].float().square().mean().backward()  # the loss of sample 2 (adapter u2) only
    got = {n: sum(p.grad.abs().sum().item() for p in fp.prompt_encoder[n].parameters() if p.grad is not None)
           for n in ("u0", "u1", "u2")}
    assert got["u2"] > 0 and got["u0"] == 0 and got["u1"] == 0, got


def test_refused_where_it_cannot_run():
    fp = _model("hf_llama", "prefix")
    kw = _inputs("hf_llama", 2)
    with pytest.raises(ValueError, match="cannot be mixed"):
        fp(**kw, adapter_names=["u0", "__base__"])
    fp.add_adapter("short", fastpeft.PrefixTuningConfig(num_virtual_tokens=P + 1))
    with pytest.raises(ValueError, match="same num_virtual_tokens"):
        fp(**kw, adapter_names=["u0", "short"])
    fp.add_adapter("pt", fastpeft.PromptTuningConfig(num_virtual_tokens=P))
    with pytest.raises(ValueError, match="one method"):
        fp(**kw, adapter_names=["u0", "pt"])
    with pytest.raises(ValueError, match="one name per sample"):
        fp(**_inputs("hf_llama", 3), adapter_names=["u0", "u1"])
