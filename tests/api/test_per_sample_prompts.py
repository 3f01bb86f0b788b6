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
    fp.add_adapter("pt", fastpeft.PromptTuningConfig(num_virtual_tokens=P))
    with pytest.raises(ValueError, match="one method"):
        fp(**kw, adapter_names=["u0", "pt"])
    with pytest.raises(ValueError, match="one name per sample"):
        fp(**_inputs("hf_llama", 3), adapter_names=["u0", "u1"])
    fp.add_adapter("l", fastpeft.LoraConfig(r=2))
    with pytest.raises(ValueError, match=r"\['l'\] cannot be mixed"):
        fp(**kw, adapter_names=["u0", "l"])


# ---- different num_virtual_tokens and "__base__" rows in one batch ---------------------------
LENS = {"u0": 3, "u1": 1, "u2": 5}
RAGGED = ["u2", "__base__", "u0", "u1", "u2", "u1"]


def _ragged_model(family, kind):
    cfg = fastpeft.PrefixTuningConfig if kind == "prefix" else fastpeft.PromptTuningConfig
    fp = fastpeft.get_peft_model(copy.deepcopy(build(family)), cfg(num_virtual_tokens=LENS["u0"]), adapter_name="u0")
    for n in ("u1", "u2"):
        fp.add_adapter(n, cfg(num_virtual_tokens=LENS[n]))
    torch.manual_seed(0)
    with torch.no_grad():
        for p in fp.prompt_encoder.parameters():
            p.normal_(0, 1.0)
    return fp.eval()


def _alone(fp, name, **kw):
    if name == "__base__":
        with fp.disable_adapter():
            return fp(**kw)
    fp.set_adapter(name)
    return fp(**kw)


def _token_part(out, kind, P, S):
    """The outputs at the text tokens (prompt tuning returns the virtual positions too)."""
    return out[:, P:] if kind == "prompt" and out.dim() == 3 and out.shape[1] == P + S else out


RAGGED_CASES = [("hf_llama", "prefix"), ("hf_llama", "prompt"), ("hf_gpt2", "prefix"), ("hf_gpt2", "prompt"),
                ("hf_bert", "prefix")]


@pytest.mark.parametrize("family,kind", RAGGED_CASES, ids=[f"{f}-{k}" for f, k in RAGGED_CASES])
def test_mixed_num_virtual_tokens_and_base_rows_equal_each_alone(family, kind):
    fp = _ragged_model(family, kind)
    kw = _inputs(family, len(RAGGED))
    S, Pm = kw["input_ids"].shape[1], max(LENS.values())
    with torch.no_grad():
        mixed = _out(family, fp(**kw, adapter_names=RAGGED))
        for i, n in enumerate(RAGGED):
            alone = _out(family, _alone(fp, n, **{k: v[i:i + 1] for k, v in kw.items()}))
            Pi = LENS.get(n, 0)
            torch.testing.assert_close(_token_part(mixed[i:i + 1], kind, Pm, S), _token_part(alone, kind, Pi, S),
                                       rtol=1e-5, atol=1e-5, msg=f"row {i} ({n})")
            if kind == "prompt" and Pi:  # the virtual positions too (the padding slots follow them)
                torch.testing.assert_close(mixed[i:i + 1, :Pi], alone[:, :Pi], rtol=1e-5, atol=1e-5)
        assert torch.isfinite(mixed).all()


def test_mixed_lengths_without_base_rows_on_an_encoder():
    """BERT prompt tuning (sequence classification, [CLS] pooler at position 0): different
    num_virtual_tokens are fine (position 0 stays the first prompt); base rows are refused."""
    fp = _ragged_model("hf_bert", "prompt")
    names = ["u2", "u0", "u1", "u2"]
    kw = _inputs("hf_bert", len(names))
    with torch.no_grad():
        mixed = _out("hf_bert", fp(**kw, adapter_names=names))
        for i, n in enumerate(names):
            alone = _out("hf_bert", _alone(fp, n, **{k: v[i:i + 1] for k, v in kw.items()}))
            torch.testing.assert_close(mixed[i:i + 1], alone, rtol=1e-5, atol=1e-5, msg=f"row {i} ({n})")
    with pytest.raises(ValueError, match="'__base__' rows with prompt tuning need a causal LM"):
        fp(**kw, adapter_names=["u2", "__base__", "u1", "u2"])


