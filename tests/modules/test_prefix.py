"""Prefix tuning: PEFT layout, GQA shapes, per-sample prefixes, reparameterisation folding (identical
outputs), P-tuning v2 on the BERT encoder against a hand-written cat + SDPA forward."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

from fastpeft.models import BertConfig, BertForSequenceClassification, BertModel
from fastpeft.modules.prefix import PrefixEncoder, PTuningV2
from fastpeft.reference.prefix_attention import prefix_attention_reference

TIGHT = dict(atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("proj", [False, True], ids=["plain", "reparam"])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (6, 1)], ids=["mha", "gqa2", "mqa"])
def test_shapes_and_gqa_width(proj, heads, kv_heads):
    enc = PrefixEncoder(3, kv_heads, 8, 5, prefix_projection=proj, encoder_hidden_size=16)
    assert enc.prefix_width == 8 * kv_heads
    kv = enc()
    assert len(kv) == 3
    for k, v in kv:
        assert k.shape == v.shape == (1, kv_heads, 5, 8)
        assert k.is_contiguous() and v.is_contiguous()
    # usable as-is by the fused op with `heads` query heads (grouped-query)
    from fastpeft.ops.prefix_attention import prefix_attention

    q = torch.randn(2, heads, 7, 8)
    k_main, v_main = torch.randn(2, kv_heads, 7, 8), torch.randn(2, kv_heads, 7, 8)
    out = prefix_attention(q, k_main, v_main, *kv[1])
    torch.testing.assert_close(out, prefix_attention_reference(q, k_main, v_main, *kv[1]), **TIGHT)
    out.sum().backward()
    trained = [p for p in enc.parameters() if p.grad is not None]
    assert trained and all(p.grad.abs().sum() > 0 for p in trained)


def test_layout_matches_peft_prefix_encoder():
    """Same parameter names/shapes as PEFT's PrefixEncoder and the same per-layer K/V split."""
    from peft import PrefixTuningConfig
    from peft.tuners.prefix_tuning.model import PrefixEncoder as PeftPrefixEncoder

    L, H, hd, P = 3, 2, 8, 5
    for proj in (False, True):
        cfg = PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=P, token_dim=H * hd, num_layers=L,
                                 num_attention_heads=H, encoder_hidden_size=16, prefix_projection=proj)
        theirs = PeftPrefixEncoder(cfg)
        ours = PrefixEncoder(L, H, hd, P, prefix_projection=proj, encoder_hidden_size=16)
        sd = theirs.state_dict()
        assert {k: v.shape for k, v in sd.items()} == {k: v.shape for k, v in ours.state_dict().items()}
        ours.load_state_dict(sd)
        # PEFT's get_prompt: (B, P, L*2*W) -> view -> permute -> split(2): layer l = (key 2l, value 2l+1)
        pkv = theirs(torch.arange(P).unsqueeze(0).expand(2, -1))
        pkv = pkv.view(2, P, L * 2, H, hd).permute([2, 0, 3, 1, 4]).split(2)
        tol = dict(rtol=1e-6, atol=1e-6) if proj else dict(rtol=0, atol=0)  # batched MLP rounds differently
        for (k, v), ref in zip(ours(batch_size=2), pkv):
            torch.testing.assert_close(k, ref[0], **tol)
            torch.testing.assert_close(v, ref[1], **tol)


def test_fold_gives_identical_prefixes_and_outputs():
    torch.manual_seed(0)
    enc = PrefixEncoder(2, 2, 8, 4, prefix_projection=True, encoder_hidden_size=512)
    assert [n for n, _ in enc.named_parameters()] == [
        "embedding.weight", "transform.0.weight", "transform.0.bias", "transform.2.weight", "transform.2.bias"]
    assert enc.transform[0].out_features == 512 and isinstance(enc.transform[1], torch.nn.Tanh)
    before = [tuple(t.detach().clone() for t in kv) for kv in enc()]
    n_before = sum(p.numel() for p in enc.parameters())
    assert enc.fold() is enc
    assert not enc.prefix_projection and enc.transform is None
    assert enc.embedding.weight.shape == (4, 2 * 2 * 16)
    assert sum(p.numel() for p in enc.parameters()) == 4 * 64 < n_before
    for (k0, v0), (k1, v1) in zip(before, enc()):
        torch.testing.assert_close(k1, k0, rtol=0, atol=0)
        torch.testing.assert_close(v1, v0, rtol=0, atol=0)
    assert enc.fold() is enc  # folding twice is a no-op


def test_fold_identical_model_outputs_ptuning_v2():
    torch.manual_seed(0)
    model = PTuningV2(tiny_bert_cls(), 4, prefix_projection=True, encoder_hidden_size=32).eval()
    ids, mask = batch()
    y0 = model(ids, mask)
    folded = copy.deepcopy(model)
    folded.prefix_encoder.fold()
    torch.testing.assert_close(folded(ids, mask), y0, rtol=0, atol=0)


def test_per_sample_prefixes_and_expansion():
    enc = PrefixEncoder(2, 2, 4, 6)
    shared = enc()
    exp = enc(batch_size=3)
    for (k, v), (ke, ve) in zip(shared, exp):
        assert ke.shape == (3, 2, 6, 4) and ke.stride(0) == 0  # a view: one prefix for the batch
        torch.testing.assert_close(ke[2], k[0], rtol=0, atol=0)
    # per-sample prefixes: user 0 uses rows 0..2, user 1 rows 3..5
    ids = torch.tensor([[0, 1, 2], [3, 4, 5]])
    per = enc(prefix_ids=ids)
    for (k, v), (kp, vp) in zip(shared, per):
        assert kp.shape == (2, 2, 3, 4)
        torch.testing.assert_close(kp[0], k[0, :, :3], rtol=0, atol=0)
        torch.testing.assert_close(vp[1], v[0, :, 3:], rtol=0, atol=0)
    with pytest.raises(ValueError, match="prefix_ids"):
        enc(prefix_ids=torch.zeros(2, 3))
    with pytest.raises(ValueError, match="batch_size"):
        enc(batch_size=4, prefix_ids=ids)
    with pytest.raises(ValueError, match="num_kv_heads"):
        PrefixEncoder(2, 0, 4, 6)