@pytest.mark.parametrize("family", ["fp_vit", "hf_vit"])
def test_prefix_attention_families_refuse_ragged_batches(family):
    fp = _ragged_model(family, "prefix")
    kw = _inputs(family, 3)
    with pytest.raises(ValueError, match="prefix_attention, which attends to every prefix key"):
        fp(**kw, adapter_names=["u0", "u1", "u0"])
    with pytest.raises(ValueError, match="__base__ rows"):
        fp(**kw, adapter_names=["u0", "__base__", "u0"])
    fp(**kw, adapter_names=["u0", "u0", "u0"])  # same lengths, no base rows: still fine


@pytest.mark.parametrize("family", ["hf_llama", "hf_gpt2"])
@pytest.mark.parametrize("kind", ["prefix", "prompt"])
def test_generate_mixed_num_virtual_tokens_and_base_rows(family, kind):
    fp = _ragged_model(family, kind)
    ids = torch.randint(1, 60, (len(RAGGED), 5), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[3, :2] = 0  # a left-padded row
    gk = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False)
    mixed = fp.generate(input_ids=ids, attention_mask=mask, adapter_names=RAGGED, **gk)
    for i, n in enumerate(RAGGED):
        row = dict(input_ids=ids[i:i + 1], attention_mask=mask[i:i + 1], **gk)
        if n == "__base__":
            with fp.disable_adapter():
                alone = fp.generate(**row)
        else:
            fp.set_adapter(n)
            alone = fp.generate(**row)
        assert torch.equal(mixed[i:i + 1], alone), (i, n)


@pytest.mark.parametrize("kind", ["prefix", "prompt"])
def test_training_mixed_lengths_gradients_equal_each_adapter_alone(kind):
    fp = _ragged_model("hf_llama", kind)
    fp.train()
    params = dict(fp.prompt_encoder.named_parameters())
    for p in params.values():
        p.requires_grad_(True)
    kw = _inputs("hf_llama", len(RAGGED))
    S, Pm = kw["input_ids"].shape[1], max(LENS.values())

    def loss(out, P):  # per-row losses over the text tokens
        return _token_part(out, kind, P, S).float().log_softmax(-1)[..., 0].mean(1)

    def grads(total):
        fp.zero_grad(set_to_none=True)
        total.backward()
        return {n: torch.zeros_like(p) if p.grad is None else p.grad.clone() for n, p in params.items()}

    mixed = grads(loss(_out("hf_llama", fp(**kw, adapter_names=RAGGED)), Pm).sum())
    expect = {n: torch.zeros_like(g) for n, g in mixed.items()}
    for i, n in enumerate(RAGGED):
        if n == "__base__":
            continue
        fp.set_adapter(n)
        for p in params.values():
            p.requires_grad_(True)
        out = _out("hf_llama", fp(**{k: v[i:i + 1] for k, v in kw.items()}))
        for k, g in grads(loss(out, LENS[n]).sum()).items():
            expect[k] += g
    for k in mixed:
        torch.testing.assert_close(mixed[k], expect[k], rtol=1e-4, atol=1e-6, msg=k)
    assert all(mixed[k].abs().sum() > 0 for k in mixed)


@pytest.mark.parametrize("kind", ["prefix", "prompt"])
def test_ragged_batch_refused_without_position_ids(kind, monkeypatch):
    fp = _ragged_model("hf_llama", kind)
    model = fp.base_model.model
    real = model.forward
    monkeypatch.setattr(model, "forward", lambda input_ids=None, attention_mask=None, inputs_embeds=None,
                        past_key_values=None, **kw: real(input_ids=input_ids, attention_mask=attention_mask,
                                                         inputs_embeds=inputs_embeds, past_key_values=past_key_values))
    kw = _inputs("hf_llama", 3)
    with pytest.raises(ValueError, match="needs explicit position ids; .*forward takes no position_ids"):
        fp(**kw, adapter_names=["u0", "u1", "u0"])
    fp(**kw, adapter_names=["u0", "u0", "u0"])  # same lengths: no padding, no position ids needed