# ---- P-tuning v2 ------------------------------------------------------------------------------
def tiny_bert_cls(**kw):
    cfg = BertConfig.tiny(vocab_size=60, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **kw)
    return BertForSequenceClassification(cfg)


def batch():
    ids = torch.tensor([[5, 8, 9, 11, 0, 0], [3, 4, 6, 8, 1, 2]])
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    return ids, mask


def manual_bert_with_prefixes(model: BertForSequenceClassification, ids, mask, kv):
    """Independent reference: positions 0..S-1 for the real tokens, prefixes concatenated into K/V."""
    bert = model.bert
    h = bert.embeddings(ids)  # position ids arange(S): the prefixes occupy no positions
    add = ((1.0 - mask.to(h.dtype)) * torch.finfo(h.dtype).min)[:, None, None, :]
    for layer, (pk, pv) in zip(bert.encoder.layer, kv):
        sa = layer.attention.self
        b, s, d = h.shape
        heads = lambda t: t.view(b, s, sa.num_attention_heads, -1).transpose(1, 2)  # noqa: E731
        ctx = prefix_attention_reference(heads(sa.query(h)), heads(sa.key(h)), heads(sa.value(h)), pk, pv,
                                         attn_mask=add.expand(b, sa.num_attention_heads, s, s))
        a = layer.attention.output(ctx.transpose(1, 2).reshape(b, s, d), h)
        h = layer.output(layer.intermediate(a), a)
    return model.classifier(bert.pooler(h))


@pytest.mark.parametrize("proj", [False, True], ids=["plain", "reparam"])
def test_ptuning_v2_matches_manual_reference_and_trains_only_prefix_and_head(proj):
    torch.manual_seed(0)
    base = tiny_bert_cls()
    m = PTuningV2(base, 5, prefix_projection=proj, encoder_hidden_size=32)
    ids, mask = batch()
    y = m(ids, mask)
    ref = manual_bert_with_prefixes(base, ids, mask, m.prefix_encoder())
    torch.testing.assert_close(y, ref, **TIGHT)
    names = {n for n, p in m.named_parameters() if p.requires_grad}
    assert names == {f"prefix_encoder.{n}" for n, _ in m.prefix_encoder.named_parameters()} | {
        "model.classifier.weight", "model.classifier.bias"}
    F.cross_entropy(y, torch.tensor([0, 2])).backward()
    for n, p in m.named_parameters():
        assert (p.grad is not None) == (n in names), n
    # padding is masked, prefixes are always visible: changing padded ids changes nothing
    ids2 = ids.clone()
    ids2[0, 4:] = 33
    torch.testing.assert_close(m(ids2, mask), y, **TIGHT)


def test_ptuning_v2_positions_unaffected_by_prefix_length():
    """The real tokens keep positions 0..S-1 whatever P is (HF BERT + PEFT would shift them by P):
    the first layer's input (word + position + type embeddings) is the prefix-free model's, bit for bit."""
    torch.manual_seed(0)
    base = tiny_bert_cls()
    ids, mask = batch()
    seen = []
    hook = base.bert.encoder.layer[0].register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach()))
    base.eval()
    base(ids, mask)
    for P in (1, 9):
        PTuningV2(base, P).eval()(ids, mask)
    hook.remove()
    assert len(seen) == 3
    for s in seen[1:]:
        torch.testing.assert_close(s, seen[0], rtol=0, atol=0)  # same (S, hidden) input, same positions


def test_ptuning_v2_with_bert_model_and_new_head():
    torch.manual_seed(0)
    bert = BertModel(BertConfig.tiny(vocab_size=60, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    m = PTuningV2(bert, 3, num_labels=4)
    ids, mask = batch()
    y = m(ids, mask)
    assert y.shape == (2, 4)
    assert m.head is m.classifier and m.encoder is bert
    assert "classifier.weight" in dict(m.named_parameters())
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable == {"prefix_encoder.embedding.weight", "classifier.weight", "classifier.bias"}
    with pytest.raises(ValueError, match="model"):
        PTuningV2(torch.nn.Linear(2, 2), 3)
    with pytest.raises(ValueError, match="pooler"):
        PTuningV2(BertModel(BertConfig.tiny(vocab_size=60), add_pooling_layer=False), 3)


def test_ptuning_v2_prefix_dropout_per_sample():
    torch.manual_seed(0)
    m = PTuningV2(tiny_bert_cls(), 4, prefix_dropout=0.5)
    ids, mask = batch()
    m.eval()
    kv = m.prefixes(2, torch.float32)
    assert kv[0][0].shape[0] == 1
    torch.testing.assert_close(m(ids, mask), m(ids, mask))
    m.train()
    kv = m.prefixes(2, torch.float32)
    k = kv[0][0]
    assert k.shape[0] == 2 and not torch.equal(k[0] == 0, k[1] == 0)  # per-sample masks
    base = m.prefix_encoder()[0][0][0]
    kept = k[0] != 0
    torch.testing.assert_close(k[0][kept], (base * 2)[kept])
    assert math.isclose(kept.float().mean().item(), 0.5, abs_tol=0.2)
    assert not torch.allclose(m(ids, mask), m(ids, mask))
